//! The liveness probe socket (proto/PROTOCOL.md §5.2): UDP on the overlay
//! address only, so probes and answers travel inside WireGuard sessions.
//! Answers pings from members' overlay addresses (rate-limited per source)
//! and hands answers to the daemon, which feeds them to the liveness core.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::liveness::{Probe, Summary, MAX_PROBE_BYTES};

/// Pings answered per second from one source.
const RATE_PER_SOURCE: u32 = 20;

/// An answer to one of our pings: (from, nonce, their summary, when it
/// arrived: the loop may handle it later, after a long step).
pub type Ack = (Ipv4Addr, u64, Summary, Instant);

/// What the socket task needs to answer pings.
#[derive(Clone, Default)]
pub struct Shared {
    /// Overlay addresses of the members we hold: only they are answered.
    pub members: Arc<RwLock<HashSet<Ipv4Addr>>>,
    /// Our gossip summary, carried by answers.
    pub summary: Arc<Mutex<Summary>>,
    /// Pings of `meshpeer ping` waiting for their answers (`ops.rs`).
    pub pings: super::ops::PingWaiters,
}

pub struct ProbeSocket {
    sock: Arc<UdpSocket>,
    task: JoinHandle<()>,
    pub ip: Ipv4Addr,
    port: u16,
}

impl ProbeSocket {
    /// Binds `ip:port` (our overlay address) and answers pings from members.
    pub async fn bind(
        ip: Ipv4Addr,
        port: u16,
        shared: Shared,
        acks: mpsc::Sender<Ack>,
    ) -> std::io::Result<Self> {
        let sock = Arc::new(UdpSocket::bind(SocketAddrV4::new(ip, port)).await?);
        let task = tokio::spawn(serve(sock.clone(), shared, acks));
        Ok(ProbeSocket {
            sock,
            task,
            ip,
            port,
        })
    }

    /// The socket and the members' probe port (`meshpeer ping` sends
    /// from a task of its own).
    pub fn handle(&self) -> (Arc<UdpSocket>, u16) {
        (self.sock.clone(), self.port)
    }

    /// Sends a probe to `to`'s probe port.
    pub async fn send(&self, to: Ipv4Addr, probe: &Probe) {
        let bytes = probe.encode();
        if let Err(e) = self
            .sock
            .send_to(&bytes, SocketAddrV4::new(to, self.port))
            .await
        {
            tracing::trace!(%to, error = %e, "probe not sent");
        }
    }
}

impl Drop for ProbeSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(sock: Arc<UdpSocket>, shared: Shared, acks: mpsc::Sender<Ack>) {
    let mut buf = vec![0u8; MAX_PROBE_BYTES + 1];
    // Per source: (window start, pings answered in it).
    let mut rate: HashMap<Ipv4Addr, (Instant, u32)> = HashMap::new();
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "probe socket receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let src = *from.ip();
        let probe = match Probe::decode(&buf[..n]) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%src, error = %e, "dropped a malformed probe");
                continue;
            }
        };
        match probe {
            Probe::Ping { nonce, .. } => {
                let member = shared
                    .members
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&src);
                if !member {
                    continue;
                }
                let now = Instant::now();
                if rate.len() > 4096 {
                    rate.retain(|_, (t, _)| now.saturating_duration_since(*t).as_secs() < 1);
                }
                let e = rate.entry(src).or_insert((now, 0));
                if now.saturating_duration_since(e.0).as_secs() >= 1 {
                    *e = (now, 0);
                }
                e.1 += 1;
                if e.1 > RATE_PER_SOURCE {
                    continue;
                }
                let summary = *shared.summary.lock().unwrap_or_else(|p| p.into_inner());
                let ack = Probe::Ack {
                    nonce,
                    summary,
                    proof: None,
                };
                let _ = sock.send_to(&ack.encode(), from).await;
            }
            Probe::Ack { nonce, summary, .. } => {
                if shared.pings.answered(nonce, src) {
                    continue;
                }
                let _ = acks.try_send((src, nonce, summary, Instant::now()));
            }
        }
    }
}
