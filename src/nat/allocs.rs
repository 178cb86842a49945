//! Which relay allocations a node holds, asks for and gives back
//! (proto/PROTOCOL.md §7), decided from the path choice on a clock passed
//! in: sans-IO, the daemon moves the requests over QUIC
//! (`daemon::step::exchange_allocations`) and feeds the answers back.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::paths::Path;

/// A relay allocation asked for and not answered is asked again after this.
pub const ALLOC_RETRY: Duration = Duration::from_secs(1);
/// How long the daemon waits for a relay's answer to one request (a relay
/// that took the request is alive; a starved one answers late, and asking it
/// again meanwhile only makes it do the same work twice).
pub const ALLOC_ANSWER_WAIT: Duration = Duration::from_secs(30);
/// A request not answered at all after this is taken as lost and asked
/// again (the daemon always answers within [`ALLOC_ANSWER_WAIT`], with
/// `None` when the relay did not).
const ALLOC_IN_FLIGHT_MAX: Duration = Duration::from_secs(45);
/// The most a refused request waits before it is asked again.
pub const ALLOC_RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait before asking again after `refused` refusals in a row:
/// [`ALLOC_RETRY`] for the first ten (a relay that has not learned of a
/// joiner yet learns within seconds, and a relayed pair waits for it), then
/// doubled each time, at most [`ALLOC_RETRY_MAX`].
fn retry_gap(refused: u32) -> Duration {
    let doublings = refused.saturating_sub(10).min(5);
    (ALLOC_RETRY * 2u32.pow(doublings)).min(ALLOC_RETRY_MAX)
}

/// A relayed session with no WireGuard handshake for [`SESSION_DEAD`] asks
/// its relay again, at most this often: `Allocate` is idempotent while the
/// allocation lives, and gives a fresh one when the relay lost it.
pub const ALLOC_REFRESH: Duration = Duration::from_secs(15);
/// A relayed session whose packets have gone unanswered this long counts
/// as dead as well (the caller passes no handshake for it): a relay that
/// held one end gone for a moment (a partition) ended the allocation while
/// both ends kept sending to its ports (soak_short: 150 s without a path).
pub const UNANSWERED_DEAD: Duration = Duration::from_secs(10);
/// A session whose last handshake is older than this, on a path that does
/// not work (or never did), is dead: WireGuard renews a session in use
/// every 2 minutes.
pub const SESSION_DEAD: Duration = Duration::from_secs(150);

/// Whether a relayed session is dead, so its allocation is asked again
/// every [`ALLOC_REFRESH`]: its packets went unanswered for
/// [`UNANSWERED_DEAD`], or its path does not work (`working`, see
/// `nat::paths`) and it had no handshake for [`SESSION_DEAD`]. A working
/// path whose session lapsed while idle is not dead: boringtun renews a
/// session only when data is sent (keepalives do not count), so an idle
/// relayed pair's last handshake grows past 150 s, and taking that for
/// death asked every relayed allocation again every 15 s at rest.
pub fn session_dead(working: bool, handshake_age: Option<Duration>, unanswered: Duration) -> bool {
    unanswered >= UNANSWERED_DEAD
        || (!working && handshake_age.is_none_or(|age| age > SESSION_DEAD))
}

/// A relay allocation we hold or asked for.
#[derive(Debug, Clone)]
struct Alloc {
    relay: [u8; 32],
    /// The relay's record version when we asked: a newer one (it
    /// restarted, or changed its record) and the allocation is asked again,
    /// since a restarted relay has forgotten it.
    relay_version: u64,
    /// The peer's record version when we asked: a newer one (it restarted,
    /// say, and the relay ended the pair's allocation when it left or was
    /// down, then made a new one with new ports when it came back) and the
    /// allocation is asked again, which gives our side's current port
    /// (soak_short: the other end kept a closed port for 150 s).
    peer_version: u64,
    /// Asked again at the next plan (the path was found broken).
    stale: bool,
    /// Refusals in a row: each doubles the wait before asking again (a
    /// relay that holds the other end gone refuses until it learns
    /// otherwise; asking every second meanwhile was a request a second).
    refused: u32,
    /// The relay's address and the port of our side, once allocated.
    endpoint: Option<SocketAddr>,
    asked: Instant,
    /// The last request has its answer (or none was sent): while one is in
    /// flight, nothing is asked again but for a new relay or new versions.
    answered: bool,
}

/// Per peer (WireGuard key) of ours: the allocation for our side of the
/// pair at its relay.
#[derive(Debug, Default)]
pub struct Allocations {
    map: HashMap<[u8; 32], Alloc>,
    requests: Vec<([u8; 32], [u8; 32])>,
    releases: Vec<([u8; 32], [u8; 32])>,
    /// Endpoints just granted (a first allocation, or new ports), by peer:
    /// each is owed a WireGuard handshake now ([`Allocations::take_granted`]).
    granted: Vec<([u8; 32], SocketAddr)>,
}

impl Allocations {
    /// The relay and endpoint a relayed peer's session uses, once allocated.
    pub fn relayed_at(&self, peer: &[u8; 32]) -> Option<([u8; 32], SocketAddr)> {
        self.map
            .get(peer)
            .and_then(|a| a.endpoint.map(|e| (a.relay, e)))
    }

    /// After a path choice: a relayed peer needs an allocation at its relay
    /// (asked again [`ALLOC_RETRY`] after a refusal or a request that got no
    /// answer, never while a request is in flight, at once when
    /// the relay's or the peer's record version changed, after
    /// [`Allocations::refresh`], and every [`ALLOC_REFRESH`] while the
    /// session is dead); a direct one gives its back. `versions`: members'
    /// record versions by WireGuard key (relays and peers); `dead`: whether
    /// a peer's session is dead (see [`session_dead`]).
    pub fn plan(
        &mut self,
        now: Instant,
        paths: &BTreeMap<[u8; 32], Path>,
        versions: &HashMap<[u8; 32], u64>,
        dead: &dyn Fn(&[u8; 32]) -> bool,
    ) {
        for (k, p) in paths {
            match p {
                Path::Relayed { via } => {
                    let version = versions.get(via).copied().unwrap_or(0);
                    let peer_version = versions.get(k).copied().unwrap_or(0);
                    let (ask, keep) = match self.map.get(k) {
                        None => (true, None),
                        Some(a) if a.relay != *via => {
                            if a.endpoint.is_some() {
                                self.releases.push((*k, a.relay));
                            }
                            (true, None)
                        }
                        Some(a) => {
                            let since = now.saturating_duration_since(a.asked);
                            let in_flight = !a.answered && since < ALLOC_IN_FLIGHT_MAX;
                            let new_versions =
                                a.relay_version != version || a.peer_version != peer_version;
                            if in_flight && !new_versions {
                                (false, a.endpoint)
                            } else if a.endpoint.is_none() {
                                (since >= retry_gap(a.refused), None)
                            } else {
                                let dead = dead(k);
                                let renewed = new_versions || (a.stale && since >= ALLOC_RETRY);
                                // Asked again, the endpoint we have stays in
                                // use until the answer.
                                (renewed || (dead && since >= ALLOC_REFRESH), a.endpoint)
                            }
                        }
                    };
                    if ask {
                        let refused = self
                            .map
                            .get(k)
                            .filter(|a| a.relay == *via)
                            .map_or(0, |a| a.refused);
                        self.map.insert(
                            *k,
                            Alloc {
                                relay: *via,
                                relay_version: version,
                                peer_version,
                                stale: false,
                                refused,
                                endpoint: keep,
                                asked: now,
                                answered: false,
                            },
                        );
                        self.requests.push((*k, *via));
                    }
                }
                Path::Direct => {
                    if let Some(a) = self.map.remove(k) {
                        if a.endpoint.is_some() {
                            self.releases.push((*k, a.relay));
                        }
                    }
                }
                Path::Trying => {}
            }
        }
        self.map.retain(|k, _| paths.contains_key(k));
    }

    /// Our path to `peer` was found broken although it is alive: its
    /// allocation (if any) is asked again at the next plan, which also
    /// gives our side's current port if the relay made a new one.
    pub fn refresh(&mut self, peer: &[u8; 32]) {
        if let Some(a) = self.map.get_mut(peer) {
            a.stale = true;
        }
    }

    /// Allocations to ask relays for: (peer, relay), WireGuard keys.
    pub fn take_requests(&mut self) -> Vec<([u8; 32], [u8; 32])> {
        std::mem::take(&mut self.requests)
    }

    /// Allocations to give back: (peer, relay), WireGuard keys.
    pub fn take_releases(&mut self) -> Vec<([u8; 32], [u8; 32])> {
        std::mem::take(&mut self.releases)
    }

    /// Relayed endpoints granted since the last call (a first allocation
    /// for the pair, new ports, or the same ports asked again: the relay
    /// then lets our latch be taken over, and a handshake is the one
    /// datagram that takes it from any address), by peer: each is owed a
    /// WireGuard handshake at once while the path does not work and it is
    /// still the peer's relayed endpoint ([`Allocations::relayed_at`]).
    /// Left to WireGuard, the first
    /// initiation to a relay port went out at its next retry, up to 5 s
    /// (`REKEY_TIMEOUT`) after the grant: in a mixed 100 coming up, pairs
    /// with both allocations granted waited ~5 s for a handshake, and new
    /// relays appearing meanwhile moved them to another relay.
    pub fn take_granted(&mut self) -> Vec<([u8; 32], SocketAddr)> {
        std::mem::take(&mut self.granted)
    }

    /// A relay answered our request for the pair with `peer`: the endpoint
    /// to use (None: refused, asked again later).
    pub fn handle_answer(
        &mut self,
        peer: &[u8; 32],
        relay: &[u8; 32],
        endpoint: Option<SocketAddr>,
    ) {
        match self.map.get_mut(peer) {
            Some(a) if &a.relay == relay => {
                a.answered = true;
                a.refused = if endpoint.is_some() {
                    0
                } else {
                    a.refused.saturating_add(1)
                };
                if let Some(e) = endpoint {
                    self.granted.push((*peer, e));
                }
                a.endpoint = endpoint;
            }
            // An answer from a relay we moved away from meanwhile (it
            // flapped): give that allocation back.
            _ => {
                if endpoint.is_some() {
                    self.releases.push((*peer, *relay));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: [u8; 32] = [1; 32];
    const R1: [u8; 32] = [7; 32];
    const R2: [u8; 32] = [8; 32];

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 3], port))
    }

    fn relayed(via: [u8; 32]) -> BTreeMap<[u8; 32], Path> {
        BTreeMap::from([(PEER, Path::Relayed { via })])
    }

    fn versions(v: u64) -> HashMap<[u8; 32], u64> {
        HashMap::from([(R1, v), (R2, 1)])
    }

    /// The peer's session as a path that does not work with its last
    /// handshake this long ago (None: never).
    fn handshake(age: Option<u64>) -> impl Fn(&[u8; 32]) -> bool {
        move |_: &[u8; 32]| session_dead(false, age.map(Duration::from_secs), Duration::ZERO)
    }

    /// Allocated once, with a working session: nothing more is asked.
    fn settled(t0: Instant) -> Allocations {
        let mut a = Allocations::default();
        a.plan(t0, &relayed(R1), &versions(1), &handshake(None));
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
        a.handle_answer(&PEER, &R1, Some(ep(53000)));
        assert_eq!(a.relayed_at(&PEER), Some((R1, ep(53000))));
        a.plan(
            t0 + Duration::from_secs(60),
            &relayed(R1),
            &versions(1),
            &handshake(Some(20)),
        );
        assert!(a.take_requests().is_empty());
        a
    }

    #[test]
    fn an_idle_working_session_past_its_lifetime_is_not_asked_again() {
        // At rest boringtun lets a session lapse 180 s after its handshake
        // (keepalives renew nothing); the path still works.
        let t0 = Instant::now();
        let mut a = settled(t0);
        let idle =
            |_: &[u8; 32]| session_dead(true, Some(Duration::from_secs(400)), Duration::ZERO);
        for s in [200, 300, 400, 600] {
            a.plan(
                t0 + Duration::from_secs(s),
                &relayed(R1),
                &versions(1),
                &idle,
            );
            assert!(a.take_requests().is_empty(), "asked again at {s} s");
        }
        // Its packets unanswered for 10 s: dead, asked again.
        let unanswered =
            |_: &[u8; 32]| session_dead(true, Some(Duration::from_secs(5)), UNANSWERED_DEAD);
        a.plan(
            t0 + Duration::from_secs(700),
            &relayed(R1),
            &versions(1),
            &unanswered,
        );
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
        // A path that does not work, last handshake 151 s ago: dead.
        assert!(session_dead(
            false,
            Some(SESSION_DEAD + Duration::from_secs(1)),
            Duration::ZERO
        ));
        assert!(!session_dead(false, Some(SESSION_DEAD), Duration::ZERO));
    }

    #[test]
    fn a_failed_request_is_repeated_after_the_retry_gap() {
        let t0 = Instant::now();
        let mut a = Allocations::default();
        a.plan(t0, &relayed(R1), &versions(1), &handshake(None));
        assert_eq!(a.take_requests().len(), 1);
        a.handle_answer(&PEER, &R1, None);
        a.plan(
            t0 + Duration::from_millis(500),
            &relayed(R1),
            &versions(1),
            &handshake(None),
        );
        assert!(a.take_requests().is_empty());
        a.plan(
            t0 + ALLOC_RETRY,
            &relayed(R1),
            &versions(1),
            &handshake(None),
        );
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
    }

    /// A slow relay is not asked again while our request waits for its
    /// answer (a starved relay got a request a second per pair, and worked
    /// through every one of them); a new relay version is asked at once.
    #[test]
    fn nothing_is_asked_again_while_a_request_is_in_flight() {
        let t0 = Instant::now();
        let mut a = Allocations::default();
        a.plan(t0, &relayed(R1), &versions(1), &handshake(None));
        assert_eq!(a.take_requests().len(), 1);
        for s in [1, 5, 20, 40] {
            let t = t0 + Duration::from_secs(s);
            a.plan(t, &relayed(R1), &versions(1), &handshake(None));
            assert!(a.take_requests().is_empty(), "asked again after {s} s");
        }
        // Never answered (lost): asked again after ALLOC_IN_FLIGHT_MAX.
        a.plan(
            t0 + ALLOC_IN_FLIGHT_MAX,
            &relayed(R1),
            &versions(1),
            &handshake(None),
        );
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
        // In flight again; the relay restarts (a newer record): asked at once.
        let t1 = t0 + ALLOC_IN_FLIGHT_MAX + Duration::from_secs(1);
        a.plan(t1, &relayed(R1), &versions(2), &handshake(None));
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
    }

    /// The relay restarted (a newer record): it forgot our allocation, so
    /// we ask again at once, keeping the old endpoint until it answers.
    #[test]
    fn a_restarted_relay_is_asked_again() {
        let t0 = Instant::now();
        let mut a = settled(t0);
        let t1 = t0 + Duration::from_secs(61);
        a.plan(t1, &relayed(R1), &versions(2), &handshake(Some(21)));
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
        assert_eq!(a.relayed_at(&PEER), Some((R1, ep(53000))));
        a.handle_answer(&PEER, &R1, Some(ep(54000)));
        assert_eq!(a.relayed_at(&PEER), Some((R1, ep(54000))));
        a.plan(
            t1 + Duration::from_secs(1),
            &relayed(R1),
            &versions(2),
            &handshake(Some(1)),
        );
        assert!(a.take_requests().is_empty());
    }

    /// A relayed session that is dead asks its relay again, every
    /// ALLOC_REFRESH, whatever the relay's record says.
    #[test]
    fn a_dead_relayed_session_refreshes_its_allocation() {
        let t0 = Instant::now();
        let mut a = settled(t0);
        let t1 = t0 + Duration::from_secs(60) + ALLOC_REFRESH;
        a.plan(t1, &relayed(R1), &versions(1), &handshake(Some(200)));
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
        a.handle_answer(&PEER, &R1, Some(ep(53000)));
        a.plan(
            t1 + Duration::from_secs(5),
            &relayed(R1),
            &versions(1),
            &handshake(Some(205)),
        );
        assert!(a.take_requests().is_empty());
        a.plan(
            t1 + ALLOC_REFRESH,
            &relayed(R1),
            &versions(1),
            &handshake(None),
        );
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
    }

    /// The peer restarted (a newer record): the relay may have ended the
    /// pair's allocation meanwhile and made a new one, so we ask again;
    /// a path found broken asks again too; nothing else does.
    #[test]
    fn a_restarted_peer_or_a_broken_path_asks_again() {
        let t0 = Instant::now();
        let mut a = settled(t0);
        let t1 = t0 + Duration::from_secs(61);
        let mut v = versions(1);
        v.insert(PEER, 5);
        a.plan(t1, &relayed(R1), &v, &handshake(Some(21)));
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
        a.handle_answer(&PEER, &R1, Some(ep(54000)));
        a.plan(t1 + ALLOC_RETRY, &relayed(R1), &v, &handshake(Some(22)));
        assert!(a.take_requests().is_empty());
        a.refresh(&PEER);
        a.plan(t1 + ALLOC_RETRY * 2, &relayed(R1), &v, &handshake(Some(23)));
        assert_eq!(a.take_requests(), vec![(PEER, R1)]);
        a.handle_answer(&PEER, &R1, Some(ep(54000)));
        a.plan(t1 + ALLOC_RETRY * 3, &relayed(R1), &v, &handshake(Some(24)));
        assert!(a.take_requests().is_empty());
    }

    /// A relay that refuses (it holds the other end gone) is asked again
    /// after 1 s ten times, then 2 s, 4 s ... at most 30 s; an allocation
    /// resets the wait.
    #[test]
    fn refusals_back_off() {
        let t0 = Instant::now();
        let mut a = Allocations::default();
        let mut t = t0;
        a.plan(t, &relayed(R1), &versions(1), &handshake(None));
        assert_eq!(a.take_requests().len(), 1);
        let mut gaps = Vec::new();
        let mut last = t;
        for _ in 0..17 {
            a.handle_answer(&PEER, &R1, None);
            loop {
                t += Duration::from_millis(250);
                a.plan(t, &relayed(R1), &versions(1), &handshake(None));
                if !a.take_requests().is_empty() {
                    break;
                }
            }
            gaps.push((t - last).as_secs());
            last = t;
        }
        assert_eq!(
            gaps,
            vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 4, 8, 16, 30, 30, 30]
        );
        a.handle_answer(&PEER, &R1, Some(ep(53000)));
        assert_eq!(a.relayed_at(&PEER), Some((R1, ep(53000))));
    }

    #[test]
    fn moving_to_another_relay_or_direct_gives_the_allocation_back() {
        let t0 = Instant::now();
        let mut a = settled(t0);
        a.plan(
            t0 + Duration::from_secs(61),
            &relayed(R2),
            &versions(1),
            &handshake(None),
        );
        assert_eq!(a.take_releases(), vec![(PEER, R1)]);
        assert_eq!(a.take_requests(), vec![(PEER, R2)]);
        // R1's late answer is given back too.
        a.handle_answer(&PEER, &R1, Some(ep(53000)));
        assert_eq!(a.take_releases(), vec![(PEER, R1)]);
        a.handle_answer(&PEER, &R2, Some(ep(55000)));
        let direct = BTreeMap::from([(PEER, Path::Direct)]);
        a.plan(
            t0 + Duration::from_secs(62),
            &direct,
            &versions(1),
            &handshake(Some(1)),
        );
        assert_eq!(a.take_releases(), vec![(PEER, R2)]);
        assert_eq!(a.relayed_at(&PEER), None);
    }

    #[test]
    fn a_granted_endpoint_is_owed_one_handshake() {
        let t0 = Instant::now();
        let mut a = Allocations::default();
        // The n-th request to R1 (relay record version `v`) and its answer.
        let mut ask = |n: u32, v: u64, answer: Option<SocketAddr>| {
            a.plan(
                t0 + ALLOC_RETRY * n,
                &relayed(R1),
                &versions(v),
                &handshake(None),
            );
            assert_eq!(a.take_requests(), vec![(PEER, R1)]);
            a.handle_answer(&PEER, &R1, answer);
            a.take_granted()
        };
        // A refusal grants nothing.
        assert!(ask(0, 1, None).is_empty());
        assert_eq!(ask(1, 1, Some(ep(53000))), vec![(PEER, ep(53000))]);
        // Asked again (a new relay version), the same port: owed again.
        assert_eq!(ask(2, 2, Some(ep(53000))), vec![(PEER, ep(53000))]);
        // New ports (the relay made a new allocation): owed too.
        assert_eq!(ask(3, 3, Some(ep(54000))), vec![(PEER, ep(54000))]);
        assert!(a.take_granted().is_empty());
        // A late answer from a relay we left is given back, not greeted.
        a.handle_answer(&PEER, &R2, Some(ep(55000)));
        assert!(a.take_granted().is_empty());
    }
}
