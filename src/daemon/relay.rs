//! The relay shell (proto/PROTOCOL.md §7): a public member's allocations,
//! two UDP ports each from its relay range, and the task that forwards
//! sealed WireGuard datagrams between them. What is forwarded is decided by
//! [`crate::relay::Allocation`] (sans-IO).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::join::Allocator;
use crate::gossip::transport::AllocReply;
use crate::proto::{self, PublicKeyBytes};
use crate::relay::{pair_key, Allocation, End, PairKey, Side, Verdict, IDLE_LIFETIME};
use crate::trust::PeerIdentity;

/// What the relay knows of a member.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    pub wg_key: [u8; 32],
    pub known_ips: Vec<IpAddr>,
}

struct Running {
    ports: (u16, u16),
    state: Arc<Mutex<Allocation>>,
    task: JoinHandle<()>,
    /// Which ends asked for the allocation and have not given it back
    /// (A, B). A release by one end keeps it while the other holds it: the
    /// other end still sends to its port and is not told.
    held: [bool; 2],
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Most allocations one member may be an end of at this relay: one member
/// (a stolen node, say) cannot take every port of the range; 512 pairs is
/// more than a member behind a symmetric NAT needs at one relay in meshes
/// of hundreds.
pub const MAX_ALLOCATIONS_PER_MEMBER: usize = 512;

#[derive(Default)]
struct Inner {
    enabled: bool,
    range: (u16, u16),
    /// [`MAX_ALLOCATIONS_PER_MEMBER`] (smaller in tests).
    max_per_member: usize,
    members: HashMap<PublicKeyBytes, MemberInfo>,
    allocations: HashMap<PairKey, Running>,
}

/// A member's relay: cheap to clone.
#[derive(Clone)]
pub struct RelayServer {
    inner: Arc<Mutex<Inner>>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// (allocations, datagrams forwarded, datagrams dropped) over the relay's life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub allocations: usize,
    pub forwarded: u64,
    pub dropped: u64,
}

impl RelayServer {
    pub fn new(range: (u16, u16)) -> Self {
        RelayServer {
            inner: Arc::new(Mutex::new(Inner {
                range,
                max_per_member: MAX_ALLOCATIONS_PER_MEMBER,
                ..Default::default()
            })),
        }
    }

    /// Whether this member relays now (public and not `--no-relay`), and
    /// who the members are: allocations of members no longer listed end.
    pub fn set_members(&self, enabled: bool, members: HashMap<PublicKeyBytes, MemberInfo>) {
        let mut g = lock(&self.inner);
        g.enabled = enabled;
        if !enabled {
            g.allocations.clear();
        }
        g.allocations
            .retain(|(a, b), _| members.contains_key(a) && members.contains_key(b));
        // Known addresses may have changed (a router got a new address).
        for ((a, b), r) in g.allocations.iter() {
            let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = members.get(a) {
                st.a.known_ips = m.known_ips.clone();
            }
            if let Some(m) = members.get(b) {
                st.b.known_ips = m.known_ips.clone();
            }
        }
        g.members = members;
        // Idle allocations end (their task may have ended them already).
        g.allocations.retain(|_, r| !r.task.is_finished());
    }

    pub fn stats(&self) -> RelayStats {
        let g = lock(&self.inner);
        let mut s = RelayStats {
            allocations: g.allocations.len(),
            ..Default::default()
        };
        for r in g.allocations.values() {
            let st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            s.forwarded += st.forwarded;
            s.dropped += st.dropped;
        }
        s
    }

    fn bind_pair(range: (u16, u16)) -> std::io::Result<(std::net::UdpSocket, std::net::UdpSocket)> {
        let span = u32::from(range.1.saturating_sub(range.0)) + 1;
        let mut last = std::io::Error::other("empty relay port range");
        for _ in 0..64 {
            let pa = range.0 + (rand::random::<u32>() % span) as u16;
            let pb = range.0 + (rand::random::<u32>() % span) as u16;
            if pa == pb {
                continue;
            }
            let a = match std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], pa))) {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], pb))) {
                Ok(b) => return Ok((a, b)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl Allocator for RelayServer {
    fn allocate(&self, _from: SocketAddr, peer: &PeerIdentity, other: [u8; 32]) -> AllocReply {
        self.allocate_for(peer.node_key, other)
    }

    fn release(&self, peer: &PeerIdentity, other: [u8; 32]) -> AllocReply {
        self.release_for(peer.node_key, other)
    }
}

impl RelayServer {
    /// An allocation for the pair (`me`, `other`), asked by `me`: the port
    /// of `me`'s side (the same one while the allocation lives).
    fn allocate_for(&self, me: PublicKeyBytes, other: [u8; 32]) -> AllocReply {
        let refuse = |r: &str| AllocReply::Refused {
            reason: r.to_string(),
        };
        let mut g = lock(&self.inner);
        if !g.enabled {
            return refuse("this member does not relay");
        }
        let (Some(mi), Some(oi)) = (g.members.get(&me).cloned(), g.members.get(&other).cloned())
        else {
            return refuse("both ends must be current members");
        };
        if me == other {
            return refuse("a pair has two members");
        }
        let key = pair_key(&me, &other);
        let side_of_me = if key.0 == me { Side::A } else { Side::B };
        let port = |r: &Running| match side_of_me {
            Side::A => r.ports.0,
            Side::B => r.ports.1,
        };
        let side_index = if side_of_me == Side::A { 0 } else { 1 };
        if let Some(r) = g.allocations.get_mut(&key) {
            if !r.task.is_finished() {
                r.held[side_index] = true;
                // Asked again (perhaps from a new mapping): the asker's
                // latch may be taken over at once (`Allocation::reopen`).
                let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
                st.reopen(Instant::now(), side_of_me);
                return AllocReply::Allocated {
                    port: port(r),
                    lifetime_secs: IDLE_LIFETIME.as_secs() as u32,
                };
            }
        }
        let held_by_me = g
            .allocations
            .keys()
            .filter(|(a, b)| *a == me || *b == me)
            .count();
        if held_by_me >= g.max_per_member {
            return refuse("too many relay allocations for this member");
        }
        let (sa, sb) = match Self::bind_pair(g.range) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot bind relay ports");
                return refuse("no free relay port");
            }
        };
        let ports = (
            sa.local_addr().map(|a| a.port()).unwrap_or(0),
            sb.local_addr().map(|a| a.port()).unwrap_or(0),
        );
        let to_tokio = |s: std::net::UdpSocket| -> std::io::Result<UdpSocket> {
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        };
        let (sa, sb) = match (to_tokio(sa), to_tokio(sb)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return refuse("cannot set up relay ports"),
        };
        let (ia, ib) = if side_of_me == Side::A {
            (mi, oi)
        } else {
            (oi, mi)
        };
        let now = Instant::now();
        let state = Arc::new(Mutex::new(Allocation::new(
            now,
            End {
                node_key: key.0,
                wg_key: ia.wg_key,
                known_ips: ia.known_ips,
                latched: None,
            },
            End {
                node_key: key.1,
                wg_key: ib.wg_key,
                known_ips: ib.known_ips,
                latched: None,
            },
        )));
        let task = tokio::spawn(forward(sa, sb, state.clone(), self.inner.clone(), key));
        tracing::info!(
            a = %proto::short_key(&key.0), b = %proto::short_key(&key.1),
            port_a = ports.0, port_b = ports.1, "relay allocation"
        );
        let mut held = [false; 2];
        held[side_index] = true;
        let r = Running {
            ports,
            state,
            task,
            held,
        };
        let p = port(&r);
        g.allocations.insert(key, r);
        AllocReply::Allocated {
            port: p,
            lifetime_secs: IDLE_LIFETIME.as_secs() as u32,
        }
    }

    /// `me` gives its side of the pair's allocation back; the allocation
    /// ends when neither side holds it.
    fn release_for(&self, me: PublicKeyBytes, other: [u8; 32]) -> AllocReply {
        let key = pair_key(&me, &other);
        let side_index = if key.0 == me { 0 } else { 1 };
        let mut g = lock(&self.inner);
        let Some(r) = g.allocations.get_mut(&key) else {
            return AllocReply::Released;
        };
        r.held[side_index] = false;
        if r.held == [false, false] {
            g.allocations.remove(&key);
            tracing::info!(a = %proto::short_key(&key.0), b = %proto::short_key(&key.1), "relay allocation released");
        }
        AllocReply::Released
    }
}

/// Forwards between a pair's two ports until the allocation idles out.
async fn forward(
    sa: UdpSocket,
    sb: UdpSocket,
    state: Arc<Mutex<Allocation>>,
    inner: Arc<Mutex<Inner>>,
    key: PairKey,
) {
    let mut ba = vec![0u8; 2048];
    let mut bb = vec![0u8; 2048];
    let mut idle = tokio::time::interval(Duration::from_secs(30));
    idle.tick().await;
    loop {
        let (side, n, from) = tokio::select! {
            r = sa.recv_from(&mut ba) => match r { Ok((n, f)) => (Side::A, n, f), Err(_) => continue },
            r = sb.recv_from(&mut bb) => match r { Ok((n, f)) => (Side::B, n, f), Err(_) => continue },
            _ = idle.tick() => {
                let expired = state.lock().unwrap_or_else(|p| p.into_inner()).expired(Instant::now());
                if expired {
                    tracing::info!(a = %proto::short_key(&key.0), b = %proto::short_key(&key.1), "relay allocation idle; closed");
                    lock(&inner).allocations.remove(&key);
                    return;
                }
                continue;
            }
        };
        let data = match side {
            Side::A => &ba[..n],
            Side::B => &bb[..n],
        };
        let v = state.lock().unwrap_or_else(|p| p.into_inner()).handle(
            Instant::now(),
            side,
            from,
            data,
        );
        match v {
            Verdict::Forward(to) => {
                let out = match side {
                    Side::A => &sb,
                    Side::B => &sa,
                };
                let _ = out.send_to(data, to).await;
            }
            Verdict::Drop(why) => {
                tracing::trace!(%from, why, len = data.len(), first = data.first().copied().unwrap_or(0), "relay dropped a datagram")
            }
        }
    }
}

/// Requests that must reach their destination in the order they were
/// made, per key (our allocation requests to one relay for one peer: a
/// `Release` must not overtake the `Allocate` asked for after it, nor the
/// other way round). Each pushed request runs in its own task once the
/// previous one for its key has finished; keys are independent.
pub struct RequestChain<K> {
    last: HashMap<K, JoinHandle<()>>,
}

impl<K> Default for RequestChain<K> {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> RequestChain<K> {
    /// Runs `request` after the previous request pushed for `key`.
    pub fn push<F>(&mut self, key: K, request: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.last.retain(|_, h| !h.is_finished());
        let prev = self.last.remove(&key);
        let h = tokio::spawn(async move {
            if let Some(p) = prev {
                let _ = p.await;
            }
            request.await;
        });
        self.last.insert(key, h);
    }

    /// Keys with a request not finished yet.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.last.values().filter(|h| !h.is_finished()).count()
    }
}

#[cfg(test)]
mod server_tests {
    use super::*;

    fn member(k: u8) -> (PublicKeyBytes, MemberInfo) {
        (
            [k; 32],
            MemberInfo {
                wg_key: [k + 100; 32],
                known_ips: vec![IpAddr::from([127, 0, 0, k])],
            },
        )
    }

    fn port(r: AllocReply) -> u16 {
        match r {
            AllocReply::Allocated { port, .. } => port,
            other => panic!("not allocated: {other:?}"),
        }
    }

    /// One end moving away from the relay (release) must not pull the
    /// allocation from under the other end, which still sends to its port
    /// and is not told: the allocation ends only when neither holds it.
    #[tokio::test]
    async fn a_release_by_one_end_keeps_the_other_ends_port() {
        let relay = RelayServer::new((52900, 57899));
        relay.set_members(true, [member(1), member(2)].into_iter().collect());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let pa = port(relay.allocate_for(a, b));
        let pb = port(relay.allocate_for(b, a));
        assert_ne!(pa, pb);
        relay.release_for(a, b);
        // b's side lives on; a asking again gets its old port back.
        assert_eq!(port(relay.allocate_for(b, a)), pb);
        assert_eq!(port(relay.allocate_for(a, b)), pa);
        relay.release_for(a, b);
        relay.release_for(b, a);
        assert!(lock(&relay.inner).allocations.is_empty());
        // An end that alone asked and releases ends it at once.
        port(relay.allocate_for(a, b));
        relay.release_for(a, b);
        assert!(lock(&relay.inner).allocations.is_empty());
    }

    /// One member cannot hold more than its share of the relay's ports;
    /// others still get theirs, and a release makes room again.
    #[tokio::test]
    async fn a_member_holds_at_most_its_cap() {
        let relay = RelayServer::new((52900, 57899));
        lock(&relay.inner).max_per_member = 2;
        relay.set_members(true, (1..=5).map(member).collect());
        let k = |i: u8| [i; 32];
        port(relay.allocate_for(k(1), k(2)));
        port(relay.allocate_for(k(1), k(3)));
        assert!(matches!(
            relay.allocate_for(k(1), k(4)),
            AllocReply::Refused { reason } if reason.contains("too many")
        ));
        // Asking again for a pair it has is not a new allocation.
        port(relay.allocate_for(k(1), k(3)));
        // Others are not affected.
        port(relay.allocate_for(k(4), k(5)));
        relay.release_for(k(1), k(2));
        port(relay.allocate_for(k(1), k(4)));
    }
}

#[cfg(test)]
mod chain_tests {
    use super::RequestChain;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A release that is slow to go out (the relay's answer takes a while)
    /// still reaches the relay before the allocation asked for after it,
    /// as when a relay flaps: down (release), up again (allocate).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_later_request_waits_for_the_earlier_one_of_its_key() {
        let log = Arc::new(Mutex::new(Vec::<&'static str>::new()));
        let mut chain = RequestChain::default();
        let l = log.clone();
        chain.push(("peer", "relay"), async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            l.lock().unwrap().push("release");
        });
        let l = log.clone();
        chain.push(("peer", "relay"), async move {
            l.lock().unwrap().push("allocate");
        });
        // Another pair is not held up by the slow one.
        let l = log.clone();
        chain.push(("other", "relay"), async move {
            l.lock().unwrap().push("other");
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while chain.pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*log.lock().unwrap(), vec!["other", "release", "allocate"]);
    }
}
