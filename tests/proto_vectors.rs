//! The wire format in proto/PROTOCOL.md, pinned by proto/vectors/v1.json.
//! Every object is rebuilt from fixed keys and compared byte for byte
//! (ed25519 signatures are deterministic), then decoded and verified.
//! Regenerate after an intentional format change with
//! `MESHPEER_WRITE_VECTORS=1 cargo test --test proto_vectors`.

use base64::Engine;
use ed25519_dalek::SigningKey;
use meshpeer::admission::{issue_token_with, verify_admission_of, Token};
use meshpeer::proto;
use meshpeer::record::{verify_record, NatKind, RecordBody, Route};
use serde_json::{json, Value};

fn build() -> Value {
    let network = SigningKey::from_bytes(&[1; 32]);
    let node = SigningKey::from_bytes(&[2; 32]);
    let join = SigningKey::from_bytes(&[3; 32]);
    let token = issue_token_with(
        &network,
        "10.77.0.0/16".parse().unwrap(),
        1_900_000_000,
        [4; 16],
        join,
    );
    let admission = token.admit(node.verifying_key().to_bytes(), 1_800_000_000);
    let body = RecordBody {
        network_key: network.verifying_key().to_bytes(),
        node_key: node.verifying_key().to_bytes(),
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
        routes: vec![Route {
            addr: "192.168.10.0".parse().unwrap(),
            prefix: 24,
        }],
        left: false,
        nat: NatKind::Public,
        relay: true,
        admission: admission.clone(),
    };
    let record_text = body.sign(&node);
    json!({
        "comment": "meshpeer wire format v1 test vectors; keys are ed25519 from 32-byte seeds of all 0x01 (network), 0x02 (node), 0x03 (join key)",
        "network_key_seed": hex::encode([1u8; 32]),
        "node_key_seed": hex::encode([2u8; 32]),
        "join_key_seed": hex::encode([3u8; 32]),
        "delegation_body": hex::encode(&token.delegation.body),
        "delegation_signature": hex::encode(&token.delegation.signature),
        "token_text": token.to_text(),
        "admission": hex::encode(proto::encode(&admission)),
        "record_body": hex::encode(proto::encode(&body)),
        "record_text": record_text,
    })
}

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/vectors/v1.json")
}

#[test]
fn vectors_match_the_implementation() {
    let built = build();
    if std::env::var_os("MESHPEER_WRITE_VECTORS").is_some() {
        std::fs::write(path(), serde_json::to_string_pretty(&built).unwrap() + "\n").unwrap();
    }
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    assert_eq!(file, built, "encoding differs from proto/vectors/v1.json");
}

#[test]
fn vectors_decode_and_verify() {
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap();
    let network = SigningKey::from_bytes(&[1; 32]).verifying_key().to_bytes();
    let node = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
    let (token, delegation) = Token::parse(file["token_text"].as_str().unwrap()).unwrap();
    assert_eq!(delegation.network_key, network);
    assert_eq!(delegation.expires_at, 1_900_000_000);
    assert_eq!(
        hex::encode(&token.delegation.body),
        file["delegation_body"].as_str().unwrap()
    );
    let adm_bytes = hex::decode(file["admission"].as_str().unwrap()).unwrap();
    let adm: proto::Signed = proto::decode("admission", &adm_bytes).unwrap();
    assert_eq!(
        verify_admission_of(&adm, &network, &node)
            .unwrap()
            .admitted_at,
        1_800_000_000
    );
    let rec = verify_record(file["record_text"].as_str().unwrap(), &network, Some(&node)).unwrap();
    assert_eq!(rec.body.name, "node01");
    assert_eq!(rec.body.endpoints.len(), 2);
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
            verify_record(&text, &network, Some(&node)).is_err(),
            "byte {i} flip accepted"
        );
    }
}
