//! Sealed relaying (sans-IO; proto/PROTOCOL.md §7): what a relay forwards,
//! for whom, and how a pair's allocation lives and dies.
//!
//! A relayed pair keeps **one end-to-end WireGuard session**. The relay
//! holds an [`Allocation`] per pair: two UDP ports of its relay range, one
//! per end. A's WireGuard peer for B points at `relay:port_a`, B's for A at
//! `relay:port_b`; what arrives at `port_a` from A goes out of `port_b` to B
//! and the other way round. The relay sees only sealed WireGuard datagrams,
//! and no WireGuard peer anywhere holds another member's overlay address.
//!
//! This module decides, per datagram, whether it is forwarded: it must be
//! shaped like a WireGuard message, come from the end that *latched* the
//! port, and fit the pair's rate. A port is latched by the first
//! WireGuard-shaped datagram from one of the member's known addresses, or
//! by a handshake initiation whose `mac1` is keyed to the other end's
//! WireGuard key (only someone who knows that key can make one); a latch
//! silent for [`RELATCH_AFTER`] may be taken over the same way. Anything
//! else is dropped: the relay is no open reflector.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};

use crate::proto::PublicKeyBytes;

/// Default UDP port range of relay allocations.
pub const DEFAULT_PORTS: (u16, u16) = (52900, 57899);
/// An allocation with no traffic for this long ends.
pub const IDLE_LIFETIME: Duration = Duration::from_secs(600);
/// A latched end that has sent nothing this long may be replaced (its
/// NAT mapping changed) by a datagram that passes the latch rule.
pub const RELATCH_AFTER: Duration = Duration::from_secs(5);
/// Datagrams forwarded per second per pair, both directions together.
pub const MAX_RATE: u32 = 2000;

/// WireGuard message types and their sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgMessage {
    Initiation,
    Response,
    CookieReply,
    Data,
}

/// Whether `d` is shaped like a WireGuard message (type byte, three zero
/// bytes, and that type's length).
pub fn wg_shape(d: &[u8]) -> Option<WgMessage> {
    if d.len() < 4 || d[1..4] != [0, 0, 0] {
        return None;
    }
    match (d[0], d.len()) {
        (1, 148) => Some(WgMessage::Initiation),
        (2, 92) => Some(WgMessage::Response),
        (3, 64) => Some(WgMessage::CookieReply),
        // Header and tag; the kernel pads the payload to 16 bytes,
        // boringtun does not.
        (4, n) if n >= 32 => Some(WgMessage::Data),
        _ => None,
    }
}

/// Whether the handshake message `d` (an initiation, or a response)
/// carries a `mac1` keyed to `receiver`'s WireGuard public key (WireGuard's
/// `mac1`: keyed BLAKE2s-128 over the message up to the MAC, keyed with
/// BLAKE2s-256("mac1----" || receiver's static public key)). Only someone
/// who knows the receiver's key can make one.
pub fn mac1_for(d: &[u8], receiver: &[u8; 32]) -> bool {
    let at = match wg_shape(d) {
        Some(WgMessage::Initiation) => 116,
        Some(WgMessage::Response) => 60,
        _ => return false,
    };
    let mut h = Blake2s256::new();
    h.update(b"mac1----");
    h.update(receiver);
    let key = h.finalize();
    let Ok(mut mac) = <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(&key)
    else {
        return false;
    };
    Mac::update(&mut mac, &d[..at]);
    mac.verify_slice(&d[at..at + 16]).is_ok()
}

/// One end of a pair, as the relay knows it.
#[derive(Debug, Clone)]
pub struct End {
    pub node_key: PublicKeyBytes,
    pub wg_key: [u8; 32],
    /// Addresses it may send from (its record's endpoints, mapped and
    /// observed endpoints): a datagram from one of these IPs may latch.
    pub known_ips: Vec<IpAddr>,
    /// Where its datagrams come from, once latched, and when last heard.
    pub latched: Option<(SocketAddr, Instant)>,
}

/// Which side of an allocation a datagram arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// What to do with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it out of the other side's port to this address.
    Forward(SocketAddr),
    Drop(&'static str),
}

/// A pair's allocation: its two ends and counters.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub a: End,
    pub b: End,
    pub last_traffic: Instant,
    window: (Instant, u32),
    pub forwarded: u64,
    pub dropped: u64,
    /// Per side (A, B): when the end last asked for its port again
    /// ([`Allocation::reopen`]); for [`RELATCH_AFTER`] after it, its latch
    /// may be taken over at once.
    reopened: [Option<Instant>; 2],
}

impl Allocation {
    pub fn new(now: Instant, a: End, b: End) -> Self {
        Allocation {
            a,
            b,
            last_traffic: now,
            window: (now, 0),
            forwarded: 0,
            dropped: 0,
            reopened: [None; 2],
        }
    }

    /// The end on `side` asked for its port again: its NAT mapping may be
    /// new. Its latch stays (the address latched keeps receiving, so a
    /// working session does not break), but a datagram from another of its
    /// addresses may take it over at once under the latch rule (a known
    /// address, or a handshake proven for the other end), without waiting
    /// for [`RELATCH_AFTER`] of silence. Clearing the latch instead dropped
    /// a working session's data until its next handshake whenever the
    /// asker's address was not among its known ones (a symmetric NAT).
    /// The window lasts [`RELATCH_AFTER`] (a new mapping sends at once)
    /// and closes when another address takes the latch, so a member whose
    /// address did not change is as hard to displace as before.
    pub fn reopen(&mut self, now: Instant, side: Side) {
        self.reopened[side as usize] = Some(now);
    }

    /// Decides about datagram `d` from `from`, arriving on `side`'s port.
    pub fn handle(&mut self, now: Instant, side: Side, from: SocketAddr, d: &[u8]) -> Verdict {
        let v = self.decide(now, side, from, d);
        match v {
            Verdict::Forward(_) => {
                self.forwarded += 1;
                self.last_traffic = now;
            }
            Verdict::Drop(_) => self.dropped += 1,
        }
        v
    }

    fn decide(&mut self, now: Instant, side: Side, from: SocketAddr, d: &[u8]) -> Verdict {
        let Some(kind) = wg_shape(d) else {
            return Verdict::Drop("not a WireGuard message");
        };
        let reopened = &mut self.reopened[side as usize];
        let open = reopened.is_some_and(|t| now.saturating_duration_since(t) < RELATCH_AFTER);
        let (me, other) = match side {
            Side::A => (&mut self.a, &self.b),
            Side::B => (&mut self.b, &self.a),
        };
        let known = me.known_ips.contains(&from.ip());
        let proves = matches!(kind, WgMessage::Initiation | WgMessage::Response)
            && mac1_for(d, &other.wg_key);
        match me.latched {
            Some((addr, _)) if addr == from => {}
            Some((_, heard)) if !open && now.saturating_duration_since(heard) < RELATCH_AFTER => {
                return Verdict::Drop("port latched by another address");
            }
            _ => {
                if !(known || proves) {
                    return Verdict::Drop("not from the member the port is for");
                }
                *reopened = None;
            }
        }
        me.latched = Some((from, now));
        let Some((to, _)) = other.latched else {
            return Verdict::Drop("the other end has not latched yet");
        };
        if now.saturating_duration_since(self.window.0) >= Duration::from_secs(1) {
            self.window = (now, 0);
        }
        self.window.1 += 1;
        if self.window.1 > MAX_RATE {
            return Verdict::Drop("over the pair's rate");
        }
        Verdict::Forward(to)
    }

    /// Whether the allocation has been idle past its lifetime.
    pub fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_traffic) >= IDLE_LIFETIME
    }
}

/// A pair, unordered: (smaller node key, larger node key).
pub type PairKey = (PublicKeyBytes, PublicKeyBytes);

pub fn pair_key(x: &PublicKeyBytes, y: &PublicKeyBytes) -> PairKey {
    if x <= y {
        (*x, *y)
    } else {
        (*y, *x)
    }
}

/// The relay of a pair (`a`, `b` are the pair's WireGuard keys): rendezvous
/// hashing over the live relays, each given as (WireGuard key, its stamp
/// signature). The stamp signature is made by the member that admitted the
/// relay, so no member can grind a key to become the relay of chosen pairs;
/// both ends pick the same relay when they know the same relays, pairs
/// spread evenly, and a relay joining or leaving moves only the pairs it
/// wins or held.
pub fn pick_relay(relays: &[([u8; 32], &[u8])], a: &[u8; 32], b: &[u8; 32]) -> Option<[u8; 32]> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    relays
        .iter()
        .filter(|(k, _)| k != a && k != b)
        .map(|(k, seed)| {
            let mut h = sha2::Sha256::new();
            sha2::Digest::update(&mut h, lo);
            sha2::Digest::update(&mut h, hi);
            sha2::Digest::update(&mut h, seed);
            let d: [u8; 32] = sha2::Digest::finalize(h).into();
            (d, *k)
        })
        .max()
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};

    fn initiation(from: &StaticSecret, to: &PublicKey) -> Vec<u8> {
        let mut t = Tunn::new(from.clone(), *to, None, None, 1, None);
        let mut out = vec![0u8; 256];
        match t.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(b) => b.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    fn keys(seed: u8) -> (StaticSecret, PublicKey) {
        let s = StaticSecret::from([seed; 32]);
        let p = PublicKey::from(&s);
        (s, p)
    }

    #[test]
    fn shapes_and_mac1() {
        let (sa, _) = keys(1);
        let (_, pb) = keys(2);
        let init = initiation(&sa, &pb);
        assert_eq!(wg_shape(&init), Some(WgMessage::Initiation));
        assert!(mac1_for(&init, pb.as_bytes()));
        let (_, pc) = keys(3);
        assert!(!mac1_for(&init, pc.as_bytes()));
        let mut bad = init.clone();
        bad[10] ^= 1;
        assert!(!mac1_for(&bad, pb.as_bytes()));
        assert_eq!(wg_shape(&[4, 0, 0, 0].repeat(8)), Some(WgMessage::Data));
        assert_eq!(wg_shape(&[4, 0, 0, 0].repeat(9)), Some(WgMessage::Data));
        assert_eq!(wg_shape(&[4, 0, 0, 0].repeat(7)), None);
        assert_eq!(wg_shape(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(wg_shape(&[]), None);
        for n in 0..200 {
            let _ = wg_shape(&vec![1u8; n]);
            let _ = mac1_for(&vec![1u8; n], &[0; 32]);
        }
    }

    #[test]
    fn asking_again_lets_the_latch_be_taken_over_at_once() {
        let t0 = Instant::now();
        let data = [4u8, 0, 0, 0].repeat(8);
        let a_addr: SocketAddr = "198.18.1.1:40000".parse().unwrap();
        let b_addr: SocketAddr = "198.18.2.2:41000".parse().unwrap();
        let mut al = Allocation::new(t0, end(1, "198.18.1.1"), end(2, "198.18.2.2"));
        al.handle(t0, Side::A, a_addr, &data);
        assert_eq!(
            al.handle(t0, Side::B, b_addr, &data),
            Verdict::Forward(a_addr)
        );
        // A moved (a new NAT mapping) and asked again: its new address
        // takes the latch over at once, a second after the old one spoke.
        let t1 = t0 + Duration::from_secs(1);
        let a_new: SocketAddr = "198.18.1.1:40777".parse().unwrap();
        assert!(matches!(
            al.handle(t1, Side::A, a_new, &data),
            Verdict::Drop(_)
        ));
        al.reopen(t1, Side::A);
        // Until then B's traffic still reaches the latched address.
        assert_eq!(
            al.handle(t1, Side::B, b_addr, &data),
            Verdict::Forward(a_addr)
        );
        // A stranger cannot take the reopened latch.
        let stranger: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        assert!(matches!(
            al.handle(t1, Side::A, stranger, &data),
            Verdict::Drop(_)
        ));
        assert_eq!(
            al.handle(t1, Side::A, a_new, &data),
            Verdict::Forward(b_addr)
        );
        assert_eq!(
            al.handle(t1, Side::B, b_addr, &data),
            Verdict::Forward(a_new)
        );
        // Taken over, the latch is held again: the old address is refused.
        assert!(matches!(
            al.handle(t1, Side::A, a_addr, &data),
            Verdict::Drop(_)
        ));
        // The window lasts RELATCH_AFTER: A asked again but kept its
        // address (and keeps sending from it); afterwards another address
        // of A cannot take the latch.
        al.reopen(t1, Side::A);
        let t2 = t1 + RELATCH_AFTER - Duration::from_millis(1);
        assert_eq!(
            al.handle(t2, Side::A, a_new, &data),
            Verdict::Forward(b_addr)
        );
        let t3 = t1 + RELATCH_AFTER;
        assert!(matches!(
            al.handle(t3, Side::A, a_addr, &data),
            Verdict::Drop(_)
        ));
        // A's address was unknown (a symmetric NAT's): a handshake proven
        // for B's key takes the reopened latch from anywhere.
        al.reopen(t3, Side::A);
        let (sa, _) = keys(1);
        let a_far: SocketAddr = "198.18.9.9:6000".parse().unwrap();
        assert_eq!(
            al.handle(t3, Side::A, a_far, &initiation(&sa, &keys(2).1)),
            Verdict::Forward(b_addr)
        );
    }

    fn end(seed: u8, ip: &str) -> End {
        End {
            node_key: [seed; 32],
            wg_key: *keys(seed).1.as_bytes(),
            known_ips: vec![ip.parse().unwrap()],
            latched: None,
        }
    }

    #[test]
    fn forwards_only_between_latched_members() {
        let t0 = Instant::now();
        let a_addr: SocketAddr = "198.18.1.1:40000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        let mut al = Allocation::new(t0, end(1, "198.18.1.1"), end(2, "198.18.2.2"));
        let data = [4u8, 0, 0, 0].repeat(8);
        // Not WireGuard: dropped.
        assert!(matches!(
            al.handle(t0, Side::A, a_addr, b"hello"),
            Verdict::Drop(_)
        ));
        // A stranger cannot latch A's port with data.
        assert!(matches!(
            al.handle(t0, Side::A, stranger, &data),
            Verdict::Drop(_)
        ));
        // A latches (from its known IP); B has not yet: nowhere to go.
        assert_eq!(
            al.handle(t0, Side::A, a_addr, &data),
            Verdict::Drop("the other end has not latched yet")
        );
        // B latches with a handshake initiation proven for A's key, from an
        // address the relay did not know (a symmetric NAT's new port).
        let (sb, _) = keys(2);
        let (_, pa) = keys(1);
        let init = initiation(&sb, &pa);
        let b_new: SocketAddr = "198.18.9.9:6000".parse().unwrap();
        assert_eq!(
            al.handle(t0, Side::B, b_new, &init),
            Verdict::Forward(a_addr)
        );
        assert_eq!(
            al.handle(t0, Side::A, a_addr, &data),
            Verdict::Forward(b_new)
        );
        // The stranger cannot take a live latch, even with a proven initiation
        // for someone else's key.
        let (sx, _) = keys(9);
        assert!(matches!(
            al.handle(t0, Side::A, stranger, &initiation(&sx, &keys(2).1)),
            Verdict::Drop(_)
        ));
        // After RELATCH_AFTER of silence from A, A's new address takes over
        // (its IP is known): a router reconnected.
        let t1 = t0 + RELATCH_AFTER;
        let a_moved: SocketAddr = "198.18.1.1:40001".parse().unwrap();
        assert_eq!(
            al.handle(t1, Side::A, a_moved, &data),
            Verdict::Forward(b_new)
        );
        assert_eq!(
            al.handle(t1, Side::B, b_new, &data),
            Verdict::Forward(a_moved)
        );
        assert!(!al.expired(t1));
        assert!(al.expired(t1 + IDLE_LIFETIME));
    }

    #[test]
    fn the_rate_is_bounded() {
        let t0 = Instant::now();
        let a_addr: SocketAddr = "198.18.1.1:40000".parse().unwrap();
        let b_addr: SocketAddr = "198.18.2.2:41000".parse().unwrap();
        let mut al = Allocation::new(t0, end(1, "198.18.1.1"), end(2, "198.18.2.2"));
        let data = [4u8, 0, 0, 0].repeat(8);
        al.handle(t0, Side::A, a_addr, &data);
        al.handle(t0, Side::B, b_addr, &data);
        let fwd = (0..3 * MAX_RATE)
            .filter(|_| matches!(al.handle(t0, Side::A, a_addr, &data), Verdict::Forward(_)))
            .count();
        assert_eq!(fwd as u32, MAX_RATE - 1);
        assert!(matches!(
            al.handle(t0 + Duration::from_secs(1), Side::A, a_addr, &data),
            Verdict::Forward(_)
        ));
    }

    #[test]
    fn relay_choice_is_agreed_spread_and_not_the_pair() {
        let sigs: Vec<Vec<u8>> = (1..=4u8).map(|i| vec![i; 64]).collect();
        let relays: Vec<([u8; 32], &[u8])> = (1..=4u8)
            .map(|i| ([i; 32], sigs[i as usize - 1].as_slice()))
            .collect();
        let mut used = std::collections::BTreeSet::new();
        for a in 10..40u8 {
            for b in 10..40u8 {
                if a == b {
                    continue;
                }
                let r = pick_relay(&relays, &[a; 32], &[b; 32]).unwrap();
                assert_eq!(Some(r), pick_relay(&relays, &[b; 32], &[a; 32]));
                used.insert(r);
            }
        }
        assert_eq!(used.len(), 4);
        assert_eq!(pick_relay(&relays[..1], &[1; 32], &[2; 32]), None);
    }
}
