//! Direct or relayed: the path to each peer.
//!
//! Every peer starts *trying* a direct path (both sides have each other's
//! candidates from gossip; connectivity checks or WireGuard's own
//! handshakes punch). A peer whose direct handshake has not come up within
//! [`PUNCH_GRACE`] (at once for pairs that cannot punch) is *relayed*: both
//! ends pick the same relay (`crate::relay::pick_relay`), get an allocation
//! there, and point their WireGuard peer for each other at it, keeping one
//! end-to-end session the relay cannot read (proto/PROTOCOL.md §7). The
//! checks go on; when a direct handshake completes, WireGuard roams to the
//! direct endpoint and the path is direct again. A path that worked stays
//! working while idle; unanswered data, a silent peer that should send
//! keepalives, or liveness break it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::membership::DesiredPeer;
use crate::reconcile::{ActualPeer, FRESH_HANDSHAKE};
use crate::record::NatKind;

/// How long a new peer tries a direct path before a relay carries its
/// traffic. The punch goes on behind the relay, and the path moves back the
/// moment a direct handshake completes, so the relay is a stopgap, not a
/// verdict. Pairs that cannot punch are relayed at once, and a public
/// member waits longer for a member behind NAT ([`punch_grace`]).
pub const PUNCH_GRACE: Duration = Duration::from_secs(3);
/// A direct path that received nothing for this long is broken (both ends
/// poke each other every 10 s, see `reconcile`), e.g. after a NAT dropped
/// the mapping; the peer goes back to trying/relayed.
pub const RX_SILENCE: Duration = Duration::from_secs(25);
/// A path whose sent packets went unanswered this long is broken, even if
/// something was received within [`RX_SILENCE`]: a peer that receives data
/// and sends nothing back answers with a keepalive after 10 s (WireGuard's
/// passive keepalive), so silence after our packets for longer than that
/// means they do not arrive (e.g. our router got a new address and the
/// peer's NAT drops what comes from it).
pub const UNANSWERED: Duration = Duration::from_secs(12);

/// A path to a peer that sends keepalives (it is behind NAT: every 25 s,
/// and we send none that would stand in for its own: see
/// `daemon::traversal`) and from which nothing arrived this long is
/// broken. Peers that send no keepalives (public members, whose tunnels
/// lapse while unused) may be silent for good: only unanswered data breaks
/// their path.
pub const KEEPALIVE_SILENCE: Duration = Duration::from_secs(40);

/// A WireGuard keepalive on the wire: an empty transport data message
/// (16-byte header, 16-byte tag). Any packet with content is longer (an
/// IPv4 packet pads to at least 32 bytes: 64 in all), and so are handshake
/// messages (148 and 92).
const KEEPALIVE_BYTES: u64 = 32;

/// How long a public member waits for a member behind a NAT it measured to
/// reach it before relaying their pair. Such a member reaches a public one
/// directly as soon as it knows of it (its NAT opens on its own packets);
/// until then a relay cannot help either (the other end must ask for the
/// allocation too). Relaying after [`PUNCH_GRACE`] meant, in a mixed mesh
/// of 100 coming up, a third of the public members' pairs with NAT members
/// relayed for nothing (584 of 1,659) and went direct 2 s later: an
/// allocation, a relay port and handshakes to it, on the public members
/// that are also the relays and the busiest. Past this, a relay still
/// serves a pair whose direct packets are lost (a firewall in front of a
/// "public" member).
pub const AWAIT_NAT_GRACE: Duration = Duration::from_secs(10);

/// The grace a pair gets for a direct path before its traffic is relayed
/// (see [`PUNCH_GRACE`]): none when a punch cannot work (`hopeless`, or
/// `unlikely`: two homes behind one CGNAT), [`AWAIT_NAT_GRACE`] for a
/// public member facing one behind a measured NAT.
pub fn punch_grace(ours: NatKind, theirs: NatKind, unlikely: bool) -> Duration {
    if punch_hopeless(ours, theirs) || unlikely {
        Duration::ZERO
    } else if ours == NatKind::Public
        && matches!(
            theirs,
            NatKind::EndpointIndependent | NatKind::EndpointDependent
        )
    {
        AWAIT_NAT_GRACE
    } else {
        PUNCH_GRACE
    }
}

/// Whether a hole punch between a member behind `ours` and one behind
/// `theirs` cannot work: either side is behind a symmetric NAT and the
/// other is not public (such pairs are relayed at once).
pub fn punch_hopeless(ours: NatKind, theirs: NatKind) -> bool {
    (ours == NatKind::EndpointDependent && theirs != NatKind::Public)
        || (theirs == NatKind::EndpointDependent && ours != NatKind::Public)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A direct WireGuard session exists.
    Direct,
    /// No direct session yet; still within the punch grace (or no relay).
    Trying,
    /// Traffic goes through the relay with this WireGuard key.
    Relayed { via: [u8; 32] },
}

/// Where a peer's relayed session goes: (relay, relay endpoint), if any.
pub type RelayedAt<'a> = dyn Fn(&[u8; 32]) -> Option<([u8; 32], SocketAddr)> + 'a;
/// The relay (WireGuard key) an endpoint belongs to when it is one of that
/// relay's allocation ports (the relay's address, not its WireGuard port).
pub type RelayOf<'a> = dyn Fn(&SocketAddr) -> Option<[u8; 32]> + 'a;

#[derive(Default)]
pub struct PathSelector {
    since: HashMap<[u8; 32], Instant>,
    /// When each peer's receive counter last grew.
    grew: HashMap<[u8; 32], Instant>,
    /// Last rx byte count seen per peer and when it last grew.
    rx: HashMap<[u8; 32], (u64, Instant)>,
    /// Last tx byte count per peer, and since when what we sent has gone
    /// unanswered (tx grew, rx did not since).
    tx: HashMap<[u8; 32], (u64, Option<Instant>)>,
    /// Peers whose path works: it had a fresh handshake and was heard from,
    /// and nothing broke it since (unanswered data, a peer that sends
    /// keepalives falling silent, liveness finding it broken). An idle
    /// path stays working: a tunnel between members that send no
    /// keepalives lapses when unused and comes back on the first packet.
    working: HashSet<[u8; 32]>,
}

impl PathSelector {
    /// Whether the data plane received from `key` within [`RX_SILENCE`]
    /// (as of the last `select`): its receive counter actually grew. A
    /// peer just added (or re-added, counters reset) has not been heard.
    pub fn hearing(&self, now: Instant, key: &[u8; 32]) -> bool {
        self.grew
            .get(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < RX_SILENCE)
            && self.unanswered(now, key) < UNANSWERED
    }

    /// Liveness found our path to `key` broken (the member refuted our
    /// accusation, so it is alive): stop counting it as heard until it is
    /// heard again, so the path is tried afresh (checks, relay meanwhile).
    pub fn broken(&mut self, key: &[u8; 32]) {
        tracing::debug!(peer = %crate::proto::short_key(key), "path stopped working: liveness found it broken");
        self.grew.remove(key);
        self.working.remove(key);
    }

    /// Whether the path to `key` works (as of the last `select`; see
    /// `working`): established and not broken since, idle or not.
    pub fn working(&self, key: &[u8; 32]) -> bool {
        self.working.contains(key)
    }

    /// How long what we sent to `key` has gone unanswered (zero when the
    /// peer answered since our last packet).
    pub fn unanswered(&self, now: Instant, key: &[u8; 32]) -> Duration {
        self.tx
            .get(key)
            .and_then(|(_, since)| *since)
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Chooses a path per peer.
    ///
    /// `actual` is the device's view (handshake age, endpoint, counters per
    /// peer); `relays` are the live relays (WireGuard key, the seed of the
    /// relay choice: their stamp signature); `me` is our own WireGuard key;
    /// `grace` is how long each peer tries a direct path before it is
    /// relayed ([`punch_grace`]); `sends_keepalives` says which peers keep their path busy
    /// with keepalives (behind NAT: only their silence breaks a path);
    /// `relayed_at` gives the relay and relay endpoint our allocation for a
    /// peer uses, if any: a working session on that endpoint is relayed,
    /// not direct. `relay_of` says which relay an endpoint is an allocation
    /// port of: a working session there is relayed too, even when it is
    /// not our allocation (WireGuard roamed to where the other end's
    /// packets came from: the other end chose that relay while we held it
    /// down, say), so it is not taken for a direct path (soak_short).
    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &mut self,
        now: Instant,
        desired: &[DesiredPeer],
        actual: &[ActualPeer],
        relays: &[([u8; 32], &[u8])],
        me: &[u8; 32],
        grace: &dyn Fn(&[u8; 32]) -> Duration,
        sends_keepalives: &dyn Fn(&[u8; 32]) -> bool,
        relayed_at: &RelayedAt<'_>,
        relay_of: &RelayOf<'_>,
    ) -> BTreeMap<[u8; 32], Path> {
        let wanted: HashSet<[u8; 32]> = desired.iter().map(|d| d.public_key).collect();
        self.since.retain(|k, _| wanted.contains(k));
        self.rx.retain(|k, _| wanted.contains(k));
        self.grew.retain(|k, _| wanted.contains(k));
        self.tx.retain(|k, _| wanted.contains(k));
        for a in actual {
            // Only peers we still want: a peer about to be removed must not
            // count as heard from its old counters (it would come back).
            if !wanted.contains(&a.public_key) {
                continue;
            }
            // First sight of a peer: counters start at zero when a peer is
            // added, so bytes already counted were received since then (a
            // handshake that completed between two steps).
            let e = self.rx.entry(a.public_key).or_insert((0, now));
            let heard = a.rx_bytes > e.0;
            if heard {
                self.grew.insert(a.public_key, now);
            }
            if a.rx_bytes != e.0 {
                *e = (a.rx_bytes, now);
            }
            let t = self.tx.entry(a.public_key).or_insert((0, None));
            // A lone keepalive expects no answer (a poke, WireGuard's
            // passive or persistent keepalive): the peer's own keepalive
            // comes at its own time, up to a poke period later. Counting
            // it made every poke look unanswered after SUSPECT, and the
            // connectivity checks and discovery rounds that follow were
            // most of a node's packets at steady state.
            let sent = a.tx_bytes.saturating_sub(t.0);
            if heard {
                t.1 = None;
            } else if sent > KEEPALIVE_BYTES && t.1.is_none() {
                t.1 = Some(now);
            }
            t.0 = a.tx_bytes;
        }
        let on_device: HashSet<[u8; 32]> = actual
            .iter()
            .filter(|a| wanted.contains(&a.public_key) && a.endpoint.is_some())
            .map(|a| a.public_key)
            .collect();
        for a in actual {
            let k = a.public_key;
            if a.handshake_age.is_some_and(|age| age < FRESH_HANDSHAKE) && self.hearing(now, &k) {
                self.working.insert(k);
            }
            let silent_too_long = sends_keepalives(&k)
                && self
                    .grew
                    .get(&k)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= KEEPALIVE_SILENCE);
            let unanswered = self.unanswered(now, &k);
            if (unanswered >= UNANSWERED || silent_too_long) && self.working.remove(&k) {
                tracing::debug!(
                    peer = %crate::proto::short_key(&k),
                    unanswered_ms = unanswered.as_millis() as u64,
                    silent_ms = self.grew.get(&k).map(|t| now.saturating_duration_since(*t).as_millis() as u64),
                    handshake_age_s = a.handshake_age.map(|d| d.as_secs()),
                    "path stopped working"
                );
            }
        }
        self.working.retain(|k| {
            let keep = on_device.contains(k);
            if !keep {
                tracing::debug!(peer = %crate::proto::short_key(k), "path stopped working: no endpoint on the device");
            }
            keep
        });
        let endpoint_of: HashMap<[u8; 32], SocketAddr> = actual
            .iter()
            .filter_map(|a| a.endpoint.map(|e| (a.public_key, e)))
            .collect();
        let mut paths = BTreeMap::new();
        for d in desired {
            let k = d.public_key;
            let since = *self.since.entry(k).or_insert(now);
            let through = relayed_at(&k);
            let path = if self.working.contains(&k) {
                match (through, endpoint_of.get(&k)) {
                    // A working session on the relay's endpoint: relayed.
                    (Some((via, ep)), Some(e)) if *e == ep => Path::Relayed { via },
                    // On another relay's allocation port: relayed there.
                    (_, Some(e)) => match relay_of(e) {
                        Some(via) if via != k => Path::Relayed { via },
                        _ => Path::Direct,
                    },
                    _ => Path::Direct,
                }
            } else if relays.iter().any(|(r, _)| *r == k) {
                // A relay is public: reached directly.
                Path::Direct
            } else if now.saturating_duration_since(since) < grace(&k) {
                Path::Trying
            } else if let Some(r) = crate::relay::pick_relay(relays, me, &k) {
                Path::Relayed { via: r }
            } else {
                Path::Trying
            };
            paths.insert(k, path);
        }
        paths
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 32] = [0xee; 32];
    const EP: &str = "192.0.2.9:51820";
    fn never(_: &[u8; 32]) -> bool {
        false
    }
    fn punch(_: &[u8; 32]) -> Duration {
        PUNCH_GRACE
    }
    fn always_talks(_: &[u8; 32]) -> bool {
        true
    }
    fn nowhere(_: &[u8; 32]) -> Option<([u8; 32], SocketAddr)> {
        None
    }
    fn no_relay(_: &SocketAddr) -> Option<[u8; 32]> {
        None
    }

    fn peer(k: u8) -> DesiredPeer {
        DesiredPeer {
            public_key: [k; 32],
            allowed_ips: vec![ipnet::Ipv4Net::from(std::net::Ipv4Addr::new(10, 0, 0, k))],
            endpoints: vec![],
            keepalive: 25,
        }
    }

    fn dev(k: u8, ep: &str, age: Option<u64>, rx: u64, tx: u64) -> ActualPeer {
        ActualPeer {
            public_key: [k; 32],
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: vec![],
            keepalive: Some(25),
            handshake_age: age.map(Duration::from_secs),
            rx_bytes: rx,
            tx_bytes: tx,
        }
    }

    #[test]
    fn punch_then_relay_then_direct_and_relayed_sessions_stay_relayed() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let relay = [1u8; 32];
        let sig = [7u8; 64];
        let relays: [([u8; 32], &[u8]); 1] = [(relay, &sig)];
        let peers = vec![peer(1), peer(2)];
        let relay_ep: SocketAddr = "198.18.0.1:53000".parse().unwrap();
        // Within the grace: trying direct; the relay itself is direct.
        let p = s.select(
            t0,
            &peers,
            &[dev(1, EP, Some(3), 0, 0)],
            &relays,
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert_eq!(p[&[2; 32]], Path::Trying);
        assert_eq!(p[&relay], Path::Direct);
        // Grace over, no handshake: relayed (an allocation is asked for).
        let p = s.select(
            t0 + PUNCH_GRACE,
            &peers,
            &[],
            &relays,
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: relay });
        // The relayed session works, on the relay's endpoint: still relayed.
        let at = |_: &[u8; 32]| Some((relay, relay_ep));
        let t1 = t0 + PUNCH_GRACE * 2;
        let p = s.select(
            t1,
            &peers,
            &[dev(2, "198.18.0.1:53000", Some(1), 100, 100)],
            &relays,
            &ME,
            &punch,
            &never,
            &at,
            &no_relay,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: relay });
        // WireGuard roamed to a direct endpoint (a punch got through): direct.
        let t2 = t1 + Duration::from_secs(1);
        let p = s.select(
            t2,
            &peers,
            &[dev(2, EP, Some(1), 200, 200)],
            &relays,
            &ME,
            &punch,
            &never,
            &at,
            &no_relay,
        );
        assert_eq!(p[&[2; 32]], Path::Direct);
        // Then silence from a peer that sends keepalives: relayed again.
        let later = t2 + KEEPALIVE_SILENCE;
        let p = s.select(
            later,
            &peers,
            &[dev(2, EP, Some(1), 200, 200)],
            &relays,
            &ME,
            &punch,
            &always_talks,
            &nowhere,
            &no_relay,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: relay });
    }

    /// The other end chose another relay (we held ours, it held that one
    /// down for a moment) and WireGuard roamed to that relay's allocation
    /// port: the session is relayed there, not direct (soak_short showed
    /// such a pair `direct`, and its allocation was given back).
    #[test]
    fn a_session_on_another_relays_port_is_relayed_there() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let (r1, r2) = ([1u8; 32], [3u8; 32]);
        let sig = [7u8; 64];
        let relays: [([u8; 32], &[u8]); 2] = [(r1, &sig), (r2, &sig)];
        let ours = |_: &[u8; 32]| Some((r1, "198.18.0.1:53000".parse().unwrap()));
        let r2_ports = |e: &SocketAddr| {
            (e.ip() == "198.18.4.3".parse::<std::net::IpAddr>().unwrap() && e.port() != 51820)
                .then_some(r2)
        };
        let t1 = t0 + PUNCH_GRACE * 2;
        let p = s.select(
            t1,
            &[peer(2)],
            &[dev(2, "198.18.4.3:56258", Some(1), 100, 100)],
            &relays,
            &ME,
            &punch,
            &never,
            &ours,
            &r2_ports,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: r2 });
        // The relay itself, on its WireGuard port, is direct.
        let p = s.select(
            t1,
            &[peer(3)],
            &[dev(3, "198.18.4.3:51820", Some(1), 100, 100)],
            &relays,
            &ME,
            &punch,
            &never,
            &nowhere,
            &r2_ports,
        );
        assert_eq!(p[&[3; 32]], Path::Direct);
    }

    #[test]
    fn without_a_relay_the_direct_attempt_goes_on() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let p = s.select(
            t0 + PUNCH_GRACE * 2,
            &[peer(2)],
            &[],
            &[],
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert_eq!(p[&[2; 32]], Path::Trying);
    }

    #[test]
    fn hopeless_pairs_are_relayed_at_once() {
        let mut s = PathSelector::default();
        let sig = [7u8; 64];
        let at_once = |_: &[u8; 32]| Duration::ZERO;
        let p = s.select(
            Instant::now(),
            &[peer(1), peer(2)],
            &[],
            &[([1; 32], &sig)],
            &ME,
            &at_once,
            &never,
            &nowhere,
            &no_relay,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: [1; 32] });
    }

    #[test]
    fn a_public_member_waits_longer_for_one_behind_nat() {
        use NatKind::*;
        assert_eq!(
            punch_grace(Public, EndpointIndependent, false),
            AWAIT_NAT_GRACE
        );
        assert_eq!(
            punch_grace(Public, EndpointDependent, false),
            AWAIT_NAT_GRACE
        );
        // The member behind NAT reaches the public one itself: the usual grace.
        assert_eq!(punch_grace(EndpointIndependent, Public, false), PUNCH_GRACE);
        assert_eq!(punch_grace(EndpointDependent, Public, false), PUNCH_GRACE);
        assert_eq!(punch_grace(Public, Public, false), PUNCH_GRACE);
        // Not measured: it may be public; the usual grace.
        assert_eq!(punch_grace(Public, Unknown, false), PUNCH_GRACE);
        // No punch can work: relayed at once.
        assert_eq!(
            punch_grace(EndpointDependent, EndpointIndependent, false),
            Duration::ZERO
        );
        assert_eq!(
            punch_grace(EndpointIndependent, EndpointIndependent, true),
            Duration::ZERO
        );

        // Through the selector: trying within the grace, relayed after it.
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let sig = [7u8; 64];
        let relays: [([u8; 32], &[u8]); 1] = [([1; 32], &sig)];
        let waits = |_: &[u8; 32]| AWAIT_NAT_GRACE;
        for (at, want) in [
            (Duration::ZERO, Path::Trying),
            (PUNCH_GRACE + Duration::from_secs(1), Path::Trying),
            (AWAIT_NAT_GRACE, Path::Relayed { via: [1; 32] }),
        ] {
            let p = s.select(
                t0 + at,
                &[peer(1), peer(2)],
                &[],
                &relays,
                &ME,
                &waits,
                &never,
                &nowhere,
                &no_relay,
            );
            assert_eq!(p[&[2; 32]], want, "at {at:?}");
        }
    }

    #[test]
    fn hearing_needs_the_receive_counter_to_grow() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let at = |rx: u64| vec![dev(2, EP, Some(1), rx, 0)];
        s.select(
            t0,
            &[peer(2)],
            &at(0),
            &[],
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert!(!s.hearing(t0, &[2; 32]));
        s.select(
            t0,
            &[peer(2)],
            &at(100),
            &[],
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert!(s.hearing(t0, &[2; 32]));
        assert!(!s.hearing(t0 + RX_SILENCE, &[2; 32]));
        // Gone from the desired set, then re-added with fresh counters: not
        // heard until it receives.
        let t1 = t0 + Duration::from_secs(1);
        s.select(t1, &[], &[], &[], &ME, &punch, &never, &nowhere, &no_relay);
        s.select(
            t1,
            &[peer(2)],
            &at(0),
            &[],
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert!(!s.hearing(t1, &[2; 32]));
        // A peer no longer desired but still on the device is not heard
        // from its old counters.
        let t2 = t1 + Duration::from_secs(1);
        s.select(
            t2,
            &[],
            &at(900),
            &[],
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert!(!s.hearing(t2, &[2; 32]));
        // First sight with bytes already counted: heard.
        let mut s = PathSelector::default();
        s.select(
            t0,
            &[peer(2)],
            &at(148),
            &[],
            &ME,
            &punch,
            &never,
            &nowhere,
            &no_relay,
        );
        assert!(s.hearing(t0, &[2; 32]));
    }

    fn sel(s: &mut PathSelector, t: Instant, rx: u64, tx: u64, talks: bool) -> Path {
        let k: &dyn Fn(&[u8; 32]) -> bool = if talks { &always_talks } else { &never };
        s.select(
            t,
            &[peer(2)],
            &[dev(2, EP, Some(1), rx, tx)],
            &[],
            &ME,
            &punch,
            k,
            &nowhere,
            &no_relay,
        )[&[2; 32]]
    }

    #[test]
    fn unanswered_packets_break_a_path() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        assert_eq!(sel(&mut s, t0, 100, 100, true), Path::Direct);
        let t1 = t0 + Duration::from_secs(1);
        sel(&mut s, t1, 100, 200, true);
        assert_eq!(s.unanswered(t1, &[2; 32]), Duration::ZERO);
        let t2 = t1 + UNANSWERED - Duration::from_millis(1);
        assert_eq!(sel(&mut s, t2, 100, 900, true), Path::Direct);
        let t3 = t1 + UNANSWERED;
        assert_ne!(sel(&mut s, t3, 100, 1000, true), Path::Direct);
        // An answer (and a fresh handshake) mends it.
        let t4 = t3 + Duration::from_secs(1);
        assert_eq!(sel(&mut s, t4, 150, 1000, true), Path::Direct);
        assert_eq!(s.unanswered(t4, &[2; 32]), Duration::ZERO);
    }

    #[test]
    fn an_idle_path_between_quiet_members_stays_working() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        assert_eq!(sel(&mut s, t0, 100, 100, false), Path::Direct);
        let quiet = t0 + Duration::from_secs(600);
        assert_eq!(sel(&mut s, quiet, 100, 100, false), Path::Direct);
        assert!(s.working(&[2; 32]));
        sel(&mut s, quiet, 100, 900, false);
        assert_ne!(
            sel(&mut s, quiet + UNANSWERED, 100, 900, false),
            Path::Direct
        );
        let mut s = PathSelector::default();
        sel(&mut s, t0, 100, 100, false);
        s.broken(&[2; 32]);
        assert!(!s.working(&[2; 32]));
    }

    #[test]
    fn a_lone_keepalive_expects_no_answer() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        sel(&mut s, t0, 100, 100, false);
        let t1 = t0 + Duration::from_secs(1);
        sel(&mut s, t1, 100, 100 + KEEPALIVE_BYTES, false);
        let t2 = t1 + UNANSWERED;
        assert_eq!(
            sel(&mut s, t2, 100, 100 + KEEPALIVE_BYTES, false),
            Path::Direct
        );
        assert_eq!(s.unanswered(t2, &[2; 32]), Duration::ZERO);
        sel(&mut s, t2, 100, 100 + KEEPALIVE_BYTES + 64, false);
        let t3 = t2 + Duration::from_secs(3);
        sel(&mut s, t3, 100, 100 + KEEPALIVE_BYTES + 64, false);
        assert_eq!(s.unanswered(t3, &[2; 32]), Duration::from_secs(3));
    }
}
