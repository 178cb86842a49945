//! Runtime state of the device key and of each peer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};

use super::config::{Key, PeerConfig};
use super::uapi::PeerStats;

/// Handshakes per second accepted before cookies are required, at least
/// (boringtun's device uses this figure for every device).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Handshakes per second a device with `peers` peers accepts before it
/// answers with cookies: twice its peers, at least [`HANDSHAKE_RATE_LIMIT`].
/// A meshpeer device has a peer for every member, and when a mesh comes up
/// every member may initiate to a public member within the same second and
/// retry: with a flat 100 a second, the public members of a mixed 100
/// answered bursts of up to 180 initiations a second with cookie replies
/// (165 in one come-up, on 4 members), and each initiator then waited for
/// WireGuard's retry 5 s later (`REKEY_TIMEOUT`) to send its initiation with
/// the cookie. A flood beyond twice the peers still gets cookies. (Kernel
/// WireGuard and wireguard-go ask for cookies only once their handshake
/// queue backs up.)
pub(crate) fn handshake_rate_limit(peers: usize) -> u64 {
    (peers as u64).saturating_mul(2).max(HANDSHAKE_RATE_LIMIT)
}

/// The device's static key and the rate limiters derived from it.
pub(crate) struct DeviceKey {
    pub secret: StaticSecret,
    pub public: PublicKey,
    /// Checks MAC1 and counts handshakes before any peer lookup (and answers
    /// with a cookie under load). Reset every second by the timer task;
    /// replaced when the peer count moves its limit ([`DeviceKey::fit`]).
    pub front_limiter: Arc<RateLimiter>,
    /// The front limiter's handshakes per second.
    limit: u64,
    /// Shared by all `Tunn`s: it only re-checks MAC1, with no limit, since
    /// the front limiter already counted the packet.
    pub tunn_limiter: Arc<RateLimiter>,
}

impl DeviceKey {
    pub fn new(private: &Key) -> Self {
        let secret = StaticSecret::from(*private);
        let public = PublicKey::from(&secret);
        DeviceKey {
            front_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            limit: HANDSHAKE_RATE_LIMIT,
            tunn_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
        }
    }

    /// Fits the front limiter to a device with `peers` peers
    /// ([`handshake_rate_limit`]); returns the limit.
    pub fn fit(&mut self, peers: usize) -> u64 {
        let want = handshake_rate_limit(peers);
        if want != self.limit {
            self.front_limiter = Arc::new(RateLimiter::new(&self.public, want));
            self.limit = want;
        }
        self.limit
    }

    pub fn new_tunn(&self, peer_public: &Key, preshared: &Key, index: u32) -> Tunn {
        let psk = if preshared == &[0; 32] {
            None
        } else {
            Some(*preshared)
        };
        // Persistent keepalive is handled by the device, not by `Tunn`, so it
        // can change without a new `Tunn` (which would drop the session).
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(*peer_public),
            psk,
            None,
            index,
            Some(Arc::clone(&self.tunn_limiter)),
        )
    }
}

/// A peer at run time. `id` and `index` never change; a peer that is removed
/// and added again is a new `Peer`.
pub(crate) struct Peer {
    pub id: u64,
    pub public_key: Key,
    /// 24-bit local index: `Tunn` puts it in the top bits of its session
    /// indices, so `receiver_idx >> 8` finds the peer.
    pub index: u32,
    pub inner: Mutex<PeerInner>,
}

pub(crate) struct PeerInner {
    /// `None` while the device has no private key.
    pub tunn: Option<Tunn>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    pub preshared_key: Key,
    /// Last authenticated packet sent or received; `None` makes a persistent
    /// keepalive due at once (it was just turned on).
    pub last_traversal: Option<Instant>,
    /// Persistent keepalive was just turned on: send one at the next timer
    /// run whatever was sent or received meanwhile (as the kernel and
    /// wireguard-go do, at once). A packet from the peer must not cancel
    /// it: both ends poke in the same beat, and each one's poke arriving
    /// first used to cancel the other's, so one side heard nothing for
    /// 25 s and took the path for broken.
    pub keepalive_now: bool,
    /// When a data packet with content last arrived from the peer, and
    /// when we last sent it anything: WireGuard's passive keepalive
    /// ([`passive_keepalive_due`]) is decided on these exact times.
    pub rx_data_at: Option<Instant>,
    pub tx_at: Option<Instant>,
    pub stats: PeerStats,
}

/// WireGuard's passive keepalive (whitepaper §6.5, *Keepalive-Timeout*):
/// data arrived from the peer and nothing went back to it for 10 s, so
/// an empty packet goes back, telling the peer its packets arrive.
pub(crate) const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the passive keepalive is due at `now`: data arrived at
/// `rx_data` and nothing was sent since (`tx`: our last packet to the
/// peer), [`KEEPALIVE_TIMEOUT`] ago.
///
/// boringtun has this timer, but stamps packets with the time of its last
/// timer run (`update_timers`, every 250 ms to 1 s here), and wants the
/// data received strictly after our last send: when the peer's request,
/// our answer and its acknowledgement fall within one timer period, as a
/// gossip round's do, no keepalive ever goes back. The peer, which sent
/// last, then hears nothing until our next persistent keepalive (up to
/// 25 s, and none at all from a public member) and took the path for
/// broken after 12 s (`nat::paths::UNANSWERED`): in an idle mixed mesh of
/// 100, 106 false path breaks in 30 minutes (up to 22 in one minute), 35
/// silence checks and 4 accusations refuted mesh-wide; none with this
/// (testnet, session 22).
pub(crate) fn passive_keepalive_due(
    now: Instant,
    rx_data: Option<Instant>,
    tx: Option<Instant>,
) -> bool {
    rx_data.is_some_and(|r| {
        tx.is_none_or(|t| t < r) && now.saturating_duration_since(r) >= KEEPALIVE_TIMEOUT
    })
}

impl Peer {
    pub fn new(cfg: &PeerConfig, index: u32, key: Option<&DeviceKey>) -> Self {
        Peer {
            id: cfg.id,
            public_key: cfg.public_key,
            index,
            inner: Mutex::new(PeerInner {
                tunn: key.map(|k| k.new_tunn(&cfg.public_key, &cfg.preshared_key, index)),
                endpoint: cfg.endpoint,
                persistent_keepalive: cfg.persistent_keepalive,
                preshared_key: cfg.preshared_key,
                last_traversal: None,
                keepalive_now: false,
                rx_data_at: None,
                tx_at: None,
                stats: PeerStats::default(),
            }),
        }
    }

    pub fn short_key(&self) -> String {
        short_key(&self.public_key)
    }
}

/// The first 8 hex digits of a key, enough to tell peers apart in logs.
pub(crate) fn short_key(key: &Key) -> String {
    hex::encode(&key[..4])
}

/// A random 24-bit non-zero value from the kernel's CSPRNG.
pub(crate) fn random_index() -> u32 {
    let mut buf = [0u8; 4];
    loop {
        // SAFETY: writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        let v = if n == 4 {
            u32::from_le_bytes(buf)
        } else {
            // getrandom(2) cannot really fail for 4 bytes; fall back anyway.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(1);
            nanos.wrapping_mul(2_654_435_761)
        } & 0x00ff_ffff;
        if v != 0 {
            return v;
        }
    }
}

/// Locks a mutex, ignoring poisoning (a panicked holder cannot leave these
/// structures in a state worse than dropping a packet).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn the_handshake_limit_grows_with_the_peers() {
        assert_eq!(handshake_rate_limit(0), HANDSHAKE_RATE_LIMIT);
        assert_eq!(handshake_rate_limit(50), HANDSHAKE_RATE_LIMIT);
        assert_eq!(handshake_rate_limit(99), 198);
        assert_eq!(handshake_rate_limit(250), 500);
        let mut k = DeviceKey::new(&[7; 32]);
        let before = Arc::clone(&k.front_limiter);
        assert_eq!(k.fit(10), HANDSHAKE_RATE_LIMIT);
        assert!(
            Arc::ptr_eq(&before, &k.front_limiter),
            "unchanged limit: same limiter"
        );
        assert_eq!(k.fit(250), 500);
        assert!(!Arc::ptr_eq(&before, &k.front_limiter));
        let after = Arc::clone(&k.front_limiter);
        assert_eq!(k.fit(250), 500);
        assert!(Arc::ptr_eq(&after, &k.front_limiter));
    }
}
