//! Admission: who may join the mesh, until when, and who was thrown out.
//!
//! `meshpeer init` creates the **network key** (ed25519). A join **token** is
//! a *delegation*: the network key signs `(network, token id, join key,
//! expiry, allowed routes)`, and the token carries the join key's secret
//! half. A joiner signs its own node key with the join key (an
//! [`Admission`](AdmissionBody)). The member that admits it (its seed)
//! checks the token against *its own* clock and revocation list and signs a
//! **stamp** with its own time; `init` stamps itself with the network key.
//! Admission plus stamp is a member's **credential**: anyone can check the
//! chain `network key → delegation → node key` and the stamp offline, so a
//! joiner needs exactly one reachable member, the network key never leaves
//! the `init` node, and a token's expiry holds (the joiner cannot choose the
//! stamp time). A **revocation list**, signed by the network key, names
//! node keys and token ids that are out for good. See proto/PROTOCOL.md §2.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use base64::Engine;
use ed25519_dalek::SigningKey;
use ipnet::Ipv4Net;
use rand::{rngs::OsRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::proto::{self, domain, PublicKeyBytes, Route, Signed, WireError};

/// Text prefix of a version-2 token.
pub const TOKEN_PREFIX: &str = "mp2.";
/// How far in the future a stamp may lie (clock skew between members).
pub const MAX_SKEW_SECS: u64 = 600;
/// Most entries of a revocation list.
pub const MAX_REVOCATIONS: usize = 1024;

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
    /// Subnets members admitted with this token may advertise as routes.
    pub allow_routes: Vec<Route>,
}

/// A join token: the network-signed delegation plus the join key's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub delegation: Signed,
    pub join_secret: [u8; 32],
}

/// What an admission credential says (signed by the join key). Its
/// `admitted_at` is the joiner's own claim and is not trusted; the stamp's
/// time is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionBody {
    pub delegation: Signed,
    pub node_key: PublicKeyBytes,
    pub admitted_at: u64,
}

/// Who signed a stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stamper {
    /// The network key (the `init` node stamping itself).
    Network,
    /// A member, with its own admission (checked one level deep).
    Member {
        node_key: PublicKeyBytes,
        admission: Signed,
    },
}

/// The admitting member's statement: "I admitted `node_key` with token
/// `token_id` at `admitted_at` (my clock)".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StampBody {
    pub network_key: PublicKeyBytes,
    pub node_key: PublicKeyBytes,
    pub token_id: [u8; 16],
    pub admitted_at: u64,
    pub stamper: Stamper,
}

/// What a node presents in its TLS certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub admission: Signed,
    /// `None` for a joiner that has not been stamped yet.
    pub stamp: Option<Signed>,
}

/// One revoked thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Revoked {
    Node(PublicKeyBytes),
    Token([u8; 16]),
}

/// The network's revocations, signed by the network key; a newer list
/// replaces an older one (each list is the full set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub network_key: PublicKeyBytes,
    pub issued_at_ms: u64,
    pub entries: Vec<Revoked>,
}

/// The network a credential or token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub key: PublicKeyBytes,
    pub cidr: Ipv4Net,
}

impl Network {
    /// The cluster id used in gossip: networks (and protocol versions) never
    /// cross-talk.
    pub fn id(&self) -> String {
        format!("meshpeer2-{}", &proto::node_id_string(&self.key)[..16])
    }
}

/// A credential that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAdmission {
    pub network: Network,
    pub node_key: PublicKeyBytes,
    pub token_id: [u8; 16],
    /// When it was admitted: the stamp's time (for a joiner, its own claim).
    pub admitted_at: u64,
    pub expires_at: u64,
    pub allow_routes: Vec<Route>,
    /// Stamped by the network key itself (the `init` node): may advertise
    /// any route.
    pub by_network: bool,
    /// The stamp's signature (unpredictable to the member itself: relay
    /// choice hashes it). Empty for a joiner.
    pub stamp_signature: Vec<u8>,
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
    #[error("the token expired at {} (admission at {})", fmt_unix(*expires_at), fmt_unix(*at))]
    Expired { expires_at: u64, at: u64 },
    #[error("credential is for node {claimed}, presented by {actual}")]
    NodeMismatch { claimed: String, actual: String },
    #[error("not admitted yet: the credential has no stamp")]
    Unstamped,
    #[error("the stamp does not match the admission ({0})")]
    StampMismatch(&'static str),
    #[error("the stamp is dated {} , more than {MAX_SKEW_SECS} s after our clock ({})", fmt_unix(*at), fmt_unix(*now))]
    StampFromFuture { at: u64, now: u64 },
    #[error("{0} is revoked")]
    Revoked(String),
    /// The member that stamped this admission was revoked since: the stamp
    /// is void, the admission itself may still be good (the member asks
    /// another member for a new stamp, proto/PROTOCOL.md §2).
    #[error("the member that admitted it ({0}) is revoked: its stamp is void")]
    StamperRevoked(String),
    #[error("revocation list holds more than {MAX_REVOCATIONS} entries")]
    TooManyRevocations,
}

/// A unix time as `YYYY-MM-DD HH:MM:SS UTC` (for messages).
pub fn fmt_unix(t: u64) -> String {
    let days = t / 86_400;
    let secs = t % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Creates the signed delegation of a new token.
pub fn issue_token(
    network_secret: &SigningKey,
    cidr: Ipv4Net,
    expires_at: u64,
    allow_routes: Vec<Route>,
) -> Token {
    let mut token_id = [0u8; 16];
    OsRng.fill_bytes(&mut token_id);
    issue_token_with(
        network_secret,
        cidr,
        expires_at,
        allow_routes,
        token_id,
        SigningKey::generate(&mut OsRng),
    )
}

/// [`issue_token`] with a chosen token id and join key (test vectors).
pub fn issue_token_with(
    network_secret: &SigningKey,
    cidr: Ipv4Net,
    expires_at: u64,
    allow_routes: Vec<Route>,
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
        allow_routes,
    };
    let body = proto::encode(&delegation);
    let signature = proto::sign(network_secret, domain::TOKEN, &body);
    Token {
        delegation: Signed { body, signature },
        join_secret: join.to_bytes(),
    }
}

impl Token {
    /// The text form users paste: `mp2.` + URL-safe base64.
    pub fn to_text(&self) -> String {
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(proto::encode(self))
        )
    }

    /// Parses and checks a token's text: the delegation must be signed by the
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

    /// Uses the token to admit `node_key`: the credential a joiner presents.
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

/// Signs a stamp: `signer` is the network key (with [`Stamper::Network`])
/// or the admitting member's node key (with [`Stamper::Member`]).
pub fn stamp(
    signer: &SigningKey,
    stamper: Stamper,
    network_key: PublicKeyBytes,
    node_key: PublicKeyBytes,
    token_id: [u8; 16],
    now_unix: u64,
) -> Signed {
    let body = proto::encode(&StampBody {
        network_key,
        node_key,
        token_id,
        admitted_at: now_unix,
        stamper,
    });
    let signature = proto::sign(signer, domain::STAMP, &body);
    Signed { body, signature }
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

/// Checks an admission (without a stamp) of `node_key` into `network_key`:
/// the delegation chain only.
fn verify_admission_chain(
    credential: &Signed,
    network_key: &PublicKeyBytes,
    node_key: &PublicKeyBytes,
) -> Result<(AdmissionBody, Delegation), AdmissionError> {
    let body: AdmissionBody = proto::decode("admission", &credential.body)?;
    let d = verify_delegation(&body.delegation, Some(network_key))?;
    proto::verify(
        &d.join_key,
        domain::ADMISSION,
        &credential.body,
        &credential.signature,
        "admission",
    )?;
    if &body.node_key != node_key {
        return Err(AdmissionError::NodeMismatch {
            claimed: proto::short_key(&body.node_key),
            actual: proto::short_key(node_key),
        });
    }
    Ok((body, d))
}

fn verified(
    d: Delegation,
    node_key: PublicKeyBytes,
    admitted_at: u64,
    by_network: bool,
    stamp_signature: Vec<u8>,
) -> Result<VerifiedAdmission, AdmissionError> {
    let cidr = Ipv4Net::new(d.cidr_addr, d.cidr_prefix)
        .map_err(|_| AdmissionError::BadCidr(d.cidr_prefix))?;
    Ok(VerifiedAdmission {
        network: Network {
            key: d.network_key,
            cidr,
        },
        node_key,
        token_id: d.token_id,
        admitted_at,
        expires_at: d.expires_at,
        allow_routes: d.allow_routes,
        by_network,
        stamp_signature,
    })
}

/// Checks a joiner's admission (no stamp yet) at `now_unix`: the chain, the
/// token unexpired now, and nothing revoked. What a seed checks before it
/// stamps.
pub fn verify_joiner(
    admission: &Signed,
    network_key: &PublicKeyBytes,
    node_key: &PublicKeyBytes,
    now_unix: u64,
    revoked: &Revocations,
) -> Result<VerifiedAdmission, AdmissionError> {
    let (body, d) = verify_admission_chain(admission, network_key, node_key)?;
    revoked.check(node_key, &d.token_id)?;
    if d.expires_at != 0 && now_unix > d.expires_at {
        return Err(AdmissionError::Expired {
            expires_at: d.expires_at,
            at: now_unix,
        });
    }
    verified(d, body.node_key, body.admitted_at, false, Vec::new())
}

/// Checks a member's credential (admission and stamp) for `node_key` in
/// `network_key` at `now_unix` (proto/PROTOCOL.md §2).
pub fn verify_credential(
    admission: &Signed,
    stamp: &Signed,
    network_key: &PublicKeyBytes,
    node_key: &PublicKeyBytes,
    now_unix: u64,
    revoked: &Revocations,
) -> Result<VerifiedAdmission, AdmissionError> {
    let (body, d) = verify_admission_chain(admission, network_key, node_key)?;
    revoked.check(node_key, &d.token_id)?;
    let s: StampBody = proto::decode("stamp", &stamp.body)?;
    if &s.network_key != network_key {
        return Err(AdmissionError::StampMismatch("network"));
    }
    if &s.node_key != node_key {
        return Err(AdmissionError::StampMismatch("node key"));
    }
    if s.token_id != d.token_id {
        return Err(AdmissionError::StampMismatch("token id"));
    }
    let by_network = match &s.stamper {
        Stamper::Network => {
            proto::verify(
                network_key,
                domain::STAMP,
                &stamp.body,
                &stamp.signature,
                "stamp",
            )?;
            true
        }
        Stamper::Member {
            node_key: stamper,
            admission,
        } => {
            let (_, sd) = verify_admission_chain(admission, network_key, stamper)?;
            if revoked.nodes.contains(stamper) || revoked.tokens.contains(&sd.token_id) {
                return Err(AdmissionError::StamperRevoked(proto::short_key(stamper)));
            }
            proto::verify(
                stamper,
                domain::STAMP,
                &stamp.body,
                &stamp.signature,
                "stamp",
            )?;
            false
        }
    };
    if d.expires_at != 0 && s.admitted_at > d.expires_at {
        return Err(AdmissionError::Expired {
            expires_at: d.expires_at,
            at: s.admitted_at,
        });
    }
    if s.admitted_at > now_unix.saturating_add(MAX_SKEW_SECS) {
        return Err(AdmissionError::StampFromFuture {
            at: s.admitted_at,
            now: now_unix,
        });
    }
    verified(
        d,
        body.node_key,
        s.admitted_at,
        by_network,
        stamp.signature.clone(),
    )
}

/// The revoked node keys and token ids, from the newest valid list.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    pub list: Option<RevocationList>,
    /// The list's text (what gossip carries), when there is one.
    pub text: Option<String>,
    nodes: HashSet<PublicKeyBytes>,
    tokens: HashSet<[u8; 16]>,
}

impl Revocations {
    /// Takes a newer list (already verified); returns whether it replaced
    /// the one held.
    pub fn update(&mut self, list: RevocationList, text: String) -> bool {
        if self
            .list
            .as_ref()
            .is_some_and(|l| l.issued_at_ms >= list.issued_at_ms)
        {
            return false;
        }
        self.nodes.clear();
        self.tokens.clear();
        for e in &list.entries {
            match e {
                Revoked::Node(k) => {
                    self.nodes.insert(*k);
                }
                Revoked::Token(t) => {
                    self.tokens.insert(*t);
                }
            }
        }
        self.list = Some(list);
        self.text = Some(text);
        true
    }

    pub fn node_revoked(&self, key: &PublicKeyBytes) -> bool {
        self.nodes.contains(key)
    }

    pub fn token_revoked(&self, id: &[u8; 16]) -> bool {
        self.tokens.contains(id)
    }

    pub fn issued_at_ms(&self) -> u64 {
        self.list.as_ref().map_or(0, |l| l.issued_at_ms)
    }

    fn check(&self, node_key: &PublicKeyBytes, token_id: &[u8; 16]) -> Result<(), AdmissionError> {
        if self.nodes.contains(node_key) {
            return Err(AdmissionError::Revoked(format!(
                "node {}",
                proto::short_key(node_key)
            )));
        }
        if self.tokens.contains(token_id) {
            return Err(AdmissionError::Revoked(format!(
                "its token {}",
                hex::encode(token_id)
            )));
        }
        Ok(())
    }
}

impl RevocationList {
    /// Signs the list with the network key; returns its gossip text.
    pub fn sign(&self, network_secret: &SigningKey) -> String {
        proto::signed_text(network_secret, domain::REVOCATIONS, self)
    }
}

/// Largest encoded revocation list (fits a gossip value).
pub const MAX_REVOCATIONS_BYTES: usize = 48 * 1024;

/// Decodes and checks a revocation list for `network_key`.
pub fn verify_revocations(
    text: &str,
    network_key: &PublicKeyBytes,
) -> Result<RevocationList, AdmissionError> {
    let (signed, list): (Signed, RevocationList) =
        proto::open_signed_text("revocation list", text, MAX_REVOCATIONS_BYTES)?;
    if &list.network_key != network_key {
        return Err(AdmissionError::WrongNetwork);
    }
    if list.entries.len() > MAX_REVOCATIONS {
        return Err(AdmissionError::TooManyRevocations);
    }
    proto::verify(
        network_key,
        domain::REVOCATIONS,
        &signed.body,
        &signed.signature,
        "revocation list",
    )?;
    Ok(list)
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

    /// A member admitted with `token` at `t` by the network key.
    fn member(token: &Token, net: &SigningKey, seed: u8, t: u64) -> (SigningKey, Signed, Signed) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let nk = key.verifying_key().to_bytes();
        let adm = token.admit(nk, 0);
        let (_, d) = Token::parse(&token.to_text()).unwrap();
        let st = stamp(
            net,
            Stamper::Network,
            net.verifying_key().to_bytes(),
            nk,
            d.token_id,
            t,
        );
        (key, adm, st)
    }

    #[test]
    fn token_round_trip_and_stamped_credentials() {
        let (nk, cidr) = net();
        let pk = nk.verifying_key().to_bytes();
        let token = issue_token(&nk, cidr, 0, vec![]);
        let (parsed, d) = Token::parse(&token.to_text()).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(d.cidr_prefix, 16);
        let none = Revocations::default();
        let (a, adm, st) = member(&token, &nk, 9, 1000);
        let ak = a.verifying_key().to_bytes();
        let v = verify_credential(&adm, &st, &pk, &ak, 1000, &none).unwrap();
        assert_eq!(v.network.cidr, cidr);
        assert_eq!(v.admitted_at, 1000);
        assert!(v.by_network);

        // A member stamps a joiner: valid, not by the network.
        let j = SigningKey::from_bytes(&[10; 32]);
        let jk = j.verifying_key().to_bytes();
        let jadm = token.admit(jk, 5);
        assert!(verify_joiner(&jadm, &pk, &jk, 2000, &none).is_ok());
        let js = stamp(
            &a,
            Stamper::Member {
                node_key: ak,
                admission: adm.clone(),
            },
            pk,
            jk,
            d.token_id,
            2000,
        );
        let v = verify_credential(&jadm, &js, &pk, &jk, 2000, &none).unwrap();
        assert!(!v.by_network);
        assert_eq!(v.admitted_at, 2000);
        // The stamp belongs to that joiner only, and must be signed by the
        // member it names.
        assert!(verify_credential(&adm, &js, &pk, &ak, 2000, &none).is_err());
        let forged = stamp(
            &j,
            Stamper::Member {
                node_key: ak,
                admission: adm.clone(),
            },
            pk,
            jk,
            d.token_id,
            2000,
        );
        assert!(verify_credential(&jadm, &forged, &pk, &jk, 2000, &none).is_err());
        // A joiner cannot stamp itself with the network stamper.
        let selfie = stamp(&j, Stamper::Network, pk, jk, d.token_id, 2000);
        assert!(verify_credential(&jadm, &selfie, &pk, &jk, 2000, &none).is_err());
    }

    #[test]
    fn expiry_is_judged_by_the_stamp_not_the_joiner() {
        let (nk, cidr) = net();
        let pk = nk.verifying_key().to_bytes();
        let token = issue_token(&nk, cidr, 100, vec![]);
        let none = Revocations::default();
        // Stamped while valid: a member for good, whatever the clock says.
        let (a, adm, st) = member(&token, &nk, 9, 100);
        let ak = a.verifying_key().to_bytes();
        assert!(verify_credential(&adm, &st, &pk, &ak, 10_000, &none).is_ok());
        // Stamped after expiry: refused, however early the joiner's own
        // claim (`admit(.., 0)` above) says it was.
        let (b, badm, bst) = member(&token, &nk, 11, 101);
        let bk = b.verifying_key().to_bytes();
        assert!(matches!(
            verify_credential(&badm, &bst, &pk, &bk, 101, &none),
            Err(AdmissionError::Expired { .. })
        ));
        // A seed asked after expiry refuses to stamp.
        let err = verify_joiner(&badm, &pk, &bk, 101, &none).unwrap_err();
        assert!(err.to_string().contains("token expired"), "{err}");
        // A stamp from the far future is refused (skew allowance).
        let (c, cadm, cst) = member(&token, &nk, 12, 50 + MAX_SKEW_SECS + 1);
        let ck = c.verifying_key().to_bytes();
        assert!(verify_credential(&cadm, &cst, &pk, &ck, 50, &none).is_err());
    }

    #[test]
    fn revocations_of_nodes_tokens_and_stampers() {
        let (nk, cidr) = net();
        let pk = nk.verifying_key().to_bytes();
        let token = issue_token(&nk, cidr, 0, vec![]);
        let (_, d) = Token::parse(&token.to_text()).unwrap();
        let (a, adm, st) = member(&token, &nk, 9, 10);
        let ak = a.verifying_key().to_bytes();
        let mut r = Revocations::default();
        let list = RevocationList {
            network_key: pk,
            issued_at_ms: 5,
            entries: vec![Revoked::Node(ak)],
        };
        let text = list.sign(&nk);
        assert_eq!(verify_revocations(&text, &pk).unwrap(), list);
        assert!(r.update(list.clone(), text.clone()));
        assert!(!r.update(list, text));
        assert!(matches!(
            verify_credential(&adm, &st, &pk, &ak, 10, &r),
            Err(AdmissionError::Revoked(_))
        ));
        // Members stamped by the revoked member are out too (the stamper is
        // checked), unless stamped again: a revoked member cannot stamp.
        let j = SigningKey::from_bytes(&[10; 32]);
        let jk = j.verifying_key().to_bytes();
        let js = stamp(
            &a,
            Stamper::Member {
                node_key: ak,
                admission: adm.clone(),
            },
            pk,
            jk,
            d.token_id,
            20,
        );
        assert!(matches!(
            verify_credential(&token.admit(jk, 0), &js, &pk, &jk, 20, &r),
            Err(AdmissionError::StamperRevoked(_))
        ));
        // A newer list revoking the token: everyone admitted with it.
        let list2 = RevocationList {
            network_key: pk,
            issued_at_ms: 6,
            entries: vec![Revoked::Token(d.token_id)],
        };
        assert!(r.update(list2.clone(), list2.sign(&nk)));
        let (b, badm, bst) = member(&token, &nk, 11, 10);
        let bk = b.verifying_key().to_bytes();
        assert!(verify_credential(&badm, &bst, &pk, &bk, 10, &r).is_err());
        assert!(verify_joiner(&badm, &pk, &bk, 10, &r).is_err());
        // A list signed by anyone else, or for another network: refused.
        let fake = list2.sign(&a);
        assert!(verify_revocations(&fake, &pk).is_err());
        assert!(verify_revocations(&list2.sign(&nk), &[0; 32]).is_err());
    }

    #[test]
    fn bad_token_text_gives_clear_errors() {
        assert_eq!(
            Token::parse("hello").unwrap_err(),
            AdmissionError::TokenPrefix
        );
        assert_eq!(
            Token::parse("mp2.!!!").unwrap_err(),
            AdmissionError::TokenBase64
        );
        assert!(matches!(
            Token::parse("mp2.AAAA").unwrap_err(),
            AdmissionError::TokenWire(_)
        ));
        // A version-1 token says so through the prefix.
        assert_eq!(
            Token::parse("mp1.AAAA").unwrap_err(),
            AdmissionError::TokenPrefix
        );
        let (nk, cidr) = net();
        let mut t = issue_token(&nk, cidr, 0, vec![]);
        t.join_secret = [3; 32];
        assert_eq!(
            Token::parse(&t.to_text()).unwrap_err(),
            AdmissionError::JoinKeyMismatch
        );
    }

    #[test]
    fn unix_times_format_as_utc() {
        assert_eq!(fmt_unix(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_unix(1_780_000_000), "2026-05-28 20:26:40 UTC");
    }
}
