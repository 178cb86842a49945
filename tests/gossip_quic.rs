//! chitchat over QUIC, in process on loopback: members converge, strangers
//! are refused, and the transport honours chitchat's Socket contract.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::Transport;
use ed25519_dalek::SigningKey;
use meshpeer::admission::issue_token;
use meshpeer::gossip::transport::ProbeError;
use meshpeer::gossip::{tls, Gossip, GossipIdentity, GossipTiming, QuicTransport};
use tokio::sync::watch;

struct Creds {
    node: SigningKey,
    transport: QuicTransport,
}

fn member(network: &SigningKey, seed: u8) -> Creds {
    let node = SigningKey::from_bytes(&[seed; 32]);
    let token = issue_token(network, "10.77.0.0/16".parse().unwrap(), 0);
    let cred = token.admit(node.verifying_key().to_bytes(), 1);
    let cert = tls::NodeCert::new(&node, &cred).unwrap();
    let (server, client) = tls::quic_configs(&cert, network.verifying_key().to_bytes()).unwrap();
    let (_tx, rx) = watch::channel(vec![format!("records-of-{seed}")]);
    std::mem::forget(_tx);
    let transport =
        QuicTransport::bind("127.0.0.1:0".parse().unwrap(), server, client, rx).unwrap();
    Creds { node, transport }
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn three_members_converge_over_quic() {
    let network = SigningKey::from_bytes(&[1; 32]);
    let timing = GossipTiming {
        interval: Duration::from_millis(100),
        ..Default::default()
    };
    let mut nodes = Vec::new();
    let mut seed: Option<SocketAddr> = None;
    for i in 0..3u8 {
        let c = member(&network, 10 + i);
        let addr = c.transport.local_addr().unwrap();
        let who = GossipIdentity {
            node_id: meshpeer::proto::node_id_string(&c.node.verifying_key().to_bytes()),
            generation: 1,
            advertise: addr,
            cluster_id: "test-cluster".into(),
        };
        let g = Gossip::start(
            who,
            seed.iter().map(|s| s.to_string()).collect(),
            &timing,
            c.transport,
            format!("value-{i}"),
        )
        .await
        .unwrap();
        seed.get_or_insert(addr);
        nodes.push(g);
    }
    for g in &nodes {
        wait_until("every node to hold every record", async || {
            let snap = g.snapshot().await;
            snap.len() == 3 && snap.iter().all(|e| e.record.is_some() && e.live)
        })
        .await;
    }
    // An update propagates.
    nodes[2].publish("value-2-new".into()).await;
    wait_until("the update to reach node 0", async || {
        nodes[0]
            .snapshot()
            .await
            .iter()
            .any(|e| e.record.as_deref() == Some("value-2-new"))
    })
    .await;
    let (sent, received) = nodes[0].transport.byte_counts();
    assert!(sent > 0 && received > 0);
    for g in nodes {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn strangers_are_refused_both_ways() {
    let network = SigningKey::from_bytes(&[1; 32]);
    let other = SigningKey::from_bytes(&[2; 32]);
    let a = member(&network, 20);
    let b = member(&network, 21);
    let stranger = member(&other, 22);
    let a_addr = a.transport.local_addr().unwrap();

    // A member answers a member's hello with its records.
    let reply = b.transport.hello(a_addr).await.unwrap();
    assert_eq!(reply.records, vec!["records-of-20".to_string()]);

    // A stranger (credential from another network) learns nothing.
    let err = stranger.transport.hello(a_addr).await.unwrap_err();
    assert!(matches!(err, ProbeError::Refused { .. }), "{err}");
    // And a member refuses to talk to a stranger posing as a server.
    let s_addr = stranger.transport.local_addr().unwrap();
    let err = a.transport.hello(s_addr).await.unwrap_err();
    assert!(matches!(err, ProbeError::Refused { .. }), "{err}");
}

#[tokio::test]
async fn socket_contract_as_chitchat_expects() {
    let network = SigningKey::from_bytes(&[1; 32]);
    let a = member(&network, 30);
    let b = member(&network, 31);
    let b_addr = b.transport.local_addr().unwrap();
    let mut sa = a
        .transport
        .open(a.transport.local_addr().unwrap())
        .await
        .unwrap();
    // Opening twice is an error.
    assert!(a
        .transport
        .open(a.transport.local_addr().unwrap())
        .await
        .is_err());
    let mut sb = b.transport.open(b_addr).await.unwrap();
    // recv waits for a message.
    assert!(tokio::time::timeout(Duration::from_millis(200), sb.recv())
        .await
        .is_err());
    sa.send(b_addr, chitchat::ChitchatMessage::BadCluster)
        .await
        .unwrap();
    let (from, got) = tokio::time::timeout(Duration::from_secs(10), sb.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, chitchat::ChitchatMessage::BadCluster);
    assert_eq!(from, a.transport.local_addr().unwrap());
    // Sending to an address nobody listens on returns at once.
    let t = std::time::Instant::now();
    sa.send(
        "127.0.0.1:9".parse().unwrap(),
        chitchat::ChitchatMessage::BadCluster,
    )
    .await
    .unwrap();
    assert!(t.elapsed() < Duration::from_millis(100));
}
