//! A hostile member against a real mesh (issue "Trust"): three meshpeer
//! daemons in network namespaces, and a fourth member, admitted with a valid
//! token, whose daemon is then replaced by this test process: from the
//! fourth namespace, with that member's own keys and credential, it speaks
//! gossip over QUIC with crafted messages (built with the crate's own
//! modules). For each attack the mesh must show it failed: addresses
//! unchanged, pings still answered, no member declared down, no daemon
//! crashed, memory bounded. Finally the operator revokes the attacker and
//! the mesh drops it; a joiner with an expired token is refused.
//!
//! Needs root (namespaces), iproute2, iputils-ping, wireguard-tools;
//! skipped otherwise unless CI=true.

#![allow(clippy::needless_range_loop)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat::{Chitchat, ChitchatConfig, ChitchatMessage, Serializable, Validator};
use common::*;
use ed25519_dalek::SigningKey;
use meshpeer::admission::Credential;
use meshpeer::gossip::tls;
use meshpeer::gossip::transport::{Inbound, JoinReply, QuicTransport, Refusal, Request};
use meshpeer::identity::Identity;
use meshpeer::liveness::{Suspect, Suspicions};
use meshpeer::proto;
use meshpeer::record::{NatKind, RecordBody};
use meshpeer::state::StateDir;
use meshpeer::trust::{PeerIdentity, TrustState, RECORD_KEY, SUSPECTS_KEY};

const NETWORK: &str = "10.77.0.0/16";

/// Takes everything: the attacker stores its forgeries unchecked.
struct Anything;
impl Validator for Anything {
    fn validate(&self, _: &str, _: &str, _: &str, _: u64) -> bool {
        true
    }
}

/// The attacker's gossip: a chitchat state it fills as it likes.
struct Evil {
    chitchat: Mutex<Chitchat>,
}

impl Inbound for Evil {
    fn gossip(
        &self,
        _from: SocketAddr,
        _peer: &PeerIdentity,
        msg: ChitchatMessage,
    ) -> Option<ChitchatMessage> {
        self.chitchat.lock().unwrap().handle_message(msg, &Anything)
    }
    fn request(&self, _: SocketAddr, _: &PeerIdentity, _: Request) -> Vec<u8> {
        Vec::new()
    }
}

/// Starts `f` on a thread inside network namespace `ns` (with a tokio
/// runtime it builds, whose threads are in it too).
fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || in_netns(&ns, f))
}

/// The n-th member's status entry of `name`.
fn member<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    members(status).iter().find(|m| m["name"] == name)
}

/// `wg show IF allowed-ips`: (peer key, allowed IPs) lines.
fn allowed_ips(node: &Node) -> String {
    let out = run_ok(
        node.cmd("wg")
            .args(["show", &node.interface, "allowed-ips"]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rss_kib(pid: u32) -> u64 {
    sys::proc_rss_kib(pid).unwrap_or(0)
}

#[test]
fn a_hostile_member_cannot_take_forge_crash_or_silence() {
    let test = "a_hostile_member_cannot_take_forge_crash_or_silence";
    if !can_run(test, &["ip", "ping", "wg"]) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let work = TempDir::new("hostile");
    let (_switch, netns, nodes) = lan(4, work.path());
    let token = nodes[0].init(NETWORK);
    nodes[0].spawn_up();
    wait_for(secs(30), "n1 up", || {
        nodes[0].assert_running();
        status_overlay_ip(&nodes[0].status()?).ok_or("no ip".to_string())
    });
    // n3 joins through n2, so n2 stamps it (phase 6 revokes n2).
    nodes[1].spawn_join("10.99.0.1", &token);
    wait_for(secs(30), "n2 up", || {
        nodes[1].assert_running();
        status_overlay_ip(&nodes[1].status()?).ok_or("no ip".to_string())
    });
    nodes[2].spawn_join("10.99.0.2", &token);
    nodes[3].spawn_join("10.99.0.1", &token);
    let mut ips = Vec::new();
    for n in &nodes {
        let ip = wait_for(secs(30), &format!("{} has an overlay IP", n.name), || {
            n.assert_running();
            status_overlay_ip(&n.status()?).ok_or("no ip".to_string())
        });
        ips.push(ip);
    }
    wait_for(secs(60), "all 12 ordered pairs ping", || {
        for a in 0..4 {
            for b in 0..4 {
                if a != b && !nodes[a].ping(&ips[b]) {
                    return Err(format!("n{} -> n{} does not ping", a + 1, b + 1));
                }
            }
        }
        Ok(())
    });
    progress(t0, "4-node mesh up; n4 turns hostile");

    // n4's daemon stops; this process takes its keys and credential.
    nodes[3].stop();
    let dir = StateDir::open(&nodes[3].state_dir).unwrap();
    let id = Identity::load(&dir).unwrap();
    let (network, admission, stamp) = meshpeer::daemon::load_network(&dir).unwrap();
    let stamp = stamp.expect("n4 was admitted");
    let victim_ip: std::net::Ipv4Addr = ips[1].parse().unwrap();
    let victims: Vec<SocketAddr> = (1..=3)
        .map(|i| format!("10.99.0.{i}:51821").parse().unwrap())
        .collect();
    let node_key = id.node_key();
    let node_id = proto::node_id_string(&node_key);
    let n2_key = {
        let s = nodes[1].status().unwrap();
        proto::parse_node_id(status_self(&s).unwrap()["node_id"].as_str().unwrap()).unwrap()
    };
    let n1_pid = nodes[0].pid().unwrap();
    let rss_before = rss_kib(n1_pid);

    // The attacker's endpoint, in n4's namespace.
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let attacker = {
        let admission = admission.clone();
        let stamp = stamp.clone();
        let nodes_n4 = netns[3].name().to_string();
        spawn_in_netns(&nodes_n4, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let trust = Arc::new(TrustState::new(network, meshpeer::trust::system_clock()));
                let cred = Credential {
                    admission: admission.clone(),
                    stamp: Some(stamp.clone()),
                };
                let cert = tls::NodeCert::new(&id.signing, &cred).unwrap();
                let (server, client) = tls::quic_configs(&cert, trust.clone()).unwrap();
                let transport = QuicTransport::bind(
                    "10.99.0.4:51821".parse().unwrap(),
                    server,
                    client,
                    trust.clone(),
                )
                .unwrap();
                let evil = Arc::new(Evil {
                    chitchat: Mutex::new(Chitchat::new(ChitchatConfig::new(
                        node_id.as_str(),
                        network.id(),
                    ))),
                });
                transport.set_inbound(evil.clone());
                let push = |evil: &Evil| {
                    for v in &victims {
                        if transport.try_start_round(*v) {
                            let syn = evil.chitchat.lock().unwrap().syn();
                            transport.send(*v, &syn);
                        }
                    }
                };
                let record = |version: u64, ip: std::net::Ipv4Addr, claimed: u64| RecordBody {
                    network_key: network.key,
                    node_key,
                    version,
                    name: "n4".into(),
                    overlay_ip: ip,
                    ip_claimed_at: claimed,
                    wg_public_key: id.wg_public(),
                    wg_port: 51820,
                    endpoints: vec!["10.99.0.4:51820".parse().unwrap()],
                    gossip_addr: "10.99.0.4:51821".parse().unwrap(),
                    tags: vec![],
                    routes: vec![],
                    left: false,
                    nat: NatKind::Public,
                    relay: false,
                    ephemeral: false,
                    admission: admission.clone(),
                    stamp: stamp.clone(),
                };

                // 1. Take n2's address, with the earliest claim there is.
                let v = meshpeer::clock::unix_ms() + 1000;
                let text = record(v, victim_ip, 0).sign(&id.signing);
                evil.chitchat
                    .lock()
                    .unwrap()
                    .set(RECORD_KEY, text, v)
                    .unwrap();
                for _ in 0..20 {
                    push(&evil);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                tx.send("address").unwrap();

                // 2. Forge: n2's record signed by us, at a huge version; and
                //    accuse n2 again and again.
                let n2_id = proto::node_id_string(&n2_key);
                let mut forged = record(u64::MAX / 2, victim_ip, 0);
                forged.node_key = n2_key;
                let forged = forged.sign(&id.signing);
                evil.chitchat.lock().unwrap().inject(
                    &n2_id,
                    RECORD_KEY,
                    forged,
                    u64::MAX / 2,
                    &Anything,
                );
                for _ in 0..40 {
                    let v = meshpeer::clock::unix_ms();
                    let s = Suspicions {
                        network_key: network.key,
                        accuser: node_key,
                        issued_at_ms: v,
                        targets: vec![Suspect {
                            node_key: n2_key,
                            since_ms: v,
                        }],
                    }
                    .sign(&id.signing);
                    let _ = evil.chitchat.lock().unwrap().set(SUSPECTS_KEY, s, v);
                    push(&evil);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                tx.send("liveness").unwrap();

                // 3. Crafted and malformed messages, the kind that crashed
                //    or flooded chitchat 0.11.
                let mut crafted: Vec<Vec<u8>> = Vec::new();
                // A delta whose versions go back (upstream: an assert).
                let mut hdr = Vec::new();
                45_139u16.serialize(&mut hdr);
                1u8.serialize(&mut hdr);
                let delta_msg = |ops: &[u8]| {
                    let mut m = hdr.clone();
                    m.push(2); // Ack
                    m.push(0); // no digest
                               // one uncompressed block, then no more blocks
                    m.push(2);
                    (ops.len() as u16).serialize(&mut m);
                    m.extend_from_slice(ops);
                    m.push(0);
                    m
                };
                let mut ops = Vec::new();
                ops.push(0u8);
                n2_id.as_str().serialize(&mut ops);
                0u64.serialize(&mut ops);
                for version in [9u64, 3] {
                    ops.push(1);
                    "record".serialize(&mut ops);
                    "x".serialize(&mut ops);
                    version.serialize(&mut ops);
                }
                crafted.push(delta_msg(&ops));
                // upstream's SetMaxVersion op (tag 2) and unknown tags
                crafted.push(delta_msg(&[2, 1, 2, 3, 4, 5, 6, 7, 8]));
                // A zip bomb: 2.4 MB of zeros in a few KB of compressed blocks.
                {
                    let mut m = hdr.clone();
                    m.push(2);
                    m.push(0);
                    let mut w =
                        chitchat::serialize::CompressedStreamWriter::with_block_threshold(16_000);
                    for _ in 0..40 {
                        w.append(&[0u8; 60_000]);
                    }
                    m.extend_from_slice(&w.finish());
                    crafted.push(m);
                }
                // A digest naming 60,000 made-up nodes.
                {
                    let mut m = hdr.clone();
                    m.push(1); // SynAck
                    m.push(1); // with digest
                    m.push(0); // scope: all
                    60_000u32.serialize(&mut m);
                    for i in 0..60_000u32 {
                        format!("fake-{i}").as_str().serialize(&mut m);
                        u64::MAX.serialize(&mut m);
                    }
                    crafted.push(m);
                }
                // 1,000 made-up members with garbage values, in one delta.
                {
                    let mut ops = Vec::new();
                    for i in 0..1000u32 {
                        let mut k = [0u8; 32];
                        k[..4].copy_from_slice(&i.to_le_bytes());
                        ops.push(0u8);
                        proto::node_id_string(&k).as_str().serialize(&mut ops);
                        0u64.serialize(&mut ops);
                        ops.push(1);
                        "record".serialize(&mut ops);
                        "garbage".serialize(&mut ops);
                        1u64.serialize(&mut ops);
                    }
                    // (sent uncompressed, in blocks of at most 60 KB)
                    let mut m = hdr.clone();
                    m.push(2);
                    m.push(0);
                    for chunk in ops.chunks(60_000) {
                        m.push(2);
                        (chunk.len() as u16).serialize(&mut m);
                        m.extend_from_slice(chunk);
                    }
                    m.push(0);
                    crafted.push(m);
                }
                // Noise.
                crafted.push(vec![0xff; 3000]);
                crafted.push(Vec::new());
                for _ in 0..5 {
                    for m in &crafted {
                        for v in &victims {
                            transport.send_raw(*v, m.clone());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                tx.send("crafted").unwrap();

                // 4. After the revocation: our connections are refused.
                let _ = done_rx.recv();
                let r = transport
                    .request(victims[0], &Request::Hello, Duration::from_secs(8))
                    .await;
                transport.close();
                r.is_err()
            })
        })
    };

    // -- 1: the address stays n2's. --
    assert_eq!(rx.recv().unwrap(), "address");
    progress(t0, "attack 1 (take n2's address) sent");
    for (i, n) in nodes[..3].iter().enumerate() {
        wait_for(
            secs(20),
            &format!("{} sees n4's claim and refuses it", n.name),
            || {
                let s = n.status()?;
                if i == 1 {
                    // n2 keeps its address.
                    return (status_overlay_ip(&s).as_deref() == Some(&ips[1]))
                        .then_some(())
                        .ok_or(format!("n2 moved to {:?}", status_overlay_ip(&s)));
                }
                let n4 = member(&s, "n4").ok_or("n4 unknown")?;
                if n4["conflict"].as_str() != Some(&format!("address {}", ips[1])) {
                    return Err(format!("n4: {n4}"));
                }
                let wg = allowed_ips(n);
                if wg.contains(&format!("{}/32", ips[1])) && member(&s, "n2").is_some() {
                    Ok(())
                } else {
                    Err(wg)
                }
            },
        );
    }
    assert!(
        nodes[0].ping(&ips[1]) && nodes[2].ping(&ips[1]),
        "n2 still answers at its address"
    );
    progress(
        t0,
        "attack 1 failed: n2 keeps its address everywhere, pings answer",
    );

    // -- 2: n2 is never declared down; forged values are refused. --
    let mut checks = 0;
    while rx.try_recv().is_err() {
        for n in &nodes[..3] {
            let s = n.status().unwrap();
            if let Some(m) = member(&s, "n2") {
                assert_ne!(m["state"], "down", "{} calls n2 down: {s}", n.name);
            }
        }
        checks += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..25 {
        for n in &nodes[..3] {
            let s = n.status().unwrap();
            if let Some(m) = member(&s, "n2") {
                assert_ne!(
                    m["state"], "down",
                    "{} calls n2 down after the attack",
                    n.name
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rejected: u64 = nodes[..3]
        .iter()
        .map(|n| {
            n.status().unwrap()["gossip_values_rejected"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(
        rejected > 0,
        "the forged record must have been refused somewhere"
    );
    let s1 = nodes[0].status().unwrap();
    let n2 = member(&s1, "n2").unwrap();
    assert_eq!(n2["overlay_ip"].as_str(), Some(ips[1].as_str()));
    progress(
        t0,
        format!(
            "attack 2 failed: n2 never down ({checks} sweeps), {rejected} forged values refused"
        ),
    );

    // -- 3: crafted messages crash nothing, create nothing, cost little. --
    assert_eq!(rx.recv().unwrap(), "crafted");
    std::thread::sleep(Duration::from_secs(2));
    for n in &nodes[..3] {
        n.assert_running();
        let s = n.status().unwrap();
        assert_eq!(
            members(&s).len(),
            4,
            "{}: members [{}]",
            n.name,
            members_summary(&s)
        );
    }
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                assert!(
                    nodes[a].ping(&ips[b]),
                    "n{} -> n{} after the crafted messages",
                    a + 1,
                    b + 1
                );
            }
        }
    }
    let rss_after = rss_kib(n1_pid);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "n1 grew from {rss_before} KiB to {rss_after} KiB"
    );
    progress(t0, format!("attack 3 failed: all running, 4 members, pings answer, n1 RSS {rss_before} -> {rss_after} KiB"));

    // -- 4: the operator revokes n4: everyone drops it, it is refused. --
    let dir1 = nodes[0].state_dir.display().to_string();
    let out = run_ok(std::process::Command::new(meshpeer_bin()).args([
        "revoke",
        &proto::node_id_string(&node_key),
        "--state-dir",
        &dir1,
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    progress(
        t0,
        format!("revoke: {}", String::from_utf8_lossy(&out.stderr).trim()),
    );
    let n4_wg = proto::key_b64(&Identity::load(&dir).unwrap().wg_public());
    for n in &nodes[..3] {
        wait_for(
            secs(15),
            &format!("{} drops the revoked n4", n.name),
            || {
                let peers = n.wg_peers()?;
                let s = n.status()?;
                if peers.contains(&n4_wg) || member(&s, "n4").is_some() {
                    Err(format!("peers {peers:?}"))
                } else {
                    Ok(())
                }
            },
        );
    }
    done_tx.send(()).unwrap();
    assert!(
        attacker.join().unwrap(),
        "the revoked member could still talk to n1"
    );
    progress(
        t0,
        "revoked: n4 dropped by every member, its connections refused",
    );

    // -- 5: a joiner with an expired token is refused, saying so. --
    let secret = {
        use base64::Engine;
        let text = std::fs::read_to_string(nodes[0].state_dir.join("network.key")).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .unwrap();
        SigningKey::from_bytes(&raw.try_into().unwrap())
    };
    let expired = meshpeer::admission::issue_token(
        &secret,
        NETWORK.parse().unwrap(),
        meshpeer::clock::unix_ms() / 1000 - 60,
        vec![],
    );
    let ns4 = netns[3].name().to_string();
    let reply = spawn_in_netns(&ns4, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let joiner = SigningKey::from_bytes(&[77; 32]);
            let cred = Credential {
                admission: expired.admit(joiner.verifying_key().to_bytes(), 0),
                stamp: None,
            };
            let trust = Arc::new(TrustState::new(network, meshpeer::trust::system_clock()));
            let cert = tls::NodeCert::new(&joiner, &cred).unwrap();
            let (server, client) = tls::quic_configs(&cert, trust.clone()).unwrap();
            let t = QuicTransport::bind("10.99.0.4:51822".parse().unwrap(), server, client, trust)
                .unwrap();
            let r = t
                .request(
                    "10.99.0.1:51821".parse().unwrap(),
                    &Request::Join {
                        name: "late".into(),
                    },
                    Duration::from_secs(8),
                )
                .await;
            t.close();
            r
        })
    })
    .join()
    .unwrap();
    // Refused at the TLS handshake (an expired joiner credential is not
    // admitted at all) or, if it got that far, with "token expired".
    match reply {
        Err(e) => assert!(e.to_string().contains("refused"), "{e}"),
        Ok(bytes) => {
            let r: JoinReply = proto::decode("join reply", &bytes).unwrap();
            assert!(
                matches!(
                    r,
                    JoinReply::Refused {
                        reason: Refusal::TokenExpired { .. }
                    }
                ),
                "{r:?}"
            );
        }
    }
    progress(t0, "an expired token is refused");

    // -- 6: the operator revokes n2, which admitted n3: every member drops
    // it (its connections are cut, so it may never hear of it); n3's stamp is void, it gets a new one from n1 (its
    // token is still good) and stays a member. --
    let n3_wg = status_self(&nodes[2].status().unwrap()).unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let n2_wg = status_self(&nodes[1].status().unwrap()).unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    run_ok(std::process::Command::new(meshpeer_bin()).args(["revoke", "n2", "--state-dir", &dir1]))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(secs(30), "n3 is stamped again and n1 keeps it", || {
        let log = nodes[2].log_tail(10_000);
        if !log.contains("member again with a new stamp") {
            return Err("n3 not stamped again yet".into());
        }
        let s = nodes[0].status()?;
        let peers = nodes[0].wg_peers()?;
        let n3 = member(&s, "n3").ok_or("n1 does not list n3")?;
        if peers.contains(&n2_wg) || member(&s, "n2").is_some() {
            return Err("n1 still has n2".into());
        }
        if n3["state"] != "connected" || !peers.contains(&n3_wg) {
            return Err(format!("n3 at n1: {n3}"));
        }
        Ok(())
    });
    wait_until(secs(15), "n1 and n3 ping each other", || {
        nodes[0].ping(&ips[2]) && nodes[2].ping(&ips[0])
    });
    progress(
        t0,
        "n2 revoked: n1 dropped it; n3 (stamped by n2) was stamped again by n1 and kept",
    );
}
