//! Direct or relayed: the path to each peer.
//!
//! Every peer starts *trying* a direct path (both sides have each other's
//! candidates from gossip and send WireGuard handshakes at once, which is the
//! hole punch). A peer whose direct handshake has not come up within
//! [`PUNCH_GRACE`] is *relayed*: its overlay address moves to the allowed IPs
//! of a relay (a public member with `relay` set and a fresh handshake with
//! us), which forwards the packets. The direct peer stays configured with its
//! endpoint and keepalive, so the punch keeps being retried; the moment a
//! direct handshake completes, the address moves back. Both ends see the same
//! handshake, so they agree on the path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::membership::DesiredPeer;
use crate::reconcile::{ActualPeer, FRESH_HANDSHAKE};

/// How long a new peer tries a direct path before a relay carries its
/// traffic. The punch goes on behind the relay, and the path moves back the
/// moment a direct handshake completes, so the relay is a stopgap, not a
/// verdict. Pairs that cannot punch (see [`PathSelector::select`]'s
/// `hopeless`) are relayed at once.
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

/// A path to a peer that sends keepalives (it is behind NAT: every 25 s)
/// and from which nothing arrived this long is broken. Peers that send no
/// keepalives (public members, whose tunnels lapse while unused) may be
/// silent for good: only unanswered data breaks their path.
pub const KEEPALIVE_SILENCE: Duration = Duration::from_secs(40);

/// A WireGuard keepalive on the wire: an empty transport data message
/// (16-byte header, 16-byte tag). Any packet with content is longer (an
/// IPv4 packet pads to at least 32 bytes: 64 in all), and so are handshake
/// messages (148 and 92).
const KEEPALIVE_BYTES: u64 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A direct WireGuard session exists.
    Direct,
    /// No direct session yet; still within the punch grace (or no relay).
    Trying,
    /// Traffic goes through the relay with this WireGuard key.
    Relayed { via: [u8; 32] },
}

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

    /// Chooses a path per peer and rewrites allowed IPs accordingly.
    ///
    /// `actual` is the device's view (handshake age, rx bytes per peer);
    /// `relays` are the WireGuard keys of usable relays; `me` is our own
    /// WireGuard key; `hopeless` holds the peers a punch cannot reach
    /// (a symmetric NAT on either side and no public address on the other):
    /// they skip the grace.
    ///
    /// Each pair picks its relay from the pair's two keys (XOR, so both
    /// ends pick the same one when they know the same relays), which
    /// spreads relayed pairs over all relays instead of piling them on one.
    /// `sends_keepalives` says which peers keep their path busy with
    /// keepalives (behind NAT): only their silence breaks a path.
    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &mut self,
        now: Instant,
        mut desired: Vec<DesiredPeer>,
        actual: &[ActualPeer],
        relays: &[[u8; 32]],
        me: &[u8; 32],
        hopeless: &dyn Fn(&[u8; 32]) -> bool,
        sends_keepalives: &dyn Fn(&[u8; 32]) -> bool,
    ) -> (Vec<DesiredPeer>, BTreeMap<[u8; 32], Path>) {
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
            if self.unanswered(now, &k) >= UNANSWERED || silent_too_long {
                self.working.remove(&k);
            }
        }
        self.working.retain(|k| on_device.contains(k));
        let mut paths = BTreeMap::new();
        let mut moved: Vec<([u8; 32], Vec<std::net::Ipv4Addr>)> = Vec::new();
        for d in desired.iter_mut() {
            let since = *self.since.entry(d.public_key).or_insert(now);
            let fresh = self.working.contains(&d.public_key);
            let path = if fresh || relays.contains(&d.public_key) {
                Path::Direct
            } else if now.saturating_duration_since(since) < PUNCH_GRACE && !hopeless(&d.public_key)
            {
                Path::Trying
            } else if let Some(r) = pick_relay(relays, me, &d.public_key) {
                Path::Relayed { via: r }
            } else {
                Path::Trying
            };

            if let Path::Relayed { via } = path {
                moved.push((via, std::mem::take(&mut d.allowed_ips)));
            }
            paths.insert(d.public_key, path);
        }
        for (via, ips) in moved {
            if let Some(r) = desired.iter_mut().find(|d| d.public_key == via) {
                r.allowed_ips.extend(ips);
                r.allowed_ips.sort();
            }
        }
        (desired, paths)
    }
}

/// The relay for the pair (`me`, `peer`), by rendezvous hashing over the
/// relays: both ends pick the same one as long as they know the same relays
/// (they must: WireGuard drops a packet whose inner source is routed to
/// another peer, so a reply through a different relay would be lost), the
/// pairs spread evenly over the relays, and a relay joining or leaving
/// moves only the pairs it wins or held.
fn pick_relay(relays: &[[u8; 32]], me: &[u8; 32], peer: &[u8; 32]) -> Option<[u8; 32]> {
    let word = |k: &[u8; 32]| u64::from_le_bytes(k[..8].try_into().unwrap_or([0; 8]));
    let pair = word(me) ^ word(peer);
    relays
        .iter()
        .filter(|r| *r != peer && *r != me)
        .max_by_key(|r| (splitmix64(pair ^ word(r)), **r))
        .copied()
}

/// SplitMix64's finaliser: a fixed, well-mixed 64-bit hash (the same in
/// every build, unlike std's hasher).
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 32] = [0xee; 32];
    fn never(_: &[u8; 32]) -> bool {
        false
    }
    fn always_talks(_: &[u8; 32]) -> bool {
        true
    }

    fn peer(k: u8) -> DesiredPeer {
        DesiredPeer {
            public_key: [k; 32],
            allowed_ips: vec![std::net::Ipv4Addr::new(10, 0, 0, k)],
            endpoints: vec![],
            keepalive: 25,
        }
    }

    #[test]
    fn punch_then_relay_then_back_to_direct() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let relay = [1u8; 32];
        let peers = vec![peer(1), peer(2)];
        let ages = |fresh_2: bool, rx: u64| {
            let a = |k: u8, age: Option<u64>, rx: u64| ActualPeer {
                public_key: [k; 32],
                endpoint: Some("192.0.2.9:51820".parse().unwrap()),
                allowed_ips: vec![],
                keepalive: Some(25),
                handshake_age: age.map(Duration::from_secs),
                rx_bytes: rx,
                tx_bytes: 0,
            };
            vec![a(1, Some(3), rx), a(2, fresh_2.then_some(1), rx)]
        };
        // Within the grace: trying direct, addresses untouched.
        let (d, p) = s.select(
            t0,
            peers.clone(),
            &ages(false, 0),
            &[relay],
            &ME,
            &never,
            &never,
        );
        assert_eq!(p[&[2; 32]], Path::Trying);
        assert_eq!(p[&relay], Path::Direct);
        assert_eq!(d, peers);
        // Grace over, no handshake: relayed, the address moves to the relay.
        let (d, p) = s.select(
            t0 + PUNCH_GRACE,
            peers.clone(),
            &ages(false, 1),
            &[relay],
            &ME,
            &never,
            &always_talks,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: relay });
        assert!(d[1].allowed_ips.is_empty());
        assert_eq!(
            d[0].allowed_ips,
            vec![
                std::net::Ipv4Addr::new(10, 0, 0, 1),
                std::net::Ipv4Addr::new(10, 0, 0, 2)
            ]
        );
        // The punch succeeds later: direct again.
        let (d, p) = s.select(
            t0 + PUNCH_GRACE * 3,
            peers.clone(),
            &ages(true, 2),
            &[relay],
            &ME,
            &never,
            &always_talks,
        );
        assert_eq!(p[&[2; 32]], Path::Direct);
        assert_eq!(d, peers);
        // Then silence (a NAT dropped the mapping): relayed again, although
        // the handshake is not yet 180 s old.
        // (Peer 2 sends keepalives: it is behind NAT.)
        let later = t0 + PUNCH_GRACE * 3 + KEEPALIVE_SILENCE;
        let (_, p) = s.select(
            later,
            peers.clone(),
            &ages(true, 2),
            &[relay],
            &ME,
            &never,
            &always_talks,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: relay });
    }

    #[test]
    fn without_a_relay_the_direct_attempt_goes_on() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let (d, p) = s.select(
            t0 + PUNCH_GRACE * 2,
            vec![peer(2)],
            &[],
            &[],
            &ME,
            &never,
            &never,
        );
        let (d2, p2) = s.select(t0 + PUNCH_GRACE * 4, d, &[], &[], &ME, &never, &never);
        assert_eq!(p[&[2; 32]], Path::Trying);
        assert_eq!(p2[&[2; 32]], Path::Trying);
        assert_eq!(d2[0].allowed_ips.len(), 1);
    }

    #[test]
    fn hopeless_pairs_are_relayed_at_once() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let relay = [1u8; 32];
        let always = |_: &[u8; 32]| true;
        let (d, p) = s.select(
            t0,
            vec![peer(1), peer(2)],
            &[],
            &[relay],
            &ME,
            &always,
            &never,
        );
        assert_eq!(p[&[2; 32]], Path::Relayed { via: relay });
        assert!(d[1].allowed_ips.is_empty());
    }

    #[test]
    fn relays_are_spread_over_pairs_and_agreed_by_both_ends() {
        let relays: Vec<[u8; 32]> = (1..=4u8).map(|i| [i; 32]).collect();
        let mut used = std::collections::BTreeSet::new();
        for a in 10..40u8 {
            for b in 10..40u8 {
                if a == b {
                    continue;
                }
                let ka = [a; 32];
                let kb = [b; 32];
                let ab = pick_relay(&relays, &ka, &kb).unwrap();
                assert_eq!(Some(ab), pick_relay(&relays, &kb, &ka));
                used.insert(ab);
            }
        }
        assert_eq!(used.len(), relays.len(), "every relay carries some pairs");
        // A new relay takes over only pairs it wins.
        let mut more = relays.clone();
        more.push([9; 32]);
        for a in 10..40u8 {
            let (ka, kb) = ([a; 32], [a + 100; 32]);
            let before = pick_relay(&relays, &ka, &kb).unwrap();
            let after = pick_relay(&more, &ka, &kb).unwrap();
            assert!(after == before || after == [9; 32]);
        }
        // Never itself, never the peer.
        assert_eq!(pick_relay(&[[1; 32]], &[1; 32], &[2; 32]), None);
        assert_eq!(pick_relay(&[[2; 32]], &[1; 32], &[2; 32]), None);
    }

    /// Peer 2 on the device, handshake 1 s ago, with these counters.
    fn talking(rx: u64, tx: u64) -> Vec<ActualPeer> {
        vec![ActualPeer {
            public_key: [2; 32],
            endpoint: Some("192.0.2.9:51820".parse().unwrap()),
            allowed_ips: vec![],
            keepalive: Some(25),
            handshake_age: Some(Duration::from_secs(1)),
            rx_bytes: rx,
            tx_bytes: tx,
        }]
    }

    #[test]
    fn hearing_needs_the_receive_counter_to_grow() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let at = |rx: u64| talking(rx, 0);
        // First sight of a just-added peer with nothing received: not heard.
        s.select(t0, vec![peer(2)], &at(0), &[], &ME, &never, &never);
        assert!(!s.hearing(t0, &[2; 32]));
        // The counter grows: heard, until RX_SILENCE passes.
        s.select(t0, vec![peer(2)], &at(100), &[], &ME, &never, &never);
        assert!(s.hearing(t0, &[2; 32]));
        assert!(!s.hearing(t0 + RX_SILENCE, &[2; 32]));
        // Gone from the desired set (its peer removed), then re-added with
        // fresh counters: not heard until it receives.
        let t1 = t0 + Duration::from_secs(1);
        s.select(t1, vec![], &[], &[], &ME, &never, &never);
        s.select(t1, vec![peer(2)], &at(0), &[], &ME, &never, &never);
        assert!(!s.hearing(t1, &[2; 32]));
        // A peer no longer desired but still on the device (removed this
        // step) is not heard from its old counters.
        let t2 = t1 + Duration::from_secs(1);
        s.select(t2, vec![], &at(900), &[], &ME, &never, &never);
        assert!(!s.hearing(t2, &[2; 32]));
        s.select(t2, vec![peer(2)], &at(0), &[], &ME, &never, &never);
        assert!(!s.hearing(t2, &[2; 32]));
        // First sight with bytes already counted: they arrived since the
        // peer was added (a handshake between two steps): heard.
        let mut s = PathSelector::default();
        s.select(t0, vec![peer(2)], &at(148), &[], &ME, &never, &never);
        assert!(s.hearing(t0, &[2; 32]));
    }

    #[test]
    fn unanswered_packets_break_a_path_before_rx_silence() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let sel = |s: &mut PathSelector, t: Instant, rx: u64, tx: u64| {
            s.select(t, vec![peer(2)], &talking(rx, tx), &[], &ME, &never, &never)
                .1[&[2; 32]]
        };
        assert_eq!(sel(&mut s, t0, 100, 100), Path::Direct);
        // We keep sending, nothing comes back.
        let t1 = t0 + Duration::from_secs(1);
        sel(&mut s, t1, 100, 200);
        assert_eq!(s.unanswered(t1, &[2; 32]), Duration::ZERO);
        let t2 = t1 + UNANSWERED - Duration::from_millis(1);
        assert_eq!(sel(&mut s, t2, 100, 900), Path::Direct);
        assert!(s.hearing(t2, &[2; 32]));
        let t3 = t1 + UNANSWERED;
        assert_ne!(sel(&mut s, t3, 100, 1000), Path::Direct);
        assert!(!s.hearing(t3, &[2; 32]));
        // An answer mends it.
        let t4 = t3 + Duration::from_secs(1);
        assert_eq!(sel(&mut s, t4, 150, 1000), Path::Direct);
        assert_eq!(s.unanswered(t4, &[2; 32]), Duration::ZERO);
    }

    #[test]
    fn an_idle_path_between_quiet_members_stays_working() {
        // Two public members send each other nothing at rest: the tunnel
        // lapses, the path does not break (it comes back on first use).
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let sel = |s: &mut PathSelector, t: Instant, rx: u64, tx: u64| {
            s.select(t, vec![peer(2)], &talking(rx, tx), &[], &ME, &never, &never)
                .1[&[2; 32]]
        };
        assert_eq!(sel(&mut s, t0, 100, 100), Path::Direct);
        let quiet = t0 + Duration::from_secs(600);
        assert_eq!(sel(&mut s, quiet, 100, 100), Path::Direct);
        assert!(s.working(&[2; 32]));
        // Data that goes unanswered breaks it.
        sel(&mut s, quiet, 100, 900);
        assert_ne!(sel(&mut s, quiet + UNANSWERED, 100, 900), Path::Direct);
        // Liveness can break it too.
        let mut s = PathSelector::default();
        sel(&mut s, t0, 100, 100);
        s.broken(&[2; 32]);
        assert!(!s.working(&[2; 32]));
    }

    #[test]
    fn a_lone_keepalive_expects_no_answer() {
        let mut s = PathSelector::default();
        let t0 = Instant::now();
        let sel = |s: &mut PathSelector, t: Instant, rx: u64, tx: u64| {
            s.select(t, vec![peer(2)], &talking(rx, tx), &[], &ME, &never, &never)
                .1[&[2; 32]]
        };
        sel(&mut s, t0, 100, 100);
        // A poke: one keepalive out, the peer's comes at its own time.
        let t1 = t0 + Duration::from_secs(1);
        sel(&mut s, t1, 100, 100 + KEEPALIVE_BYTES);
        let t2 = t1 + UNANSWERED;
        assert_eq!(sel(&mut s, t2, 100, 100 + KEEPALIVE_BYTES), Path::Direct);
        assert_eq!(s.unanswered(t2, &[2; 32]), Duration::ZERO);
        // Data does expect one.
        sel(&mut s, t2, 100, 100 + KEEPALIVE_BYTES + 64);
        let t3 = t2 + Duration::from_secs(3);
        sel(&mut s, t3, 100, 100 + KEEPALIVE_BYTES + 64);
        assert_eq!(s.unanswered(t3, &[2; 32]), Duration::from_secs(3));
    }
}
