//! Bodies of meshpeer's fuzz targets, one function per decoder family, and
//! the seed generator.
//!
//! Built twice: by the fuzz crate (`fuzz/src/lib.rs`, for `cargo fuzz`)
//! and by the main crate's `tests/fuzz_corpus.rs`, which replays every
//! committed corpus file through [`TARGETS`] under plain `cargo test`. So
//! it uses only the main crate's dependencies and nothing of libFuzzer.
//!
//! Every function takes arbitrary bytes and must return normally: a panic
//! is a finding (either in the decoder, or one of the properties asserted
//! here: what decodes re-encodes to the same value, the gossip summary
//! matches the state, UAPI's allowed IPs stay unique...).
//!
//! Signed objects are fuzzed two ways: **raw** (the bytes as received: a
//! mutation almost always breaks a signature, so this covers decoding and
//! the checks before signature verification) and **re-signed** (the bytes
//! are decoded, the keys in them replaced by the harness's fixed keys and
//! every layer signed again, then the real verifier runs: this reaches the
//! checks *after* the signatures — names, tags, CIDR, expiry, revocation,
//! stamp/admission mismatches). In re-signed mode a `flags` byte leaves
//! chosen fields as the input has them (bit set = do not patch), so
//! mismatches are reachable too.

#![allow(clippy::type_complexity)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatMessage, Deserializable, Serializable, Validator,
};
use ed25519_dalek::SigningKey;
use meshpeer::admission::{
    self, AdmissionBody, Credential, Delegation, Network, RevocationList, Revocations, Revoked,
    StampBody, Stamper, Token,
};
use meshpeer::gossip::transport::{AllocReply, HelloReply, JoinReply, Refusal, Request};
use meshpeer::liveness::{self, Alive, Liveness, MemberView, Probe, Suspicions};
use meshpeer::nat::stun::{self, StunMessage};
use meshpeer::observe::{self, Observations};
use meshpeer::proto::{self, domain, PublicKeyBytes, Signed};
use meshpeer::record::{self, RecordBody, Trust};
use meshpeer::trust::{TrustState, ALIVE_KEY, AUTHORITY_NODE, RECORD_KEY, REVOKED_KEY, SEEN_KEY};
use meshpeer::wg::userspace::{self as uapi, DeviceConfig};

/// The clock every verifier runs with (unix seconds).
pub const NOW: u64 = 1_000_000;
/// The network's CIDR.
pub const CIDR: &str = "10.77.0.0/16";
/// A token id the "revoking" revocations list names.
pub const REVOKED_TOKEN: [u8; 16] = [0xEE; 16];

/// Every target: its name (the corpus directory) and its body.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("gossip_message", gossip_message),
    ("gossip_state", gossip_state),
    ("record", record),
    ("token", token),
    ("credential", credential),
    ("liveness", liveness),
    ("request", request),
    ("stun", stun),
    ("control", control),
    ("uapi", uapi),
    ("config", config),
    ("relay", relay),
];

// ---------------------------------------------------------------------------
// Fixed keys and trust.

pub struct Keys {
    pub net: SigningKey,
    pub join: SigningKey,
    pub node: SigningKey,
    pub stamper: SigningKey,
    pub other: SigningKey,
    pub net_pk: PublicKeyBytes,
    pub join_pk: PublicKeyBytes,
    pub node_pk: PublicKeyBytes,
    pub stamper_pk: PublicKeyBytes,
    pub other_pk: PublicKeyBytes,
    /// No revocations.
    pub none: Revocations,
    /// Revokes `other` and [`REVOKED_TOKEN`].
    pub some: Revocations,
    pub trust: TrustState,
    pub trust_revoking: TrustState,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let k = |b: u8| SigningKey::from_bytes(&[b; 32]);
        let (net, join, node, stamper, other) = (k(1), k(2), k(3), k(4), k(5));
        let pk = |s: &SigningKey| s.verifying_key().to_bytes();
        let list = RevocationList {
            network_key: pk(&net),
            issued_at_ms: 5,
            entries: vec![Revoked::Node(pk(&other)), Revoked::Token(REVOKED_TOKEN)],
        };
        let text = list.sign(&net);
        let mut some = Revocations::default();
        some.update(list.clone(), text.clone());
        let network = Network {
            key: pk(&net),
            cidr: CIDR.parse().unwrap_or_else(|_| unreachable!()),
        };
        let trust = TrustState::new(network, Arc::new(|| NOW));
        let trust_revoking = TrustState::new(network, Arc::new(|| NOW));
        trust_revoking.update_revocations(list, text);
        Keys {
            net_pk: pk(&net),
            join_pk: pk(&join),
            node_pk: pk(&node),
            stamper_pk: pk(&stamper),
            other_pk: pk(&other),
            net,
            join,
            node,
            stamper,
            other,
            none: Revocations::default(),
            some,
            trust,
            trust_revoking,
        }
    })
}

fn trust(revoking: bool) -> Trust<'static> {
    let k = keys();
    Trust {
        network_key: &k.net_pk,
        now_unix: NOW,
        revoked: if revoking { &k.some } else { &k.none },
    }
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

fn signed(key: &SigningKey, dom: &[u8], body: Vec<u8>) -> Signed {
    Signed {
        signature: proto::sign(key, dom, &body),
        body,
    }
}

/// `mode byte || rest`; empty input is mode 0 with nothing.
fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, &[]),
    }
}

// ---------------------------------------------------------------------------
// Re-signing (see the module documentation). Flag bits: set = keep the
// input's value.

const KEEP_NETWORK: u8 = 1;
const KEEP_JOIN_KEY: u8 = 2;
const KEEP_NODE_KEY: u8 = 4;
const KEEP_STAMP_FIELDS: u8 = 8;
const KEEP_STAMPER: u8 = 16;
const KEEP_SIGNATURE: u8 = 32;
/// Check against the revocations that name `other` and [`REVOKED_TOKEN`].
const REVOKING: u8 = 64;
/// Sign the outer object with `other` instead of its owner.
const WRONG_SIGNER: u8 = 128;

fn resign_delegation(s: &Signed, f: u8) -> Signed {
    let k = keys();
    let Ok(mut d) = proto::decode::<Delegation>("delegation", &s.body) else {
        return s.clone();
    };
    if f & KEEP_NETWORK == 0 {
        d.network_key = k.net_pk;
    }
    if f & KEEP_JOIN_KEY == 0 {
        d.join_key = k.join_pk;
    }
    signed(&k.net, domain::TOKEN, proto::encode(&d))
}

/// Returns the re-signed admission and its delegation's token id.
fn resign_admission(s: &Signed, node: PublicKeyBytes, f: u8) -> (Signed, Option<[u8; 16]>) {
    let k = keys();
    let Ok(mut a) = proto::decode::<AdmissionBody>("admission", &s.body) else {
        return (s.clone(), None);
    };
    a.delegation = resign_delegation(&a.delegation, f);
    let token_id = proto::decode::<Delegation>("delegation", &a.delegation.body)
        .ok()
        .map(|d| d.token_id);
    if f & KEEP_NODE_KEY == 0 {
        a.node_key = node;
    }
    (
        signed(&k.join, domain::ADMISSION, proto::encode(&a)),
        token_id,
    )
}

fn resign_stamp(s: &Signed, node: PublicKeyBytes, token_id: Option<[u8; 16]>, f: u8) -> Signed {
    let k = keys();
    let Ok(mut st) = proto::decode::<StampBody>("stamp", &s.body) else {
        return s.clone();
    };
    if f & KEEP_STAMP_FIELDS == 0 {
        st.network_key = k.net_pk;
        st.node_key = node;
        if let Some(t) = token_id {
            st.token_id = t;
        }
    }
    let signer = match &mut st.stamper {
        Stamper::Network => &k.net,
        Stamper::Member {
            node_key,
            admission,
        } => {
            if f & KEEP_STAMPER == 0 {
                *node_key = k.stamper_pk;
                *admission = resign_admission(admission, k.stamper_pk, f).0;
            }
            &k.stamper
        }
    };
    let body = proto::encode(&st);
    if f & KEEP_SIGNATURE != 0 {
        return Signed {
            body,
            signature: s.signature.clone(),
        };
    }
    signed(signer, domain::STAMP, body)
}

fn resign_credential(c: &Credential, node: PublicKeyBytes, f: u8) -> Credential {
    let (admission, token_id) = resign_admission(&c.admission, node, f);
    let stamp = c.stamp.as_ref().map(|s| resign_stamp(s, node, token_id, f));
    Credential { admission, stamp }
}

// ---------------------------------------------------------------------------
// Gossip.

/// `ChitchatMessage::deserialize`; what decodes re-encodes to an equal
/// message of the announced length.
pub fn gossip_message(data: &[u8]) {
    let Ok(msg) = ChitchatMessage::deserialize(&mut &data[..]) else {
        return;
    };
    check_message_round_trip(&msg);
}

fn check_message_round_trip(msg: &ChitchatMessage) {
    let bytes = msg.serialize_to_vec();
    assert_eq!(
        bytes.len(),
        msg.serialized_len(),
        "serialized_len of {msg:?}"
    );
    let back = ChitchatMessage::deserialize(&mut &bytes[..]);
    assert_eq!(back.as_ref().ok(), Some(msg), "round trip: {back:?}");
}

struct AcceptAll;
impl Validator for AcceptAll {
    fn validate(&self, _: &str, _: &str, _: &str, _: u64) -> bool {
        true
    }
}

/// Accepts keys that are not `bad` and odd versions only (refusals in the
/// middle of a node's delta).
struct Picky;
impl Validator for Picky {
    fn validate(&self, _: &str, key: &str, _: &str, version: u64) -> bool {
        key != "bad" && version % 2 == 1
    }
}

const CLUSTER: &str = "meshpeer2-fuzz";

/// Node `a` of the gossip state target, holding a few nodes' values.
fn gossip_node(id: &str, small: bool, seed: u64, peers: &[(&str, u64)]) -> Chitchat {
    let mut cfg = ChitchatConfig::new(id, CLUSTER);
    cfg.seed = seed;
    if small {
        // Tight limits: budgets, the MTU cut and bucket hashes all happen.
        cfg.limits.mtu = 300;
        cfg.limits.max_new_nodes_per_message = 2;
        cfg.limits.max_nodes = 6;
        cfg.limits.max_value_bytes = 200;
        cfg.limits.bucket_threshold = 2;
        cfg.limits.max_digest_entries = 3;
        cfg.limits.forget_memory = 2;
    }
    let mut c = Chitchat::new(cfg);
    let _ = c.set("record", format!("{id} record"), 10);
    let _ = c.set("alive", format!("{id} alive"), 12);
    for (peer, v) in peers {
        c.inject(peer, "record", format!("{peer} v{v}"), *v, &AcceptAll);
        c.inject(peer, "seen", format!("{peer} seen"), v + 1, &AcceptAll);
    }
    c
}

/// The summary a chitchat node reports equals the one recomputed from its
/// node states.
fn check_summary(c: &Chitchat) {
    let states = c.node_states();
    let hash = states.iter().fold(0u64, |h, (id, s)| {
        h.wrapping_add(chitchat::summary_term(id, s.max_version()))
    });
    let s = c.summary();
    assert_eq!(s.count as usize, states.len(), "summary count");
    assert_eq!(s.hash, hash, "summary hash");
    for (id, s) in states {
        let max = s.key_values().map(|(_, v)| v.version).max().unwrap_or(0);
        assert!(max <= s.max_version(), "{id}: a value above max_version");
        assert!(
            s.key_values()
                .all(|(_, v)| v.value.len() <= c.limits().max_value_bytes)
                || &**id == c.node_id().as_ref(),
            "{id}: a value over the size limit was stored"
        );
    }
    assert!(states.len() <= c.limits().max_nodes + 1, "max_nodes");
}

/// Frames: `u16 LE length || bytes`, the last frame takes what is left.
fn frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let n = u16::from_le_bytes([data[0], data[1]]) as usize;
        let rest = &data[2..];
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

/// Messages fed to a `Chitchat` state machine (node `a`), whose answers go
/// to a second node `b` and back for up to four steps. `flags || frames`:
/// bits 0-1 pick the validator (accept all, picky, meshpeer's real
/// `TrustState`), bit 2 tight limits; an empty frame forgets a node.
/// Checked after every step: answers round-trip, summaries match states.
pub fn gossip_state(data: &[u8]) {
    let (flags, rest) = split(data);
    let k = keys();
    let node_id = proto::node_id_string(&k.node_pk);
    let validator: &dyn Validator = match flags & 3 {
        0 => &AcceptAll,
        1 => &Picky,
        2 => &k.trust,
        _ => &k.trust_revoking,
    };
    let small = flags & 4 != 0;
    let mut a = gossip_node("a", small, 1, &[("p", 20), ("q", 3), ("r", 7)]);
    let mut b = gossip_node("b", small, 2, &[("p", 5), ("s", 9), (&node_id, 1)]);
    for frame in frames(rest) {
        if frame.is_empty() {
            let first = a.node_states().keys().nth(1).cloned();
            if let Some(id) = first {
                a.forget(&id);
            }
            check_summary(&a);
            continue;
        }
        let Ok(msg) = ChitchatMessage::deserialize(&mut &frame[..]) else {
            continue;
        };
        check_message_round_trip(&msg);
        let mut next = a.handle_message(msg, validator);
        check_summary(&a);
        let mut at_b = true;
        for _ in 0..4 {
            let Some(m) = next.take() else { break };
            check_message_round_trip(&m);
            if let ChitchatMessage::Ack { delta, .. } = &m {
                let mtu = a.limits().mtu.max(128);
                assert!(delta.serialized_len() <= mtu, "delta over the MTU");
            }
            next = if at_b {
                b.handle_message(m, validator)
            } else {
                a.handle_message(m, validator)
            };
            check_summary(&a);
            check_summary(&b);
            at_b = !at_b;
        }
    }
    let _ = a.take_self_seen();
}

// ---------------------------------------------------------------------------
// Records.

/// `record::verify_record` and the gossip validator
/// (`TrustState::validate_value`) on a record. Modes (`mode & 1`): 0 raw
/// (`mode || text`; bit 1: published under the node's id rather than none,
/// bit 2: the revoking list), 1 re-signed (`mode || flags || encoded
/// Signed`).
pub fn record(data: &[u8]) {
    let (mode, rest) = split(data);
    let k = keys();
    if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let id = (mode & 2 != 0).then_some(&k.node_pk);
        let r = record::verify_record(text, &trust(mode & 4 != 0), id);
        if let Ok(v) = &r {
            check_record(v);
        }
        let ts = if mode & 4 != 0 {
            &k.trust_revoking
        } else {
            &k.trust
        };
        let version = r.as_ref().map_or(0, |v| v.body.version);
        let node = proto::node_id_string(id.unwrap_or(&k.node_pk));
        let _ = ts.validate_value(&node, RECORD_KEY, text, version);
        return;
    }
    let (f, rest) = split(rest);
    let Ok(outer) = proto::decode::<Signed>("record", rest) else {
        return;
    };
    let Ok(mut body) = proto::decode::<RecordBody>("record body", &outer.body) else {
        return;
    };
    if f & KEEP_NETWORK == 0 {
        body.network_key = k.net_pk;
    }
    if f & KEEP_NODE_KEY == 0 {
        body.node_key = k.node_pk;
    }
    let c = resign_credential(
        &Credential {
            admission: body.admission.clone(),
            stamp: Some(body.stamp.clone()),
        },
        k.node_pk,
        f,
    );
    body.admission = c.admission;
    body.stamp = c.stamp.unwrap_or_else(|| unreachable!());
    let text = body.sign(if f & WRONG_SIGNER != 0 {
        &k.other
    } else {
        &k.node
    });
    let r = record::verify_record(&text, &trust(f & REVOKING != 0), Some(&k.node_pk));
    if let Ok(v) = &r {
        check_record(v);
        let ts = if f & REVOKING != 0 {
            &k.trust_revoking
        } else {
            &k.trust
        };
        let id = proto::node_id_string(&k.node_pk);
        assert_eq!(
            ts.validate_value(&id, RECORD_KEY, &text, v.body.version),
            Ok(()),
            "a verified record is a valid gossip value"
        );
        assert!(ts
            .validate_value(&id, RECORD_KEY, &text, v.body.version.wrapping_add(1))
            .is_err());
    }
}

fn check_record(v: &record::VerifiedRecord) {
    let b = &v.body;
    assert!(record::valid_name(&b.name), "name {:?}", b.name);
    assert!(b.tags.iter().all(|t| record::valid_tag(t)));
    assert!(b.endpoints.len() <= record::MAX_ENDPOINTS);
    assert!(b.tags.len() <= record::MAX_TAGS);
    assert!(b.routes.len() <= record::MAX_ROUTES);
    assert!(v.admission.network.cidr.contains(&b.overlay_ip));
    assert_eq!(v.admission.node_key, b.node_key);
    let again: RecordBody = proto::decode("record body", &proto::encode(&**b))
        .unwrap_or_else(|e| panic!("re-encoded record does not decode: {e}"));
    assert_eq!(&again, &**b);
}

// ---------------------------------------------------------------------------
// Tokens.

/// `Token::parse`. Modes: 0 `mode || text`, 1 re-signed (`mode || flags ||
/// encoded Token`; flag bit 2 keeps the input's join secret). A parsed
/// token's text parses to the same token.
pub fn token(data: &[u8]) {
    let (mode, rest) = split(data);
    let text = if mode & 1 == 0 {
        let Ok(t) = std::str::from_utf8(rest) else {
            return;
        };
        t.to_string()
    } else {
        let k = keys();
        let (f, rest) = split(rest);
        let Ok(mut t) = proto::decode::<Token>("token", rest) else {
            return;
        };
        t.delegation = resign_delegation(&t.delegation, f);
        if f & KEEP_NODE_KEY == 0 {
            t.join_secret = k.join.to_bytes();
        }
        t.to_text()
    };
    if let Ok((t, d)) = Token::parse(&text) {
        assert!(d.cidr_prefix <= 30);
        let again = Token::parse(&t.to_text());
        assert_eq!(again.as_ref().ok(), Some(&(t, d)), "token round trip");
    }
}

// ---------------------------------------------------------------------------
// Credentials, revocation lists, certificates.

/// Credentials as a TLS certificate carries them, revocation lists, and
/// certificates. Modes (`mode % 5`): 0 `encoded Credential` checked raw,
/// 1 re-signed (`flags || encoded Credential`), 2 revocation list text,
/// 3 re-signed revocation list (`flags || encoded Signed`), 4 a DER
/// certificate (`tls::check_certificate`).
pub fn credential(data: &[u8]) {
    let (mode, rest) = split(data);
    let k = keys();
    match mode % 5 {
        0 => {
            let Ok(c) = proto::decode::<Credential>("credential", rest) else {
                return;
            };
            let node = proto::decode::<AdmissionBody>("admission", &c.admission.body)
                .map_or(k.node_pk, |a| a.node_key);
            check_credential(&c, &node, mode & 8 != 0);
        }
        1 => {
            let (f, rest) = split(rest);
            let Ok(c) = proto::decode::<Credential>("credential", rest) else {
                return;
            };
            let c = resign_credential(&c, k.node_pk, f);
            check_credential(&c, &k.node_pk, f & REVOKING != 0);
        }
        2 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            check_revocations(text);
            let _ = k.trust.validate_value(AUTHORITY_NODE, REVOKED_KEY, text, 5);
        }
        3 => {
            let (f, rest) = split(rest);
            let Ok(s) = proto::decode::<Signed>("revocations", rest) else {
                return;
            };
            let Ok(mut list) = proto::decode::<RevocationList>("revocations", &s.body) else {
                return;
            };
            if f & KEEP_NETWORK == 0 {
                list.network_key = k.net_pk;
            }
            let text = list.sign(if f & WRONG_SIGNER != 0 {
                &k.other
            } else {
                &k.net
            });
            check_revocations(&text);
        }
        _ => {
            let cert = rustls::pki_types::CertificateDer::from(rest);
            let read = meshpeer::gossip::tls::read_certificate(&cert);
            let checked = meshpeer::gossip::tls::check_certificate(&cert, &k.trust);
            if read.is_err() {
                assert!(checked.is_err());
            }
        }
    }
}

fn check_credential(c: &Credential, node: &PublicKeyBytes, revoking: bool) {
    let k = keys();
    let revoked = if revoking { &k.some } else { &k.none };
    let direct = match &c.stamp {
        Some(s) => admission::verify_credential(&c.admission, s, &k.net_pk, node, NOW, revoked),
        None => admission::verify_joiner(&c.admission, &k.net_pk, node, NOW, revoked),
    };
    if let Ok(v) = &direct {
        assert_eq!(&v.node_key, node);
        assert!(v.network.cidr.prefix_len() <= 30);
        assert!(!revoked.node_revoked(node) && !revoked.token_revoked(&v.token_id));
        if c.stamp.is_some() {
            assert!(v.admitted_at <= NOW + admission::MAX_SKEW_SECS);
            assert!(v.expires_at == 0 || v.admitted_at <= v.expires_at);
        }
    }
    let ts = if revoking {
        &k.trust_revoking
    } else {
        &k.trust
    };
    let via_trust = ts.check_credential(c, node);
    assert_eq!(
        direct.as_ref().ok(),
        via_trust.as_ref().ok().map(|p| &p.admission),
        "TrustState and admission disagree"
    );
}

fn check_revocations(text: &str) {
    let k = keys();
    if let Ok(list) = admission::verify_revocations(text, &k.net_pk) {
        assert!(list.entries.len() <= admission::MAX_REVOCATIONS);
        let mut r = Revocations::default();
        assert!(r.update(list.clone(), text.to_string()));
        for e in &list.entries {
            match e {
                Revoked::Node(n) => assert!(r.node_revoked(n)),
                Revoked::Token(t) => assert!(r.token_revoked(t)),
            }
        }
        assert_eq!(
            k.trust
                .validate_value(AUTHORITY_NODE, REVOKED_KEY, text, list.issued_at_ms),
            Ok(())
        );
    }
}

// ---------------------------------------------------------------------------
// Liveness and observations.

fn base_instant() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// The members a liveness state machine knows: the fixed keys, at
/// 10.77.0.<seed>.
fn members() -> Vec<MemberView> {
    let k = keys();
    [
        (k.node_pk, 3),
        (k.other_pk, 5),
        (k.join_pk, 2),
        (k.net_pk, 1),
    ]
    .iter()
    .map(|(key, i)| MemberView {
        key: *key,
        overlay_ip: Ipv4Addr::new(10, 77, 0, *i),
        reachable: true,
        heard: true,
    })
    .collect()
}

/// Probes, `alive`, `suspects` and `seen` values. Modes (`mode % 7`): 0
/// `Probe::decode` (a decoded `Ack` answers the liveness state machine's
/// own probe number `nonce`, if it sent that many), 1 alive text, 2
/// suspicions text, 3 observations text, each published under `node`;
/// 4-6 the same re-signed (`flags || encoded Signed`), fed to a `Liveness`
/// (alive, suspicions) or an `ObservationBook`.
pub fn liveness(data: &[u8]) {
    let (mode, rest) = split(data);
    let k = keys();
    let t0 = base_instant();
    let mut l = Liveness::new(k.net_pk, k.stamper_pk, 7);
    l.handle_members(t0, &members());
    l.handle_timeout(t0 + Duration::from_secs(5), NOW * 1000);
    let sent = l.poll_transmit();
    let t1 = t0 + Duration::from_millis(5500);
    let node_id = proto::node_id_string(&k.node_pk);
    match mode % 7 {
        0 => {
            let Ok(p) = Probe::decode(rest) else {
                return;
            };
            let again = Probe::decode(&p.encode());
            assert_eq!(again.as_ref().ok(), Some(&p), "probe round trip");
            if let Probe::Ack { nonce, summary, .. } = p {
                match usize::try_from(nonce).ok().and_then(|i| sent.get(i)) {
                    Some((ip, Probe::Ping { nonce, .. })) => l.handle_ack(t1, *ip, *nonce, summary),
                    _ => l.handle_ack(t1, Ipv4Addr::new(10, 77, 0, 3), nonce, summary),
                }
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let r = liveness::verify_alive(text, &k.net_pk, &k.node_pk);
            let v = r.as_ref().map_or(0, |a| a.issued_at_ms);
            let ok = k.trust.validate_value(&node_id, ALIVE_KEY, text, v).is_ok();
            assert_eq!(ok, r.is_ok());
            if let Ok(a) = r {
                l.handle_alive(t1, &a);
            }
        }
        2 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let r = liveness::verify_suspicions(text, &k.net_pk, &k.node_pk);
            let v = r.as_ref().map_or(0, |s| s.issued_at_ms);
            let ok = k
                .trust
                .validate_value(&node_id, meshpeer::trust::SUSPECTS_KEY, text, v)
                .is_ok();
            assert_eq!(ok, r.is_ok());
            if let Ok(s) = r {
                l.handle_suspicions(t1, &s);
            }
        }
        3 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let r = observe::verify_observations(text, &k.net_pk, &k.node_pk);
            let v = r.as_ref().map_or(0, |o| o.issued_at);
            let ok = k.trust.validate_value(&node_id, SEEN_KEY, text, v).is_ok();
            assert_eq!(ok, r.is_ok());
            let mut book = observe::ObservationBook::default();
            if book.handle(&k.net_pk, &k.node_pk, text).is_ok() {
                let _ = book.endpoints_of(&k.stamper_pk, &[]);
            }
        }
        m => {
            let (f, rest) = split(rest);
            let Ok(s) = proto::decode::<Signed>("value", rest) else {
                return;
            };
            let signer = if f & WRONG_SIGNER != 0 {
                &k.other
            } else {
                &k.node
            };
            match m {
                4 => {
                    let Ok(mut a) = proto::decode::<Alive>("alive", &s.body) else {
                        return;
                    };
                    if f & KEEP_NETWORK == 0 {
                        a.network_key = k.net_pk;
                    }
                    if f & KEEP_NODE_KEY == 0 {
                        a.node_key = k.node_pk;
                    }
                    let text = a.sign(signer);
                    if let Ok(a) = liveness::verify_alive(&text, &k.net_pk, &k.node_pk) {
                        assert!(a.refutes.len() <= liveness::MAX_LISTED);
                        l.handle_alive(t1, &a);
                    }
                }
                5 => {
                    let Ok(mut su) = proto::decode::<Suspicions>("suspicions", &s.body) else {
                        return;
                    };
                    if f & KEEP_NETWORK == 0 {
                        su.network_key = k.net_pk;
                    }
                    if f & KEEP_NODE_KEY == 0 {
                        su.accuser = k.node_pk;
                    }
                    let text = su.sign(signer);
                    if let Ok(su) = liveness::verify_suspicions(&text, &k.net_pk, &k.node_pk) {
                        assert!(su.targets.len() <= liveness::MAX_LISTED);
                        l.handle_suspicions(t1, &su);
                    }
                }
                _ => {
                    let Ok(mut o) = proto::decode::<Observations>("seen", &s.body) else {
                        return;
                    };
                    if f & KEEP_NETWORK == 0 {
                        o.network_key = k.net_pk;
                    }
                    if f & KEEP_NODE_KEY == 0 {
                        o.observer = k.node_pk;
                    }
                    let text = o.sign(signer);
                    let mut book = observe::ObservationBook::default();
                    if book.handle(&k.net_pk, &k.node_pk, &text).is_ok() {
                        assert!(o.seen.len() <= observe::MAX_SEEN);
                        let _ = book.endpoints_of(&k.stamper_pk, &[]);
                    }
                }
            }
        }
    }
    // Run the machine on: whatever came in must not break its timers.
    for step in 1..=8u64 {
        let now = t1 + Duration::from_millis(700 * step);
        l.handle_timeout(now, NOW * 1000 + 700 * step);
        let _ = l.poll_transmit();
        while l.poll_event().is_some() {}
        let _ = l.take_accusations();
        let _ = l.take_refutations();
        let _ = l.take_mismatches();
        let _ = l.poll_timeout();
    }
}

// ---------------------------------------------------------------------------
// Requests and replies on QUIC streams.

/// Requests and replies on bidirectional QUIC streams (`mode % 5`: 0
/// `Request`, 1 `JoinReply`, 2 the hello reply `Result<HelloReply,
/// Refusal>`, 3 `AllocReply`, 4 `HelloReply`); a joiner's handling of what
/// a reply carries (records, revocation list, stamp) follows.
pub fn request(data: &[u8]) {
    let (mode, rest) = split(data);
    fn round_trip<T>(what: &'static str, bytes: &[u8]) -> Option<T>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let v: T = proto::decode(what, bytes).ok()?;
        let again: Result<T, _> = proto::decode(what, &proto::encode(&v));
        assert_eq!(again.as_ref().ok(), Some(&v), "{what} round trip");
        Some(v)
    }
    match mode % 5 {
        0 => {
            if let Some(Request::Join { name }) = round_trip::<Request>("request", rest) {
                let _ = record::valid_name(&name);
                let _ = record::name_from(&name);
            }
        }
        1 => match round_trip::<JoinReply>("join reply", rest) {
            Some(JoinReply::Admitted { stamp, hello }) => {
                let _ = proto::decode::<StampBody>("stamp", &stamp.body);
                handle_hello(&hello);
            }
            Some(JoinReply::Refused { reason }) => {
                let _ = reason.to_string();
            }
            None => {}
        },
        2 => match round_trip::<Result<HelloReply, Refusal>>("hello reply", rest) {
            Some(Ok(hello)) => handle_hello(&hello),
            Some(Err(r)) => {
                let _ = r.to_string();
            }
            None => {}
        },
        3 => {
            let _ = round_trip::<AllocReply>("alloc reply", rest);
        }
        _ => {
            if let Some(h) = round_trip::<HelloReply>("hello", rest) {
                handle_hello(&h);
            }
        }
    }
}

fn handle_hello(h: &HelloReply) {
    let t = trust(false);
    for r in h.records.iter().take(64) {
        let _ = record::verify_record(r, &t, None);
    }
    if let Some(text) = &h.revoked {
        check_revocations(text);
    }
    for (name, _) in h.names.iter().take(64) {
        let _ = record::valid_name(name);
    }
}

// ---------------------------------------------------------------------------
// STUN.

/// `nat::stun::parse`. What parses re-encodes (with meshpeer's own
/// encoders, where one exists) to the same message; a non-classic message
/// also `looks_like_stun`.
pub fn stun(data: &[u8]) {
    let Some(m) = stun::parse(data) else {
        return;
    };
    let again = match &m {
        StunMessage::Request {
            txid,
            for_key: None,
            from_key: None,
        } => Some(stun::binding_request(*txid)),
        StunMessage::Request {
            txid,
            for_key: Some(to),
            from_key: Some(from),
        } => {
            let (mut t, mut f) = ([0u8; 32], [0u8; 32]);
            t[..8].copy_from_slice(to);
            f[..8].copy_from_slice(from);
            let _ = stun::answer_request(Some(*to), Some(*from), &t, |k| k == from);
            Some(stun::check_request(*txid, &t, &f))
        }
        StunMessage::Response { txid, mapped } => Some(stun::binding_response(*txid, *mapped)),
        StunMessage::Refused { txid } => Some(stun::refusal(*txid)),
        StunMessage::ClassicRequest { txid } => {
            let _ = stun::classic_binding_response(*txid, SocketAddr::from(([192, 0, 2, 1], 9)));
            None
        }
        StunMessage::Request { .. } => None,
    };
    if !matches!(m, StunMessage::ClassicRequest { .. }) {
        assert!(stun::looks_like_stun(data));
    }
    if let Some(bytes) = again {
        assert_eq!(stun::parse(&bytes).as_ref(), Some(&m), "STUN round trip");
    }
}

// ---------------------------------------------------------------------------
// Relay ports.

/// The two ends of the relay target's allocation: `node` (WireGuard key
/// of secret [3; 32], known at 198.51.100.3) and `stamper` ([4; 32], at
/// 203.0.113.4).
fn relay_end(secret: u8, ip: [u8; 4]) -> meshpeer::relay::End {
    let k = keys();
    meshpeer::relay::End {
        node_key: if secret == 3 { k.node_pk } else { k.stamper_pk },
        wg_key: uapi::public_key_of(&[secret; 32]),
        known_ips: vec![std::net::IpAddr::from(ip)],
        latched: None,
    }
}

/// Datagrams arriving at a relay allocation's two ports
/// (`relay::Allocation::handle`, with `wg_shape` and `mac1_for`). Frames
/// (`u16 LE length || header || datagram`): header bit 0 the side, bits
/// 1-2 the source (A's known address, B's, a stranger, A's address on
/// another port), bits 3-7 time passing (x 250 ms). A forwarded datagram
/// is WireGuard-shaped, came from the address that latched its side, and
/// goes to the other side's latched address.
pub fn relay(data: &[u8]) {
    use meshpeer::relay::{self, Allocation, Side, Verdict};
    let t0 = base_instant();
    let mut alloc = Allocation::new(
        t0,
        relay_end(3, [198, 51, 100, 3]),
        relay_end(4, [203, 0, 113, 4]),
    );
    let sources: [SocketAddr; 4] = [
        SocketAddr::from(([198, 51, 100, 3], 51820)),
        SocketAddr::from(([203, 0, 113, 4], 40000)),
        SocketAddr::from(([192, 0, 2, 66], 666)),
        SocketAddr::from(([198, 51, 100, 3], 51999)),
    ];
    let mut now = t0;
    let mut n = 0u64;
    for frame in frames(data) {
        let Some((&h, d)) = frame.split_first() else {
            continue;
        };
        let side = if h & 1 == 0 { Side::A } else { Side::B };
        let from = sources[usize::from((h >> 1) & 3)];
        now += Duration::from_millis(250 * u64::from(h >> 3));
        let shape = relay::wg_shape(d);
        if shape.is_some() {
            assert!(uapi::is_wireguard_message(d));
        }
        let _ = relay::mac1_for(d, &alloc.a.wg_key);
        let v = alloc.handle(now, side, from, d);
        n += 1;
        if let Verdict::Forward(to) = v {
            assert!(
                shape.is_some(),
                "forwarded a datagram that is not WireGuard"
            );
            let (me, other) = match side {
                Side::A => (&alloc.a, &alloc.b),
                Side::B => (&alloc.b, &alloc.a),
            };
            assert_eq!(me.latched.map(|l| l.0), Some(from));
            assert_eq!(other.latched.map(|l| l.0), Some(to));
        }
        assert_eq!(alloc.forwarded + alloc.dropped, n);
        let _ = alloc.expired(now);
    }
}

// ---------------------------------------------------------------------------
// Control socket.

/// The control socket's JSON (`mode & 1`: 0 `control::Request`, the
/// daemon's side; 1 `control::Reply`, the client's). What parses
/// re-serializes to JSON that parses to the same JSON.
pub fn control(data: &[u8]) {
    use meshpeer::control::{Reply, Request};
    let (mode, rest) = split(data);
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    fn check<T: serde::Serialize + serde::de::DeserializeOwned>(text: &str) {
        let Ok(v) = serde_json::from_str::<T>(text) else {
            return;
        };
        let json = serde_json::to_string(&v).unwrap_or_else(|e| panic!("serialize: {e}"));
        let back: T = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        let json2 = serde_json::to_string(&back).unwrap_or_else(|e| panic!("serialize: {e}"));
        assert_eq!(json, json2);
    }
    if mode & 1 == 0 {
        check::<Request>(text);
        if let Ok(Request::Revoke { list }) = serde_json::from_str::<Request>(text) {
            check_revocations(&list);
        }
    } else {
        check::<Reply>(text);
        if let Ok(Reply::Status(s)) = serde_json::from_str::<Reply>(text) {
            let _ = s.render();
        }
    }
}

// ---------------------------------------------------------------------------
// UAPI.

/// The configuration the UAPI target's requests apply to.
fn uapi_base() -> &'static DeviceConfig {
    static BASE: OnceLock<DeviceConfig> = OnceLock::new();
    BASE.get_or_init(|| {
        let body = [
            format!("private_key={}", hex32(7)),
            "listen_port=51820".into(),
            format!("public_key={}", hex32(8)),
            "endpoint=192.0.2.8:51820".into(),
            "allowed_ip=10.77.0.8/32".into(),
            format!("public_key={}", hex32(9)),
            "allowed_ip=10.77.0.9/32".into(),
            "allowed_ip=fd00::/64".into(),
        ];
        let req = uapi::parse_set(body.iter().map(String::as_str))
            .unwrap_or_else(|e| panic!("base UAPI request: {e}"));
        DeviceConfig::default()
            .apply(&req)
            .unwrap_or_else(|e| panic!("base UAPI request: {e}"))
    })
}

fn hex32(b: u8) -> String {
    [b; 32].iter().map(|x| format!("{x:02x}")).collect()
}

/// A `set=1` body (the lines after `set=1`, up to the blank line, as the
/// UAPI socket reads them) through `parse_set`, applied to a configured
/// device with `DeviceConfig::apply`, rendered with `render_get`. After
/// apply: peer keys unique and not our own, allowed IPs with host bits
/// clear and each owned by one peer.
pub fn uapi(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.split('\n').take_while(|l| !l.is_empty());
    let Ok(req) = uapi::parse_set(lines) else {
        return;
    };
    let Ok(cfg) = uapi_base().apply(&req) else {
        return;
    };
    let own = cfg.public_key();
    let mut keys_seen = std::collections::HashSet::new();
    let mut nets = std::collections::HashSet::new();
    for p in &cfg.peers {
        assert!(keys_seen.insert(p.public_key), "two peers with one key");
        assert_ne!(Some(p.public_key), own, "a peer with our own key");
        for n in &p.allowed_ips {
            assert_eq!(*n, n.trunc(), "host bits in {n}");
            assert!(nets.insert(*n), "{n} owned by two peers");
        }
    }
    let _ = uapi::render_get(&cfg, &|_| uapi::PeerStats::default());
}

// ---------------------------------------------------------------------------
// Configuration files.

/// The TOML configuration file parser, `meshpeer::config::parse`, and
/// what the daemon makes of its result (`Options::or`, `daemon_config`,
/// `log_filter`) or of its error (`ConfigError::pretty`, which points at a
/// line and column). An accepted file's options hold checked values (tags
/// sorted, unique and valid; a non-empty state directory); an error's
/// place lies in the text and its line is that line of the text.
pub fn config(data: &[u8]) {
    use meshpeer::config::{self, ConfigError, Options};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(std::path::Path::new("fuzz.toml"), text) {
        Ok(opts) => {
            if let Some(tags) = &opts.tags {
                assert!(tags.windows(2).all(|w| w[0] < w[1]), "tags {tags:?}");
                for t in tags {
                    assert_eq!(config::parse_tag(t).as_ref(), Ok(t), "tag {t:?}");
                }
            }
            if let Some(d) = &opts.state_dir {
                assert!(!d.as_os_str().is_empty());
            }
            let layered = Options::default().or(opts.clone());
            assert_eq!(layered, opts);
            let _ = opts.daemon_config(vec!["192.0.2.1:51821".into()]);
            let _ = opts.log_filter();
        }
        Err(e) => {
            let pretty = e.pretty();
            if let ConfigError::At {
                line,
                column,
                source_line,
                ..
            } = &e
            {
                let lines: Vec<&str> = text.split('\n').collect();
                assert!(*line >= 1 && *line <= lines.len().max(1), "line {line}");
                assert!(*column >= 1);
                let want = lines.get(line - 1).copied().unwrap_or("");
                assert_eq!(source_line, want.trim_end_matches('\r'));
                assert!(pretty.contains(source_line.as_str()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Seeds.

/// Seed inputs for every target, made with meshpeer's own encoders:
/// `(target, file name, bytes)`.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let k = keys();
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let mut add = |t: &'static str, name: &str, bytes: Vec<u8>| out.push((t, name.into(), bytes));
    let with = |mode: u8, bytes: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(bytes);
        v
    };
    let cidr = CIDR.parse().unwrap_or_else(|_| unreachable!());

    // Tokens and credentials: network-stamped, member-stamped, joiner.
    let route = proto::Route {
        addr: "192.168.50.0".parse().unwrap_or_else(|_| unreachable!()),
        prefix: 24,
    };
    let tok = admission::issue_token_with(
        &k.net,
        cidr,
        NOW + 3600,
        vec![route],
        [7; 16],
        k.join.clone(),
    );
    let tok_never = admission::issue_token_with(&k.net, cidr, 0, vec![], [8; 16], k.join.clone());
    let adm = tok.admit(k.node_pk, NOW - 10);
    let net_stamp = admission::stamp(
        &k.net,
        Stamper::Network,
        k.net_pk,
        k.node_pk,
        [7; 16],
        NOW - 5,
    );
    let stamper_adm = tok_never.admit(k.stamper_pk, NOW - 100);
    let member_stamp = admission::stamp(
        &k.stamper,
        Stamper::Member {
            node_key: k.stamper_pk,
            admission: stamper_adm.clone(),
        },
        k.net_pk,
        k.node_pk,
        [7; 16],
        NOW - 5,
    );
    add("token", "text", with(0, tok.to_text().as_bytes()));
    add(
        "token",
        "text-never",
        with(0, tok_never.to_text().as_bytes()),
    );
    add(
        "token",
        "resigned",
        [&[1, 0][..], &proto::encode(&tok)].concat(),
    );
    let cred = Credential {
        admission: adm.clone(),
        stamp: Some(net_stamp.clone()),
    };
    let cred_member = Credential {
        admission: adm.clone(),
        stamp: Some(member_stamp.clone()),
    };
    let cred_joiner = Credential {
        admission: adm.clone(),
        stamp: None,
    };
    for (name, c) in [
        ("network", &cred),
        ("member", &cred_member),
        ("joiner", &cred_joiner),
    ] {
        add(
            "credential",
            &format!("raw-{name}"),
            with(0, &proto::encode(c)),
        );
        add(
            "credential",
            &format!("resigned-{name}"),
            [&[1, 0][..], &proto::encode(c)].concat(),
        );
    }
    let list = RevocationList {
        network_key: k.net_pk,
        issued_at_ms: 9,
        entries: vec![Revoked::Node(k.other_pk), Revoked::Token([7; 16])],
    };
    let list_text = list.sign(&k.net);
    add("credential", "revocations", with(2, list_text.as_bytes()));
    add(
        "credential",
        "revocations-resigned",
        [&[3, 0][..], &unb64(&list_text).unwrap_or_default()].concat(),
    );
    if let Ok(cert) = meshpeer::gossip::tls::NodeCert::new(&k.node, &cred) {
        add("credential", "certificate", with(4, cert.cert.as_ref()));
    }

    // Records.
    let body = RecordBody {
        network_key: k.net_pk,
        node_key: k.node_pk,
        version: NOW * 1000,
        name: "node-3".into(),
        overlay_ip: Ipv4Addr::new(10, 77, 0, 3),
        ip_claimed_at: NOW * 1000 - 50,
        wg_public_key: [3; 32],
        wg_port: 51820,
        endpoints: vec![
            "198.51.100.3:51820"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
            "[2001:db8::3]:51820"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        ],
        gossip_addr: "198.51.100.3:51821"
            .parse()
            .unwrap_or_else(|_| unreachable!()),
        tags: vec!["gpu".into(), "rack-1".into()],
        routes: vec![route],
        left: false,
        nat: record::NatKind::EndpointIndependent,
        relay: true,
        ephemeral: false,
        admission: adm.clone(),
        stamp: net_stamp.clone(),
    };
    let rec_text = body.sign(&k.node);
    let member_rec = RecordBody {
        stamp: member_stamp.clone(),
        left: true,
        nat: record::NatKind::Unknown,
        ..body.clone()
    };
    let member_text = member_rec.sign(&k.node);
    add("record", "raw", with(2, rec_text.as_bytes()));
    add(
        "record",
        "raw-member-stamped",
        with(2, member_text.as_bytes()),
    );
    add("record", "raw-no-id-revoking", with(4, rec_text.as_bytes()));
    add(
        "record",
        "resigned",
        [&[1, 0][..], &unb64(&rec_text).unwrap_or_default()].concat(),
    );
    add(
        "record",
        "resigned-member",
        [&[1, 0][..], &unb64(&member_text).unwrap_or_default()].concat(),
    );

    // Liveness, observations.
    let summary = liveness::Summary {
        count: 4,
        hash: 0x1234_5678_9abc,
    };
    let ping = Probe::Ping {
        nonce: 0,
        summary,
        proof_for: Some(k.node_pk),
    };
    let proof = signed(
        &k.node,
        domain::PROBE_PROOF,
        proto::encode(&liveness::ProbeProof {
            network_key: k.net_pk,
            node_key: k.node_pk,
            requester: k.stamper_pk,
            nonce: 1,
        }),
    );
    let ack = Probe::Ack {
        nonce: 0,
        summary,
        proof: Some(proof),
    };
    let ack1 = Probe::Ack {
        nonce: 1,
        summary: liveness::Summary::default(),
        proof: None,
    };
    add("liveness", "ping", with(0, &ping.encode()));
    add("liveness", "ack", with(0, &ack.encode()));
    add("liveness", "ack-1", with(0, &ack1.encode()));
    let alive = Alive {
        network_key: k.net_pk,
        node_key: k.node_pk,
        issued_at_ms: NOW * 1000 + 1,
        refutes: vec![liveness::Accusation {
            accuser: k.stamper_pk,
            since_ms: NOW * 1000,
        }],
    };
    let sus = Suspicions {
        network_key: k.net_pk,
        accuser: k.node_pk,
        issued_at_ms: NOW * 1000 + 2,
        targets: vec![
            liveness::Suspect {
                node_key: k.stamper_pk,
                since_ms: NOW * 1000,
            },
            liveness::Suspect {
                node_key: k.other_pk,
                since_ms: NOW * 1000,
            },
        ],
    };
    let obs = Observations {
        network_key: k.net_pk,
        observer: k.node_pk,
        issued_at: NOW * 1000 + 3,
        seen: vec![observe::Seen {
            node_key: k.stamper_pk,
            endpoint: "203.0.113.4:40000"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        }],
    };
    for (i, name, text) in [
        (1u8, "alive", alive.sign(&k.node)),
        (2, "suspicions", sus.sign(&k.node)),
        (3, "observations", obs.sign(&k.node)),
    ] {
        add("liveness", name, with(i, text.as_bytes()));
        add(
            "liveness",
            &format!("{name}-resigned"),
            [&[i + 3, 0][..], &unb64(&text).unwrap_or_default()].concat(),
        );
    }

    // Requests and replies.
    let hello = HelloReply {
        records: vec![rec_text.clone()],
        holders: vec![(Ipv4Addr::new(10, 77, 0, 3), k.node_pk)],
        names: vec![("node-3".into(), k.node_pk)],
        revoked: Some(list_text.clone()),
    };
    for (name, r) in [
        (
            "join",
            Request::Join {
                name: "node-3".into(),
            },
        ),
        ("hello", Request::Hello),
        ("allocate", Request::Allocate { peer: k.other_pk }),
        ("release", Request::Release { peer: k.other_pk }),
    ] {
        add(
            "request",
            &format!("request-{name}"),
            with(0, &proto::encode(&r)),
        );
    }
    let admitted = JoinReply::Admitted {
        stamp: net_stamp.clone(),
        hello: hello.clone(),
    };
    add(
        "request",
        "join-admitted",
        with(1, &proto::encode(&admitted)),
    );
    for (i, reason) in [
        Refusal::TokenExpired {
            expires_at: NOW,
            now: NOW + 1,
        },
        Refusal::Revoked,
        Refusal::NetworkFull,
        Refusal::NotAJoiner,
        Refusal::Busy,
        Refusal::Other("no".into()),
    ]
    .into_iter()
    .enumerate()
    {
        add(
            "request",
            &format!("join-refused-{i}"),
            with(
                1,
                &proto::encode(&JoinReply::Refused {
                    reason: reason.clone(),
                }),
            ),
        );
        if i == 3 {
            let r: Result<HelloReply, Refusal> = Err(reason);
            add("request", "hello-refused", with(2, &proto::encode(&r)));
        }
    }
    let ok: Result<HelloReply, Refusal> = Ok(hello.clone());
    add("request", "hello-ok", with(2, &proto::encode(&ok)));
    for (name, r) in [
        (
            "allocated",
            AllocReply::Allocated {
                port: 52900,
                lifetime_secs: 600,
            },
        ),
        ("released", AllocReply::Released),
        (
            "refused",
            AllocReply::Refused {
                reason: "not a relay".into(),
            },
        ),
    ] {
        add(
            "request",
            &format!("alloc-{name}"),
            with(3, &proto::encode(&r)),
        );
    }
    add("request", "hello-reply", with(4, &proto::encode(&hello)));

    // STUN.
    let txid = [0x5a; 12];
    add("stun", "binding-request", stun::binding_request(txid));
    add(
        "stun",
        "check-request",
        stun::check_request(txid, &[3; 32], &[4; 32]),
    );
    add(
        "stun",
        "response-v4",
        stun::binding_response(
            txid,
            "198.51.100.3:40000"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        ),
    );
    add(
        "stun",
        "response-v6",
        stun::binding_response(
            txid,
            "[2001:db8::3]:40000"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        ),
    );
    add("stun", "refusal", stun::refusal(txid));
    let mut classic = vec![0x00, 0x01, 0x00, 0x00];
    classic.extend_from_slice(&[0x42; 16]);
    add("stun", "classic-request", classic);

    // Relay: a handshake initiation from each end keyed to the other (the
    // mac1 latch), a response, data, and a stranger's datagram.
    let wg = |secret: u8, peer: u8| {
        use boringtun::noise::{Tunn, TunnResult};
        use boringtun::x25519::{PublicKey, StaticSecret};
        let peer = PublicKey::from(&StaticSecret::from([peer; 32]));
        let mut t = Tunn::new(StaticSecret::from([secret; 32]), peer, None, None, 1, None);
        let mut buf = vec![0u8; 256];
        match t.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(b) => b.to_vec(),
            _ => Vec::new(),
        }
    };
    let relay_frames = |fs: &[(u8, Vec<u8>)]| {
        let mut v = Vec::new();
        for (h, d) in fs {
            v.extend_from_slice(&((d.len() + 1) as u16).to_le_bytes());
            v.push(*h);
            v.extend_from_slice(d);
        }
        v
    };
    let init_ab = wg(3, 4);
    let init_ba = wg(4, 3);
    let mut data_msg = vec![4, 0, 0, 0];
    data_msg.extend_from_slice(&[0x11; 44]);
    let mut response = vec![2, 0, 0, 0];
    response.extend_from_slice(&[0x22; 88]);
    add(
        "relay",
        "mac1-latch",
        relay_frames(&[
            (4, init_ab.clone()),
            (3, init_ba.clone()),
            (0, data_msg.clone()),
            (1 | 8, data_msg.clone()),
        ]),
    );
    add(
        "relay",
        "known-addresses",
        relay_frames(&[
            (0, data_msg.clone()),
            (3, response.clone()),
            (4, data_msg.clone()),
            (6 | 48, init_ab.clone()),
            (1, data_msg.clone()),
        ]),
    );

    // Control socket.
    add("control", "status", with(0, br#"{"cmd":"status"}"#));
    add("control", "leave", with(0, br#"{"cmd":"leave"}"#));
    add(
        "control",
        "revoke",
        with(
            0,
            serde_json::json!({"cmd": "revoke", "list": list_text})
                .to_string()
                .as_bytes(),
        ),
    );
    add("control", "reply-left", with(1, br#"{"reply":"left"}"#));
    add(
        "control",
        "ping",
        with(0, br#"{"cmd":"ping","member":"node-4","timeout_ms":500}"#),
    );
    add("control", "netcheck", with(0, br#"{"cmd":"netcheck"}"#));
    let pong = serde_json::json!({
        "reply": "pong", "name": "node-4", "node_id": proto::node_id_string(&k.other_pk),
        "overlay_ip": "10.77.0.4", "rtt_us": 1200, "state": "connected", "path": "relayed",
        "relay": "node-9", "endpoint": "198.51.100.9:52901", "why_not_direct": "symmetric NAT"
    });
    add(
        "control",
        "reply-pong",
        with(1, pong.to_string().as_bytes()),
    );
    let netcheck = serde_json::json!({
        "reply": "netcheck", "nat": "endpoint-independent",
        "mapped_endpoints": ["203.0.113.10:51820"], "advertise_addr": "203.0.113.10",
        "wg_port": 51820, "gossip_port": 51821, "relaying": false,
        "stun_servers": ["stun.example.net:3478"],
        "answers": [{"server": "198.51.100.4:51820", "member": "node-4",
                     "mapped": "203.0.113.10:51820", "age_secs": 3},
                    {"server": "stun.example.net:3478", "member": null,
                     "mapped": "203.0.113.10:51820", "age_secs": 12}]
    });
    add(
        "control",
        "reply-netcheck",
        with(1, netcheck.to_string().as_bytes()),
    );
    add(
        "control",
        "reply-error",
        with(1, br#"{"reply":"error","message":"bad request"}"#),
    );
    let status = serde_json::json!({
        "reply": "status", "node": "node-3", "node_id": proto::node_id_string(&k.node_pk),
        "network": CIDR, "interface": "mp0", "backend": "userspace", "listen_port": 51820,
        "gossip_addr": "198.51.100.3:51821", "gossip_bytes_sent": 10, "gossip_bytes_received": 20,
        "gossip_rounds": 3, "gossip_rounds_in_sync": 2, "gossip_values_stored": 1,
        "gossip_values_rejected": 0, "nat": "public", "mapped_endpoints": ["198.51.100.3:51820"],
        "relaying": true, "relay_allocations": 2, "relay_forwarded": 300, "relay_dropped": 4,
        "self": {
            "name": "node-3", "node_id": "y", "overlay_ip": "10.77.0.3", "public_key": "k3",
            "endpoint": null, "state": "self", "path": null, "relay": null,
            "why_not_direct": null, "nat": "public", "last_handshake_secs": null,
            "rtt_us": null, "rx_bytes": 0, "tx_bytes": 0, "tags": [], "ephemeral": true
        },
        "members": [{
            "name": "node-4", "node_id": "x", "overlay_ip": "10.77.0.4", "public_key": "k",
            "endpoint": "198.51.100.4:51820", "state": "connected", "path": "direct",
            "relay": null, "why_not_direct": null, "nat": "public", "last_handshake_secs": 5,
            "rtt_us": 1200, "rx_bytes": 1, "tx_bytes": 2, "tags": ["gpu"], "conflict": null
        }]
    });
    add(
        "control",
        "reply-status",
        with(1, status.to_string().as_bytes()),
    );

    // UAPI.
    let set = format!(
        "private_key={}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\npublic_key={}\n\
         preshared_key={}\nprotocol_version=1\nendpoint=198.51.100.4:51820\n\
         persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.77.0.4/32\n\
         allowed_ip=192.168.50.0/24\npublic_key={}\nupdate_only=true\nendpoint=[2001:db8::9%1]:51820\n\
         allowed_ip=-10.77.0.9/32\nallowed_ip=fd00::1/64\npublic_key={}\nremove=true\n\n",
        hex32(7),
        hex32(4),
        hex32(0),
        hex32(9),
        hex32(8)
    );
    add("uapi", "set", set.into_bytes());
    add(
        "uapi",
        "reconcile",
        format!(
            "public_key={}\nendpoint=[2001:db8::4]:51820\nallowed_ip=10.77.0.9/32\n",
            hex32(4)
        )
        .into_bytes(),
    );

    // Configuration files: every key, and a few errors.
    add(
        "config",
        "every-key",
        b"state_dir = \"/var/lib/meshpeer\"\ninterface = \"mp0\"\nname = \"node-3\"\n\
wg_port = 51820\ngossip_port = 51821\nprobe_port = 51819\n\
advertise_addr = \"203.0.113.10\"\nbackend = \"auto\"\ndown_grace_secs = 60\n\
join_timeout_secs = 60\ntags = [\"gpu\", \"compute\"]\n\
stun_servers = [\"stun.example.net:3478\", \"[2001:db8::1]:3478\"]\nno_relay = false\n\
relay_ports = \"52900-57899\"\ntoken_file = \"/etc/meshpeer/token\"\n\
metrics_addr = \"127.0.0.1:9477\"\nlog_level = \"info,meshpeer::gossip=debug\"\n\
on_stop = \"leave\"\nephemeral = true\n"
            .to_vec(),
    );
    add("config", "unknown-key", b"interfase = \"mp0\"\n".to_vec());
    add("config", "bad-port", b"# ports\nwg_port = 70000\n".to_vec());
    add(
        "config",
        "bad-tag",
        b"tags = [\"ok\", \"Not OK\"]\n".to_vec(),
    );

    // Gossip: the messages of real rounds between two nodes, one of which
    // holds a signed record (so the real validator accepts it).
    let node_id = proto::node_id_string(&k.node_pk);
    let mut a = gossip_node("a", false, 1, &[("p", 20), ("q", 3)]);
    a.inject(
        &node_id,
        RECORD_KEY,
        rec_text.clone(),
        body.version,
        &k.trust,
    );
    let mut b = gossip_node("b", false, 2, &[("p", 5)]);
    let mut msgs = Vec::new();
    let mut msg = a.syn();
    let mut at_b = true;
    loop {
        msgs.push(msg.clone());
        let reply = if at_b {
            b.handle_message(msg, &AcceptAll)
        } else {
            a.handle_message(msg, &AcceptAll)
        };
        match reply {
            Some(r) => {
                msg = r;
                at_b = !at_b;
            }
            None => break,
        }
    }
    msgs.push(b.syn());
    msgs.push(ChitchatMessage::BadCluster);
    let mut big = gossip_node("c", true, 3, &[("p", 1), ("q", 1), ("r", 1)]);
    msgs.push(big.syn());
    for (i, m) in msgs.iter().enumerate() {
        add("gossip_message", &format!("msg-{i}"), m.serialize_to_vec());
    }
    // The state target gets b's side of the round (a's messages), and the
    // whole conversation as frames, under each validator.
    let framed = |ms: &[&ChitchatMessage]| {
        let mut v = Vec::new();
        for m in ms {
            let b = m.serialize_to_vec();
            v.extend_from_slice(&(b.len() as u16).to_le_bytes());
            v.extend_from_slice(&b);
        }
        v
    };
    let all: Vec<&ChitchatMessage> = msgs.iter().collect();
    for flags in [0u8, 1, 2, 4] {
        add(
            "gossip_state",
            &format!("round-{flags}"),
            with(flags, &framed(&all)),
        );
    }
    for (i, m) in msgs.iter().enumerate() {
        add("gossip_state", &format!("one-{i}"), with(2, &framed(&[m])));
    }
    out
}
