//! Gossip and requests over QUIC.
//!
//! One quinn endpoint both accepts and connects, so a node's gossip address
//! is also its source address and connections are reused in both directions
//! (a member behind NAT is answered over the connection it opened). Each
//! chitchat message travels alone on a unidirectional stream; a request
//! (join, hello, relay allocation) takes a bidirectional stream and gets one
//! reply. Both sides authenticate with mutual TLS ([`super::tls`]): the
//! peer's identity (member, or joiner that may only ask to join) is read
//! from its certificate once per connection.
//!
//! Sending never waits on the network: `send` queues the message for a
//! per-destination task that connects as needed. A destination that cannot
//! be reached is held back with backoff. What arrives is handed to an
//! [`Inbound`] (the daemon's gossip state and request handlers), whose
//! answer goes back the same way.
//!
//! Input limits (proto/PROTOCOL.md §4.6): messages and replies of at most
//! [`MAX_MESSAGE`] bytes, at most [`MAX_CONNS_PER_IP`] connections per
//! source address and [`MAX_CONNS`] in all, 16 concurrent streams of each
//! kind per connection (see `tls::quic_configs`).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chitchat::{ChitchatMessage, Deserializable, Serializable};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::proto::{self, PublicKeyBytes, Signed};
use crate::trust::{PeerIdentity, TrustState};

/// Largest gossip message accepted on a stream.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest reply accepted to a request of ours (a `Join` or `Hello` reply
/// holds every member's address and name: about 1 MB at 10,000 members,
/// plus up to [`HELLO_RECORDS_BUDGET`] of records). Only the member we
/// asked sends one, once.
pub const MAX_REPLY: usize = 8 << 20;
/// How many bytes of record text a `Hello` reply carries at most: public
/// members first (a joiner behind NAT can gossip with them at once), then
/// the others, each whole. Beyond it the joiner learns the records by
/// gossip, as every member does (at 1,000 members all records came to
/// 1.2 MB, above the 1 MiB cap that replies had then: joins failed).
pub const HELLO_RECORDS_BUDGET: usize = 1 << 20;
/// Largest request accepted.
const MAX_REQUEST: usize = 4096;
/// Most open connections from one source address. Members behind one
/// CGNAT or home router share an address (a CGNAT may put hundreds of
/// subscribers behind one), so this bounds a flood from one address
/// without refusing a NATed site's members: 8 refused a joiner behind a
/// CGNAT in the churn soak, counting its neighbours' and dead members'
/// connections.
pub const MAX_CONNS_PER_IP: usize = 64;
/// Most connections in all.
pub const MAX_CONNS: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// After a failed connection attempt, that address is left alone for this
/// long, doubling up to [`MAX_BACKOFF`] (unless it is `expected` to be
/// reachable).
const FAILED_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
const SENDER_IDLE: Duration = Duration::from_secs(60);
/// A gossip stream not finished within this is dropped (a round not
/// answered within [`ROUND_WAIT`] is over anyway).
const STREAM_READ_LIMIT: Duration = ROUND_WAIT;
/// At most one gossip round (Syn) in flight per destination: a new round to
/// an address waits for the answer to the last one (SynAck), or this long.
/// Without it a joiner asked its seed four times a second while the seed's
/// first answer (the whole mesh) was still on its way.
pub const ROUND_WAIT: Duration = Duration::from_secs(4);
const SERVER_NAME: &str = "meshpeer";

/// A request on a bidirectional stream (proto/PROTOCOL.md §6, §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A joiner asks to be admitted (stamped).
    Join { name: String },
    /// A member asks for what we hold (records, holders, revocations).
    Hello,
    /// A member asks this relay for the pair (it, `peer`).
    Allocate { peer: PublicKeyBytes },
    /// A member gives its pair with `peer` back.
    Release { peer: PublicKeyBytes },
}

/// What a member holds, for joiners and restarted members.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Record values (gossip text).
    pub records: Vec<String>,
    /// Who holds which overlay address (proto/PROTOCOL.md §3.1).
    pub holders: Vec<(Ipv4Addr, PublicKeyBytes)>,
    /// Who holds which name.
    pub names: Vec<(String, PublicKeyBytes)>,
    /// The newest revocation list (gossip text).
    pub revoked: Option<String>,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    TokenExpired {
        expires_at: u64,
        now: u64,
    },
    Revoked,
    NetworkFull,
    /// `Join` from a member that is already stamped (or `Hello` from a joiner).
    NotAJoiner,
    Busy,
    Other(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TokenExpired { expires_at, now } => write!(
                f,
                "the token expired at {} (the seed's clock says {})",
                crate::admission::fmt_unix(*expires_at),
                crate::admission::fmt_unix(*now)
            ),
            Refusal::Revoked => write!(f, "this node or its token is revoked"),
            Refusal::NetworkFull => write!(f, "the network has no free address"),
            Refusal::NotAJoiner => write!(f, "request not allowed for this credential"),
            Refusal::Busy => write!(f, "the seed is busy; try again"),
            Refusal::Other(s) => write!(f, "{s}"),
        }
    }
}

/// The answer to `Join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinReply {
    Admitted { stamp: Signed, hello: HelloReply },
    Refused { reason: Refusal },
}

/// The answer to `Allocate` / `Release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllocReply {
    Allocated { port: u16, lifetime_secs: u32 },
    Released,
    Refused { reason: String },
}

/// Where what arrives goes.
pub trait Inbound: Send + Sync + 'static {
    /// A gossip message from the member `peer` at `from` (its key
    /// authenticated the connection); the answer goes back.
    fn gossip(
        &self,
        from: SocketAddr,
        peer: &PeerIdentity,
        msg: ChitchatMessage,
    ) -> Option<ChitchatMessage>;
    /// A request from `peer` at `from`; returns the encoded reply.
    fn request(&self, from: SocketAddr, peer: &PeerIdentity, req: Request) -> Vec<u8>;
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer from {0} within {1:?} (is meshpeer running there, and UDP open?)")]
    Timeout(SocketAddr, Duration),
    #[error("{addr} refused us: {detail} (is the token for this network, and still valid?)")]
    Refused { addr: SocketAddr, detail: String },
    #[error("{0} accepted the connection but did not answer within {1:?}")]
    NoReply(SocketAddr, Duration),
    #[error("{addr}: {detail}")]
    Other { addr: SocketAddr, detail: String },
}

impl ProbeError {
    /// Whether nothing answered at all (no QUIC handshake).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProbeError::Timeout(..))
    }
}

struct Shared {
    endpoint: quinn::Endpoint,
    client: Mutex<quinn::ClientConfig>,
    trust: Arc<TrustState>,
    inbound: OnceLock<Arc<dyn Inbound>>,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// Per member: the connection its last gossip message came on (remote
    /// address), and when (`recent_connection`).
    heard_on: Mutex<HashMap<PublicKeyBytes, (SocketAddr, Instant)>>,
    senders: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    /// Addresses that failed to connect: (retry after, current backoff).
    unreachable: Mutex<HashMap<SocketAddr, (Instant, Duration)>>,
    /// Destinations with a gossip round in flight: when it was started.
    rounds: Mutex<HashMap<SocketAddr, Instant>>,
    /// Gossip addresses that should be reachable (public members, members
    /// on our LAN): a failed connection holds them only briefly.
    expected: Mutex<std::collections::HashSet<SocketAddr>>,
    bytes_out: std::sync::atomic::AtomicU64,
    bytes_in: std::sync::atomic::AtomicU64,
    /// When each address was last warned about (bad input is logged at
    /// warning level once a minute per address).
    warned: Mutex<HashMap<std::net::IpAddr, Instant>>,
    /// When each address was last reported unreachable for a request
    /// ([`QuicTransport::report_due`]).
    reported: Mutex<HashMap<std::net::IpAddr, Instant>>,
}

fn warn_once_a_minute(shared: &Shared, remote: SocketAddr) -> bool {
    once_a_minute(&shared.warned, remote)
}

/// Whether `remote` was not named in `map` within the last minute (and
/// notes it now).
fn once_a_minute(map: &Mutex<HashMap<std::net::IpAddr, Instant>>, remote: SocketAddr) -> bool {
    let now = Instant::now();
    let mut w = lock(map);
    if w.len() > 1024 {
        w.retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(60));
    }
    match w.get(&remote.ip()) {
        Some(t) if now.saturating_duration_since(*t) < Duration::from_secs(60) => false,
        _ => {
            w.insert(remote.ip(), now);
            true
        }
    }
}

/// A QUIC endpoint carrying gossip and requests; cheap to clone.
#[derive(Clone)]
pub struct QuicTransport {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single inserts and removes cannot leave these maps inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl QuicTransport {
    /// Binds the endpoint and starts accepting connections. Nothing that
    /// arrives is handled until [`QuicTransport::set_inbound`].
    pub fn bind(
        addr: SocketAddr,
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
        trust: Arc<TrustState>,
    ) -> std::io::Result<Self> {
        Self::bind_with_reset_secret(addr, server, client, trust, None)
    }

    /// [`QuicTransport::bind`] with the key of QUIC stateless resets
    /// derived from `reset_secret`, which must stay the same across
    /// restarts of this node (see [`reset_secret`]). A member that was
    /// killed and restarted then answers the packets of connections it no
    /// longer knows with a reset its peers accept (RFC 9000 §10.3), and
    /// they connect again at once. With a random key (quinn's default) the
    /// peers cannot tell the reset from noise and keep sending into the
    /// dead connection until it idles out (180 s): no gossip and no
    /// requests (relay allocations, pings) reach the member meanwhile.
    pub fn bind_with_reset_secret(
        addr: SocketAddr,
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
        trust: Arc<TrustState>,
        reset_secret: Option<[u8; 32]>,
    ) -> std::io::Result<Self> {
        let config = match reset_secret {
            Some(s) => {
                let mut c = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    &s,
                )));
                // Connection ids must also be recognised across restarts:
                // quinn drops a short-header packet whose id its generator
                // does not validate before it would answer with a reset,
                // and the default generator's key is random per process.
                let cid_key =
                    u64::from_le_bytes(reset_secret_for_cids(&s)[..8].try_into().unwrap_or([0; 8]));
                c.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                c
            }
            None => quinn::EndpointConfig::default(),
        };
        let socket = std::net::UdpSocket::bind(addr)?;
        // The default receive buffer (about 200 KB) overflowed on loaded
        // public members (testnet, 100 members coming up: 10-25 % of the
        // datagrams to the gossip port dropped), and QUIC's loss recovery
        // then held joins and relay allocations for tens of seconds.
        crate::wg::userspace::net::grow_buffers(std::os::fd::AsRawFd::as_raw_fd(&socket));
        let endpoint =
            quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))?;
        let shared = Arc::new(Shared {
            endpoint,
            client: Mutex::new(client),
            trust,
            inbound: OnceLock::new(),
            conns: Mutex::new(HashMap::new()),
            heard_on: Mutex::new(HashMap::new()),
            senders: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            rounds: Mutex::new(HashMap::new()),
            expected: Mutex::new(Default::default()),
            bytes_out: 0.into(),
            bytes_in: 0.into(),
            warned: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(shared.clone()));
        Ok(Self { shared })
    }

    pub fn set_inbound(&self, inbound: Arc<dyn Inbound>) {
        let _ = self.shared.inbound.set(inbound);
    }

    /// New TLS configurations (a joiner that was just stamped presents its
    /// new credential): later connections use them; existing ones close.
    pub fn reconfigure(&self, server: quinn::ServerConfig, client: quinn::ClientConfig) {
        self.shared.endpoint.set_server_config(Some(server));
        *lock(&self.shared.client) = client;
        for (_, c) in lock(&self.shared.conns).drain() {
            c.close(0u32.into(), b"new credential");
        }
    }

    /// Gossip addresses that should be reachable (public members, members
    /// on our LAN): a failed connection to one holds it back only briefly.
    pub fn set_expected(&self, expected: std::collections::HashSet<SocketAddr>) {
        *lock(&self.shared.expected) = expected;
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// (bytes sent, bytes received) of gossip and requests, stream payloads.
    pub fn byte_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.bytes_out.load(Relaxed),
            self.shared.bytes_in.load(Relaxed),
        )
    }

    /// The remote address of the open connection a member's gossip came on
    /// within `within`, if any: a member behind NAT that opened a
    /// connection to us is reached through it (`gossip::rounds::
    /// prefer_underlay`) while its NAT mapping is surely open.
    pub fn recent_connection(&self, key: &PublicKeyBytes, within: Duration) -> Option<SocketAddr> {
        let (addr, at) = *lock(&self.shared.heard_on).get(key)?;
        if at.elapsed() >= within {
            return None;
        }
        lock(&self.shared.conns)
            .get(&addr)
            .filter(|c| c.close_reason().is_none())
            .map(|_| addr)
    }

    /// Open connections.
    /// Whether a failed request to `addr` should be logged at `info` now:
    /// once a minute per address (the rest at `debug`). Under load a member
    /// asks many relays for many pairs: at 250 members on 2 cores the logs
    /// held 1.6 M "cannot reach the relay" lines in 17 minutes.
    pub fn report_due(&self, addr: SocketAddr) -> bool {
        once_a_minute(&self.shared.reported, addr)
    }

    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Whether a round to `to` may start now (none in flight, not held
    /// back); if so it counts as started.
    pub fn try_start_round(&self, to: SocketAddr) -> bool {
        let now = Instant::now();
        if on_hold(&self.shared, &to) {
            return false;
        }
        start_round(&mut lock(&self.shared.rounds), to, now)
    }

    /// Whether a round to `to` is unanswered and younger than [`ROUND_WAIT`].
    pub fn round_in_flight(&self, to: &SocketAddr) -> bool {
        in_flight(&lock(&self.shared.rounds), to, Instant::now())
    }

    /// Queues a gossip message to `to` (never waits on the network).
    pub fn send(&self, to: SocketAddr, msg: &ChitchatMessage) {
        send_to(&self.shared, to, msg);
    }

    /// Queues `bytes` as one gossip message to `to`, as they are. Only for
    /// tests that play a hostile member (crafted or malformed messages).
    #[doc(hidden)]
    pub fn send_raw(&self, to: SocketAddr, bytes: Vec<u8>) {
        queue_bytes(&self.shared, to, bytes);
    }

    /// Sends one request to `addr` and returns the raw reply, within
    /// `limit` (half of it for the QUIC handshake).
    pub async fn request(
        &self,
        addr: SocketAddr,
        req: &Request,
        limit: Duration,
    ) -> Result<Vec<u8>, ProbeError> {
        self.request_within(addr, req, limit / 2, limit).await
    }

    /// [`Self::request`] with separate limits for the QUIC handshake
    /// (`connect`) and for the whole exchange (`limit`). A peer that
    /// completed the handshake is alive: waiting longer for its answer
    /// costs nothing, while asking again makes a loaded peer do the same
    /// work twice (at 250 mixed a seed starved of CPU admitted 160 joiners
    /// 1,171 times, sending its whole membership each time, because every
    /// joiner gave up after 8, 16 or 32 s and asked again).
    pub async fn request_within(
        &self,
        addr: SocketAddr,
        req: &Request,
        connect: Duration,
        limit: Duration,
    ) -> Result<Vec<u8>, ProbeError> {
        let fut = async {
            let conn = connect_within(&self.shared, addr, connect.min(limit)).await?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| conn_err(addr, e))?;
            let bytes = proto::encode(req);
            send.write_all(&bytes).await.map_err(|e| other(addr, e))?;
            send.finish().map_err(|e| other(addr, e))?;
            let reply = read_all(recv).await.map_err(|e| match e {
                quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => {
                    conn_err(addr, c)
                }
                e => other(addr, e),
            })?;
            use std::sync::atomic::Ordering::Relaxed;
            self.shared.bytes_out.fetch_add(bytes.len() as u64, Relaxed);
            self.shared.bytes_in.fetch_add(reply.len() as u64, Relaxed);
            Ok(reply)
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            // The handshake has its own (shorter) limit: what ran out here
            // was the wait for the reply.
            Err(_) => Err(ProbeError::NoReply(addr, limit)),
        }
    }

    pub fn close(&self) {
        self.shared.endpoint.close(0u32.into(), b"bye");
    }
}

/// The secret of a node's QUIC stateless-reset key: a hash of its node
/// key's secret, domain-separated, so it survives restarts and says
/// nothing about the node key.
pub fn reset_secret(node_secret: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"meshpeer quic stateless reset key v1\0");
    h.update(node_secret);
    h.finalize().into()
}

/// The key of the connection-id generator, from the reset secret
/// (domain-separated: the two keys are not the same).
fn reset_secret_for_cids(reset_secret: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"meshpeer quic connection id key v1\0");
    h.update(reset_secret);
    h.finalize().into()
}

fn other(addr: SocketAddr, e: impl std::fmt::Display) -> ProbeError {
    ProbeError::Other {
        addr,
        detail: e.to_string(),
    }
}

fn conn_err(addr: SocketAddr, e: quinn::ConnectionError) -> ProbeError {
    match &e {
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code.to_string().contains("crypto")
                || (0x100..0x200).contains(&u64::from(c.error_code)) =>
        {
            ProbeError::Refused {
                addr,
                detail: e.to_string(),
            }
        }
        quinn::ConnectionError::TransportError(t)
            if (0x100..0x200).contains(&u64::from(t.code)) =>
        {
            ProbeError::Refused {
                addr,
                detail: format!("its certificate failed our check ({t})"),
            }
        }
        quinn::ConnectionError::TimedOut => ProbeError::Timeout(addr, CONNECT_TIMEOUT),
        _ => other(addr, e),
    }
}

async fn read_all(mut recv: quinn::RecvStream) -> Result<Vec<u8>, quinn::ReadToEndError> {
    recv.read_to_end(MAX_REPLY).await
}

/// The records a `Hello` reply carries: `(public, text)` in any order;
/// public members' first, then the others, each whole, until
/// [`HELLO_RECORDS_BUDGET`] bytes of text (`budget` in tests).
pub fn hello_records(
    candidates: impl IntoIterator<Item = (bool, Arc<str>)>,
    budget: usize,
) -> Vec<String> {
    let mut all: Vec<(bool, Arc<str>)> = candidates.into_iter().collect();
    // Stable: public first, the given order within each.
    all.sort_by_key(|(public, _)| !*public);
    let mut used = 0usize;
    let mut out = Vec::new();
    for (_, text) in all {
        if used + text.len() > budget {
            continue;
        }
        used += text.len();
        out.push(text.to_string());
    }
    out
}

async fn connect_within(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    limit: Duration,
) -> Result<quinn::Connection, ProbeError> {
    if let Some(c) = lock(&shared.conns).get(&addr) {
        if c.close_reason().is_none() {
            return Ok(c.clone());
        }
    }
    let client = lock(&shared.client).clone();
    let connecting = shared
        .endpoint
        .connect_with(client, addr, SERVER_NAME)
        .map_err(|e| other(addr, e))?;
    let res = match tokio::time::timeout(limit, connecting).await {
        Err(_) => Err(ProbeError::Timeout(addr, limit)),
        Ok(r) => r.map_err(|e| conn_err(addr, e)),
    };
    match res {
        Ok(conn) => {
            lock(&shared.unreachable).remove(&addr);
            register(shared, conn.clone());
            Ok(conn)
        }
        Err(e) => {
            let mut bad = lock(&shared.unreachable);
            // A member that should be reachable and did not answer is busy
            // or restarting: retry soon. Others (members behind NAT, whose
            // advertised address nobody can reach) back off for long.
            let backoff = if lock(&shared.expected).contains(&addr) {
                FAILED_BACKOFF
            } else {
                bad.get(&addr)
                    .map(|(_, b)| (*b * 2).min(MAX_BACKOFF))
                    .unwrap_or(FAILED_BACKOFF)
            };
            if bad.len() >= MAX_CONNS {
                let now = Instant::now();
                bad.retain(|_, (until, _)| now < *until);
            }
            bad.insert(addr, (Instant::now() + backoff, backoff));
            Err(e)
        }
    }
}

/// Whether gossip to `addr` is on hold after failed connection attempts.
fn on_hold(shared: &Shared, addr: &SocketAddr) -> bool {
    lock(&shared.unreachable)
        .get(addr)
        .is_some_and(|(until, _)| Instant::now() < *until)
}

/// The peer's identity from its certificate (checked again: the revocation
/// list may have changed since the handshake).
fn identify(shared: &Shared, conn: &quinn::Connection) -> Option<PeerIdentity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    super::tls::check_certificate(certs.first()?, &shared.trust).ok()
}

/// Remembers a connection by its remote address and serves its streams.
fn register(shared: &Arc<Shared>, conn: quinn::Connection) {
    lock(&shared.unreachable).remove(&conn.remote_address());
    // Two members may connect to each other at the same moment: both
    // connections stay usable (the older one idles out), the map keeps the
    // newest for sending.
    lock(&shared.conns).insert(conn.remote_address(), conn.clone());
    tokio::spawn(serve_connection(shared.clone(), conn));
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let ip = incoming.remote_address().ip();
        let (total, from_ip) = {
            let mut conns = lock(&shared.conns);
            // Connections closed since (a member killed or gone: idled
            // out, reset) do not count.
            conns.retain(|_, c| c.close_reason().is_none());
            let from_ip = conns.keys().filter(|a| a.ip() == ip).count();
            (conns.len(), from_ip)
        };
        if total >= MAX_CONNS || from_ip >= MAX_CONNS_PER_IP {
            tracing::debug!(%ip, total, from_ip, "gossip connection refused: too many");
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => register(&shared, conn),
                // Strangers end here: their certificate failed the check.
                Err(e) => tracing::debug!(%remote, error = %e, "gossip connection refused"),
            }
        });
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let Some(peer) = identify(&shared, &conn) else {
        conn.close(0x1u32.into(), b"credential no longer valid");
        forget_conn(&shared, &conn);
        return;
    };
    let peer = Arc::new(peer);
    loop {
        // Revoked since the handshake: the connection ends here.
        if shared.trust.peer_revoked(&peer) {
            tracing::info!(%remote, "closing the connection of a revoked member");
            conn.close(0x2u32.into(), b"revoked");
            break;
        }
        tokio::select! {
            uni = conn.accept_uni() => {
                let Ok(stream) = uni else { break };
                // Read in a task of its own, within a deadline: a stream
                // that is slow to finish (a loaded or hostile peer) must
                // not hold up this connection's other streams (joins and
                // relay allocations waited up to 50 s behind one on a
                // loaded seed). QUIC bounds the streams open at once.
                tokio::spawn(serve_gossip_stream(shared.clone(), peer.clone(), remote, stream));
            }
            bi = conn.accept_bi() => {
                let Ok((mut send, mut recv)) = bi else { break };
                let shared = shared.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let bytes = match recv.read_to_end(MAX_REQUEST).await {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::debug!(%remote, error = %e, "request stream failed");
                            return;
                        }
                    };
                    let req = match proto::decode::<Request>("request", &bytes) {
                        Ok(r) => r,
                        Err(e) => {
                            if warn_once_a_minute(&shared, remote) {
                                tracing::warn!(%remote, error = %e, "dropped a malformed request");
                            }
                            return;
                        }
                    };
                    // Not ready to answer (starting up) or revoked: reset
                    // the stream. Dropping it would finish it, and the
                    // asker would read an empty answer, which a joiner
                    // takes as a broken seed and gives up (seen with a
                    // joiner waiting for a seed that was just starting).
                    let Some(inbound) = shared.inbound.get() else {
                        let _ = send.reset(0u32.into());
                        return;
                    };
                    if shared.trust.peer_revoked(&peer) {
                        let _ = send.reset(0u32.into());
                        return;
                    }
                    let reply = inbound.request(remote, &peer, req);
                    use std::sync::atomic::Ordering::Relaxed;
                    shared.bytes_in.fetch_add(bytes.len() as u64, Relaxed);
                    shared.bytes_out.fetch_add(reply.len() as u64, Relaxed);
                    let _ = send.write_all(&reply).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        }
    }
    forget_conn(&shared, &conn);
}

/// One gossip message on a unidirectional stream: read (within
/// [`STREAM_READ_LIMIT`]), checked, handed to the state, answered.
async fn serve_gossip_stream(
    shared: Arc<Shared>,
    peer: Arc<PeerIdentity>,
    remote: SocketAddr,
    stream: quinn::RecvStream,
) {
    let bytes = match tokio::time::timeout(STREAM_READ_LIMIT, read_all(stream)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "gossip stream failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "gossip stream not finished in time; dropped");
            return;
        }
    };
    shared
        .bytes_in
        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if shared.trust.peer_revoked(&peer) {
        return;
    }
    if !peer.stamped {
        tracing::debug!(%remote, "gossip from a joiner that is not admitted yet; dropped");
        return;
    }
    let msg = match ChitchatMessage::deserialize(&mut bytes.as_slice()) {
        Ok(m) => m,
        Err(e) => {
            if warn_once_a_minute(&shared, remote) {
                tracing::warn!(%remote, error = %e, "dropped a malformed gossip message (more from this address are logged at debug level for a minute)");
            } else {
                tracing::debug!(%remote, error = %e, "dropped a malformed gossip message");
            }
            return;
        }
    };
    {
        let mut heard = lock(&shared.heard_on);
        if heard.len() >= MAX_CONNS && !heard.contains_key(&peer.node_key) {
            heard.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(60));
        }
        heard.insert(peer.node_key, (remote, Instant::now()));
    }
    if matches!(
        msg,
        ChitchatMessage::SynAck { .. } | ChitchatMessage::BadCluster
    ) {
        // The answer to our round: the next may start.
        lock(&shared.rounds).remove(&remote);
    }
    let Some(inbound) = shared.inbound.get() else {
        return;
    };
    if let Some(reply) = inbound.gossip(remote, &peer, msg) {
        send_to(&shared, remote, &reply);
    }
}

fn forget_conn(shared: &Shared, conn: &quinn::Connection) {
    let remote = conn.remote_address();
    let mut conns = lock(&shared.conns);
    if conns
        .get(&remote)
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        conns.remove(&remote);
    }
}

fn send_to(shared: &Arc<Shared>, to: SocketAddr, msg: &ChitchatMessage) {
    if on_hold(shared, &to) {
        return;
    }
    let mut bytes = Vec::with_capacity(msg.serialized_len());
    msg.serialize(&mut bytes);
    queue_bytes(shared, to, bytes);
}

fn queue_bytes(shared: &Arc<Shared>, to: SocketAddr, bytes: Vec<u8>) {
    let mut senders = lock(&shared.senders);
    let tx = match senders.get(&to) {
        Some(tx) if !tx.is_closed() => tx.clone(),
        _ => {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(sender_task(shared.clone(), to, rx));
            senders.insert(to, tx.clone());
            tx
        }
    };
    // A full queue means the peer is slow or unreachable; gossip is
    // redundant, so the message can go.
    if tx.try_send(bytes).is_err() {
        tracing::trace!(%to, "gossip queue full; message dropped");
    }
}

/// Sends queued messages to one destination, connecting as needed.
async fn sender_task(shared: Arc<Shared>, to: SocketAddr, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Ok(Some(bytes)) = tokio::time::timeout(SENDER_IDLE, rx.recv()).await {
        if on_hold(&shared, &to) {
            continue;
        }
        for _attempt in 0..2 {
            let conn = match connect_within(&shared, to, CONNECT_TIMEOUT).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%to, error = %e, "cannot reach gossip peer");
                    break;
                }
            };
            let res = async {
                let mut s = conn.open_uni().await?;
                s.write_all(&bytes).await?;
                s.finish()?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
            .await;
            match res {
                Ok(()) => {
                    shared
                        .bytes_out
                        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    tracing::debug!(%to, error = %e, "gossip send failed; reconnecting");
                    forget_conn(&shared, &conn);
                }
            }
        }
    }
    lock(&shared.senders).remove(&to);
}

/// Whether a new gossip round to `to` may start at `now` (and if so,
/// records it): not while the last one is unanswered and younger than
/// [`ROUND_WAIT`].
fn start_round(rounds: &mut HashMap<SocketAddr, Instant>, to: SocketAddr, now: Instant) -> bool {
    if in_flight(rounds, &to, now) {
        return false;
    }
    if rounds.len() > 1024 {
        rounds.retain(|_, t| now.saturating_duration_since(*t) < ROUND_WAIT);
    }
    rounds.insert(to, now);
    true
}

fn in_flight(rounds: &HashMap<SocketAddr, Instant>, to: &SocketAddr, now: Instant) -> bool {
    rounds
        .get(to)
        .is_some_and(|t| now.saturating_duration_since(*t) < ROUND_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_round_in_flight_per_destination() {
        let mut rounds = HashMap::new();
        let (a, b): (SocketAddr, SocketAddr) = (
            "192.0.2.1:51821".parse().unwrap(),
            "192.0.2.2:51821".parse().unwrap(),
        );
        let t0 = Instant::now();
        assert!(start_round(&mut rounds, a, t0));
        assert!(!start_round(
            &mut rounds,
            a,
            t0 + Duration::from_millis(250)
        ));
        assert!(start_round(&mut rounds, b, t0 + Duration::from_millis(250)));
        rounds.remove(&b);
        assert!(start_round(&mut rounds, b, t0 + Duration::from_millis(300)));
        assert!(start_round(&mut rounds, a, t0 + ROUND_WAIT));
    }

    #[test]
    fn hello_replies_carry_public_records_first_within_the_budget() {
        let r = |s: &str| Arc::<str>::from(s);
        let picked = hello_records(
            vec![
                (false, r("nat-1-aaaa")),
                (true, r("pub-1-aaaa")),
                (false, r("nat-2-aaaa")),
                (true, r("pub-2-aaaa")),
                (false, r("nat-3")),
            ],
            35,
        );
        // 10 bytes each: both public ones, one NAT one, then only the
        // short one still fits.
        assert_eq!(picked, ["pub-1-aaaa", "pub-2-aaaa", "nat-1-aaaa", "nat-3"]);
        assert!(hello_records(vec![(true, r("x"))], 0).is_empty());
        // 10,000 records of about 1.2 KB: the budget holds, the reply is
        // well under the reply cap.
        let big: Vec<(bool, Arc<str>)> = (0..10_000)
            .map(|i| (i % 3 == 0, Arc::from("r".repeat(1200).as_str())))
            .collect();
        let picked = hello_records(big, HELLO_RECORDS_BUDGET);
        let bytes: usize = picked.iter().map(String::len).sum();
        assert!(bytes <= HELLO_RECORDS_BUDGET);
        assert!(picked.len() > 800, "{}", picked.len());
        let reply = HelloReply {
            records: picked,
            holders: (0..10_000u32)
                .map(|i| (Ipv4Addr::from(0x0a00_0000 + i), [i as u8; 32]))
                .collect(),
            names: (0..10_000)
                .map(|i| (format!("node-{i:05}-rack7"), [i as u8; 32]))
                .collect(),
            revoked: None,
        };
        assert!(proto::encode(&reply).len() < MAX_REPLY);
    }

    #[test]
    fn requests_and_replies_round_trip() {
        for r in [
            Request::Join { name: "n1".into() },
            Request::Hello,
            Request::Allocate { peer: [3; 32] },
            Request::Release { peer: [3; 32] },
        ] {
            assert_eq!(
                proto::decode::<Request>("r", &proto::encode(&r)).unwrap(),
                r
            );
        }
        let j = JoinReply::Refused {
            reason: Refusal::TokenExpired {
                expires_at: 0,
                now: 86_400,
            },
        };
        assert_eq!(
            proto::decode::<JoinReply>("j", &proto::encode(&j)).unwrap(),
            j
        );
        assert!(Refusal::TokenExpired {
            expires_at: 0,
            now: 86_400
        }
        .to_string()
        .contains("expired at 1970-01-01"));
    }
}
