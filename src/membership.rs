//! The membership core (sans-IO): which members exist, in what state, and
//! which WireGuard peers this node should therefore have.
//!
//! Driving contract: the shell reads a snapshot of the gossip state (one
//! [`GossipEntry`] per chitchat node: its id, its record value, whether the
//! failure detector holds it live) and calls [`Membership::handle_snapshot`]
//! with the current `now`. The core verifies new record values, drops forged,
//! foreign and replayed ones, tracks liveness, and returns [`Event`]s for the
//! shell to log. [`Membership::desired_peers`] then says what WireGuard should
//! hold. The core does no I/O and reads no clock.
//!
//! Invariants:
//! * only records that passed [`verify_record`] are ever stored;
//! * a member's stored version never decreases (replays are dropped);
//! * a member that left, or stayed down longer than the grace period, has no
//!   desired peer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::ipalloc::Claim;
use crate::proto::{self, PublicKeyBytes};
use crate::record::{verify_record, RecordBody};

/// How long a member may be down before its WireGuard peer is removed.
pub const DEFAULT_DOWN_GRACE: Duration = Duration::from_secs(60);
/// How long a member that was never heard from (no heartbeat since we
/// learned of it) counts as joining rather than down.
pub const NEVER_LIVE_GRACE: Duration = Duration::from_secs(30);
/// A live member is down only after the failure detector has said so
/// without a break for this long, times `max(1, log10(members))` (the
/// suspicion timeout of SWIM/memberlist). chitchat's detector calls a member
/// dead after a silence of 8 times its mean heartbeat gap, and under load,
/// or at hundreds of members where heartbeats travel several gossip hops,
/// such silences happen to live members: without this, members flapped
/// down and up (466 times in 450 s on one node of a 250-node run), and
/// every flap moved relayed pairs to another relay and back.
pub const SUSPICION: Duration = Duration::from_secs(4);

/// How long chitchat must call a member dead before it is down here.
pub fn suspicion_for(members: usize) -> Duration {
    let scale = (members.max(1) as f64).log10().max(1.0);
    SUSPICION.mul_f64(scale)
}
/// Keepalive interval set on every peer (seconds), as users set it by hand.
/// (meshpeer also pokes every peer every 10 s; see `reconcile`.)
pub const KEEPALIVE_SECS: u16 = 25;

/// One node as the gossip layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipEntry {
    pub node_id: String,
    pub record: Option<String>,
    /// Its signed observations of other members ([`crate::observe`]).
    pub seen: Option<String>,
    pub live: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Live,
    /// The failure detector marked it down at this instant.
    Down {
        since: Instant,
    },
    /// It left on purpose.
    Left,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub record: RecordBody,
    pub liveness: Liveness,
    /// Whether the failure detector ever held it live: a member that just
    /// appeared is not "down" before its first heartbeat arrives.
    seen_live: bool,
    /// When the liveness of a never-live member was first checked.
    first_checked: Option<Instant>,
    /// Since when the failure detector calls this live member dead
    /// (it is down after [`suspicion_for`]).
    silent_since: Option<Instant>,
    /// The record text last accepted (to skip re-verifying it).
    raw: String,
}

/// What changed; the shell logs these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Joined {
        name: String,
        node: String,
        overlay_ip: Ipv4Addr,
    },
    Updated {
        name: String,
        version: u64,
    },
    Left {
        name: String,
    },
    Down {
        name: String,
    },
    Up {
        name: String,
    },
    Forgotten {
        name: String,
    },
    Rejected {
        node: String,
        reason: String,
    },
    Replay {
        node: String,
        held: u64,
        got: u64,
    },
}

/// A WireGuard peer this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub public_key: [u8; 32],
    /// Overlay addresses routed to this peer (its own, plus those it relays).
    pub allowed_ips: Vec<Ipv4Addr>,
    /// Candidate endpoints, best first.
    pub endpoints: Vec<SocketAddr>,
    pub keepalive: u16,
}

pub struct Membership {
    network_key: PublicKeyBytes,
    self_key: PublicKeyBytes,
    down_grace: Duration,
    members: BTreeMap<PublicKeyBytes, Member>,
    /// Highest version ever accepted per node, kept after a member is
    /// forgotten so an old record cannot be replayed into the mesh.
    high_water: BTreeMap<PublicKeyBytes, u64>,
    /// Node ids whose undecodable value was already reported (log once).
    reported: BTreeMap<String, String>,
}

impl Membership {
    pub fn new(
        network_key: PublicKeyBytes,
        self_key: PublicKeyBytes,
        down_grace: Duration,
    ) -> Self {
        Self {
            network_key,
            self_key,
            down_grace,
            members: BTreeMap::new(),
            high_water: BTreeMap::new(),
            reported: BTreeMap::new(),
        }
    }

    /// Feeds one snapshot of the gossip state.
    pub fn handle_snapshot(&mut self, now: Instant, entries: &[GossipEntry]) -> Vec<Event> {
        let mut events = Vec::new();
        // A node that restarted shows up under several chitchat generations:
        // merge them (live if any generation is live; the newest record wins).
        let mut seen: BTreeMap<PublicKeyBytes, bool> = BTreeMap::new();
        for e in entries {
            let Some(key) = proto::parse_node_id(&e.node_id) else {
                self.report(
                    &e.node_id,
                    "node id is not a meshpeer key".into(),
                    &mut events,
                );
                continue;
            };
            *seen.entry(key).or_default() |= e.live;
            if let Some(text) = &e.record {
                self.handle_record(&key, &e.node_id, text, &mut events);
            }
        }
        let suspicion = suspicion_for(self.members.len());
        for (key, live) in &seen {
            self.handle_liveness(now, key, *live, suspicion, &mut events);
        }
        // Members gone from gossip altogether (chitchat garbage-collected them).
        let gone: Vec<PublicKeyBytes> = self
            .members
            .keys()
            .filter(|k| !seen.contains_key(*k) && **k != self.self_key)
            .copied()
            .collect();
        for key in gone {
            if let Some(m) = self.members.remove(&key) {
                if m.liveness != Liveness::Left {
                    events.push(Event::Forgotten {
                        name: m.record.name,
                    });
                }
            }
        }
        events
    }

    fn report(&mut self, node: &str, reason: String, events: &mut Vec<Event>) {
        if self.reported.get(node) != Some(&reason) {
            self.reported.insert(node.to_string(), reason.clone());
            events.push(Event::Rejected {
                node: node.to_string(),
                reason,
            });
        }
    }

    fn handle_record(
        &mut self,
        key: &PublicKeyBytes,
        node_id: &str,
        text: &str,
        events: &mut Vec<Event>,
    ) {
        if self.members.get(key).is_some_and(|m| m.raw == text) {
            return;
        }
        let record = match verify_record(text, &self.network_key, Some(key)) {
            Ok(v) => v.body,
            Err(e) => {
                self.report(node_id, e.to_string(), events);
                return;
            }
        };
        let held = self.high_water.get(key).copied();
        if let Some(held) = held {
            // The same version again is only news if we had forgotten the
            // member; anything older is a replay.
            if record.version < held || (record.version == held && self.members.contains_key(key)) {
                if record.version < held {
                    let reason = format!("replay v{} < v{held}", record.version);
                    if self.reported.get(node_id) != Some(&reason) {
                        self.reported.insert(node_id.to_string(), reason);
                        events.push(Event::Replay {
                            node: node_id.to_string(),
                            held,
                            got: record.version,
                        });
                    }
                }
                return;
            }
        }
        self.high_water.insert(*key, record.version);
        self.reported.remove(node_id);
        let name = record.name.clone();
        let prev = self.members.get(key).map(|m| m.liveness);
        let seen_live = self.members.get(key).is_some_and(|m| m.seen_live);
        let first_checked = self.members.get(key).and_then(|m| m.first_checked);
        let silent_since = self.members.get(key).and_then(|m| m.silent_since);
        let liveness = if record.left {
            if prev != Some(Liveness::Left) {
                events.push(Event::Left { name: name.clone() });
            }
            Liveness::Left
        } else {
            match prev {
                None | Some(Liveness::Left) => {
                    events.push(Event::Joined {
                        name: name.clone(),
                        node: node_id.to_string(),
                        overlay_ip: record.overlay_ip,
                    });
                    Liveness::Live
                }
                Some(l) => {
                    events.push(Event::Updated {
                        name: name.clone(),
                        version: record.version,
                    });
                    l
                }
            }
        };
        self.members.insert(
            *key,
            Member {
                record,
                liveness,
                seen_live,
                first_checked,
                silent_since,
                raw: text.to_string(),
            },
        );
    }

    fn handle_liveness(
        &mut self,
        now: Instant,
        key: &PublicKeyBytes,
        live: bool,
        suspicion: Duration,
        events: &mut Vec<Event>,
    ) {
        if *key == self.self_key {
            return;
        }
        let Some(m) = self.members.get_mut(key) else {
            return;
        };
        if !m.seen_live {
            // A member we learned of but never heard a heartbeat from: give
            // it NEVER_LIVE_GRACE, then it is down like any other (e.g. it
            // died before we joined).
            let first = *m.first_checked.get_or_insert(now);
            let overdue = now.saturating_duration_since(first) >= NEVER_LIVE_GRACE;
            m.seen_live = live || overdue;
            if !overdue {
                return;
            }
            if !live {
                // Silent since we learned of it: suspected all along.
                m.silent_since = Some(first);
            }
        }
        match (m.liveness, live) {
            (Liveness::Live, true) => m.silent_since = None,
            (Liveness::Live, false) => {
                let since = *m.silent_since.get_or_insert(now);
                if now.saturating_duration_since(since) < suspicion {
                    return;
                }
                m.silent_since = None;
                m.liveness = Liveness::Down { since: now };
                events.push(Event::Down {
                    name: m.record.name.clone(),
                });
            }
            (Liveness::Down { .. }, true) => {
                m.liveness = Liveness::Live;
                events.push(Event::Up {
                    name: m.record.name.clone(),
                });
            }
            _ => {}
        }
    }

    /// All known members except those that left, self included.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.liveness != Liveness::Left)
    }

    pub fn member(&self, key: &PublicKeyBytes) -> Option<&Member> {
        self.members.get(key)
    }

    /// Overlay addresses held by members other than `except`.
    pub fn taken_ips(&self, except: &PublicKeyBytes) -> BTreeSet<Ipv4Addr> {
        self.members()
            .filter(|m| &m.record.node_key != except)
            .map(|m| m.record.overlay_ip)
            .collect()
    }

    /// Whether another member's claim beats `mine` for the same address.
    pub fn loses_claim(&self, mine: &Claim) -> bool {
        self.members().any(|m| {
            m.record.node_key != mine.node_key
                && m.record.overlay_ip == mine.ip
                && Claim {
                    ip: m.record.overlay_ip,
                    claimed_at: m.record.ip_claimed_at,
                    node_key: m.record.node_key,
                }
                .beats(mine)
        })
    }

    /// The WireGuard peers this node should have at `now`.
    /// The WireGuard peers we want: live members, and down ones within the
    /// down grace or still `hearing` (the data plane received from their
    /// WireGuard key recently: gossip lost their heartbeat, e.g. on a
    /// saturated host, but the member is there; removing its peer would
    /// only cost a new handshake when it is seen again).
    pub fn desired_peers(
        &self,
        now: Instant,
        local_nets: &[Ipv4Net],
        hearing: &dyn Fn(&[u8; 32]) -> bool,
    ) -> Vec<DesiredPeer> {
        let mut claims: BTreeMap<Ipv4Addr, Claim> = BTreeMap::new();
        for m in self.members() {
            let c = Claim {
                ip: m.record.overlay_ip,
                claimed_at: m.record.ip_claimed_at,
                node_key: m.record.node_key,
            };
            claims
                .entry(c.ip)
                .and_modify(|held| {
                    if c.beats(held) {
                        *held = c
                    }
                })
                .or_insert(c);
        }
        self.members()
            .filter(|m| m.record.node_key != self.self_key)
            .filter(|m| match m.liveness {
                Liveness::Live => true,
                Liveness::Down { since } => {
                    now.saturating_duration_since(since) < self.down_grace
                        || hearing(&m.record.wg_public_key)
                }
                Liveness::Left => false,
            })
            // Of two members claiming one address, only the winner gets it.
            .filter(|m| {
                claims.get(&m.record.overlay_ip).map(|c| c.node_key) == Some(m.record.node_key)
            })
            .map(|m| DesiredPeer {
                public_key: m.record.wg_public_key,
                allowed_ips: vec![m.record.overlay_ip],
                endpoints: order_endpoints(&m.record.endpoints, local_nets),
                keepalive: KEEPALIVE_SECS,
            })
            .collect()
    }
}

/// Whether `a` is on one of our own networks (our LAN).
pub fn on_local_net(local_nets: &[Ipv4Net], a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V4(v4) => local_nets.iter().any(|n| n.contains(v4.ip())),
        SocketAddr::V6(_) => false,
    }
}

/// Orders candidates: same subnet as one of ours first, then the record's order.
pub fn order_endpoints(candidates: &[SocketAddr], local_nets: &[Ipv4Net]) -> Vec<SocketAddr> {
    let local = |a: &SocketAddr| on_local_net(local_nets, a);
    let mut out: Vec<SocketAddr> = candidates.iter().filter(|a| local(a)).copied().collect();
    out.extend(candidates.iter().filter(|a| !local(a)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deaf(_: &[u8; 32]) -> bool {
        false
    }
    use crate::record::tests::sample;
    use ed25519_dalek::SigningKey;

    /// A membership (down grace 60 s) and one other member's key and record.
    fn one_member() -> (SigningKey, RecordBody, Membership) {
        let net = SigningKey::from_bytes(&[1; 32]);
        let (node, body) = sample(3, &net, "10.77.0.2".parse().unwrap());
        let m = Membership::new(
            net.verifying_key().to_bytes(),
            [0; 32],
            Duration::from_secs(60),
        );
        (node, body, m)
    }

    fn entry(body: &RecordBody, node: &SigningKey, live: bool) -> GossipEntry {
        GossipEntry {
            node_id: proto::node_id_string(&body.node_key),
            record: Some(body.sign(node)),
            seen: None,
            live,
        }
    }

    #[test]
    fn join_update_replay_leave() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let (me, my_body) = sample(2, &net, "10.77.0.1".parse().unwrap());
        let (node, mut body) = sample(3, &net, "10.77.0.2".parse().unwrap());
        let mut m = Membership::new(
            net.verifying_key().to_bytes(),
            my_body.node_key,
            DEFAULT_DOWN_GRACE,
        );
        let t0 = Instant::now();
        let ev = m.handle_snapshot(t0, &[entry(&my_body, &me, true), entry(&body, &node, true)]);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(
            matches!(&ev[1], Event::Joined { name, .. } if name == "n3")
                || matches!(&ev[0], Event::Joined { name, .. } if name == "n3")
        );
        let peers = m.desired_peers(t0, &[], &deaf);
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].allowed_ips,
            vec!["10.77.0.2".parse::<Ipv4Addr>().unwrap()]
        );

        // Newer version: accepted.
        let old = body.clone();
        body.version = 2;
        body.endpoints = vec!["192.0.2.9:51820".parse().unwrap()];
        let ev = m.handle_snapshot(t0, &[entry(&body, &node, true)]);
        assert_eq!(
            ev,
            vec![Event::Updated {
                name: "n3".into(),
                version: 2
            }]
        );
        // Replay of the old version: dropped, reported once.
        let ev = m.handle_snapshot(t0, &[entry(&old, &node, true)]);
        assert!(matches!(
            ev[0],
            Event::Replay {
                held: 2,
                got: 1,
                ..
            }
        ));
        assert_eq!(m.desired_peers(t0, &[], &deaf)[0].endpoints, body.endpoints);
        assert!(m
            .handle_snapshot(t0, &[entry(&old, &node, true)])
            .is_empty());

        // Leave: the peer goes at once.
        body.version = 3;
        body.left = true;
        let ev = m.handle_snapshot(t0, &[entry(&body, &node, true)]);
        assert_eq!(ev, vec![Event::Left { name: "n3".into() }]);
        assert!(m.desired_peers(t0, &[], &deaf).is_empty());
        // Rejoin with a newer record.
        body.version = 4;
        body.left = false;
        let ev = m.handle_snapshot(t0, &[entry(&body, &node, true)]);
        assert!(matches!(ev[0], Event::Joined { .. }));
    }

    #[test]
    fn down_members_lose_their_peer_after_the_grace_period() {
        let (node, body, mut m) = one_member();
        let start = Instant::now();
        m.handle_snapshot(start, &[entry(&body, &node, true)]);
        // Dead for chitchat: suspected first, down after the suspicion.
        assert!(m
            .handle_snapshot(start, &[entry(&body, &node, false)])
            .is_empty());
        let t0 = start + suspicion_for(1);
        let ev = m.handle_snapshot(t0, &[entry(&body, &node, false)]);
        assert_eq!(ev, vec![Event::Down { name: "n3".into() }]);
        assert_eq!(
            m.desired_peers(t0 + Duration::from_secs(59), &[], &deaf)
                .len(),
            1
        );
        assert!(m
            .desired_peers(t0 + Duration::from_secs(60), &[], &deaf)
            .is_empty());
        // ... unless its WireGuard session still delivers packets.
        let hearing = |k: &[u8; 32]| *k == body.wg_public_key;
        assert_eq!(
            m.desired_peers(t0 + Duration::from_secs(60), &[], &hearing)
                .len(),
            1
        );
        let ev = m.handle_snapshot(t0 + Duration::from_secs(61), &[entry(&body, &node, true)]);
        assert_eq!(ev, vec![Event::Up { name: "n3".into() }]);
        assert_eq!(
            m.desired_peers(t0 + Duration::from_secs(61), &[], &deaf)
                .len(),
            1
        );
        // Gone from gossip altogether: forgotten. The same record seen again
        // brings it back; an older one stays a replay.
        let ev = m.handle_snapshot(t0, &[]);
        assert_eq!(ev, vec![Event::Forgotten { name: "n3".into() }]);
        let ev = m.handle_snapshot(t0, &[entry(&body, &node, true)]);
        assert!(matches!(ev[0], Event::Joined { .. }), "{ev:?}");
        m.handle_snapshot(t0, &[]);
        let mut older = body.clone();
        older.version = 0;
        let ev = m.handle_snapshot(t0, &[entry(&older, &node, true)]);
        assert!(
            matches!(
                ev[0],
                Event::Replay {
                    held: 1,
                    got: 0,
                    ..
                }
            ),
            "{ev:?}"
        );
        assert!(m.desired_peers(t0, &[], &deaf).is_empty());
    }

    #[test]
    fn a_short_silence_is_not_down_and_suspicion_grows_with_the_mesh() {
        let (node, body, mut m) = one_member();
        let t0 = Instant::now();
        m.handle_snapshot(t0, &[entry(&body, &node, true)]);
        // Flapping faster than the suspicion: never down.
        for i in 0..20u64 {
            let t = t0 + Duration::from_secs(i * 2);
            let live = i % 2 == 1;
            assert!(m
                .handle_snapshot(t, &[entry(&body, &node, live)])
                .is_empty());
        }
        assert_eq!(suspicion_for(1), SUSPICION);
        assert_eq!(suspicion_for(10), SUSPICION);
        assert_eq!(suspicion_for(100), SUSPICION * 2);
        assert!(suspicion_for(250) > suspicion_for(100));
        assert!(suspicion_for(250) < SUSPICION * 3);
    }

    #[test]
    fn a_member_never_heard_from_goes_down_after_a_grace() {
        let (node, body, mut m) = one_member();
        let t0 = Instant::now();
        // Learned of it (e.g. from a joiner's first sync) after it had died.
        m.handle_snapshot(t0, &[entry(&body, &node, false)]);
        assert!(m
            .handle_snapshot(t0 + Duration::from_secs(29), &[entry(&body, &node, false)])
            .is_empty());
        let ev = m.handle_snapshot(t0 + NEVER_LIVE_GRACE, &[entry(&body, &node, false)]);
        assert_eq!(ev, vec![Event::Down { name: "n3".into() }]);
        assert!(m
            .desired_peers(t0 + NEVER_LIVE_GRACE + Duration::from_secs(60), &[], &deaf)
            .is_empty());
    }

    #[test]
    fn forged_records_are_rejected_and_reported_once() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let (_, body) = sample(3, &net, "10.77.0.2".parse().unwrap());
        let attacker = SigningKey::from_bytes(&[66; 32]);
        let mut m = Membership::new(net.verifying_key().to_bytes(), [0; 32], DEFAULT_DOWN_GRACE);
        let forged = entry(&body, &attacker, true);
        let ev = m.handle_snapshot(Instant::now(), std::slice::from_ref(&forged));
        assert!(matches!(ev[0], Event::Rejected { .. }));
        assert!(m.handle_snapshot(Instant::now(), &[forged]).is_empty());
        assert!(m.desired_peers(Instant::now(), &[], &deaf).is_empty());
    }

    #[test]
    fn address_conflicts_have_one_winner() {
        let net = SigningKey::from_bytes(&[1; 32]);
        let ip: Ipv4Addr = "10.77.0.7".parse().unwrap();
        let (a, mut ab) = sample(3, &net, ip);
        let (b, mut bb) = sample(4, &net, ip);
        ab.ip_claimed_at = 100;
        bb.ip_claimed_at = 200;
        let mut m = Membership::new(net.verifying_key().to_bytes(), [0; 32], DEFAULT_DOWN_GRACE);
        m.handle_snapshot(
            Instant::now(),
            &[entry(&ab, &a, true), entry(&bb, &b, true)],
        );
        let peers = m.desired_peers(Instant::now(), &[], &deaf);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].public_key, ab.wg_public_key);
        let claim_b = Claim {
            ip,
            claimed_at: 200,
            node_key: bb.node_key,
        };
        assert!(m.loses_claim(&claim_b));
        let claim_a = Claim {
            ip,
            claimed_at: 100,
            node_key: ab.node_key,
        };
        assert!(!m.loses_claim(&claim_a));
    }

    #[test]
    fn same_subnet_endpoints_come_first() {
        let c: Vec<SocketAddr> = vec![
            "203.0.113.1:1".parse().unwrap(),
            "192.168.1.5:1".parse().unwrap(),
        ];
        let nets = vec!["192.168.1.0/24".parse().unwrap()];
        assert_eq!(order_endpoints(&c, &nets)[0], c[1]);
        assert_eq!(order_endpoints(&c, &[])[0], c[0]);
    }
}
