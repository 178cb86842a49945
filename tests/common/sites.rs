//! Two sites routed through their gateways (site-to-site, as seed 003 does
//! by hand with VPN gateways): run on this machine by tests/sites.rs and
//! inside a VM with kernel WireGuard by tests/vm_kernel.rs.
//!
//! ```text
//!   LAN A rt-la 192.168.51.10 ── rt-gwa (gateway, 192.168.51.1; advertises 192.168.51.0/24)
//!                                   │
//!   switch rt-br (10.98.0.0/24): rt-plain (init), rt-gwa, rt-gwb, rt-rogue
//!                                   │
//!   LAN B rt-lb 192.168.52.10 ── rt-gwb (gateway, 192.168.52.1; advertises 192.168.52.0/24)
//! ```
//!
//! The LAN hosts are not members: each has its gateway as default route,
//! as the LAN hosts of seed 004 have their master node. `plain` is the
//! `init` node: it holds the network key and may advertise any route, but
//! not 10.0.0.0/8, which holds the overlay: refused by every member. The
//! gateways joined with tokens from `invite --allow-route` for their LAN.
//! `rogue` joined with a plain token and advertises site B's LAN: every
//! member refuses it, installs nothing for rogue, and traffic goes on as
//! before. Then gateway B leaves: its route goes from every member, and
//! its IPv4 forwarding is turned off again.
//!
//! Names: namespaces `rt-*`, WireGuard interfaces `rt1..rt4`.

use super::*;
use std::collections::BTreeMap;
use std::time::Instant;

const NETWORK: &str = "10.77.0.0/16";
const LAN_A: &str = "192.168.51.0/24";
const LAN_B: &str = "192.168.52.0/24";
const HOST_A: &str = "192.168.51.10";
const HOST_B: &str = "192.168.52.10";

/// A member's entry in `status` by name.
fn member<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    members(s).iter().find(|m| m["name"] == name)
}

/// The state (and reason) `observer`'s status gives `owner`'s `route`.
fn route_state(observer: &Node, owner: &str, route: &str) -> Result<(String, String), String> {
    let s = observer.status()?;
    let m = member(&s, owner).ok_or_else(|| format!("{owner} not in [{}]", members_summary(&s)))?;
    let r = m["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["route"] == route))
        .ok_or_else(|| format!("{owner}'s routes have no {route}: {}", m["routes"]))?;
    Ok((
        r["state"].as_str().unwrap_or("?").to_string(),
        r["reason"].as_str().unwrap_or("").to_string(),
    ))
}

/// Waits until `observer` judges `owner`'s `route` `state`, with a reason
/// containing `reason`.
fn expect_route(observer: &Node, owner: &str, route: &str, state: &str, reason: &str) {
    wait_for(
        secs(20),
        &format!(
            "{} shows {owner}'s route {route} {state} ({reason})",
            observer.name
        ),
        || {
            observer.assert_running();
            let (st, why) = route_state(observer, owner, route)?;
            if st == state && why.contains(reason) {
                Ok(())
            } else {
                Err(format!("{st}: {why}"))
            }
        },
    );
}

/// `wg show IF allowed-ips` in `ns`: WireGuard key -> allowed IPs.
fn allowed_ips(ns: &Netns, iface: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let out = run_ok(ns.cmd("wg").args(["show", iface, "allowed-ips"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let key = it.next()?.to_string();
            Some((key, it.map(str::to_string).collect()))
        })
        .collect())
}

/// Runs the scenario; `test` names the calling test in skip/fail messages,
/// `expect_backend` (or `MESHPEER_EXPECT_BACKEND`) the backend every node
/// must report.
pub fn two_sites_route_through_their_gateways(test: &str, expect_backend: Option<&str>) {
    if !can_run(test, &["ip", "ping", "wg"]) {
        return;
    }
    let _serial = serial_prefix("rt");
    let t0 = Instant::now();
    let expect_backend = expect_backend
        .map(str::to_string)
        .or_else(|| std::env::var("MESHPEER_EXPECT_BACKEND").ok())
        .filter(|s| !s.is_empty());

    // Dropped in reverse: daemons, namespaces, switch, scratch dir.
    let work = TempDir::new("sites");
    let switch = Switch::new("rt-br");
    let names = ["plain", "gwa", "gwb", "rogue"];
    let netns: Vec<Netns> = names
        .iter()
        .map(|n| Netns::new(&format!("rt-{n}")))
        .collect();
    for (i, ns) in netns.iter().enumerate() {
        switch.attach(ns, &format!("10.98.0.{}/24", i + 1));
    }
    // The two LANs: a host behind each gateway, its default route via it.
    let lans: Vec<Netns> = ["rt-la", "rt-lb"].iter().map(|n| Netns::new(n)).collect();
    for (lan, (gw, (gw_ip, host_ip))) in lans.iter().zip([
        (&netns[1], ("192.168.51.1", HOST_A)),
        (&netns[2], ("192.168.52.1", HOST_B)),
    ]) {
        veth(gw, "rt-lan", lan, "rt-eth0");
        gw.addr_up("rt-lan", &format!("{gw_ip}/24"));
        lan.addr_up("rt-eth0", &format!("{host_ip}/24"));
        lan.ip(&["route", "add", "default", "via", gw_ip]);
    }
    let nodes: Vec<Node> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Node::new(n, &netns[i], &format!("rt{}", i + 1), work.path()))
        .collect();
    let (plain, gwa, gwb, rogue) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);
    progress(
        t0,
        format!("namespaces up, logs in {}", work.path().display()),
    );

    let token = plain.init(NETWORK);
    plain.spawn_up_with(&["--advertise-route", "10.0.0.0/8"]);
    wait_for(secs(30), "plain answers `status`", || {
        plain.assert_running();
        plain.status().map(|_| ())
    });
    let invite = |allow: Option<&str>| -> String {
        let mut args = vec!["invite"];
        if let Some(r) = allow {
            args.extend(["--allow-route", r]);
        }
        let out = plain.cli(&args).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (token_a, token_b) = (invite(Some(LAN_A)), invite(Some(LAN_B)));
    gwa.spawn_join_with("10.98.0.1", &token_a, &["--advertise-route", LAN_A]);
    gwb.spawn_join_with("10.98.0.1", &token_b, &["--advertise-route", LAN_B]);
    // A plain token: no route is allowed.
    rogue.spawn_join_with("10.98.0.1", &token, &["--advertise-route", LAN_B]);

    let mut overlay = BTreeMap::new();
    for n in &nodes {
        let s = wait_connected(n, 3, secs(60));
        if let Some(want) = &expect_backend {
            assert_eq!(backend(&s), Some(want.as_str()), "{}: backend", n.name);
        }
        overlay.insert(n.name.clone(), status_overlay_ip(&s).expect("overlay ip"));
    }
    progress(t0, format!("mesh up: {overlay:?}"));

    // Every member judges every route alike (each its own LAN excepted).
    for n in &nodes {
        if n.name != "gwa" {
            expect_route(n, "gwa", LAN_A, "installed", "");
        }
        if n.name != "gwb" {
            expect_route(n, "gwb", LAN_B, "installed", "");
        }
        expect_route(n, "rogue", LAN_B, "refused", "not allowed by its token");
        expect_route(
            n,
            "plain",
            "10.0.0.0/8",
            "refused",
            "overlaps the overlay network",
        );
    }
    expect_route(gwa, "gwa", LAN_A, "advertised", "");
    expect_route(gwb, "gwb", LAN_B, "advertised", "");
    progress(
        t0,
        "routes judged alike by every member; rogue's and plain's refused",
    );

    // Kernel routes and allowed IPs: the gateways' subnets to them, nothing
    // for rogue anywhere.
    let keys: BTreeMap<String, String> = {
        let s = plain.status().unwrap_or_else(|e| panic!("{e}"));
        members(&s)
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or("").to_string(),
                    m["public_key"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    for (i, n) in nodes.iter().enumerate() {
        let ns = &netns[i];
        wait_for(
            secs(10),
            &format!("{}: kernel routes and allowed IPs", n.name),
            || {
                let routes = ns.ip_out(&["-4", "route", "show"]);
                let ips = allowed_ips(ns, &n.interface)?;
                for (gw, lan) in [("gwa", LAN_A), ("gwb", LAN_B)] {
                    if n.name == gw {
                        continue;
                    }
                    let want = format!("{lan} dev {}", n.interface);
                    if !routes.lines().any(|l| l.starts_with(&want)) {
                        return Err(format!("no `{want}` in:\n{routes}"));
                    }
                    if !ips
                        .get(&keys[gw])
                        .is_some_and(|v| v.iter().any(|x| x == lan))
                    {
                        return Err(format!("{gw}'s peer lacks {lan}: {ips:?}"));
                    }
                }
                if routes.contains("10.0.0.0/8") {
                    return Err(format!("a route for plain's 10.0.0.0/8:\n{routes}"));
                }
                if n.name != "rogue" {
                    let r = ips.get(&keys["rogue"]).cloned().unwrap_or_default();
                    if r != vec![format!("{}/32", overlay["rogue"])] {
                        return Err(format!("rogue's peer holds more than its address: {r:?}"));
                    }
                }
                Ok(())
            },
        );
    }
    progress(t0, "kernel routes and allowed IPs as planned");

    // Gateways forward; the others (whose routes are all refused) do not.
    for (i, n) in nodes.iter().enumerate() {
        let want = if n.name.starts_with("gw") { "1" } else { "0" };
        assert_eq!(
            netns[i].sysctl("net/ipv4/ip_forward"),
            want,
            "{}: ip_forward",
            n.name
        );
    }

    // Traffic: LAN to LAN through both gateways, a plain member to both
    // LANs, a LAN host to a member's overlay address.
    let (la, lb) = (&lans[0], &lans[1]);
    wait_until(secs(20), "LAN host A pings LAN host B", || la.ping(HOST_B));
    wait_until(secs(10), "LAN host B pings LAN host A", || lb.ping(HOST_A));
    wait_until(secs(10), "plain pings both LAN hosts", || {
        plain.ping(HOST_A) && plain.ping(HOST_B)
    });
    wait_until(
        secs(10),
        "rogue pings both LAN hosts (through the gateways)",
        || rogue.ping(HOST_A) && rogue.ping(HOST_B),
    );
    wait_until(secs(10), "LAN host A pings plain's overlay address", || {
        la.ping(&overlay["plain"])
    });
    progress(
        t0,
        "LAN A <-> LAN B, plain -> both LANs, LAN -> overlay: all ping",
    );

    // Gateway B leaves: its subnet goes from every member; it turns
    // forwarding off again on its way out.
    gwb.leave();
    let st = gwb.wait_exit(secs(15));
    assert!(st.success(), "gwb exited with {st} after leave");
    for (i, n) in nodes.iter().enumerate() {
        if n.name == "gwb" {
            continue;
        }
        wait_for(secs(15), &format!("{} drops gwb's route", n.name), || {
            let routes = netns[i].ip_out(&["-4", "route", "show"]);
            if routes.contains("192.168.52.0/24") {
                Err(routes)
            } else {
                Ok(())
            }
        });
    }
    assert_eq!(
        netns[2].sysctl("net/ipv4/ip_forward"),
        "0",
        "gwb: forwarding off again"
    );
    assert!(
        !la.ping(HOST_B),
        "LAN B still reachable after its gateway left"
    );
    assert!(la.ping(&overlay["plain"]), "LAN A lost the mesh");
    progress(t0, "gwb left: its route gone everywhere; done");
}
