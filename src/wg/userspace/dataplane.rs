//! Packet paths: TUN → peer → UDP, UDP → peer → TUN, and the timers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tokio::net::UdpSocket;

use super::device::{read, Shared};
use super::peer::{lock, passive_keepalive_due, Peer};
use super::uapi::is_wireguard_message;

/// Largest IP packet handled (TUN reads are one packet each).
const MAX_PACKET: usize = 65535;
/// Room for the WireGuard data header and tag (32 bytes) and for handshake
/// messages (148 bytes).
const OUT_BUF: usize = MAX_PACKET + 256;
/// Period of the timer task with few peers (boringtun's device uses 250 ms);
/// see [`timer_period`].
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Up to this many peers the timer task runs every [`TIMER_TICK`]; above,
/// its period grows in proportion, up to [`MAX_TIMER_TICK`].
const TIMER_PEERS: usize = 40;
const MAX_TIMER_TICK: Duration = Duration::from_secs(1);

/// The timer task's period for `peers` peers. Each run visits every peer
/// (`Tunn::update_timers`, keepalives), so at hundreds of peers a fixed
/// 250 ms makes the idle cost of a node grow with the mesh. WireGuard's
/// timers are seconds long (retry 5 s, keepalive 10 s, rekey 120 s), so a
/// coarser run only makes them fire up to a second late.
fn timer_period(peers: usize) -> Duration {
    if peers <= TIMER_PEERS {
        return TIMER_TICK;
    }
    (TIMER_TICK * peers as u32 / TIMER_PEERS as u32).min(MAX_TIMER_TICK)
}

/// TUN → longest-prefix match → encapsulate → UDP.
pub(crate) async fn tun_loop(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; OUT_BUF];
    let mut errors = 0u32;
    loop {
        let n = match shared.tun.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                errors += 1;
                if errors == 1 || errors % 1000 == 0 {
                    tracing::warn!(ifname = %shared.ifname, error = %e, "TUN read failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        errors = 0;
        let packet = &buf[..n];
        let Some(dst) = Tunn::dst_address(packet) else {
            continue;
        };
        let send = {
            let st = read(&shared.state);
            let Some(peer) = st.routes.lookup(dst) else {
                tracing::trace!(%dst, "no peer for destination, dropped");
                continue;
            };
            let mut inner = lock(&peer.inner);
            let inner = &mut *inner;
            if inner.endpoint.is_none() {
                // Nowhere to send: do not start a handshake (two X25519
                // operations) whose initiation would be dropped anyway.
                tracing::trace!(peer = %peer.short_key(), "peer has no endpoint, dropped");
                continue;
            }
            let Some(tunn) = inner.tunn.as_mut() else {
                continue;
            };
            match tunn.encapsulate(packet, &mut out) {
                TunnResult::WriteToNetwork(b) => {
                    let len = b.len();
                    match inner.endpoint {
                        Some(ep) => {
                            inner.stats.tx_bytes += len as u64;
                            let now = Instant::now();
                            inner.last_traversal = Some(now);
                            inner.tx_at = Some(now);
                            st.bound
                                .as_ref()
                                .and_then(|b| b.for_addr(&ep).cloned())
                                .map(|sock| (sock, ep, len))
                        }
                        None => {
                            tracing::trace!(peer = %peer.short_key(), "peer has no endpoint, dropped");
                            None
                        }
                    }
                }
                TunnResult::Err(e) => {
                    tracing::trace!(peer = %peer.short_key(), error = ?e, "encapsulate failed");
                    None
                }
                _ => None,
            }
        };
        if let Some((sock, ep, len)) = send {
            tracing::trace!(%dst, to = %ep, len, "sent");
            if let Err(e) = sock.send_to(&out[..len], ep).await {
                tracing::trace!(to = %ep, error = %e, "UDP send failed");
            }
        }
    }
}

/// What to do with a received datagram once the locks are released.
enum Action {
    None,
    /// Write `out[..len]` to the TUN.
    ToTun(usize),
    /// Send these datagrams back to the source.
    Reply(Vec<Vec<u8>>),
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Kind {
    Init,
    Response,
    Cookie,
    Data,
}

/// UDP → peer lookup → decapsulate → allowed-IPs check → TUN.
pub(crate) async fn udp_loop(shared: Arc<Shared>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; OUT_BUF];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let data = &buf[..n];
        if !is_wireguard_message(data) {
            forward_raw(&shared, from, data);
            continue;
        }
        match handle_datagram(&shared, from, data, &mut out) {
            Action::None => {}
            Action::ToTun(len) => {
                if let Err(e) = shared.tun.send(&out[..len]).await {
                    tracing::trace!(error = %e, "TUN write failed");
                }
            }
            Action::Reply(packets) => {
                for p in packets {
                    if let Err(e) = sock.send_to(&p, from).await {
                        tracing::trace!(to = %from, error = %e, "UDP send failed");
                    }
                }
            }
        }
    }
}

fn forward_raw(shared: &Shared, from: SocketAddr, data: &[u8]) {
    let mut slot = lock(&shared.raw_tx);
    if let Some(tx) = slot.as_ref() {
        match tx.try_send((from, data.to_vec())) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                tracing::trace!(%from, "raw datagram subscriber full, dropped");
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => *slot = None,
        }
    } else {
        tracing::trace!(%from, len = data.len(), "non-WireGuard datagram dropped");
    }
}

fn handle_datagram(shared: &Shared, from: SocketAddr, data: &[u8], out: &mut [u8]) -> Action {
    let st = read(&shared.state);
    let Some(key) = st.key.as_ref() else {
        return Action::None;
    };
    // MAC1 check and handshake rate limiting before any expensive work.
    let packet = match key.front_limiter.verify_packet(Some(from.ip()), data, out) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            tracing::debug!(%from, "under load, sending cookie reply");
            return Action::Reply(vec![cookie.to_vec()]);
        }
        Err(_) => return Action::None,
    };
    let (peer, kind): (Option<&Arc<Peer>>, Kind) = match &packet {
        Packet::HandshakeInit(p) => (
            parse_handshake_anon(&key.secret, &key.public, p)
                .ok()
                .and_then(|h| st.peers.get(&h.peer_static_public)),
            Kind::Init,
        ),
        Packet::HandshakeResponse(p) => (st.by_index.get(&(p.receiver_idx >> 8)), Kind::Response),
        Packet::PacketCookieReply(p) => (st.by_index.get(&(p.receiver_idx >> 8)), Kind::Cookie),
        Packet::PacketData(p) => (st.by_index.get(&(p.receiver_idx >> 8)), Kind::Data),
    };
    let Some(peer) = peer else {
        tracing::trace!(%from, "no peer for datagram, dropped");
        return Action::None;
    };
    let mut inner = lock(&peer.inner);
    let inner = &mut *inner;
    let Some(tunn) = inner.tunn.as_mut() else {
        return Action::None;
    };
    let action = match tunn.decapsulate(Some(from.ip()), data, out) {
        TunnResult::Done => Action::None,
        TunnResult::Err(e) => {
            tracing::trace!(peer = %peer.short_key(), %from, error = ?e, "decapsulate failed");
            return Action::None;
        }
        TunnResult::WriteToNetwork(b) => {
            let mut packets = vec![b.to_vec()];
            // Flush packets queued while the handshake was pending, but not
            // after answering an initiation: as responder we have no current
            // session until the initiator's first data packet arrives, so
            // boringtun would "flush" by starting a handshake of its own.
            // When both ends have packets queued (a simultaneous punch),
            // each answer then brings a new initiation from the other side,
            // and the two ping-pong handshakes for seconds.
            if kind != Kind::Init {
                while let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], out) {
                    packets.push(b.to_vec());
                }
            }
            if matches!(kind, Kind::Init | Kind::Response) {
                inner.stats.last_handshake = Some(SystemTime::now());
                tracing::debug!(peer = %peer.short_key(), %from, "handshake completed");
            }
            let sent: usize = packets.iter().map(Vec::len).sum();
            inner.stats.tx_bytes += sent as u64;
            inner.tx_at = Some(Instant::now());
            Action::Reply(packets)
        }
        TunnResult::WriteToTunnelV4(p, src) => {
            let len = p.len();
            inner.rx_data_at = Some(Instant::now());
            check_source(&st.routes, peer, src.into(), len)
        }
        TunnResult::WriteToTunnelV6(p, src) => {
            let len = p.len();
            inner.rx_data_at = Some(Instant::now());
            check_source(&st.routes, peer, src.into(), len)
        }
    };
    if kind != Kind::Cookie {
        inner.stats.rx_bytes += data.len() as u64;
        inner.last_traversal = Some(Instant::now());
        if inner.endpoint != Some(from) {
            tracing::debug!(peer = %peer.short_key(), old = ?inner.endpoint, new = %from, "endpoint roamed");
            inner.endpoint = Some(from);
        }
    }
    action
}

/// Cryptokey routing on receive: the source must route back to this peer.
fn check_source(
    routes: &super::allowed_ips::AllowedIps<Arc<Peer>>,
    peer: &Arc<Peer>,
    src: std::net::IpAddr,
    len: usize,
) -> Action {
    match routes.lookup(src) {
        Some(p) if Arc::ptr_eq(p, peer) => {
            tracing::trace!(peer = %peer.short_key(), %src, len, "received");
            Action::ToTun(len)
        }
        _ => {
            tracing::trace!(peer = %peer.short_key(), %src, "source not in allowed IPs, dropped");
            Action::None
        }
    }
}

/// Every [`timer_period`]: rate-limiter reset, `Tunn::update_timers` for
/// every peer (handshake retries, rekeys, passive keepalives) and persistent
/// keepalives.
pub(crate) async fn timer_loop(shared: Arc<Shared>) {
    let mut out = vec![0u8; OUT_BUF];
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sends: Vec<(Arc<UdpSocket>, SocketAddr, Vec<u8>)> = Vec::new();
    loop {
        tick.tick().await;
        {
            let st = read(&shared.state);
            let period = timer_period(st.peers.len());
            if period != tick.period() {
                tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            }
            if let Some(k) = &st.key {
                k.front_limiter.reset_count();
            }
            for peer in st.peers.values() {
                let mut inner = lock(&peer.inner);
                let inner = &mut *inner;
                if inner.endpoint.is_none() {
                    // No endpoint means no session (a session's endpoint is
                    // where its packets came from): nothing to retry, and
                    // an initiation could not be sent.
                    continue;
                }
                let Some(tunn) = inner.tunn.as_mut() else {
                    continue;
                };
                let mut packet = match tunn.update_timers(&mut out) {
                    TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
                    TunnResult::Err(WireGuardError::ConnectionExpired) => None,
                    TunnResult::Err(e) => {
                        tracing::trace!(peer = %peer.short_key(), error = ?e, "timer error");
                        None
                    }
                    _ => None,
                };
                let ka = inner.persistent_keepalive;
                let due = inner.keepalive_now
                    || inner
                        .last_traversal
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(ka.into()));
                // WireGuard's passive keepalive, on exact times (see
                // `passive_keepalive_due`: boringtun's misses answers and
                // acknowledgements that fall within one timer run).
                if packet.is_none()
                    && tunn.time_since_last_handshake().is_some()
                    && passive_keepalive_due(Instant::now(), inner.rx_data_at, inner.tx_at)
                {
                    if let TunnResult::WriteToNetwork(b) = tunn.encapsulate(&[], &mut out) {
                        tracing::trace!(peer = %peer.short_key(), "passive keepalive");
                        packet = Some(b.to_vec());
                    }
                }
                if packet.is_none() && ka > 0 && due {
                    inner.last_traversal = Some(Instant::now());
                    inner.keepalive_now = false;
                    // Without a session, start a handshake rather than queue
                    // an empty packet (which would pile up in `Tunn`'s queue).
                    let res = if tunn.time_since_last_handshake().is_some() {
                        tunn.encapsulate(&[], &mut out)
                    } else {
                        tunn.format_handshake_initiation(&mut out, false)
                    };
                    if let TunnResult::WriteToNetwork(b) = res {
                        tracing::trace!(peer = %peer.short_key(), "persistent keepalive");
                        packet = Some(b.to_vec());
                    }
                }
                let (Some(packet), Some(ep)) = (packet, inner.endpoint) else {
                    continue;
                };
                if let Some(sock) = st.bound.as_ref().and_then(|b| b.for_addr(&ep)) {
                    inner.stats.tx_bytes += packet.len() as u64;
                    inner.tx_at = Some(Instant::now());
                    sends.push((Arc::clone(sock), ep, packet));
                }
            }
        }
        for (sock, ep, packet) in sends.drain(..) {
            if let Err(e) = sock.send_to(&packet, ep).await {
                tracing::trace!(to = %ep, error = %e, "UDP send failed");
            }
        }
    }
}

#[cfg(test)]
mod timer_tests {
    use super::*;

    #[test]
    fn timer_period_stretches_with_peers_and_is_bounded() {
        assert_eq!(timer_period(0), TIMER_TICK);
        assert_eq!(timer_period(TIMER_PEERS), TIMER_TICK);
        assert_eq!(timer_period(2 * TIMER_PEERS), 2 * TIMER_TICK);
        assert_eq!(timer_period(10_000), MAX_TIMER_TICK);
        assert!(timer_period(TIMER_PEERS + 1) > TIMER_TICK);
    }
}
