//! The simulated network: regions and latency, loss, partitions, NAT
//! reachability classes, what a datagram or a QUIC message costs on the
//! wire, and the event queue on simulated time.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

use crate::nat::paths::punch_hopeless;
use crate::record::NatKind;

/// What stands between a member and the internet (PROTOCOL §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatClass {
    /// A public address: reachable by anyone.
    Public,
    /// A home NAT with an endpoint-independent mapping: punching works.
    EndpointIndependent,
    /// A symmetric (endpoint-dependent) NAT: only public members (or a
    /// relay) reach it.
    Symmetric,
    /// An endpoint-independent NAT behind a carrier-grade NAT shared by the
    /// members of group `.0`: punching works to others, but two homes
    /// behind one CGNAT are relayed (no hairpin).
    Cgnat(u16),
}

impl NatClass {
    /// What the member's record says (what its STUN discovery finds).
    pub fn kind(self) -> NatKind {
        match self {
            NatClass::Public => NatKind::Public,
            NatClass::EndpointIndependent | NatClass::Cgnat(_) => NatKind::EndpointIndependent,
            NatClass::Symmetric => NatKind::EndpointDependent,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NatClass::Public => "public",
            NatClass::EndpointIndependent => "ei",
            NatClass::Symmetric => "symmetric",
            NatClass::Cgnat(_) => "cgnat",
        }
    }
}

/// How a pair's WireGuard session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    Relayed,
}

/// The route a pair's session takes, by the daemon's rule (the punch rule
/// of `nat::paths`, and two homes behind one CGNAT relayed at once).
pub fn route(a: NatClass, b: NatClass) -> Route {
    if punch_hopeless(a.kind(), b.kind()) {
        return Route::Relayed;
    }
    match (a, b) {
        (NatClass::Cgnat(x), NatClass::Cgnat(y)) if x == y => Route::Relayed,
        _ => Route::Direct,
    }
}

/// One-way latency between regions: 5 ms within one, 20 ms more per
/// region apart (up to 80 ms between the farthest of four).
pub fn base_latency(ra: u8, rb: u8) -> Duration {
    if ra == rb {
        Duration::from_millis(5)
    } else {
        Duration::from_millis(20 * u64::from(ra.abs_diff(rb)).min(4))
    }
}

/// Extra one-way latency through a relay.
pub const RELAY_EXTRA: Duration = Duration::from_millis(10);

/// Outer IPv4 + UDP headers.
pub const UDP_IP: u64 = 28;
/// A WireGuard transport message around an inner packet: 16-byte header,
/// 16-byte tag; the inner packet is padded to a multiple of 16.
pub fn wireguard_datagram(inner_ip_packet: u64) -> u64 {
    16 + inner_ip_packet.div_ceil(16) * 16 + 16 + UDP_IP
}
/// A probe (UDP payload `len`) inside WireGuard, on the wire.
pub fn probe_wire_bytes(len: usize) -> u64 {
    wireguard_datagram(UDP_IP + len as u64)
}
/// A WireGuard keepalive on the wire (empty transport message).
pub const WG_KEEPALIVE: u64 = 32 + UDP_IP;
/// A WireGuard handshake (initiation 148 + response 92) on the wire.
pub const WG_HANDSHAKE: u64 = 148 + 92 + 2 * UDP_IP;
/// QUIC payload per packet, and the per-packet overhead (short header,
/// STREAM frame, AEAD tag, UDP/IP); an ACK packet per two packets.
pub const QUIC_PAYLOAD: u64 = 1200;
pub const QUIC_PACKET_OVERHEAD: u64 = 1 + 8 + 4 + 8 + 16 + UDP_IP;
pub const QUIC_ACK: u64 = 1 + 8 + 6 + 16 + UDP_IP;

/// Packets a QUIC message of `len` bytes takes.
pub fn quic_packets(len: usize) -> u64 {
    (len as u64).div_ceil(QUIC_PAYLOAD).max(1)
}

/// A QUIC message of `len` bytes (one uni stream) on the wire, sender side;
/// the receiver's ACKs are returned separately.
pub fn quic_wire_bytes(len: usize) -> (u64, u64) {
    let p = quic_packets(len);
    (
        len as u64 + p * QUIC_PACKET_OVERHEAD,
        p.div_ceil(2) * QUIC_ACK,
    )
}

/// An event at a simulated time; ties go by sequence number.
pub struct Scheduled<E> {
    pub at: Duration,
    pub seq: u64,
    pub event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}
impl<E> Eq for Scheduled<E> {}
impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Scheduled<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the earliest first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The event queue.
pub struct Queue<E> {
    heap: BinaryHeap<Scheduled<E>>,
    seq: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<E> Queue<E> {
    pub fn push(&mut self, at: Duration, event: E) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    pub fn peek_time(&self) -> Option<Duration> {
        self.heap.peek().map(|s| s.at)
    }

    pub fn pop(&mut self) -> Option<Scheduled<E>> {
        self.heap.pop()
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_punch_rule() {
        use NatClass::*;
        assert_eq!(route(Public, Symmetric), Route::Direct);
        assert_eq!(route(EndpointIndependent, Symmetric), Route::Relayed);
        assert_eq!(route(Symmetric, Symmetric), Route::Relayed);
        assert_eq!(route(EndpointIndependent, Cgnat(1)), Route::Direct);
        assert_eq!(route(Cgnat(1), Cgnat(1)), Route::Relayed);
        assert_eq!(route(Cgnat(1), Cgnat(2)), Route::Direct);
    }

    #[test]
    fn the_queue_is_ordered_by_time_then_sequence() {
        let mut q = Queue::default();
        q.push(Duration::from_millis(5), "b");
        q.push(Duration::from_millis(1), "a");
        q.push(Duration::from_millis(5), "c");
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|s| s.event)).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }
}
