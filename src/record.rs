//! Signed membership records: what a node tells the mesh about itself.
//!
//! A record is signed by the node's own ed25519 key and carries the node's
//! admission credential, so any member can check it no matter who relayed it.
//! `version` only grows: a record older than (or as old as) one already held is
//! a replay and is dropped by [`crate::membership`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::admission::{self, AdmissionError, Revocations, VerifiedAdmission};
pub use crate::proto::Route;
use crate::proto::{self, domain, PublicKeyBytes, Signed, WireError};

/// Limits that keep one record small enough to gossip cheaply.
pub const MAX_RECORD_BYTES: usize = 4096;
pub const MAX_NAME_LEN: usize = 63;
pub const MAX_ENDPOINTS: usize = 16;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_LEN: usize = 32;
pub const MAX_ROUTES: usize = 32;

/// Whether `name` is a valid member name: a hostname label (RFC 1123):
/// 1 to 63 bytes of `a-z`, `0-9` and `-`, not starting or ending with `-`.
/// Names are what `/etc/hosts` and DNS answer for, so nothing else goes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `tag` is a valid tag: 1 to 32 bytes of `a-z 0-9 - _ .`.
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// A member name derived from free text (a host name): lower case, every
/// run of other characters made one `-`, trimmed to 63 bytes; `node` if
/// nothing is left.
pub fn name_from(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= MAX_NAME_LEN {
            break;
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "node".to_string()
    } else {
        out
    }
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
    /// An ephemeral member (a stateless node that joins afresh on every
    /// boot): members forget it soon after it goes down
    /// ([`crate::membership::FORGET_EPHEMERAL_AFTER`]).
    pub ephemeral: bool,
    /// The node's admission credential and the stamp of the member that
    /// admitted it (see [`crate::admission`]).
    pub admission: Signed,
    pub stamp: Signed,
}

/// A record whose signature and credential were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord {
    /// Shared with every other holder of the same record text when
    /// [`share_decoded`] is on.
    pub body: Arc<RecordBody>,
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
    #[error("record carries an invalid credential: {0}")]
    Admission(#[from] AdmissionError),
    #[error(
        "overlay address {0} lies outside the network (or is its network or broadcast address)"
    )]
    OutsideNetwork(Ipv4Addr),
    #[error("name {0:?} is not a hostname label (a-z, 0-9, -; 1 to 63 bytes)")]
    BadName(String),
    #[error("tag {0:?} is not valid (a-z, 0-9, - _ .; 1 to 32 bytes)")]
    BadTag(String),
    #[error("route {0}")]
    BadRoute(crate::routes::RouteError),
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

/// The next version of a member's values (proto/PROTOCOL.md §4.2): above
/// every version it used (`last`, persisted) and every version of its own
/// that gossip has seen (`gossip_max`), and at least the clock in ms.
pub fn next_version(last: u64, gossip_max: u64, unix_ms: u64) -> u64 {
    unix_ms.max(last.max(gossip_max) + 1)
}

/// What records are checked against: our network, our clock, and the
/// revocations we hold.
#[derive(Clone, Copy)]
pub struct Trust<'a> {
    pub network_key: &'a PublicKeyBytes,
    pub now_unix: u64,
    pub revoked: &'a Revocations,
}

/// Decodes and checks a record received from gossip.
///
/// `gossip_id` is the node id the record was published under; a record signed
/// by anyone else is rejected, so no member can speak for another.
pub fn verify_record(
    text: &str,
    trust: &Trust<'_>,
    gossip_id: Option<&PublicKeyBytes>,
) -> Result<VerifiedRecord, RecordError> {
    let decoded = decode(text)?;
    let signed = &decoded.signed;
    let body = &decoded.body;
    if &body.network_key != trust.network_key {
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
    let admission = admission::verify_credential(
        &body.admission,
        &body.stamp,
        trust.network_key,
        &body.node_key,
        trust.now_unix,
        trust.revoked,
    )?;
    let cidr = admission.network.cidr;
    if !cidr.contains(&body.overlay_ip)
        || (cidr.prefix_len() < 31
            && (body.overlay_ip == cidr.network() || body.overlay_ip == cidr.broadcast()))
    {
        return Err(RecordError::OutsideNetwork(body.overlay_ip));
    }
    if !valid_name(&body.name) {
        return Err(RecordError::BadName(body.name.clone()));
    }
    if body.endpoints.len() > MAX_ENDPOINTS {
        return Err(RecordError::Limit("more than 16 endpoints"));
    }
    if body.tags.len() > MAX_TAGS {
        return Err(RecordError::Limit("more than 32 tags"));
    }
    if let Some(t) = body.tags.iter().find(|t| !valid_tag(t)) {
        return Err(RecordError::BadTag(t.clone()));
    }
    if body.routes.len() > MAX_ROUTES {
        return Err(RecordError::Limit("more than 32 routes"));
    }
    // Routes are IPv4 subnets (the overlay is IPv4): a prefix length of at
    // most 32 and no host bits. Whether a route is installed is decided by
    // each member (`crate::routes::plan`).
    if let Some(e) = body
        .routes
        .iter()
        .find_map(|r| crate::routes::to_net(r).err())
    {
        return Err(RecordError::BadRoute(e));
    }
    Ok(VerifiedRecord {
        body: decoded.body.clone(),
        admission,
    })
}

/// A record text taken apart (nothing checked yet).
struct Decoded {
    signed: Signed,
    body: Arc<RecordBody>,
}

type DecodedCache = Mutex<Option<lru::LruCache<Arc<str>, Arc<Decoded>>>>;

fn decoded_cache() -> &'static DecodedCache {
    static CACHE: OnceLock<DecodedCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(None))
}

/// Keeps up to `capacity` decoded records per process and hands the same
/// [`RecordBody`] to every holder of the same text (0: off, the default).
/// Decoding is a pure function of the text, so sharing it changes nothing
/// but memory and time; every check of [`verify_record`] still runs for
/// every holder. A daemon holds one copy of each record and leaves this off;
/// the simulation, whose thousands of members hold the same records, turns
/// it on.
pub fn share_decoded(capacity: usize) {
    let mut cache = decoded_cache().lock().unwrap_or_else(|p| p.into_inner());
    *cache = std::num::NonZeroUsize::new(capacity).map(lru::LruCache::new);
}

fn decode(text: &str) -> Result<Arc<Decoded>, RecordError> {
    let lock = || decoded_cache().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = lock().as_mut().and_then(|c| c.get(text).cloned()) {
        return Ok(d);
    }
    if text.len() > MAX_RECORD_BYTES.div_ceil(3) * 4 + 4 {
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
    let decoded = Arc::new(Decoded {
        signed,
        body: Arc::new(body),
    });
    if let Some(c) = lock().as_mut() {
        c.put(Arc::from(text), decoded.clone());
    }
    Ok(decoded)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::admission::{issue_token, stamp, Stamper, Token};

    /// No revocations, a clock at 1000 s.
    pub(crate) fn trust(nk: &PublicKeyBytes) -> Trust<'_> {
        static NONE: std::sync::OnceLock<Revocations> = std::sync::OnceLock::new();
        Trust {
            network_key: nk,
            now_unix: 1000,
            revoked: NONE.get_or_init(Revocations::default),
        }
    }

    /// A member's signing key and record, admitted and stamped by the
    /// network key.
    pub(crate) fn sample(
        node_seed: u8,
        network: &SigningKey,
        ip: Ipv4Addr,
    ) -> (SigningKey, RecordBody) {
        let node = SigningKey::from_bytes(&[node_seed; 32]);
        let token = issue_token(network, "10.77.0.0/16".parse().unwrap(), 0, vec![]);
        let (_, d) = Token::parse(&token.to_text()).unwrap();
        let nk = network.verifying_key().to_bytes();
        let node_key = node.verifying_key().to_bytes();
        let body = RecordBody {
            network_key: nk,
            node_key,
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
            ephemeral: false,
            admission: token.admit(node_key, 1),
            stamp: stamp(network, Stamper::Network, nk, node_key, d.token_id, 1),
        };
        (node, body)
    }

    #[test]
    fn signed_record_verifies_and_forgeries_do_not() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let nk = net.verifying_key().to_bytes();
        let t = trust(&nk);
        let (node, body) = sample(5, &net, "10.77.0.9".parse().unwrap());
        let text = body.sign(&node);
        let v = verify_record(&text, &t, Some(&body.node_key)).unwrap();
        assert_eq!(*v.body, body);

        // Published under someone else's id.
        assert!(matches!(
            verify_record(&text, &t, Some(&[4; 32])),
            Err(RecordError::WrongNode { .. })
        ));
        // Signed by a key other than the one it names.
        let other = SigningKey::from_bytes(&[6; 32]);
        assert!(matches!(
            verify_record(&body.sign(&other), &t, None),
            Err(RecordError::Wire(WireError::BadSignature(_)))
        ));
        // Another network.
        assert_eq!(
            verify_record(&text, &trust(&[0; 32]), None),
            Err(RecordError::WrongNetwork)
        );
        // Outside the CIDR, or its network/broadcast address.
        for ip in ["10.78.0.1", "10.77.0.0", "10.77.255.255"] {
            let mut outside = body.clone();
            outside.overlay_ip = ip.parse().unwrap();
            assert!(matches!(
                verify_record(&outside.sign(&node), &t, None),
                Err(RecordError::OutsideNetwork(_))
            ));
        }
        // A credential or stamp that admits another node.
        let (_, other_body) = sample(7, &net, "10.77.0.9".parse().unwrap());
        let mut stolen = body.clone();
        stolen.admission = other_body.admission.clone();
        assert!(matches!(
            verify_record(&stolen.sign(&node), &t, None),
            Err(RecordError::Admission(_))
        ));
        let mut stolen = body.clone();
        stolen.stamp = other_body.stamp;
        assert!(matches!(
            verify_record(&stolen.sign(&node), &t, None),
            Err(RecordError::Admission(_))
        ));
        assert_eq!(verify_record("***", &t, None), Err(RecordError::Base64));
    }

    #[test]
    fn names_and_tags_are_checked() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let nk = net.verifying_key().to_bytes();
        let t = trust(&nk);
        let (node, body) = sample(5, &net, "10.77.0.9".parse().unwrap());
        for bad in [
            "",
            "has space",
            "Upper",
            "-lead",
            "trail-",
            "ünï",
            "a\x1b[31m",
            &"x".repeat(64),
        ] {
            let mut b = body.clone();
            b.name = bad.to_string();
            assert!(
                matches!(
                    verify_record(&b.sign(&node), &t, None),
                    Err(RecordError::BadName(_))
                ),
                "{bad:?}"
            );
        }
        let mut b = body.clone();
        b.tags = vec!["gpu".into(), "bad tag".into()];
        assert!(matches!(
            verify_record(&b.sign(&node), &t, None),
            Err(RecordError::BadTag(_))
        ));
        b.tags = vec!["gpu".into(), "rack-1".into(), "slurm.compute".into()];
        assert!(verify_record(&b.sign(&node), &t, None).is_ok());
        assert_eq!(name_from("My Host_01.example"), "my-host-01-example");
        assert_eq!(name_from("***"), "node");
        assert!(valid_name(&name_from(&"é".repeat(100))));
    }

    #[test]
    fn routes_must_be_ipv4_subnets() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let nk = net.verifying_key().to_bytes();
        let t = trust(&nk);
        let (node, body) = sample(5, &net, "10.77.0.9".parse().unwrap());
        let r = |a: &str, p: u8| Route {
            addr: a.parse().unwrap(),
            prefix: p,
        };
        let mut b = body.clone();
        // Valid subnets, even ones members will refuse to install.
        b.routes = vec![r("192.168.1.0", 24), r("0.0.0.0", 0), r("10.0.0.1", 32)];
        assert!(verify_record(&b.sign(&node), &t, None).is_ok());
        for bad in [r("192.168.1.1", 24), r("192.168.1.0", 33), r("fd00::", 64)] {
            b.routes = vec![r("192.168.2.0", 24), bad];
            let e = verify_record(&b.sign(&node), &t, None).unwrap_err();
            assert!(matches!(e, RecordError::BadRoute(_)), "{bad:?}: {e}");
        }
        b.routes = (0..33).map(|i| r(&format!("10.{i}.0.0"), 16)).collect();
        assert_eq!(
            verify_record(&b.sign(&node), &t, None),
            Err(RecordError::Limit("more than 32 routes"))
        );
    }

    #[test]
    fn garbage_never_panics() {
        let nk = [1u8; 32];
        let t = trust(&nk);
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
            assert!(verify_record(&text, &t, None).is_err());
        }
    }
}
