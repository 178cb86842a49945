//! chitchat over QUIC.
//!
//! chitchat's `Transport`/`Socket` traits are the seam: [`QuicTransport`]
//! carries each chitchat message on its own unidirectional QUIC stream
//! (QUIC datagrams are too small for chitchat's digests). One quinn endpoint
//! both accepts and connects, so a node's gossip address is also its source
//! address, and connections are reused in both directions.
//!
//! chitchat awaits `Socket::send` inside its single loop, so `send` never
//! waits on the network: it queues the message for a per-destination sender
//! task and returns. A destination that cannot be reached drops messages for
//! a short backoff instead of stalling gossip.
//!
//! Besides gossip, the endpoint answers one request on bidirectional streams:
//! a joiner's *hello*, answered with the records the member holds, so the
//! joiner can choose a free overlay address before it publishes its record.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::proto;

/// Largest gossip message or reply accepted on a stream.
pub const MAX_MESSAGE: usize = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// After a failed connection attempt, that address is left alone for this
/// long, doubling up to [`MAX_BACKOFF`]: members behind NAT advertise an
/// address others cannot reach, and chitchat keeps picking it.
const FAILED_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Up to this many live members, every gossip round is sent; above it,
/// each round goes out with probability `FULL_RATE_MEMBERS / live`. A
/// round carries a digest of every member, so a node's gossip cost is
/// rounds × members: thinned like this (with chitchat's 1 s interval in
/// large meshes, see [`crate::gossip::HOUSEKEEPING_INTERVAL`]) it stays
/// flat up to this size and then falls as the mesh grows, at the price
/// of slower spreading (rounds per node and second: 3 up to 75 members,
/// 1.5 at 150, 0.9 at 250).
pub const FULL_RATE_MEMBERS: usize = 75;
const SENDER_IDLE: Duration = Duration::from_secs(60);
/// At most one gossip round (Syn) in flight per destination: a new round
/// to an address waits for the answer (SynAck) to the last one, or for this
/// long. Without it a joiner, which knows no live member yet and so starts
/// a round with its seed every interval, sent the seed four Syns a second
/// while the seed's first answer (the whole mesh state, up to 64 KB,
/// zstd-compressed by chitchat for each answer) was still on its way; with
/// a hundred joiners the seed spent its time compressing answers nobody
/// waited for (measured: 61 KB answers, 29 per joiner, 2.9 MB/s at the
/// seed of a 150-node mesh).
const ROUND_WAIT: Duration = Duration::from_secs(4);
const SERVER_NAME: &str = "meshpeer";

/// The request a joiner sends on a bidirectional stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Hello,
}

/// The reply: the records (gossip values) the member holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct HelloReply {
    pub records: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer from {0} within {1:?} (is meshpeer running there, and UDP open?)")]
    Timeout(SocketAddr, Duration),
    #[error("{addr} refused us: {detail} (is the token for this network?)")]
    Refused { addr: SocketAddr, detail: String },
    #[error("{addr}: {detail}")]
    Other { addr: SocketAddr, detail: String },
}

struct Shared {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    senders: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    incoming: mpsc::Sender<(SocketAddr, ChitchatMessage)>,
    records: watch::Receiver<Vec<String>>,
    /// Addresses that failed to connect: (retry after, current backoff).
    unreachable: Mutex<HashMap<SocketAddr, (Instant, Duration)>>,
    /// Destinations with a gossip round in flight: when it was started.
    rounds: Mutex<HashMap<SocketAddr, Instant>>,
    /// Where rounds may go: the live members and those that should be
    /// reachable, as last told by the daemon (see [`route_round`]).
    targets: Mutex<Vec<SocketAddr>>,
    /// Gossip addresses that should be reachable (public members, members
    /// on our LAN): a failed connection holds them only briefly.
    expected: Mutex<std::collections::HashSet<SocketAddr>>,
    /// Gossip bytes sent and received (for status and the testnet).
    bytes_out: std::sync::atomic::AtomicU64,
    bytes_in: std::sync::atomic::AtomicU64,
}

type Inbox = mpsc::Receiver<(SocketAddr, ChitchatMessage)>;

/// A QUIC endpoint carrying chitchat; cheap to clone.
#[derive(Clone)]
pub struct QuicTransport {
    shared: Arc<Shared>,
    socket_rx: Arc<Mutex<Option<Inbox>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these maps cannot leave it inconsistent
    // (single insert/remove operations), so recover from poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl QuicTransport {
    /// Binds the gossip endpoint and starts accepting connections.
    pub fn bind(
        addr: SocketAddr,
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
        records: watch::Receiver<Vec<String>>,
    ) -> std::io::Result<Self> {
        let endpoint = quinn::Endpoint::server(server, addr)?;
        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            endpoint,
            client,
            conns: Mutex::new(HashMap::new()),
            senders: Mutex::new(HashMap::new()),
            incoming: tx,
            records,
            unreachable: Mutex::new(HashMap::new()),
            rounds: Mutex::new(HashMap::new()),
            targets: Mutex::new(Vec::new()),
            expected: Mutex::new(Default::default()),
            bytes_out: 0.into(),
            bytes_in: 0.into(),
        });
        tokio::spawn(accept_loop(shared.clone()));
        Ok(Self {
            shared,
            socket_rx: Arc::new(Mutex::new(Some(rx))),
        })
    }

    /// Tells the transport the gossip addresses of the live members and
    /// those of members that should be reachable (public, or on our LAN;
    /// see [`connect_within`]). Both are round targets (see
    /// [`route_round`]): the second even when our failure detector thinks
    /// them dead, as gossiping with them is how we would learn otherwise
    /// (under load, a node that only gossiped with those it believed live
    /// lost them one by one).
    pub fn set_live(
        &self,
        mut live: Vec<SocketAddr>,
        expected: std::collections::HashSet<SocketAddr>,
    ) {
        let known: std::collections::HashSet<SocketAddr> = live.iter().copied().collect();
        live.extend(expected.iter().filter(|a| !known.contains(a)));
        *lock(&self.shared.targets) = live;
        *lock(&self.shared.expected) = expected;
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// (bytes sent, bytes received) of gossip so far, stream payloads only.
    pub fn byte_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.bytes_out.load(Relaxed),
            self.shared.bytes_in.load(Relaxed),
        )
    }

    /// Asks the member at `addr` for the records it holds, proving on the
    /// way that both sides are admitted (mutual TLS).
    pub async fn hello(&self, addr: SocketAddr) -> Result<HelloReply, ProbeError> {
        self.hello_within(addr, CONNECT_TIMEOUT * 2).await
    }

    /// [`QuicTransport::hello`] with a time limit (half of it for the QUIC
    /// handshake). A joiner that asks a loaded seed again gives it longer:
    /// giving up drops the seed's work on the answer.
    pub async fn hello_within(
        &self,
        addr: SocketAddr,
        limit: Duration,
    ) -> Result<HelloReply, ProbeError> {
        let fut = async {
            let conn = connect_within(&self.shared, addr, limit / 2).await?;
            let (mut send, recv) = conn.open_bi().await.map_err(|e| conn_err(addr, e))?;
            send.write_all(&proto::encode(&Request::Hello))
                .await
                .map_err(|e| other(addr, e))?;
            send.finish().map_err(|e| other(addr, e))?;
            let bytes = read_all(recv).await.map_err(|e| match e {
                quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => {
                    conn_err(addr, c)
                }
                e => other(addr, e),
            })?;
            proto::decode::<HelloReply>("hello reply", &bytes).map_err(|e| other(addr, e))
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| ProbeError::Timeout(addr, limit))?
    }

    pub fn close(&self) {
        self.shared.endpoint.close(0u32.into(), b"bye");
    }
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
    recv.read_to_end(MAX_MESSAGE).await
}

async fn connect(shared: &Arc<Shared>, addr: SocketAddr) -> Result<quinn::Connection, ProbeError> {
    connect_within(shared, addr, CONNECT_TIMEOUT).await
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
    let connecting = shared
        .endpoint
        .connect_with(shared.client.clone(), addr, SERVER_NAME)
        .map_err(|e| other(addr, e))?;
    let res = match tokio::time::timeout(limit, connecting).await {
        Err(_) => Err(ProbeError::Timeout(addr, limit)),
        Ok(r) => r.map_err(|e| conn_err(addr, e)),
    };
    let mut bad = lock(&shared.unreachable);
    match res {
        Ok(conn) => {
            bad.remove(&addr);
            drop(bad);
            register(shared, conn.clone());
            Ok(conn)
        }
        Err(e) => {
            // A member that should be reachable (public, or on our LAN)
            // and did not answer is busy or restarting: retry it soon. Only
            // addresses nobody can reach (behind NAT) back off for long.
            let backoff = if lock(&shared.expected).contains(&addr) {
                FAILED_BACKOFF
            } else {
                bad.get(&addr)
                    .map(|(_, b)| (*b * 2).min(MAX_BACKOFF))
                    .unwrap_or(FAILED_BACKOFF)
            };
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

/// Remembers a connection by its remote address and serves its streams.
fn register(shared: &Arc<Shared>, conn: quinn::Connection) {
    // It reached us (or we it): no longer on hold.
    lock(&shared.unreachable).remove(&conn.remote_address());
    lock(&shared.conns).insert(conn.remote_address(), conn.clone());
    tokio::spawn(serve_connection(shared.clone(), conn));
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => register(&shared, conn),
                // Strangers end here: their certificate failed the admission check.
                Err(e) => tracing::debug!(%remote, error = %e, "gossip connection refused"),
            }
        });
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    loop {
        tokio::select! {
            uni = conn.accept_uni() => {
                let Ok(stream) = uni else { break };
                match read_all(stream).await {
                    Ok(bytes) => {
                        shared.bytes_in.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        match ChitchatMessage::deserialize(&mut bytes.as_slice()) {
                            Ok(msg) => {
                                if matches!(msg, ChitchatMessage::SynAck { .. } | ChitchatMessage::BadCluster) {
                                    // The answer to our round: the next may start.
                                    lock(&shared.rounds).remove(&remote);
                                }
                                if shared.incoming.send((remote, msg)).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => tracing::warn!(%remote, error = %e, "dropped a malformed gossip message"),
                        }
                    }
                    Err(e) => tracing::debug!(%remote, error = %e, "gossip stream failed"),
                }
            }
            bi = conn.accept_bi() => {
                let Ok((mut send, recv)) = bi else { break };
                let records = shared.records.borrow().clone();
                tokio::spawn(async move {
                    let mut recv = recv;
                    let Ok(bytes) = recv.read_to_end(1024).await.map_err(|e| tracing::debug!(%remote, error = %e, "request stream failed")) else { return };
                    match proto::decode::<Request>("request", &bytes) {
                        Ok(Request::Hello) => {
                            let reply = proto::encode(&HelloReply { records });
                            let _ = send.write_all(&reply).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        }
                        Err(e) => tracing::warn!(%remote, error = %e, "dropped a malformed request"),
                    }
                });
            }
        }
    }
    let mut conns = lock(&shared.conns);
    if conns
        .get(&remote)
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        conns.remove(&remote);
    }
}

/// Sends queued messages to one destination, connecting as needed.
async fn sender_task(shared: Arc<Shared>, to: SocketAddr, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Ok(Some(bytes)) = tokio::time::timeout(SENDER_IDLE, rx.recv()).await {
        if on_hold(&shared, &to) {
            continue;
        }
        let mut sent = false;
        for _attempt in 0..2 {
            let conn = match connect(&shared, to).await {
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
                    sent = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(%to, error = %e, "gossip send failed; reconnecting");
                    let mut conns = lock(&shared.conns);
                    if conns
                        .get(&to)
                        .is_some_and(|c| c.stable_id() == conn.stable_id())
                    {
                        conns.remove(&to);
                    }
                }
            }
        }
        if !sent {
            tracing::trace!(%to, "gossip message dropped");
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
    // Forget answered-never rounds of long ago so the map stays small.
    if rounds.len() > 1024 {
        rounds.retain(|_, t| now.saturating_duration_since(*t) < ROUND_WAIT);
    }
    rounds.insert(to, now);
    true
}

/// Whether a round to `to` is unanswered and younger than [`ROUND_WAIT`].
fn in_flight(rounds: &HashMap<SocketAddr, Instant>, to: &SocketAddr, now: Instant) -> bool {
    rounds
        .get(to)
        .is_some_and(|t| now.saturating_duration_since(*t) < ROUND_WAIT)
}

/// Where a gossip round that chitchat starts towards `to` goes, if
/// anywhere (and records it as in flight):
///
/// * `targets` are the live members and those that should be reachable
///   (see [`QuicTransport::set_live`]).
/// * Above [`FULL_RATE_MEMBERS`] targets, only that share of rounds goes
///   out.
/// * A round towards a member we cannot reach (behind NAT: its advertised
///   address is on hold) or with a round still in flight goes to a random
///   reachable live member instead. A Syn carries only our digest, the
///   same whoever gets it, so this is still Scuttlebutt; without it most
///   rounds of a member behind NAT were dropped (80 % of the members it
///   picks are behind NAT too), and its heartbeat left it at irregular
///   gaps that the failure detector took for deaths once rounds were rarer.
fn route_round<R: rand::Rng>(
    targets: &[SocketAddr],
    held: impl Fn(&SocketAddr) -> bool,
    rounds: &mut HashMap<SocketAddr, Instant>,
    to: SocketAddr,
    now: Instant,
    rng: &mut R,
) -> Option<SocketAddr> {
    use rand::seq::SliceRandom;
    if targets.len() > FULL_RATE_MEMBERS
        && rng.gen::<f64>() >= FULL_RATE_MEMBERS as f64 / targets.len() as f64
    {
        return None;
    }
    let target = if held(&to) || in_flight(rounds, &to, now) {
        let free: Vec<SocketAddr> = targets
            .iter()
            .filter(|a| **a != to && !held(a) && !in_flight(rounds, a, now))
            .copied()
            .collect();
        *free.choose(rng)?
    } else {
        to
    };
    start_round(rounds, target, now).then_some(target)
}

struct QuicSocket {
    shared: Arc<Shared>,
    rx: Inbox,
}

#[async_trait]
impl Transport for QuicTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let rx = lock(&self.socket_rx)
            .take()
            .ok_or_else(|| anyhow::anyhow!("gossip socket on {listen_addr} is already open"))?;
        Ok(Box::new(QuicSocket {
            shared: self.shared.clone(),
            rx,
        }))
    }
}

#[async_trait]
impl Socket for QuicSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let to = if let ChitchatMessage::Syn { .. } = msg {
            // A round chitchat starts: thinned, and sent where it can go.
            let now = Instant::now();
            let targets = lock(&self.shared.targets);
            let held = {
                let bad = lock(&self.shared.unreachable);
                move |a: &SocketAddr| bad.get(a).is_some_and(|(until, _)| now < *until)
            };
            let mut rounds = lock(&self.shared.rounds);
            match route_round(
                &targets,
                held,
                &mut rounds,
                to,
                now,
                &mut rand::thread_rng(),
            ) {
                Some(t) => t,
                None => return Ok(()),
            }
        } else {
            if on_hold(&self.shared, &to) {
                return Ok(());
            }
            to
        };
        let mut bytes = Vec::with_capacity(msg.serialized_len());
        msg.serialize(&mut bytes);
        let mut senders = lock(&self.shared.senders);
        let tx = match senders.get(&to) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(sender_task(self.shared.clone(), to, rx));
                senders.insert(to, tx.clone());
                tx
            }
        };
        // Never block chitchat's loop: a full queue means the peer is slow
        // or unreachable; gossip is redundant, so the message can go.
        if tx.try_send(bytes).is_err() {
            tracing::trace!(%to, "gossip queue full; message dropped");
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        self.rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("gossip endpoint closed"))
    }
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
        // Unanswered: no second round to the same member...
        assert!(!start_round(
            &mut rounds,
            a,
            t0 + Duration::from_millis(250)
        ));
        // ...but others are not held up.
        assert!(start_round(&mut rounds, b, t0 + Duration::from_millis(250)));
        // An answer (removal) frees it at once; a lost one after ROUND_WAIT.
        rounds.remove(&b);
        assert!(start_round(&mut rounds, b, t0 + Duration::from_millis(300)));
        assert!(start_round(&mut rounds, a, t0 + ROUND_WAIT));
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, (i % 250) as u8], 51821 + (i / 250) as u16))
    }

    #[test]
    fn rounds_towards_unreachable_members_go_to_reachable_ones() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let now = Instant::now();
        // Members 0-3 are reachable; 4-9 sit behind NAT (on hold).
        let live: Vec<SocketAddr> = (0..10).map(addr).collect();
        let held = |a: &SocketAddr| live[4..].contains(a);
        let mut rounds = HashMap::new();
        // A reachable, idle target is kept.
        assert_eq!(
            route_round(&live, held, &mut rounds, addr(1), now, &mut rng),
            Some(addr(1))
        );
        for _ in 0..3 {
            // Held, or with a round in flight: another reachable member.
            let t = route_round(&live, held, &mut rounds, addr(5), now, &mut rng).unwrap();
            assert!(live[..4].contains(&t) && t != addr(1), "{t}");
        }
        // Every reachable member has a round in flight: nowhere to go.
        assert_eq!(
            route_round(&live, held, &mut rounds, addr(6), now, &mut rng),
            None
        );
        // Answers free them again.
        rounds.clear();
        assert!(route_round(&live, held, &mut rounds, addr(6), now, &mut rng).is_some());
    }

    #[test]
    fn large_meshes_send_a_share_of_rounds() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let now = Instant::now();
        let live: Vec<SocketAddr> = (0..2 * FULL_RATE_MEMBERS).map(addr).collect();
        let mut sent = 0;
        for _ in 0..2000 {
            let mut rounds = HashMap::new();
            if route_round(&live, |_| false, &mut rounds, addr(0), now, &mut rng).is_some() {
                sent += 1;
            }
        }
        // Half of them, give or take.
        assert!((850..1150).contains(&sent), "{sent}");
        // A small mesh sends every round.
        let small: Vec<SocketAddr> = (0..FULL_RATE_MEMBERS).map(addr).collect();
        for i in 0..100 {
            let mut rounds = HashMap::new();
            assert!(
                route_round(&small, |_| false, &mut rounds, addr(i % 10), now, &mut rng).is_some()
            );
        }
    }
}
