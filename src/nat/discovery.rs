//! Endpoint discovery: which public endpoint does our WireGuard socket get,
//! and does the NAT keep it for every destination?
//!
//! Every round, a binding request goes from the WireGuard port to up to
//! [`MAX_TARGETS`] members (public ones first). Each answer says how that
//! member sees us. One mapped address that is our own means no NAT; the same
//! mapped endpoint from different members means an endpoint-independent
//! mapping (punchable); different ones mean an endpoint-dependent
//! ("symmetric") mapping. Observations expire, so a NAT that changes (router
//! reboot, new public address) is noticed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::stun;
use crate::record::NatKind;

pub const MAX_TARGETS: usize = 3;
/// Rounds until two destinations answered, and once they have.
pub const FAST_ROUND: Duration = Duration::from_secs(1);
/// Rounds once the picture is known. A mesh at rest sends little else, so
/// this is slow; a mapping that changes shows first as paths whose packets
/// go unanswered, which bring the next round forward ([`Discovery::hurry`]).
pub const SLOW_ROUND: Duration = Duration::from_secs(30);
/// An observation older than this is forgotten.
pub const OBSERVATION_TTL: Duration = Duration::from_secs(60);
const REQUEST_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatInfo {
    pub kind: NatKind,
    /// Server-reflexive endpoints, most often seen first.
    pub mapped: Vec<SocketAddr>,
}

/// Whether an address looks globally routable: not private (RFC 1918),
/// shared/CGNAT (RFC 6598), loopback, link-local or unspecified. A host with
/// such an address on an interface is most likely not behind a NAT.
pub fn looks_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xC0) == 64))
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xE000) == 0x2000,
    }
}

pub struct Discovery {
    /// Transaction ids: 96 random bits each, from a generator seeded by the
    /// operating system's CSPRNG (predictable ids would let anyone who saw
    /// one answer for a server it is not).
    rng: rand::rngs::StdRng,
    pending: HashMap<[u8; 12], (SocketAddr, Instant)>,
    observed: HashMap<SocketAddr, (SocketAddr, Instant)>,
    next_round: Option<Instant>,
    /// How many targets the last round asked.
    asked: usize,
    round_started: Option<Instant>,
}

impl Discovery {
    /// `seed` seeds the transaction ids (pass 32 bytes from the OS CSPRNG).
    pub fn new(seed: [u8; 32]) -> Self {
        use rand::SeedableRng;
        Self {
            rng: rand::rngs::StdRng::from_seed(seed),
            pending: HashMap::new(),
            observed: HashMap::new(),
            next_round: None,
            asked: 0,
            round_started: None,
        }
    }

    /// Requests to send now: `(target, datagram)`.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        targets: &[SocketAddr],
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        self.pending
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < REQUEST_TTL);
        self.observed
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < OBSERVATION_TTL);
        // A round is due on schedule, or at once while fewer than two
        // destinations answered and more targets are known than the last
        // round asked (members appear one by one after a join).
        let more = self.observed.len() < 2 && targets.len().min(MAX_TARGETS) > self.asked;
        if (self.next_round.is_some_and(|t| now < t) && !more) || targets.is_empty() {
            return Vec::new();
        }
        self.asked = targets.len().min(MAX_TARGETS);
        self.round_started = Some(now);
        // Fast until two destinations answered (one mapping cannot tell an
        // endpoint-independent NAT from a symmetric one), or until every
        // target we know answered.
        let answered = self.observed.len();
        let round = if answered < 2.min(targets.len().min(MAX_TARGETS)) {
            FAST_ROUND
        } else {
            SLOW_ROUND
        };
        self.next_round = Some(now + round);
        targets
            .iter()
            .take(MAX_TARGETS)
            .map(|t| {
                let txid: [u8; 12] = rand::Rng::gen(&mut self.rng);
                self.pending.insert(txid, (*t, now));
                (*t, stun::binding_request(txid))
            })
            .collect()
    }

    /// Something suggests our mapping changed (packets to peers go
    /// unanswered): the next round is due now, unless one started less than
    /// [`FAST_ROUND`] ago.
    pub fn hurry(&mut self, now: Instant) {
        if let Some(next) = self.next_round {
            let started = self.round_started.unwrap_or(now - FAST_ROUND);
            if now.saturating_duration_since(started) >= FAST_ROUND && next > now {
                self.next_round = Some(now);
            }
        }
    }

    /// A binding response from `from` arrived; returns whether it answered
    /// our request (our transaction id, from the server we asked; each id
    /// counts once).
    pub fn handle_response(
        &mut self,
        now: Instant,
        txid: [u8; 12],
        from: SocketAddr,
        mapped: SocketAddr,
    ) -> bool {
        match self.pending.get(&txid) {
            Some((target, _)) if *target == from => {
                let target = *target;
                self.pending.remove(&txid);
                // A new public address (the router reconnected): older
                // observations describe a NAT that is gone. (A new port
                // alone is not enough: a symmetric NAT gives one per
                // destination, and a flushed one is re-measured within a
                // round.)
                if self.observed.values().any(|(m, _)| m.ip() != mapped.ip()) {
                    self.observed.clear();
                }
                self.observed.insert(target, (mapped, now));
                true
            }
            _ => false,
        }
    }

    /// The answers the NAT picture comes from: (server asked, our endpoint
    /// as it saw it, when it answered).
    pub fn observations(&self) -> impl Iterator<Item = (SocketAddr, SocketAddr, Instant)> + '_ {
        self.observed.iter().map(|(s, (m, t))| (*s, *m, *t))
    }

    /// What the observations say, given this host's addresses and WireGuard
    /// port. With no observation yet, `public_hint` (this host has a
    /// globally routable address of its own) makes it tentatively public:
    /// the first member of a mesh has nobody to ask.
    pub fn info(&self, local: &[IpAddr], wg_port: u16, public_hint: bool) -> NatInfo {
        let mut counts: Vec<(SocketAddr, usize)> = Vec::new();
        for (mapped, _) in self.observed.values() {
            match counts.iter_mut().find(|(m, _)| m == mapped) {
                Some((_, n)) => *n += 1,
                None => counts.push((*mapped, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mapped: Vec<SocketAddr> = counts.iter().map(|(m, _)| *m).collect();
        let kind = if mapped.is_empty() {
            if public_hint {
                NatKind::Public
            } else {
                NatKind::Unknown
            }
        } else if mapped
            .iter()
            .any(|m| local.contains(&m.ip()) && m.port() == wg_port)
        {
            NatKind::Public
        } else if mapped.len() == 1 || counts[0].1 >= 2 {
            // One mapping, or one that several destinations agree on: a
            // Linux NAT keeps the host's port per destination unless another
            // host behind it already uses that port towards that same
            // destination, so two members of one home on the default port
            // see a few odd mappings next to the common one. Only mappings
            // that all differ mean the NAT picks a port per destination.
            NatKind::EndpointIndependent
        } else {
            NatKind::EndpointDependent
        };
        NatInfo { kind, mapped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txid_of(req: &[u8]) -> [u8; 12] {
        match stun::parse(req) {
            Some(stun::StunMessage::Request { txid, .. }) => txid,
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn classifies_public_cone_and_symmetric() {
        let t0 = Instant::now();
        let targets: Vec<SocketAddr> = vec![
            "198.18.0.1:51820".parse().unwrap(),
            "198.18.0.2:51820".parse().unwrap(),
        ];
        let local: Vec<IpAddr> = vec!["192.168.1.2".parse().unwrap()];

        // Endpoint-independent: both see the same mapping.
        let mut d = Discovery::new([1; 32]);
        let reqs = d.poll_transmit(t0, &targets);
        assert_eq!(reqs.len(), 2);
        assert!(
            d.poll_transmit(t0, &targets).is_empty(),
            "one round at a time"
        );
        let m: SocketAddr = "198.18.5.5:40000".parse().unwrap();
        for (to, r) in &reqs {
            assert!(d.handle_response(t0, txid_of(r), *to, m));
        }
        assert_eq!(
            d.info(&local, 51820, false),
            NatInfo {
                kind: NatKind::EndpointIndependent,
                mapped: vec![m]
            }
        );
        // Unknown transaction ids are ignored.
        assert!(!d.handle_response(t0, [9; 12], targets[0], m));
        // So are answers from anyone but the server asked.
        let reqs = d.poll_transmit(t0 + SLOW_ROUND, &targets);
        let stranger: SocketAddr = "198.18.66.66:3478".parse().unwrap();
        assert!(!d.handle_response(t0 + SLOW_ROUND, txid_of(&reqs[0].1), stranger, m));
        assert!(d.handle_response(t0 + SLOW_ROUND, txid_of(&reqs[0].1), reqs[0].0, m));
        // Each transaction id counts once, and ids do not repeat.
        assert!(!d.handle_response(t0 + SLOW_ROUND, txid_of(&reqs[0].1), reqs[0].0, m));
        assert_ne!(txid_of(&reqs[0].1), txid_of(&reqs[1].1));

        // Mostly one mapping, one odd one out (a port clash with another
        // host behind the same NAT): still endpoint-independent, the common
        // mapping first.
        let mut d = Discovery::new([3; 32]);
        let three: Vec<SocketAddr> = vec![
            "198.18.0.1:51820".parse().unwrap(),
            "198.18.0.2:51820".parse().unwrap(),
            "198.18.0.3:51820".parse().unwrap(),
        ];
        let reqs = d.poll_transmit(t0, &three);
        let odd: SocketAddr = "198.18.5.5:48711".parse().unwrap();
        for (i, (to, r)) in reqs.iter().enumerate() {
            d.handle_response(t0, txid_of(r), *to, if i == 1 { odd } else { m });
        }
        assert_eq!(
            d.info(&local, 51820, false),
            NatInfo {
                kind: NatKind::EndpointIndependent,
                mapped: vec![m, odd]
            }
        );

        // The router got a new public address: the old observations go at
        // once, the new mapping is the answer.
        let moved: SocketAddr = "198.18.9.9:40000".parse().unwrap();
        let reqs = d.poll_transmit(t0 + SLOW_ROUND, &three);
        d.handle_response(t0 + SLOW_ROUND, txid_of(&reqs[0].1), reqs[0].0, moved);
        assert_eq!(
            d.info(&local, 51820, false),
            NatInfo {
                kind: NatKind::EndpointIndependent,
                mapped: vec![moved]
            }
        );

        // Symmetric: a new port per destination.
        let mut d = Discovery::new([2; 32]);
        let reqs = d.poll_transmit(t0, &targets);
        for (i, (to, r)) in reqs.iter().enumerate() {
            d.handle_response(
                t0,
                txid_of(r),
                *to,
                SocketAddr::new(m.ip(), 40000 + i as u16),
            );
        }
        assert_eq!(
            d.info(&local, 51820, false).kind,
            NatKind::EndpointDependent
        );

        // Public: the mapping is our own address and port.
        let mut d = Discovery::new([3; 32]);
        let reqs = d.poll_transmit(t0, &targets);
        d.handle_response(
            t0,
            txid_of(&reqs[0].1),
            reqs[0].0,
            "192.168.1.2:51820".parse().unwrap(),
        );
        assert_eq!(d.info(&local, 51820, false).kind, NatKind::Public);
    }

    #[test]
    fn public_looking_addresses() {
        for a in ["203.0.113.5", "198.18.0.1", "8.8.8.8", "2001:db8::1"] {
            assert!(looks_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "10.1.2.3",
            "192.168.1.2",
            "172.16.0.1",
            "100.64.0.1",
            "100.127.255.1",
            "127.0.0.1",
            "169.254.1.1",
            "fd00::1",
        ] {
            assert!(!looks_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn observations_expire_and_rounds_slow_down() {
        let t0 = Instant::now();
        let targets: Vec<SocketAddr> = vec!["198.18.0.1:51820".parse().unwrap()];
        let mut d = Discovery::new([1; 32]);
        let reqs = d.poll_transmit(t0, &targets);
        assert!(d
            .poll_transmit(t0 + FAST_ROUND - Duration::from_millis(1), &targets)
            .is_empty());
        d.handle_response(
            t0,
            txid_of(&reqs[0].1),
            reqs[0].0,
            "198.18.5.5:1".parse().unwrap(),
        );
        let reqs = d.poll_transmit(t0 + FAST_ROUND, &targets);
        assert_eq!(reqs.len(), 1);
        assert!(d
            .poll_transmit(
                t0 + FAST_ROUND + SLOW_ROUND - Duration::from_millis(1),
                &targets
            )
            .is_empty());
        // No answers for a minute: the old mapping is forgotten.
        d.poll_transmit(t0 + OBSERVATION_TTL + Duration::from_secs(1), &targets);
        assert_eq!(d.info(&[], 51820, false).kind, NatKind::Unknown);
        assert_eq!(d.info(&[], 51820, true).kind, NatKind::Public);
    }

    #[test]
    fn a_new_target_starts_a_round_at_once_until_two_answered() {
        let t0 = Instant::now();
        let one: Vec<SocketAddr> = vec!["198.18.0.1:51820".parse().unwrap()];
        let two: Vec<SocketAddr> = vec![one[0], "198.18.0.3:51820".parse().unwrap()];
        let three: Vec<SocketAddr> = vec![two[0], two[1], "198.18.0.5:51820".parse().unwrap()];
        let mut d = Discovery::new([1; 32]);
        let reqs = d.poll_transmit(t0, &one);
        d.handle_response(
            t0,
            txid_of(&reqs[0].1),
            reqs[0].0,
            "198.18.5.5:1".parse().unwrap(),
        );
        // A second member appears: asked at once, not a round later.
        let t1 = t0 + Duration::from_millis(100);
        let reqs = d.poll_transmit(t1, &two);
        assert_eq!(reqs.len(), 2);
        for (to, r) in &reqs {
            d.handle_response(t1, txid_of(r), *to, "198.18.5.5:1".parse().unwrap());
        }
        // Two answered: a third member waits for the schedule.
        assert!(d
            .poll_transmit(t1 + Duration::from_millis(100), &three)
            .is_empty());
    }

    #[test]
    fn hurry_brings_the_next_round_forward_but_not_too_often() {
        let t0 = Instant::now();
        let targets: Vec<SocketAddr> = vec!["198.18.0.1:51820".parse().unwrap()];
        let mut d = Discovery::new([1; 32]);
        let reqs = d.poll_transmit(t0, &targets);
        d.handle_response(
            t0,
            txid_of(&reqs[0].1),
            reqs[0].0,
            "198.18.5.5:1".parse().unwrap(),
        );
        d.hurry(t0 + Duration::from_millis(100));
        assert!(d
            .poll_transmit(t0 + Duration::from_millis(100), &targets)
            .is_empty());
        let t1 = t0 + FAST_ROUND;
        d.hurry(t1);
        assert_eq!(d.poll_transmit(t1, &targets).len(), 1);
    }
}
