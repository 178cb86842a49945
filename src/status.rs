//! What `meshpeer status` shows, as data (the JSON schema) and as a table.
//!
//! JSON schema (`status --json`), one object:
//!
//! ```text
//! { "node": NAME, "node_id": ID, "network": CIDR, "interface": IF,
//!   "backend": "kernel" | "userspace", "listen_port": PORT,
//!   "gossip_addr": "IP:PORT", "gossip_bytes_sent": N, "gossip_bytes_received": N,
//!   "gossip_connections": N (open QUIC connections),
//!   "loop_wakeups": N (times the event loop woke up since start),
//!   "loop_steps": N, "loop_step_ms": N (steps run, and their wall time),
//!   "self": MEMBER,
//!   "members": [MEMBER, ...] }          // self included, sorted by overlay IP
//! MEMBER = { "name", "node_id", "overlay_ip", "public_key" (WireGuard, base64),
//!   "endpoint" (IP:PORT or null), "state": "self" | "connected" | "idle" | "connecting" | "down",
//!   "path": "direct" | "relayed" | "trying" | null (self),
//!   "relay": NAME | null, "why_not_direct": TEXT | null,
//!   "nat": "public" | "endpoint-independent" | "symmetric" | "unknown",
//!   "last_handshake_secs" (age or null), "rtt_us" (round trip of the last
//!   answered liveness probe over the overlay, in microseconds; null before
//!   the first answer), "rx_bytes", "tx_bytes", "tags": [..],
//!   "routes": [ROUTE, ...] }
//! ROUTE = { "route": "192.168.10.0/24", "state": "installed" | "advertised"
//!   | "inactive" | "refused", "reason": TEXT | null }
//! plus, at the top level, "nat", "mapped_endpoints": [..], "relaying": bool,
//! "routes_installed" (kernel routes through the mesh interface now).
//! ```
//!
//! A member's routes are the subnets it advertises (`--advertise-route`)
//! as this node judges them (`crate::routes`): `installed` (routed through
//! the mesh to that member here), `advertised` (this node's own, authorized
//! and held), `inactive` (its member has no WireGuard peer here), `refused`
//! with the reason.
//!
//! `connected`: a WireGuard session (a handshake within the last 180 s);
//! `idle`: live, the tunnel has lapsed while unused (public members send no
//! keepalives to each other) and comes back on the first packet, the path
//! having worked before; `connecting`: live, no working path yet; `down`:
//! liveness called it down (its own probes unanswered and no refutation,
//! see `crate::liveness`; its peer is removed after the down grace period).
//! Also per member: "conflict" (what it claims that another member holds,
//! or null).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    #[serde(rename = "self")]
    Myself,
    Connected,
    Idle,
    Connecting,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Myself => "self",
            MemberState::Connected => "connected",
            MemberState::Idle => "idle",
            MemberState::Connecting => "connecting",
            MemberState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub node_id: String,
    pub overlay_ip: std::net::Ipv4Addr,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub state: MemberState,
    /// "direct", "relayed" or "trying" (null for self).
    pub path: Option<String>,
    /// The relay's name when relayed.
    pub relay: Option<String>,
    /// Why the pair is relayed rather than direct.
    pub why_not_direct: Option<String>,
    /// The member's NAT as it measured it: public, endpoint-independent,
    /// symmetric, unknown.
    pub nat: String,
    pub last_handshake_secs: Option<u64>,
    /// Round-trip time of the last echo over the overlay (the path in use).
    pub rtt_us: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub tags: Vec<String>,
    /// A stateless member (`--ephemeral`), forgotten soon after it goes down.
    #[serde(default)]
    pub ephemeral: bool,
    /// What it claims that another member holds (it does not get it here).
    #[serde(default)]
    pub conflict: Option<String>,
    /// The subnets it advertises, and what this node makes of each.
    #[serde(default)]
    pub routes: Vec<RouteStatus>,
}

/// One advertised subnet as this node judges it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub route: String,
    /// `installed`, `advertised`, `inactive` or `refused`.
    pub state: String,
    /// Why it is refused (or inactive).
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub node_id: String,
    pub network: String,
    pub interface: String,
    pub backend: crate::wg::BackendKind,
    pub listen_port: u16,
    pub gossip_addr: String,
    pub gossip_bytes_sent: u64,
    pub gossip_bytes_received: u64,
    /// Gossip rounds this node started, and how many found the other side
    /// already in sync (two small messages).
    #[serde(default)]
    pub gossip_rounds: u64,
    #[serde(default)]
    pub gossip_rounds_in_sync: u64,
    /// Open QUIC connections (gossip, joins, relay requests).
    #[serde(default)]
    pub gossip_connections: u64,
    /// Values gossip stored from others, and refused (failed validation).
    #[serde(default)]
    pub gossip_values_stored: u64,
    #[serde(default)]
    pub gossip_values_rejected: u64,
    /// Times the daemon's event loop woke up since it started.
    #[serde(default)]
    pub loop_wakeups: u64,
    /// Steps the daemon ran (membership, paths, WireGuard, what to
    /// publish), and the wall time they took in all, in milliseconds.
    #[serde(default)]
    pub loop_steps: u64,
    #[serde(default)]
    pub loop_step_ms: u64,
    /// Our NAT as STUN measured it, and our mapped (server-reflexive) endpoints.
    pub nat: String,
    pub mapped_endpoints: Vec<String>,
    /// Whether this member relays for others.
    pub relaying: bool,
    /// Relay use (when relaying): pairs allocated now, sealed datagrams
    /// forwarded and dropped by the current allocations.
    #[serde(default)]
    pub relay_allocations: usize,
    #[serde(default)]
    pub relay_forwarded: u64,
    #[serde(default)]
    pub relay_dropped: u64,
    /// Kernel routes to members' subnets through the mesh interface now.
    #[serde(default)]
    pub routes_installed: usize,
    #[serde(rename = "self")]
    pub myself: Option<MemberStatus>,
    pub members: Vec<MemberStatus>,
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn age(secs: Option<u64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s ago"),
        Some(s) if s < 7200 => format!("{}m ago", s / 60),
        Some(s) => format!("{}h ago", s / 3600),
    }
}

impl Status {
    /// How many members are in state `st`.
    pub fn count(&self, st: MemberState) -> usize {
        self.members.iter().filter(|m| m.state == st).count()
    }

    /// The human-readable view: a header about this node, then one line per
    /// member (`wg show` meets `tailscale status`), a note at the end of a
    /// line saying why a pair is not direct, or what a member claims that
    /// another holds.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} ({}) in {} on {}: {} WireGuard port {}, gossip {}, NAT {}{}\n",
            self.node,
            // A prefix by characters: the reply is input like any other.
            self.node_id.chars().take(8).collect::<String>(),
            self.network,
            self.interface,
            match self.backend {
                crate::wg::BackendKind::Kernel => "kernel",
                crate::wg::BackendKind::Userspace => "userspace",
            },
            self.listen_port,
            self.gossip_addr,
            self.nat,
            if self.relaying {
                format!(
                    ", relaying for others ({} pair{} now)",
                    self.relay_allocations,
                    if self.relay_allocations == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            },
        );
        let others = self.members.len() - self.count(MemberState::Myself);
        out.push_str(&format!(
            "{} member{} besides this node: {} connected, {} idle, {} connecting, {} down\n\n",
            others,
            if others == 1 { "" } else { "s" },
            self.count(MemberState::Connected),
            self.count(MemberState::Idle),
            self.count(MemberState::Connecting),
            self.count(MemberState::Down),
        ));
        const HEADER: [&str; 10] = [
            "OVERLAY IP",
            "NAME",
            "STATE",
            "PATH",
            "ENDPOINT",
            "RTT",
            "HANDSHAKE",
            "RX",
            "TX",
            "TAGS",
        ];
        let rows: Vec<([String; 10], String)> = self
            .members
            .iter()
            .map(|m| {
                let note = match (&m.conflict, &m.why_not_direct) {
                    (Some(c), _) => format!("conflict: {c}"),
                    (None, Some(w)) => format!("not direct: {w}"),
                    _ => String::new(),
                };
                let dash = || "-".to_string();
                (
                    [
                        m.overlay_ip.to_string(),
                        m.name.clone(),
                        m.state.as_str().to_string(),
                        match (&m.path, &m.relay) {
                            (Some(p), Some(r)) => format!("{p} via {r}"),
                            (Some(p), None) => p.clone(),
                            _ => dash(),
                        },
                        m.endpoint.clone().unwrap_or_else(dash),
                        m.rtt_us
                            .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
                            .unwrap_or_else(dash),
                        age(m.last_handshake_secs),
                        if m.state == MemberState::Myself {
                            dash()
                        } else {
                            bytes(m.rx_bytes)
                        },
                        if m.state == MemberState::Myself {
                            dash()
                        } else {
                            bytes(m.tx_bytes)
                        },
                        if m.tags.is_empty() {
                            dash()
                        } else {
                            m.tags.join(",")
                        },
                    ],
                    note,
                )
            })
            .collect();
        let mut widths: Vec<usize> = HEADER.iter().map(|h| h.len()).collect();
        for (r, _) in &rows {
            for (w, c) in widths.iter_mut().zip(r.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[&str], note: &str| -> String {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
            s.push_str(note);
            s.trim_end().to_string() + "\n"
        };
        out.push_str(&line(&HEADER, ""));
        for (r, note) in &rows {
            let cells: Vec<&str> = r.iter().map(String::as_str).collect();
            out.push_str(&line(&cells, note));
        }
        out.push_str(&self.render_routes());
        printable(&out)
    }

    /// The routes section of [`Status::render`]: every advertised subnet,
    /// by whom, and what this node makes of it (empty when none).
    fn render_routes(&self) -> String {
        let rows: Vec<[String; 3]> = self
            .members
            .iter()
            .flat_map(|m| {
                m.routes.iter().map(|r| {
                    let state = match &r.reason {
                        Some(why) => format!("{}: {why}", r.state),
                        None => r.state.clone(),
                    };
                    [r.route.clone(), m.name.clone(), state]
                })
            })
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        let header = ["ROUTE".to_string(), "VIA".to_string(), "STATE".to_string()];
        let w0 = rows
            .iter()
            .chain([&header])
            .map(|r| r[0].len())
            .max()
            .unwrap_or(0);
        let w1 = rows
            .iter()
            .chain([&header])
            .map(|r| r[1].chars().count())
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "\n{} route{} through the mesh installed here\n",
            self.routes_installed,
            if self.routes_installed == 1 { "" } else { "s" }
        );
        for r in [&header].into_iter().chain(rows.iter()) {
            out.push_str(&format!("{:<w0$}  {:<w1$}  {}\n", r[0], r[1], r[2]));
        }
        out
    }
}

/// `text` with every control character but newline shown as `\u{..}`: what
/// other members wrote (names, tags; checked when their records were
/// verified, but a status may come from another daemon version) never
/// reaches the terminal as an escape sequence.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_never_reach_the_table() {
        assert_eq!(printable("n1\x1b[2J\tx\n"), "n1\\u{1b}[2J\\u{9}x\n");
        let mut s = sample_status();
        s.members[0].name = "evil\x1b]0;pwned\x07".into();
        s.members[0].tags = vec!["t\x1b[31m".into()];
        let table = s.render();
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "{table:?}"
        );
        assert!(table.contains("evil\\u{1b}]0;pwned\\u{7}"), "{table}");
    }

    fn sample_status() -> Status {
        let m = MemberStatus {
            name: "a".into(),
            node_id: "id".into(),
            overlay_ip: "10.77.0.1".parse().unwrap(),
            public_key: "k".into(),
            endpoint: None,
            state: MemberState::Myself,
            path: None,
            relay: None,
            why_not_direct: None,
            nat: "public".into(),
            last_handshake_secs: None,
            rtt_us: None,
            rx_bytes: 0,
            tx_bytes: 2048,
            tags: vec![],
            ephemeral: false,
            conflict: None,
            routes: vec![],
        };
        Status {
            node: "a".into(),
            node_id: "id".into(),
            network: "10.77.0.0/16".into(),
            interface: "mp0".into(),
            backend: crate::wg::BackendKind::Userspace,
            listen_port: 51820,
            gossip_addr: "192.0.2.1:51821".into(),
            gossip_bytes_sent: 0,
            gossip_bytes_received: 0,
            gossip_rounds: 0,
            gossip_rounds_in_sync: 0,
            gossip_connections: 0,
            loop_wakeups: 0,
            loop_steps: 0,
            loop_step_ms: 0,
            gossip_values_stored: 0,
            gossip_values_rejected: 0,
            nat: "public".into(),
            mapped_endpoints: vec![],
            relaying: false,
            relay_allocations: 0,
            relay_forwarded: 0,
            relay_dropped: 0,
            routes_installed: 0,
            myself: Some(m.clone()),
            members: vec![m],
        }
    }

    #[test]
    fn json_schema_has_the_documented_fields() {
        let s = sample_status();
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["backend"], "userspace");
        assert_eq!(v["self"]["state"], "self");
        for f in ["name", "overlay_ip", "public_key", "endpoint", "state"] {
            assert!(v["members"][0].get(f).is_some(), "{f}");
        }
        let table = s.render();
        assert!(
            table.contains("NAME") && table.contains("10.77.0.1"),
            "{table}"
        );
        let mut other = s.members[0].clone();
        other.state = MemberState::Connected;
        other.name = "b".into();
        other.path = Some("relayed".into());
        other.relay = Some("r".into());
        other.why_not_direct =
            Some("their NAT maps each destination to a new port (symmetric)".into());
        other.tags = vec!["gpu".into(), "compute".into()];
        let mut s2 = s.clone();
        s2.members.push(other);
        let table = s2.render();
        let line = table.lines().find(|l| l.contains(" b ")).unwrap();
        assert!(line.contains("relayed via r"), "{table}");
        assert!(line.contains("2.0 KiB"), "{table}");
        assert!(line.contains("gpu,compute"), "{table}");
        assert!(
            line.ends_with("not direct: their NAT maps each destination to a new port (symmetric)"),
            "{table}"
        );
        assert!(
            table.contains("1 member besides this node: 1 connected"),
            "{table}"
        );
        assert!(!table.contains("ROUTE"), "no routes, no section: {table}");

        // Routes: one line each, with the verdict and its reason.
        let mut s3 = s2.clone();
        s3.routes_installed = 1;
        s3.members[1].routes = vec![
            RouteStatus {
                route: "192.168.2.0/24".into(),
                state: "installed".into(),
                reason: None,
            },
            RouteStatus {
                route: "0.0.0.0/0".into(),
                state: "refused".into(),
                reason: Some("overlaps the overlay network 10.77.0.0/16".into()),
            },
        ];
        let table = s3.render();
        assert!(
            table.contains("1 route through the mesh installed here"),
            "{table}"
        );
        assert!(
            table.contains("192.168.2.0/24  b    installed\n"),
            "{table}"
        );
        assert!(
            table.contains(
                "0.0.0.0/0       b    refused: overlaps the overlay network 10.77.0.0/16"
            ),
            "{table}"
        );
        let v: serde_json::Value = serde_json::to_value(&s3).unwrap();
        assert_eq!(v["routes_installed"], 1);
        assert_eq!(v["members"][1]["routes"][1]["state"], "refused");
        assert_eq!(v["members"][0]["routes"], serde_json::json!([]));
    }
}
