//! The wire format in proto/PROTOCOL.md, pinned by proto/vectors/v2.json.
//! Every object is rebuilt from fixed keys and compared byte for byte
//! (ed25519 signatures are deterministic), then decoded and verified.
//! Regenerate after an intentional format change with
//! `MESHPEER_WRITE_VECTORS=1 cargo test --test proto_vectors`.

use base64::Engine;
use ed25519_dalek::SigningKey;
use meshpeer::admission::{
    issue_token_with, stamp, verify_credential, verify_revocations, RevocationList, Revocations,
    Revoked, Stamper, Token,
};
use meshpeer::liveness::{
    verify_alive, verify_suspicions, Accusation, Alive, Probe, Summary, Suspect, Suspicions,
};
use meshpeer::proto;
use meshpeer::record::{verify_record, NatKind, RecordBody, Route, Trust};
use serde_json::{json, Value};

const NOW: u64 = 1_800_000_100;

fn keys() -> (SigningKey, SigningKey, SigningKey) {
    (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
        SigningKey::from_bytes(&[3; 32]),
    )
}

fn build() -> Value {
    let (network, node, join) = keys();
    let nk = network.verifying_key().to_bytes();
    let node_key = node.verifying_key().to_bytes();
    let route = Route {
        addr: "192.168.10.0".parse().unwrap(),
        prefix: 24,
    };
    let token = issue_token_with(
        &network,
        "10.77.0.0/16".parse().unwrap(),
        1_900_000_000,
        vec![route],
        [4; 16],
        join,
    );
    let admission = token.admit(node_key, 1_800_000_000);
    let st = stamp(
        &network,
        Stamper::Network,
        nk,
        node_key,
        [4; 16],
        1_800_000_001,
    );
    let body = RecordBody {
        network_key: nk,
        node_key,
        version: 1_800_000_000_123,
        name: "node01".into(),
        overlay_ip: "10.77.0.1".parse().unwrap(),
        ip_claimed_at: 1_800_000_000_000,
        wg_public_key: [5; 32],
        wg_port: 51820,
        endpoints: vec![
            "203.0.113.10:51820".parse().unwrap(),
            "[2001:db8::1]:51820".parse().unwrap(),
        ],
        gossip_addr: "203.0.113.10:51821".parse().unwrap(),
        tags: vec!["slurm".into()],
        routes: vec![route],
        left: false,
        nat: NatKind::Public,
        relay: true,
        ephemeral: false,
        admission: admission.clone(),
        stamp: st.clone(),
    };
    let alive = Alive {
        network_key: nk,
        node_key,
        issued_at_ms: 1_800_000_000_200,
        refutes: vec![Accusation {
            accuser: [6; 32],
            since_ms: 1_800_000_000_150,
        }],
    };
    let suspicions = Suspicions {
        network_key: nk,
        accuser: node_key,
        issued_at_ms: 1_800_000_000_300,
        targets: vec![Suspect {
            node_key: [7; 32],
            since_ms: 1_800_000_000_250,
        }],
    };
    let revocations = RevocationList {
        network_key: nk,
        issued_at_ms: 1_800_000_000_400,
        entries: vec![Revoked::Node([8; 32]), Revoked::Token([9; 16])],
    };
    let probe = Probe::Ping {
        nonce: 42,
        summary: Summary { count: 3, hash: 7 },
        proof_for: None,
    };
    json!({
        "comment": "meshpeer wire format v2 test vectors; keys are ed25519 from 32-byte seeds of all 0x01 (network), 0x02 (node), 0x03 (join key)",
        "network_key_seed": hex::encode([1u8; 32]),
        "node_key_seed": hex::encode([2u8; 32]),
        "join_key_seed": hex::encode([3u8; 32]),
        "delegation_body": hex::encode(&token.delegation.body),
        "delegation_signature": hex::encode(&token.delegation.signature),
        "token_text": token.to_text(),
        "admission": hex::encode(proto::encode(&admission)),
        "stamp": hex::encode(proto::encode(&st)),
        "record_body": hex::encode(proto::encode(&body)),
        "record_text": body.sign(&node),
        "alive_text": alive.sign(&node),
        "suspicions_text": suspicions.sign(&node),
        "revocations_text": revocations.sign(&network),
        "probe": hex::encode(probe.encode()),
    })
}

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/vectors/v2.json")
}

#[test]
fn vectors_match_the_implementation() {
    let built = build();
    if std::env::var_os("MESHPEER_WRITE_VECTORS").is_some() {
        std::fs::write(path(), serde_json::to_string_pretty(&built).unwrap() + "\n").unwrap();
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    assert_eq!(file, built, "encoding differs from proto/vectors/v2.json");
}

#[test]
fn vectors_decode_and_verify() {
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    let (network, node, _) = keys();
    let nk = network.verifying_key().to_bytes();
    let node_key = node.verifying_key().to_bytes();
    let (token, delegation) = Token::parse(file["token_text"].as_str().unwrap()).unwrap();
    assert_eq!(delegation.network_key, nk);
    assert_eq!(delegation.expires_at, 1_900_000_000);
    assert_eq!(delegation.allow_routes.len(), 1);
    assert_eq!(
        hex::encode(&token.delegation.body),
        file["delegation_body"].as_str().unwrap()
    );
    let adm: proto::Signed = proto::decode(
        "admission",
        &hex::decode(file["admission"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let st: proto::Signed = proto::decode(
        "stamp",
        &hex::decode(file["stamp"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let none = Revocations::default();
    let v = verify_credential(&adm, &st, &nk, &node_key, NOW, &none).unwrap();
    assert_eq!(v.admitted_at, 1_800_000_001);
    assert!(v.by_network);
    let trust = Trust {
        network_key: &nk,
        now_unix: NOW,
        revoked: &none,
    };
    let rec = verify_record(
        file["record_text"].as_str().unwrap(),
        &trust,
        Some(&node_key),
    )
    .unwrap();
    assert_eq!(rec.body.name, "node01");
    assert_eq!(rec.body.endpoints.len(), 2);
    assert!(verify_alive(file["alive_text"].as_str().unwrap(), &nk, &node_key).is_ok());
    assert!(verify_suspicions(file["suspicions_text"].as_str().unwrap(), &nk, &node_key).is_ok());
    let list = verify_revocations(file["revocations_text"].as_str().unwrap(), &nk).unwrap();
    assert_eq!(list.entries.len(), 2);
    let probe = Probe::decode(&hex::decode(file["probe"].as_str().unwrap()).unwrap()).unwrap();
    assert!(matches!(probe, Probe::Ping { nonce: 42, .. }));
    // The record text is base64 of `version || postcard(Signed)`, whose body
    // is exactly `record_body`.
    let raw = base64::engine::general_purpose::STANDARD
        .decode(file["record_text"].as_str().unwrap())
        .unwrap();
    let signed: proto::Signed = proto::decode("record", &raw).unwrap();
    assert_eq!(
        hex::encode(&signed.body),
        file["record_body"].as_str().unwrap()
    );
    // Flip any byte of the record: verification fails, never panics.
    for i in 0..raw.len() {
        let mut bad = raw.clone();
        bad[i] ^= 0x40;
        let text = base64::engine::general_purpose::STANDARD.encode(&bad);
        assert!(
            verify_record(&text, &trust, Some(&node_key)).is_err(),
            "byte {i} flip accepted"
        );
    }
}
