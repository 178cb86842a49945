//! `testnet probe-nat`: checks that each emulated NAT behaves as it claims,
//! with real UDP packets.
//!
//! For each kind it builds a tiny topology — two public "servers" A and B
//! and two clients C1, C2 behind the same NAT router (for `cgnat`: the same
//! home behind the same CGNAT) — with 3-second UDP mapping timeouts, and
//! checks:
//! * mapping: C1 sends from one port to A:3478, A:3479 and B:3478; what
//!   address and ports do the servers see? (endpoint-independent mapping =
//!   one port for all; symmetric = a new port per destination)
//! * the address seen is the NAT's public address (the CGNAT's for cgnat);
//! * filtering: a packet from an endpoint C1 never sent to is dropped;
//!   a reply from an endpoint it sent to arrives;
//! * no hairpinning: C2 → C1's public mapping does not arrive;
//! * expiry: after the UDP timeout an inbound packet on the old mapping is
//!   dropped;
//! * `conntrack -F` (flush_nat) forgets mappings.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cleanup::{self, RunGuard};
use crate::sys;
use crate::topology::{Kind, Mix, Plan, TopoOptions};

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub kind: String,
    pub public_ip_of_nat: String,
    pub mapped: Vec<String>,
    pub endpoint_independent_mapping: bool,
    pub port_preserved: bool,
    pub mapped_to_nat_address: bool,
    pub reply_from_contacted_endpoint_arrives: bool,
    pub unsolicited_inbound_dropped: bool,
    pub hairpin: bool,
    pub mapping_expires: bool,
    pub flush_forgets_mapping: bool,
    pub secs: f64,
    pub ok: bool,
    pub failures: Vec<String>,
}

const TIMEOUT_SECS: u32 = 3;

fn udp_in(ns: &str, ip: Ipv4Addr, port: u16) -> Result<UdpSocket> {
    let s = sys::in_netns(ns, move || {
        Ok(UdpSocket::bind(SocketAddrV4::new(ip, port))?)
    })?;
    s.set_read_timeout(Some(Duration::from_millis(400)))?;
    Ok(s)
}

/// Receives one datagram (or None after the read timeout).
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddrV4)> {
    let mut buf = [0u8; 1500];
    match s.recv_from(&mut buf) {
        Ok((n, std::net::SocketAddr::V4(a))) => Some((buf[..n].to_vec(), a)),
        _ => None,
    }
}

fn drain(s: &UdpSocket) {
    s.set_read_timeout(Some(Duration::from_millis(50))).ok();
    while recv(s).is_some() {}
    s.set_read_timeout(Some(Duration::from_millis(400))).ok();
}

/// Did `s` get a datagram with payload `tag`?
fn got(s: &UdpSocket, tag: &[u8]) -> bool {
    for _ in 0..3 {
        match recv(s) {
            Some((d, _)) if d == tag => return true,
            Some(_) => continue,
            None => return false,
        }
    }
    false
}

/// Probes one kind; builds and destroys its own namespaces.
pub fn probe(kind: Kind) -> Result<ProbeResult> {
    let t = std::time::Instant::now();
    let prefix = cleanup::new_prefix();
    cleanup::register(&prefix)?;
    let _guard = RunGuard {
        prefix: prefix.clone(),
    };
    // One public host to talk to, plus the kind under test (3 public hosts
    // when public is the kind under test).
    let mut mix = Mix::only(kind, if kind == Kind::Public { 3 } else { 2 });
    if kind != Kind::Public {
        mix.public = 1;
    }
    let opts = TopoOptions {
        kind: "mixed".into(),
        mix,
        slots: 4,
        nodes_per_home: 2,
        homes_per_cgnat: 2,
        hosts_per_isp: 128,
        udp_timeout_secs: Some(TIMEOUT_SECS),
        udp_stream_timeout_secs: Some(TIMEOUT_SECS),
        seed: 7,
        home_size_exact: true,
        home_sizes: Default::default(),
        stun_server: false,
        sites: vec![],
    };
    let plan = Plan::new(&prefix, &opts)?;
    plan.build()?;
    let servers: Vec<&crate::topology::NodeSpec> = plan
        .nodes
        .iter()
        .filter(|n| n.kind == Kind::Public)
        .take(2)
        .collect();
    let clients: Vec<&crate::topology::NodeSpec> = plan
        .nodes
        .iter()
        .filter(|n| n.kind == kind && !servers.iter().any(|s| s.index == n.index))
        .take(2)
        .collect();
    if servers.len() < 2 || clients.len() < 2 {
        bail!("probe topology for {kind:?} lacks servers or clients");
    }
    let (a, b) = (servers[0], servers[1]);
    let (c1, c2) = (clients[0], clients[1]);
    let a1 = udp_in(&a.ns, a.underlay, 3478)?;
    let a2 = udp_in(&a.ns, a.underlay, 3479)?;
    let a3 = udp_in(&a.ns, a.underlay, 3480)?;
    let a4 = udp_in(&a.ns, a.underlay, 3482)?;
    let a5 = udp_in(&a.ns, a.underlay, 3483)?;
    let b1 = udp_in(&b.ns, b.underlay, 3478)?;
    let k1 = udp_in(&c1.ns, Ipv4Addr::UNSPECIFIED, 40000)?;
    let k2 = udp_in(&c2.ns, Ipv4Addr::UNSPECIFIED, 40001)?;
    let sa = |s: &crate::topology::NodeSpec, port| SocketAddrV4::new(s.underlay, port);
    let mut failures = vec![];

    // 1. Mapping.
    let mut mapped = vec![];
    for (srv, dst) in [(&a1, sa(a, 3478)), (&a2, sa(a, 3479)), (&b1, sa(b, 3478))] {
        k1.send_to(b"map", dst)?;
        let (_, from) = recv(srv)
            .with_context(|| format!("server {dst} got nothing from {} ({kind:?})", c1.ns))?;
        mapped.push(from);
    }
    let eim = mapped.iter().all(|m| *m == mapped[0]);
    let nat_ip = c1.public_ip;
    let mapped_to_nat = mapped.iter().all(|m| *m.ip() == nat_ip);
    let port_preserved = mapped.iter().all(|m| m.port() == 40000);
    let m = mapped[0];

    // 2. Filtering.
    a1.send_to(b"reply", m)?;
    let reply_ok = got(&k1, b"reply");
    drain(&k1);
    a3.send_to(b"unsolicited", m)?;
    let unsolicited_a = got(&k1, b"unsolicited");
    let fresh = udp_in(&b.ns, b.underlay, 3481)?;
    fresh.send_to(b"unsolicited2", m)?;
    let unsolicited_b = got(&k1, b"unsolicited2");
    let dropped = !unsolicited_a && !unsolicited_b;

    // 3. Hairpin: C2 sends to C1's public mapping.
    drain(&k1);
    k2.send_to(b"hairpin", m)?;
    let hairpin = got(&k1, b"hairpin");

    // 4. Expiry.
    k1.send_to(b"expire", sa(a, 3482))?;
    let (_, m4) = recv(&a4).context("expiry server got nothing")?;
    drain(&k1);
    a4.send_to(b"fresh", m4)?;
    let fresh_ok = got(&k1, b"fresh");
    std::thread::sleep(Duration::from_secs(TIMEOUT_SECS as u64 + 2));
    a4.send_to(b"stale", m4)?;
    let stale = got(&k1, b"stale");
    let expires = fresh_ok && !stale;

    // 5. Flush.
    k1.send_to(b"flush", sa(a, 3483))?;
    let (_, m5) = recv(&a5).context("flush server got nothing")?;
    drain(&k1);
    a5.send_to(b"before", m5)?;
    let before = got(&k1, b"before");
    plan.flush_nat()?;
    a5.send_to(b"after", m5)?;
    let after = got(&k1, b"after");
    let flush_forgets = before && !after;

    // Expected behaviour per kind.
    let mut check = |cond: bool, what: &str| {
        if !cond {
            failures.push(what.to_string());
        }
    };
    check(reply_ok, "a reply from the contacted endpoint must arrive");
    match kind {
        Kind::Public => {
            check(
                eim && port_preserved,
                "a public host must not be translated",
            );
            check(!dropped, "a public host receives unsolicited packets");
        }
        Kind::Nat | Kind::Cgnat => {
            check(
                eim,
                "endpoint-independent mapping: one public port for every destination",
            );
            check(
                mapped_to_nat,
                "the mapped address must be the (outermost) NAT's public address",
            );
            check(dropped, "unsolicited inbound packets must be dropped");
            check(!hairpin, "no hairpinning");
            check(expires, "the mapping must expire after the UDP timeout");
            check(flush_forgets, "conntrack -F must forget the mapping");
        }
        Kind::Symmetric => {
            check(
                !eim && mapped
                    .iter()
                    .map(|m| m.port())
                    .collect::<std::collections::HashSet<_>>()
                    .len()
                    == 3,
                "symmetric: a new port per destination",
            );
            check(
                mapped_to_nat,
                "the mapped address must be the NAT's public address",
            );
            check(dropped, "unsolicited inbound packets must be dropped");
            check(!hairpin, "no hairpinning");
            check(expires, "the mapping must expire after the UDP timeout");
            check(flush_forgets, "conntrack -F must forget the mapping");
        }
    }
    if kind == Kind::Cgnat {
        // the home router's own WAN is in 100.64/10; the world sees the CGNAT
        check(
            nat_ip.octets()[0] == 198,
            "cgnat: the world must see the CGNAT's 198.18/15 address",
        );
    }
    plan.destroy();
    Ok(ProbeResult {
        kind: kind.as_str().into(),
        public_ip_of_nat: nat_ip.to_string(),
        mapped: mapped.iter().map(|m| m.to_string()).collect(),
        endpoint_independent_mapping: eim,
        port_preserved,
        mapped_to_nat_address: mapped_to_nat,
        reply_from_contacted_endpoint_arrives: reply_ok,
        unsolicited_inbound_dropped: dropped,
        hairpin,
        mapping_expires: expires,
        flush_forgets_mapping: flush_forgets,
        secs: t.elapsed().as_secs_f64(),
        ok: failures.is_empty(),
        failures,
    })
}
