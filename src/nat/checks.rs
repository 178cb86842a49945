//! Connectivity checks: which of a peer's candidate endpoints answers.
//!
//! WireGuard sends its handshake to one endpoint at a time and, when that
//! initiation is lost (the other side's NAT was not open yet, or the
//! candidate was wrong), retries only after `REKEY_TIMEOUT` (5 s). So instead
//! of waiting for WireGuard to guess, each member sends a small STUN binding
//! request from its WireGuard port to every candidate of each peer it has no
//! direct path to (the ICE idea, without ICE's machinery: members answer
//! STUN on their WireGuard port anyway). The request also opens our NAT
//! towards that candidate. The first candidate that answers is *validated*:
//! the shell points the WireGuard peer at it and starts a handshake at once.
//!
//! Schedule per peer: a burst right after the peer needs a path or its
//! candidates change (0, 0.5, 1, 1.5, 2, 3, 4, 6 and 8 s later), then with every poke
//! (the 10 s wall-clock beat both ends share). A per-step budget bounds the
//! datagrams a node sends when hundreds of members appear at once; the
//! peers checked least recently go first, so a burst's later checks to
//! some peers never starve the first check to others, and a poke the
//! budget cannot cover at once is owed and sent in the next steps.
//!
//! A response only counts when its transaction id is one we sent to that
//! candidate, and only names one of the peer's own signed candidates, so an
//! off-path sender cannot steer a peer's endpoint (and WireGuard
//! authenticates everything after that anyway).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Delays (from the start of a burst) of the checks in a burst.
const BURST: [Duration; 9] = [
    Duration::from_millis(0),
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(1500),
    Duration::from_millis(2000),
    Duration::from_millis(3000),
    Duration::from_millis(4000),
    Duration::from_millis(6000),
    Duration::from_millis(8000),
];
/// At most this many check datagrams per step (the rest wait for the next).
pub const CHECK_BUDGET: usize = 64;
/// A request without an answer after this long is forgotten.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// A validated candidate is trusted for this long after its last answer.
pub const VALID_FOR: Duration = Duration::from_secs(30);
/// The first gap between two forced handshakes to one peer (the other side
/// may not know us yet and drop the first ones; each answered check after
/// the gap tries again). The gap doubles with each try, up to
/// [`FORCE_MAX_GAP`], until the peer needs no checks any more.
const FORCE_EVERY: Duration = Duration::from_secs(1);
const FORCE_MAX_GAP: Duration = Duration::from_secs(32);
/// At most this many candidates of one peer are checked.
const MAX_CANDIDATES: usize = 4;
/// How long a public peer's record endpoint is held back waiting for a
/// first answer to our checks (an answer or a refusal). A member whose
/// WireGuard is the kernel's cannot answer; after this its record's
/// endpoint is used as it is.
pub const ANSWER_GRACE: Duration = Duration::from_secs(5);

struct PeerChecks {
    /// When the peer was first listed as needing checks (this time).
    since: Instant,
    /// One of its candidates answered or refused a check: it answers
    /// checks (its WireGuard is meshpeer's own).
    heard: bool,
    candidates: Vec<SocketAddr>,
    burst_start: Instant,
    /// How many checks of the burst were sent.
    sent: usize,
    validated: Option<(SocketAddr, Instant)>,
    forced: Option<(SocketAddr, Instant)>,
    /// Gap before the next forced handshake to the same endpoint.
    force_gap: Duration,
    /// When a check last went to this peer (the budget serves the least
    /// recently checked first).
    last_sent: Option<Instant>,
    /// A poke's checks that the budget has not sent yet.
    owed: bool,
}

/// The connectivity-check state of one member (sans-IO: the caller sends
/// the requests and hands back the answers).
#[derive(Default)]
pub struct Checks {
    peers: HashMap<[u8; 32], PeerChecks>,
    pending: HashMap<[u8; 12], ([u8; 32], SocketAddr, Instant)>,
}

/// A peer that needs a path, with its candidates in preference order.
pub struct Need<'a> {
    pub key: [u8; 32],
    pub candidates: &'a [SocketAddr],
}

impl Checks {
    /// Which checks to send now. `need` lists the peers without a direct
    /// path that a punch can reach; peers not listed are forgotten. `poke`
    /// is the shared 10 s beat: every candidate of every listed peer is
    /// checked then (within the budget). `txid` makes transaction ids.
    pub fn poll(
        &mut self,
        now: Instant,
        need: &[Need<'_>],
        poke: bool,
        txid: &mut dyn FnMut() -> [u8; 12],
    ) -> Vec<([u8; 12], [u8; 32], SocketAddr)> {
        self.peers.retain(|k, _| need.iter().any(|n| &n.key == k));
        self.pending
            .retain(|_, (_, _, at)| now.saturating_duration_since(*at) < CHECK_TIMEOUT);
        // Which peers are due, least recently checked first (a peer never
        // checked before any other), then in `need` order.
        let mut due: Vec<(Option<Instant>, usize, bool)> = Vec::new();
        for (i, n) in need.iter().enumerate() {
            let cands: Vec<SocketAddr> =
                n.candidates.iter().take(MAX_CANDIDATES).copied().collect();
            if cands.is_empty() {
                continue;
            }
            let p = self.peers.entry(n.key).or_insert_with(|| PeerChecks {
                since: now,
                heard: false,
                candidates: cands.clone(),
                burst_start: now,
                sent: 0,
                validated: None,
                forced: None,
                force_gap: FORCE_EVERY,
                last_sent: None,
                owed: false,
            });
            if p.candidates != cands {
                // New candidates (a record update): a new burst, and a
                // validated endpoint no longer listed is dropped.
                p.candidates = cands;
                p.burst_start = now;
                p.sent = 0;
                if p.validated.is_some_and(|(a, _)| !p.candidates.contains(&a)) {
                    p.validated = None;
                }
            }
            p.owed |= poke;
            let burst_due = BURST
                .get(p.sent)
                .is_some_and(|d| now.saturating_duration_since(p.burst_start) >= *d);
            if burst_due || p.owed {
                due.push((p.last_sent, i, burst_due));
            }
        }
        due.sort_by_key(|&(last, i, _)| (last, i));
        let mut out = Vec::new();
        for (_, i, burst_due) in due {
            let key = need[i].key;
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            if out.len() + p.candidates.len() > CHECK_BUDGET {
                // Over budget: this peer waits for the next step (its
                // burst position and an owed poke are kept).
                continue;
            }
            if burst_due {
                p.sent += 1;
            }
            p.owed = false;
            p.last_sent = Some(now);
            for &c in &p.candidates {
                let id = txid();
                self.pending.insert(id, (key, c, now));
                out.push((id, key, c));
            }
        }
        out
    }

    /// An answer to one of our checks; returns the peer it validates (once
    /// per peer per [`FORCE_EVERY`] and per new endpoint: the shell then
    /// starts a handshake there). Answers we did not ask for are `None`
    /// (the caller hands them to discovery).
    pub fn handle_response(
        &mut self,
        now: Instant,
        txid: &[u8; 12],
        from: SocketAddr,
    ) -> Option<Validated> {
        let (key, candidate) = self.take_answer(txid, from)?;
        let p = self.peers.get_mut(&key)?;
        // Prefer the earlier candidate (same LAN before public) when both
        // answer: only replace a fresh validation by a better-ranked one.
        let rank = |a: &SocketAddr| p.candidates.iter().position(|c| c == a);
        match p.validated {
            Some((a, at))
                if a != candidate
                    && now.saturating_duration_since(at) < VALID_FOR
                    && rank(&a) < rank(&candidate) => {}
            _ => p.validated = Some((candidate, now)),
        }
        let (endpoint, _) = p.validated?;
        // Again to the same endpoint only after the gap, which then
        // doubles; a new endpoint starts over.
        let force = match p.forced {
            Some((a, at)) if a == endpoint => {
                let due = now.saturating_duration_since(at) >= p.force_gap;
                if due {
                    p.force_gap = (p.force_gap * 2).min(FORCE_MAX_GAP);
                }
                due
            }
            _ => {
                p.force_gap = FORCE_EVERY;
                true
            }
        };
        if force {
            p.forced = Some((endpoint, now));
        }
        Some(Validated {
            key,
            endpoint,
            force,
        })
    }

    /// A refusal of one of our checks: the member is there but has no
    /// WireGuard peer for us yet. Nothing is validated (a handshake would
    /// be dropped); the member does answer checks, so its endpoint stays
    /// held back ([`Checks::holds`]) until it answers one. Its own checks
    /// reach us once it knows us, and it then starts the handshake.
    pub fn handle_refusal(&mut self, txid: &[u8; 12], from: SocketAddr) -> bool {
        self.take_answer(txid, from).is_some()
    }

    /// The peer and candidate of a pending check that `from` answered
    /// (successfully or with a refusal); the peer is then known to answer
    /// checks. Only the candidate we asked counts (a NAT in between may
    /// answer from the same address only: anything else is not this
    /// path), and only while it is still one of the peer's candidates.
    fn take_answer(&mut self, txid: &[u8; 12], from: SocketAddr) -> Option<([u8; 32], SocketAddr)> {
        let (key, candidate, _) = self.pending.remove(txid)?;
        if from != candidate {
            return None;
        }
        let p = self.peers.get_mut(&key)?;
        if !p.candidates.contains(&candidate) {
            return None;
        }
        p.heard = true;
        Some((key, candidate))
    }

    /// Whether to hold back the record endpoint of a peer that needs
    /// checks and has no validated candidate: yes while it is new (not
    /// checked yet, or within [`ANSWER_GRACE`]) and for good once it
    /// answered or refused a check; no for a peer that never answers.
    pub fn holds(&self, now: Instant, key: &[u8; 32]) -> bool {
        match self.peers.get(key) {
            None => true,
            Some(p) => p.heard || now.saturating_duration_since(p.since) < ANSWER_GRACE,
        }
    }

    /// The candidate of `key` that answered lately, if any.
    pub fn validated(&self, now: Instant, key: &[u8; 32]) -> Option<SocketAddr> {
        self.peers
            .get(key)?
            .validated
            .filter(|(_, at)| now.saturating_duration_since(*at) < VALID_FOR)
            .map(|(a, _)| a)
    }

    /// How many checks are waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// A peer whose candidate answered a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validated {
    pub key: [u8; 32],
    /// The best candidate that answered lately.
    pub endpoint: SocketAddr,
    /// Start a WireGuard handshake towards `endpoint` now.
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Peer [1; 32] with these candidates.
    fn peer1(candidates: &[SocketAddr]) -> [Need<'_>; 1] {
        [Need {
            key: [1; 32],
            candidates,
        }]
    }

    fn ids() -> impl FnMut() -> [u8; 12] {
        let mut n = 0u32;
        move || {
            n += 1;
            let mut id = [0; 12];
            id[..4].copy_from_slice(&n.to_le_bytes());
            id
        }
    }

    #[test]
    fn a_refusal_validates_nothing_and_keeps_the_endpoint_held() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let cands = [a("198.51.100.1:51820")];
        assert!(c.holds(t0, &[1; 32]), "a new peer is held before any check");
        let out = c.poll(t0, &peer1(&cands), false, &mut id);
        // A refusal from elsewhere is not one.
        assert!(!c.handle_refusal(&out[0].0, a("198.51.100.9:51820")));
        let out = c.poll(
            t0 + Duration::from_millis(500),
            &peer1(&cands),
            false,
            &mut id,
        );
        assert!(c.handle_refusal(&out[0].0, cands[0]));
        assert_eq!(c.validated(t0, &[1; 32]), None);
        let late = t0 + ANSWER_GRACE * 10;
        assert!(
            c.holds(late, &[1; 32]),
            "it answers checks: held until it accepts us"
        );
        // Once it has a peer for us, its answer validates.
        let out = c.poll(late, &peer1(&cands), true, &mut id);
        let v = c.handle_response(late, &out[0].0, cands[0]).unwrap();
        assert_eq!(v.endpoint, cands[0]);
        assert_eq!(c.validated(late, &[1; 32]), Some(cands[0]));
    }

    #[test]
    fn a_peer_that_never_answers_is_held_only_for_the_grace() {
        // A public member whose WireGuard is the kernel's cannot answer.
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let cands = [a("198.51.100.1:51820")];
        c.poll(t0, &peer1(&cands), false, &mut id);
        assert!(c.holds(t0 + ANSWER_GRACE / 2, &[1; 32]));
        assert!(!c.holds(t0 + ANSWER_GRACE, &[1; 32]));
    }

    #[test]
    fn burst_then_only_on_poke() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let cands = [a("198.51.100.1:51820"), a("192.168.1.2:51820")];
        let need = peer1(&cands);
        let mut sent_at = vec![];
        for step in 0..40u64 {
            let now = t0 + Duration::from_millis(step * 500);
            let out = c.poll(now, &need, false, &mut id);
            if !out.is_empty() {
                assert_eq!(out.len(), 2, "every candidate each time");
                sent_at.push(step * 500);
            }
        }
        assert_eq!(
            sent_at,
            vec![0, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000]
        );
        // After the burst, a poke checks again.
        let out = c.poll(t0 + Duration::from_secs(21), &need, true, &mut id);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn new_candidates_start_a_new_burst_and_drop_a_stale_validation() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let old = [a("198.51.100.1:51820")];
        let out = c.poll(t0, &peer1(&old), false, &mut id);
        let v = c.handle_response(t0, &out[0].0, old[0]).unwrap();
        assert_eq!(v.endpoint, old[0]);
        assert!(v.force);
        let t1 = t0 + Duration::from_secs(20);
        let new = [a("198.51.100.7:40000")];
        let out = c.poll(t1, &peer1(&new), false, &mut id);
        assert_eq!(out.len(), 1, "a new burst starts at once");
        assert_eq!(c.validated(t1, &[1; 32]), None);
    }

    #[test]
    fn only_our_own_requests_from_the_asked_candidate_count() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let cands = [a("198.51.100.1:51820")];
        let out = c.poll(t0, &peer1(&cands), false, &mut id);
        assert_eq!(c.handle_response(t0, &[0xaa; 12], cands[0]), None);
        assert_eq!(
            c.handle_response(t0, &out[0].0, a("203.0.113.9:1")),
            None,
            "answer from elsewhere"
        );
        assert_eq!(c.validated(t0, &[1; 32]), None);
        // A stale request is forgotten.
        let out = c.poll(
            t0 + Duration::from_millis(500),
            &peer1(&cands),
            false,
            &mut id,
        );
        let late = t0 + Duration::from_secs(6);
        c.poll(late, &peer1(&cands), false, &mut id);
        assert_eq!(c.handle_response(late, &out[0].0, cands[0]), None);
    }

    #[test]
    fn prefers_the_better_ranked_candidate_and_limits_forcing() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let lan = a("192.168.1.2:51820");
        let public = a("198.51.100.1:40000");
        let cands = [lan, public];
        let need = peer1(&cands);
        let out = c.poll(t0, &need, false, &mut id);
        let by = |x: SocketAddr| out.iter().find(|(_, _, c)| *c == x).unwrap().0;
        let v = c.handle_response(t0, &by(public), public).unwrap();
        assert_eq!((v.endpoint, v.force), (public, true));
        let v = c.handle_response(t0, &by(lan), lan).unwrap();
        assert_eq!(
            (v.endpoint, v.force),
            (lan, true),
            "a better one forces again"
        );
        // The public one answering again does not replace the LAN one.
        let t1 = t0 + Duration::from_millis(500);
        let out = c.poll(t1, &need, false, &mut id);
        let by = |x: SocketAddr| out.iter().find(|(_, _, c)| *c == x).unwrap().0;
        let v = c.handle_response(t1, &by(public), public).unwrap();
        assert_eq!((v.endpoint, v.force), (lan, false));
        assert_eq!(c.validated(t1, &[1; 32]), Some(lan));
        // Forced again only after FORCE_EVERY.
        let t2 = t0 + FORCE_EVERY;
        let out = c.poll(t2, &need, false, &mut id);
        let by = |x: SocketAddr| out.iter().find(|(_, _, c)| *c == x).unwrap().0;
        let v = c.handle_response(t2, &by(lan), lan).unwrap();
        assert!(v.force);
        // Then the gap doubles: 2 s, 4 s, ...
        let answer = |c: &mut Checks, id: &mut dyn FnMut() -> [u8; 12], t: Instant| {
            let out = c.poll(t, &need, true, id);
            let tx = out.iter().find(|(_, _, x)| *x == lan).unwrap().0;
            c.handle_response(t, &tx, lan).unwrap().force
        };
        assert!(!answer(&mut c, &mut id, t2 + Duration::from_millis(1900)));
        assert!(answer(&mut c, &mut id, t2 + Duration::from_secs(2)));
        assert!(!answer(&mut c, &mut id, t2 + Duration::from_secs(5)));
        assert!(answer(&mut c, &mut id, t2 + Duration::from_secs(6)));
    }

    #[test]
    fn the_budget_defers_peers_to_the_next_step() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let cands: Vec<[SocketAddr; 2]> = (0..100u16)
            .map(|i| [a(&format!("198.51.100.1:{}", 1000 + i)), a("10.0.0.1:1")])
            .collect();
        let need: Vec<Need<'_>> = cands
            .iter()
            .enumerate()
            .map(|(i, c)| Need {
                key: [i as u8; 32],
                candidates: c,
            })
            .collect();
        let first = c.poll(t0, &need, false, &mut id);
        assert_eq!(first.len(), CHECK_BUDGET);
        let second = c.poll(t0 + Duration::from_millis(1), &need, false, &mut id);
        assert_eq!(second.len(), CHECK_BUDGET, "the deferred peers go next");
        let public = |v: &[([u8; 12], [u8; 32], SocketAddr)]| -> Vec<SocketAddr> {
            v.iter().map(|x| x.2).filter(|x| x.port() != 1).collect()
        };
        let (first, second) = (public(&first), public(&second));
        assert!(first.iter().all(|f| !second.contains(f)));
    }

    /// 100 peers with two candidates each, checked every 625 ms (the tick
    /// of a 100-member mesh): the budget fits 32 peers a step.
    fn hundred(cands: &[[SocketAddr; 2]]) -> Vec<Need<'_>> {
        cands
            .iter()
            .enumerate()
            .map(|(i, c)| Need {
                key: [i as u8; 32],
                candidates: c,
            })
            .collect()
    }

    fn hundred_candidates() -> Vec<[SocketAddr; 2]> {
        (0..100u16)
            .map(|i| [a(&format!("198.51.100.1:{}", 1000 + i)), a("10.0.0.1:1")])
            .collect()
    }

    #[test]
    fn every_peer_gets_its_first_check_before_any_gets_a_later_one() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let cands = hundred_candidates();
        let need = hundred(&cands);
        let mut first: HashMap<[u8; 32], u64> = HashMap::new();
        for step in 0..8u64 {
            let out = c.poll(
                t0 + Duration::from_millis(625 * step),
                &need,
                false,
                &mut id,
            );
            assert!(out.len() <= CHECK_BUDGET);
            for (_, k, _) in out {
                first.entry(k).or_insert(step);
            }
        }
        assert_eq!(first.len(), 100);
        // 200 datagrams at 64 a step: every peer within four steps (2 s),
        // not after the first peers' bursts (they are due every step).
        assert!(first.values().all(|s| *s < 4), "{first:?}");
    }

    #[test]
    fn a_poke_over_the_budget_is_owed_to_every_peer() {
        let mut c = Checks::default();
        let mut id = ids();
        let t0 = Instant::now();
        let cands = hundred_candidates();
        let need = hundred(&cands);
        // Run every burst to its end.
        for step in 0..40u64 {
            c.poll(
                t0 + Duration::from_millis(625 * step),
                &need,
                false,
                &mut id,
            );
        }
        let t1 = t0 + Duration::from_secs(30);
        assert!(c.poll(t1, &need, false, &mut id).is_empty(), "burst over");
        let mut poked: HashMap<[u8; 32], usize> = HashMap::new();
        for step in 0..6u64 {
            let now = t1 + Duration::from_millis(625 * (step + 1));
            for (_, k, _) in c.poll(now, &need, step == 0, &mut id) {
                *poked.entry(k).or_default() += 1;
            }
        }
        assert_eq!(poked.len(), 100, "every peer is checked after the poke");
        assert!(poked.values().all(|n| *n == 2), "once, both candidates");
    }
}
