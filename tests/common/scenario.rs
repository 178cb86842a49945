//! The seed scenario: three nodes on one switch form a full WireGuard mesh,
//! then one leaves and the others drop it. Run on the host by tests/mesh.rs
//! and inside a VM with kernel WireGuard by tests/vm_kernel.rs.
//!
//! Needs root (network namespaces), iproute2, iputils-ping and wireguard-tools.
//! Not root: skipped, unless CI=true. `MESHPEER_EXPECT_BACKEND=kernel` (or
//! `userspace`) makes it assert which WireGuard backend the daemons use;
//! without it any backend is accepted.
//!
//! Topology: namespace `mpt-br` holds bridge `mpt-br0`; namespaces
//! `mpt-n1..3` are plugged into it with underlay 10.99.0.1-3/24 and run
//! meshpeer on WireGuard interfaces `mpt1..3` (unique names: the userspace
//! backend's UAPI sockets share /var/run/wireguard).

use super::*;
use std::time::Instant;

const NETWORK: &str = "10.77.0.0/16";

/// Runs the scenario; `test` names the calling test in skip/fail messages.
/// `expect_backend` ("kernel" or "userspace"), or else the environment's
/// `MESHPEER_EXPECT_BACKEND`, is the backend every node must report; with
/// neither, any backend is accepted.
pub fn three_nodes_form_a_full_mesh_and_one_leaves(test: &str, expect_backend: Option<&str>) {
    if !can_run(test, &["ip", "ping", "wg"]) {
        return;
    }
    let _serial = serial();
    let t0 = Instant::now();
    let expect_backend = expect_backend
        .map(str::to_string)
        .or_else(|| std::env::var("MESHPEER_EXPECT_BACKEND").ok())
        .filter(|s| !s.is_empty());
    progress(
        t0,
        format!(
            "meshpeer binary {}, expected backend {:?}, timeout scale {}",
            meshpeer_bin().display(),
            expect_backend,
            timeout_scale()
        ),
    );

    // Declared in this order so that they drop in reverse: daemons first,
    // then their namespaces, then the switch, then the scratch dir.
    let work = TempDir::new("mesh");
    let (_switch, _netns, nodes) = lan(3, work.path());
    progress(
        t0,
        format!("namespaces up, logs in {}", work.path().display()),
    );

    // n1 creates the network; n2 and n3 join through it.
    let token = nodes[0].init(NETWORK);
    progress(t0, "n1: init done");
    nodes[0].spawn_up();
    let n1 = &nodes[0];
    wait_for(secs(30), "n1 answers `status` with its overlay IP", || {
        n1.assert_running();
        let s = n1.status()?;
        status_overlay_ip(&s).ok_or_else(|| format!("no overlay_ip in {s}"))
    });
    progress(t0, "n1: up");
    for node in &nodes[1..] {
        node.spawn_join("10.99.0.1", &token);
    }

    // Every node reports its own overlay IP (and public key).
    let mut ips = Vec::new();
    let mut keys = Vec::new();
    for node in &nodes {
        let s = wait_for(
            secs(30),
            &format!("{} answers `status` with its overlay IP", node.name),
            || {
                node.assert_running();
                let s = node.status()?;
                status_overlay_ip(&s)
                    .map(|_| s.clone())
                    .ok_or_else(|| format!("no overlay_ip in {s}"))
            },
        );
        let ip = status_overlay_ip(&s).unwrap();
        let key = status_self(&s)
            .and_then(|m| m["public_key"].as_str())
            .unwrap_or_default()
            .to_string();
        let b = backend(&s).unwrap_or("?").to_string();
        progress(
            t0,
            format!("{}: overlay {ip}, backend {b}, key {key}", node.name),
        );
        if let Some(want) = &expect_backend {
            assert_eq!(
                &b, want,
                "{}: backend (MESHPEER_EXPECT_BACKEND={want})",
                node.name
            );
        }
        ips.push(ip);
        keys.push(key);
    }
    let mut uniq = ips.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 3, "overlay IPs must be distinct: {ips:?}");

    // All 6 ordered pairs ping over the overlay.
    let pairs: Vec<(usize, usize)> = (0..3)
        .flat_map(|a| (0..3).filter(move |&b| b != a).map(move |b| (a, b)))
        .collect();
    wait_for(
        secs(60),
        "all 6 ordered pairs ping each other over the overlay",
        || {
            for n in &nodes {
                n.assert_running();
            }
            for &(a, b) in &pairs {
                if !nodes[a].ping(&ips[b]) {
                    return Err(format!(
                        "{} -> {} ({}) does not ping",
                        nodes[a].name, nodes[b].name, ips[b]
                    ));
                }
            }
            Ok(())
        },
    );
    progress(t0, "full mesh: all 6 pairs ping");

    // Each WireGuard device holds exactly the 2 other nodes; each status lists 3 members.
    for (i, node) in nodes.iter().enumerate() {
        let mut want: Vec<&str> = (0..3)
            .filter(|&j| j != i)
            .map(|j| keys[j].as_str())
            .collect();
        want.sort();
        wait_for(
            secs(15),
            &format!(
                "{}: `wg show {} peers` lists exactly the 2 others",
                node.name, node.interface
            ),
            || {
                let mut peers = node.wg_peers()?;
                peers.sort();
                let keys_known = want.iter().all(|k| !k.is_empty());
                if peers.len() == 2 && (!keys_known || peers == want) {
                    Ok(())
                } else {
                    Err(format!("peers {peers:?}, want {want:?}"))
                }
            },
        );
        wait_for(
            secs(15),
            &format!("{}: status lists 3 members", node.name),
            || {
                let s = node.status()?;
                if members(&s).len() == 3 {
                    Ok(())
                } else {
                    Err(format!("members: [{}]", members_summary(&s)))
                }
            },
        );
    }
    progress(t0, "each node: 2 WireGuard peers, 3 members");

    // A first join tells the user what it does, on stderr (the log file).
    for n in &nodes[1..] {
        wait_until(
            secs(10),
            &format!("{}: join progress lines", n.name),
            || {
                let log = n.log_tail(10_000);
                log.contains("meshpeer: contacting seed 10.99.0.1:51821")
                    && log.contains("meshpeer: admitted by 10.99.0.1:51821")
                    && log.contains("meshpeer: overlay address ")
                    && log.contains("meshpeer: joined: all ")
            },
        );
    }

    // Status measures the round trip to each member over the overlay.
    for node in &nodes {
        wait_for(
            secs(20),
            &format!(
                "{}: status shows a round-trip time for both others",
                node.name
            ),
            || {
                let s = node.status()?;
                let rtts: Vec<Option<u64>> = s["members"]
                    .as_array()
                    .map(|ms| {
                        ms.iter()
                            .filter(|m| m["state"] != "self")
                            .map(|m| m["rtt_us"].as_u64())
                            .collect()
                    })
                    .unwrap_or_default();
                if rtts.len() == 2 && rtts.iter().all(|r| r.is_some_and(|us| us > 0)) {
                    Ok(())
                } else {
                    Err(format!("rtt_us of the others: {rtts:?}"))
                }
            },
        );
    }
    progress(t0, "each node: round-trip times to both others");

    // n3 leaves: its daemon exits 0, and n1 and n2 drop it.
    nodes[2].leave();
    let status = nodes[2].wait_exit(secs(15));
    assert!(
        status.success(),
        "n3: daemon exited with {status} after `leave`"
    );
    progress(t0, "n3: left and exited 0");
    let (n3_ip, n3_key) = (ips[2].clone(), keys[2].clone());
    for node in &nodes[..2] {
        wait_for(secs(15), &format!("{} drops n3", node.name), || {
            node.assert_running();
            let peers = node.wg_peers()?;
            if peers.len() != 1 || (!n3_key.is_empty() && peers.contains(&n3_key)) {
                return Err(format!("wg peers {peers:?} (n3 is {n3_key})"));
            }
            let s = node.status()?;
            let n3_connected = members(&s).iter().any(|m| {
                (m["name"] == "n3"
                    || m["overlay_ip"].as_str().map(strip_prefix_len).as_deref() == Some(&n3_ip))
                    && m["state"] == "connected"
            });
            if n3_connected {
                return Err(format!(
                    "status still has n3 connected: [{}]",
                    members_summary(&s)
                ));
            }
            Ok(())
        });
    }
    progress(t0, "n1, n2: n3 dropped");

    // The remaining two still reach each other.
    wait_until(secs(15), "n1 and n2 still ping each other", || {
        nodes[0].ping(&ips[1]) && nodes[1].ping(&ips[0])
    });
    progress(t0, "n1 <-> n2 still ping; done");
}
