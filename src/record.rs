//! Signed membership records: what a node tells the mesh about itself.
//!
//! A record is signed by the node's own ed25519 key and carries the node's
//! admission credential, so any member can check it no matter who relayed it.
//! `version` only grows: a record older than (or as old as) one already held is
//! a replay and is dropped by [`crate::membership`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use base64::Engine;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::admission::{self, AdmissionError, VerifiedAdmission};
use crate::proto::{self, domain, PublicKeyBytes, Signed, WireError};

/// Limits that keep one record small enough to gossip cheaply.
pub const MAX_RECORD_BYTES: usize = 4096;
pub const MAX_NAME_LEN: usize = 63;
pub const MAX_ENDPOINTS: usize = 16;
pub const MAX_TAGS: usize = 32;
pub const MAX_ROUTES: usize = 32;

/// A route a member offers into the mesh (site-to-site); carried now, used later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// What a member learned about the NAT in front of its WireGuard socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatKind {
    /// Not measured yet.
    #[default]
    Unknown,
    /// No NAT: the mapped address is one of the member's own.
    Public,
    /// Endpoint-independent mapping (home NAT, most CGNAT): one public
    /// port for every destination, so hole punching can work.
    EndpointIndependent,
    /// Endpoint-dependent ("symmetric") mapping: a new port per destination;
    /// only a public member or a relay reaches it.
    EndpointDependent,
}

/// The signed content of a membership record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    pub network_key: PublicKeyBytes,
    pub node_key: PublicKeyBytes,
    /// Grows with every change the node publishes (unix milliseconds, or the
    /// previous version + 1 if the clock went backwards).
    pub version: u64,
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    /// Unix milliseconds at which the node claimed `overlay_ip`; the earlier
    /// claim wins a conflict (ties: the smaller node key).
    pub ip_claimed_at: u64,
    pub wg_public_key: [u8; 32],
    pub wg_port: u16,
    /// Candidate WireGuard endpoints, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Where the node's gossip (QUIC) endpoint listens.
    pub gossip_addr: SocketAddr,
    pub tags: Vec<String>,
    pub routes: Vec<Route>,
    /// Set in the node's last record when it leaves the mesh on purpose.
    pub left: bool,
    /// The NAT in front of the member's WireGuard socket.
    pub nat: NatKind,
    /// Whether the member relays traffic for pairs that cannot connect
    /// directly (only meaningful for public members).
    pub relay: bool,
    /// The node's admission credential (see [`crate::admission`]).
    pub admission: Signed,
}

/// A record whose signature and credential were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord {
    pub body: RecordBody,
    pub admission: VerifiedAdmission,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record is not base64")]
    Base64,
    #[error("record is {0} bytes, more than {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("record is corrupt: {0}")]
    Wire(#[from] WireError),
    #[error("record is for another network")]
    WrongNetwork,
    #[error("record was published under node id {gossip_id} but is signed by {signer}")]
    WrongNode { gossip_id: String, signer: String },
    #[error("record carries an invalid admission: {0}")]
    Admission(#[from] AdmissionError),
    #[error("overlay address {0} lies outside the network")]
    OutsideNetwork(Ipv4Addr),
    #[error("record exceeds a limit: {0}")]
    Limit(&'static str),
}

impl RecordBody {
    /// Signs the record with the node's key; returns the text put in gossip.
    pub fn sign(&self, node_key: &SigningKey) -> String {
        let body = proto::encode(self);
        let signature = proto::sign(node_key, domain::RECORD, &body);
        base64::engine::general_purpose::STANDARD.encode(proto::encode(&Signed { body, signature }))
    }
}

/// Decodes and checks a record received from gossip.
///
/// `gossip_id` is the node id the record was published under; a record signed
/// by anyone else is rejected, so no member can speak for another.
pub fn verify_record(
    text: &str,
    network_key: &PublicKeyBytes,
    gossip_id: Option<&PublicKeyBytes>,
) -> Result<VerifiedRecord, RecordError> {
    if text.len() > MAX_RECORD_BYTES * 4 / 3 + 4 {
        return Err(RecordError::TooLarge(text.len() * 3 / 4));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| RecordError::Base64)?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge(bytes.len()));
    }
    let signed: Signed = proto::decode("record", &bytes)?;
    let body: RecordBody = proto::decode("record body", &signed.body)?;
    if &body.network_key != network_key {
        return Err(RecordError::WrongNetwork);
    }
    if let Some(id) = gossip_id {
        if id != &body.node_key {
            return Err(RecordError::WrongNode {
                gossip_id: proto::short_key(id),
                signer: proto::short_key(&body.node_key),
            });
        }
    }
    proto::verify(
        &body.node_key,
        domain::RECORD,
        &signed.body,
        &signed.signature,
        "record",
    )?;
    let admission = admission::verify_admission_of(&body.admission, network_key, &body.node_key)?;
    if !admission.network.cidr.contains(&body.overlay_ip) {
        return Err(RecordError::OutsideNetwork(body.overlay_ip));
    }
    if body.name.len() > MAX_NAME_LEN {
        return Err(RecordError::Limit("name longer than 63 bytes"));
    }
    if body.endpoints.len() > MAX_ENDPOINTS {
        return Err(RecordError::Limit("more than 16 endpoints"));
    }
    if body.tags.len() > MAX_TAGS {
        return Err(RecordError::Limit("more than 32 tags"));
    }
    if body.routes.len() > MAX_ROUTES {
        return Err(RecordError::Limit("more than 32 routes"));
    }
    Ok(VerifiedRecord { body, admission })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::admission::issue_token;

    pub(crate) fn sample(
        node_seed: u8,
        network: &SigningKey,
        ip: Ipv4Addr,
    ) -> (SigningKey, RecordBody) {
        let node = SigningKey::from_bytes(&[node_seed; 32]);
        let token = issue_token(network, "10.77.0.0/16".parse().unwrap(), 0);
        let body = RecordBody {
            network_key: network.verifying_key().to_bytes(),
            node_key: node.verifying_key().to_bytes(),
            version: 1,
            name: format!("n{node_seed}"),
            overlay_ip: ip,
            ip_claimed_at: 10,
            wg_public_key: [node_seed; 32],
            wg_port: 51820,
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            gossip_addr: "192.0.2.1:51821".parse().unwrap(),
            tags: vec![],
            routes: vec![],
            left: false,
            nat: NatKind::Unknown,
            relay: false,
            admission: token.admit(node.verifying_key().to_bytes(), 1),
        };
        (node, body)
    }

    #[test]
    fn signed_record_verifies_and_forgeries_do_not() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let nk = net.verifying_key().to_bytes();
        let (node, body) = sample(5, &net, "10.77.0.9".parse().unwrap());
        let text = body.sign(&node);
        let v = verify_record(&text, &nk, Some(&body.node_key)).unwrap();
        assert_eq!(v.body, body);

        // Published under someone else's id.
        assert!(matches!(
            verify_record(&text, &nk, Some(&[4; 32])),
            Err(RecordError::WrongNode { .. })
        ));
        // Signed by a key other than the one it names.
        let other = SigningKey::from_bytes(&[6; 32]);
        assert!(matches!(
            verify_record(&body.sign(&other), &nk, None),
            Err(RecordError::Wire(WireError::BadSignature(_)))
        ));
        // Another network.
        assert_eq!(
            verify_record(&text, &[0; 32], None),
            Err(RecordError::WrongNetwork)
        );
        // Outside the CIDR.
        let mut outside = body.clone();
        outside.overlay_ip = "10.78.0.1".parse().unwrap();
        assert!(matches!(
            verify_record(&outside.sign(&node), &nk, None),
            Err(RecordError::OutsideNetwork(_))
        ));
        // A credential that admits another node.
        let (_, other_body) = sample(7, &net, "10.77.0.9".parse().unwrap());
        let mut stolen = body.clone();
        stolen.admission = other_body.admission;
        assert!(matches!(
            verify_record(&stolen.sign(&node), &nk, None),
            Err(RecordError::Admission(_))
        ));
        assert_eq!(verify_record("***", &nk, None), Err(RecordError::Base64));
    }

    #[test]
    fn garbage_never_panics() {
        let nk = [1u8; 32];
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
            assert!(verify_record(&text, &nk, None).is_err());
        }
    }
}
