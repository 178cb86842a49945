//! Admission: who may join the mesh.
//!
//! `meshpeer init` creates the **network key** (ed25519). A join **token** is a
//! *delegation*: the network key signs `(network, token id, join key,
//! expiry)`, and the token carries the join key's secret half. A joiner proves
//! it holds a token by signing its own node key with the join key; the result,
//! an [`Admission`] credential, is self-contained: any member can check the
//! chain `network key → delegation → node key` without asking anyone, so a
//! joiner needs exactly one reachable member. Credentials travel in the node's
//! TLS certificate (so QUIC connections are mutually authenticated) and in its
//! membership record.
//!
//! Designed for later revocation and expiry: every credential names its token
//! id and admission time, so a revocation list of token ids (signed by the
//! network key) and an expiry check slot in at [`verify_admission`].

use std::net::Ipv4Addr;

use base64::Engine;
use ed25519_dalek::SigningKey;
use ipnet::Ipv4Net;
use rand::{rngs::OsRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::proto::{self, domain, PublicKeyBytes, Signed, WireError};

/// Text prefix of a version-1 token.
pub const TOKEN_PREFIX: &str = "mp1.";

/// What a delegation (the signed part of a token) says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    pub network_key: PublicKeyBytes,
    pub cidr_addr: Ipv4Addr,
    pub cidr_prefix: u8,
    pub token_id: [u8; 16],
    pub join_key: PublicKeyBytes,
    /// Unix seconds after which the token admits nobody new; 0 = never.
    pub expires_at: u64,
}

/// A join token: the network-signed delegation plus the join key's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub delegation: Signed,
    pub join_secret: [u8; 32],
}

/// What an admission credential says (signed by the join key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionBody {
    pub delegation: Signed,
    pub node_key: PublicKeyBytes,
    /// Unix seconds at which the node admitted itself with the token.
    pub admitted_at: u64,
}

/// The network a credential or token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub key: PublicKeyBytes,
    pub cidr: Ipv4Net,
}

impl Network {
    /// The cluster id used in gossip: networks never cross-talk.
    pub fn id(&self) -> String {
        format!("meshpeer-{}", &proto::node_id_string(&self.key)[..16])
    }
}

/// A credential that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAdmission {
    pub network: Network,
    pub node_key: PublicKeyBytes,
    pub token_id: [u8; 16],
    pub admitted_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error("not a meshpeer token (it should start with {TOKEN_PREFIX})")]
    TokenPrefix,
    #[error("token is not valid base64")]
    TokenBase64,
    #[error("token is corrupt: {0}")]
    TokenWire(WireError),
    #[error("credential is corrupt: {0}")]
    Wire(#[from] WireError),
    #[error("credential belongs to another network")]
    WrongNetwork,
    #[error("the token's join key does not match its delegation")]
    JoinKeyMismatch,
    #[error("network prefix /{0} is invalid")]
    BadCidr(u8),
    #[error("token expired (it admitted nodes until unix time {expires_at}, admission at {admitted_at})")]
    Expired { expires_at: u64, admitted_at: u64 },
    #[error("credential is for node {claimed}, presented by {actual}")]
    NodeMismatch { claimed: String, actual: String },
}

/// Creates the signed delegation of a new token.
pub fn issue_token(network_secret: &SigningKey, cidr: Ipv4Net, expires_at: u64) -> Token {
    let mut token_id = [0u8; 16];
    OsRng.fill_bytes(&mut token_id);
    issue_token_with(
        network_secret,
        cidr,
        expires_at,
        token_id,
        SigningKey::generate(&mut OsRng),
    )
}

/// [`issue_token`] with a chosen token id and join key (test vectors).
pub fn issue_token_with(
    network_secret: &SigningKey,
    cidr: Ipv4Net,
    expires_at: u64,
    token_id: [u8; 16],
    join: SigningKey,
) -> Token {
    let delegation = Delegation {
        network_key: network_secret.verifying_key().to_bytes(),
        cidr_addr: cidr.network(),
        cidr_prefix: cidr.prefix_len(),
        token_id,
        join_key: join.verifying_key().to_bytes(),
        expires_at,
    };
    let body = proto::encode(&delegation);
    let signature = proto::sign(network_secret, domain::TOKEN, &body);
    Token {
        delegation: Signed { body, signature },
        join_secret: join.to_bytes(),
    }
}

impl Token {
    /// The text form users paste: `mp1.` + URL-safe base64.
    pub fn to_text(&self) -> String {
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(proto::encode(self))
        )
    }

    /// Parses and checks a token: its delegation must be signed by the network
    /// key it names, and the secret must match the delegated join key.
    pub fn parse(text: &str) -> Result<(Token, Delegation), AdmissionError> {
        let b64 = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(AdmissionError::TokenPrefix)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| AdmissionError::TokenBase64)?;
        let token: Token = proto::decode("token", &bytes).map_err(AdmissionError::TokenWire)?;
        let delegation = verify_delegation(&token.delegation, None)?;
        let join = SigningKey::from_bytes(&token.join_secret);
        if join.verifying_key().to_bytes() != delegation.join_key {
            return Err(AdmissionError::JoinKeyMismatch);
        }
        Ok((token, delegation))
    }

    /// Uses the token to admit `node_key`: the credential a node presents.
    pub fn admit(&self, node_key: PublicKeyBytes, now_unix: u64) -> Signed {
        let body = proto::encode(&AdmissionBody {
            delegation: self.delegation.clone(),
            node_key,
            admitted_at: now_unix,
        });
        let join = SigningKey::from_bytes(&self.join_secret);
        let signature = proto::sign(&join, domain::ADMISSION, &body);
        Signed { body, signature }
    }
}

fn verify_delegation(
    signed: &Signed,
    expected_network: Option<&PublicKeyBytes>,
) -> Result<Delegation, AdmissionError> {
    let d: Delegation = proto::decode("delegation", &signed.body)?;
    if let Some(expected) = expected_network {
        if &d.network_key != expected {
            return Err(AdmissionError::WrongNetwork);
        }
    }
    proto::verify(
        &d.network_key,
        domain::TOKEN,
        &signed.body,
        &signed.signature,
        "token delegation",
    )?;
    if d.cidr_prefix > 30 {
        return Err(AdmissionError::BadCidr(d.cidr_prefix));
    }
    Ok(d)
}

/// Checks an admission credential for `network_key`. Pure: `now` is not read
/// here; expiry is judged against the admission time the credential states.
pub fn verify_admission(
    credential: &Signed,
    network_key: &PublicKeyBytes,
) -> Result<VerifiedAdmission, AdmissionError> {
    let body: AdmissionBody = proto::decode("admission", &credential.body)?;
    let d = verify_delegation(&body.delegation, Some(network_key))?;
    proto::verify(
        &d.join_key,
        domain::ADMISSION,
        &credential.body,
        &credential.signature,
        "admission",
    )?;
    if d.expires_at != 0 && body.admitted_at > d.expires_at {
        return Err(AdmissionError::Expired {
            expires_at: d.expires_at,
            admitted_at: body.admitted_at,
        });
    }
    let cidr = Ipv4Net::new(d.cidr_addr, d.cidr_prefix)
        .map_err(|_| AdmissionError::BadCidr(d.cidr_prefix))?;
    Ok(VerifiedAdmission {
        network: Network {
            key: d.network_key,
            cidr,
        },
        node_key: body.node_key,
        token_id: d.token_id,
        admitted_at: body.admitted_at,
    })
}

/// Verifies that `credential` admits exactly `node_key` into `network_key`.
pub fn verify_admission_of(
    credential: &Signed,
    network_key: &PublicKeyBytes,
    node_key: &PublicKeyBytes,
) -> Result<VerifiedAdmission, AdmissionError> {
    let v = verify_admission(credential, network_key)?;
    if &v.node_key != node_key {
        return Err(AdmissionError::NodeMismatch {
            claimed: proto::short_key(&v.node_key),
            actual: proto::short_key(node_key),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> (SigningKey, Ipv4Net) {
        (
            SigningKey::from_bytes(&[1; 32]),
            "10.77.0.0/16".parse().unwrap(),
        )
    }

    #[test]
    fn token_round_trip_and_admission() {
        let (nk, cidr) = net();
        let token = issue_token(&nk, cidr, 0);
        let (parsed, d) = Token::parse(&token.to_text()).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(d.cidr_prefix, 16);
        let node = [9u8; 32];
        let cred = parsed.admit(node, 1000);
        let v = verify_admission_of(&cred, &nk.verifying_key().to_bytes(), &node).unwrap();
        assert_eq!(v.network.cidr, cidr);
        assert_eq!(v.admitted_at, 1000);
    }

    #[test]
    fn foreign_network_and_forged_credentials_are_rejected() {
        let (nk, cidr) = net();
        let other = SigningKey::from_bytes(&[2; 32]);
        let token = issue_token(&other, cidr, 0);
        let cred = token.admit([9; 32], 5);
        assert_eq!(
            verify_admission(&cred, &nk.verifying_key().to_bytes()),
            Err(AdmissionError::WrongNetwork)
        );
        // A credential for node A presented by node B.
        let token = issue_token(&nk, cidr, 0);
        let cred = token.admit([9; 32], 5);
        assert!(matches!(
            verify_admission_of(&cred, &nk.verifying_key().to_bytes(), &[8; 32]),
            Err(AdmissionError::NodeMismatch { .. })
        ));
        // Tampering with the body breaks the join-key signature.
        let mut bad = cred.clone();
        let last = bad.body.len() - 1;
        bad.body[last] ^= 1;
        assert!(verify_admission(&bad, &nk.verifying_key().to_bytes()).is_err());
    }

    #[test]
    fn expired_tokens_admit_nobody_new() {
        let (nk, cidr) = net();
        let token = issue_token(&nk, cidr, 100);
        let late = token.admit([9; 32], 101);
        assert!(matches!(
            verify_admission(&late, &nk.verifying_key().to_bytes()),
            Err(AdmissionError::Expired { .. })
        ));
        assert!(
            verify_admission(&token.admit([9; 32], 100), &nk.verifying_key().to_bytes()).is_ok()
        );
    }

    #[test]
    fn bad_token_text_gives_clear_errors() {
        assert_eq!(
            Token::parse("hello").unwrap_err(),
            AdmissionError::TokenPrefix
        );
        assert_eq!(
            Token::parse("mp1.!!!").unwrap_err(),
            AdmissionError::TokenBase64
        );
        assert!(matches!(
            Token::parse("mp1.AAAA").unwrap_err(),
            AdmissionError::TokenWire(_)
        ));
        // A token whose secret half was swapped.
        let (nk, cidr) = net();
        let mut t = issue_token(&nk, cidr, 0);
        t.join_secret = [3; 32];
        assert_eq!(
            Token::parse(&t.to_text()).unwrap_err(),
            AdmissionError::JoinKeyMismatch
        );
    }
}
