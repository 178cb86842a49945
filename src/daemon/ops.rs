//! The operations side of the daemon: `meshpeer ping` and `netcheck`
//! (control requests), the metrics endpoint, configuration reloads
//! (SIGHUP), what happens on stop, and the firewall notice at start.
//!
//! Kept apart from the protocol core: everything here reads the node's
//! state (or the status snapshot) and answers; nothing decides membership,
//! liveness or paths.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::{DaemonConfig, Node};
use crate::config::OnStop;
use crate::control::{
    NetcheckReport, Pending, PingReply, Reply, StunAnswer, DEFAULT_PING_TIMEOUT, MAX_PING_TIMEOUT,
};
use crate::liveness::Probe;
use crate::metrics::MetricsServer;
use crate::status::{MemberState, Status};

/// Pings of `meshpeer ping` in flight: nonce -> where to report the answer
/// (who answered, when). Probe answers carrying one of these nonces go here
/// instead of to the liveness core (`probes.rs`).
#[derive(Clone, Default)]
pub struct PingWaiters(Arc<Mutex<HashMap<u64, PongSlot>>>);

/// Where one ping's answer goes: who answered, and when.
type PongSlot = oneshot::Sender<(Ipv4Addr, Instant)>;

impl PingWaiters {
    fn add(&self, nonce: u64) -> oneshot::Receiver<(Ipv4Addr, Instant)> {
        let (tx, rx) = oneshot::channel();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce, tx);
        rx
    }

    fn remove(&self, nonce: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nonce);
    }

    /// A probe answer with `nonce` from `from`: true if it was a ping's.
    pub fn answered(&self, nonce: u64, from: Ipv4Addr) -> bool {
        let waiter = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if map.is_empty() {
                return false;
            }
            map.remove(&nonce)
        };
        match waiter {
            Some(tx) => {
                let _ = tx.send((from, Instant::now()));
                true
            }
            None => false,
        }
    }
}

/// The daemon's operations state (a field of [`Node`]).
#[derive(Default)]
pub(super) struct Ops {
    metrics: Option<MetricsServer>,
}

impl Ops {
    /// Starts the metrics endpoint if configured (an address that cannot be
    /// bound is an error at start).
    pub(super) async fn start(
        cfg: &DaemonConfig,
        status: &watch::Receiver<Option<Status>>,
    ) -> anyhow::Result<Ops> {
        let metrics = match cfg.metrics_addr {
            None => None,
            Some(addr) => Some(start_metrics(addr, status).await?),
        };
        Ok(Ops { metrics })
    }
}

async fn start_metrics(
    addr: SocketAddr,
    status: &watch::Receiver<Option<Status>>,
) -> anyhow::Result<MetricsServer> {
    let srv = MetricsServer::start(addr, status.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr} (--metrics-addr): {e}"))?;
    tracing::info!(addr = %srv.addr, "serving Prometheus metrics at http://{}/metrics", srv.addr);
    Ok(srv)
}

/// The next configuration sent for a reload (SIGHUP); never resolves when
/// there is no reload channel or its sender is gone.
pub(super) async fn next_reload(
    reload: &mut Option<watch::Receiver<DaemonConfig>>,
) -> DaemonConfig {
    if let Some(rx) = reload {
        if rx.changed().await.is_ok() {
            return rx.borrow_and_update().clone();
        }
    }
    *reload = None;
    std::future::pending().await
}

/// Tells the operator which ports to open (printed once at start, whatever
/// the log level: it is what a firewall needs).
pub(super) fn firewall_notice(cfg: &DaemonConfig, wg_port: u16, public: bool) {
    let metrics = match cfg.metrics_addr {
        Some(a) if !a.ip().is_loopback() => {
            format!("; metrics {}/tcp on {} (scrapers only)", a.port(), a.ip())
        }
        _ => String::new(),
    };
    let probes = format!(
        "liveness probes use {}/udp on the overlay interface {} only",
        cfg.probe_port, cfg.interface
    );
    let relay = if cfg.relay {
        format!(
            ", {}-{}/udp (relay allocations)",
            cfg.relay_ports.0, cfg.relay_ports.1
        )
    } else {
        String::new()
    };
    let ports = format!(
        "{wg_port}/udp (WireGuard), {}/udp (gossip){relay}",
        cfg.gossip_port
    );
    if public {
        eprintln!("meshpeer: firewall: open {ports} inbound on this node{metrics}; {probes}");
    } else {
        eprintln!(
            "meshpeer: firewall: this node looks behind NAT: nothing needs opening inbound (it uses {ports}{metrics}); {probes}"
        );
    }
}

impl Node {
    /// A control request of the operations side.
    /// Sends one liveness probe to `member` from a task of its own and
    /// answers with the round trip and the path; the loop does not wait.
    pub(super) fn ping(&mut self, member: String, timeout_ms: Option<u64>, reply: Pending) {
        let snapshot = self.status.borrow().clone();
        let target = match snapshot {
            None => Err("starting up (joining the mesh or creating the interface)".to_string()),
            Some(s) => find_member(&s, &member).map(|m| (m.name.clone(), m.overlay_ip, m.state)),
        };
        let probes = self.probes.as_ref().map(|p| p.handle());
        let waiters = self.probe_shared.pings.clone();
        let summary = *self
            .probe_shared
            .summary
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let status = self.status.subscribe();
        let timeout = timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_PING_TIMEOUT)
            .min(MAX_PING_TIMEOUT);
        tokio::spawn(async move {
            let (name, ip) = match target {
                Err(message) => return reply.answer(Reply::Error { message }).await,
                Ok((name, _, MemberState::Myself)) => {
                    return reply
                        .answer(Reply::Error {
                            message: format!("{name} is this node"),
                        })
                        .await
                }
                Ok((name, ip, _)) => (name, ip),
            };
            let Some((sock, port)) = probes else {
                return reply
                    .answer(Reply::Error {
                        message: "the liveness probe socket is not bound (see the daemon's log)"
                            .into(),
                    })
                    .await;
            };
            let nonce: u64 = rand::random();
            let answer = waiters.add(nonce);
            let probe = Probe::Ping {
                nonce,
                summary,
                proof_for: None,
            };
            let sent = Instant::now();
            if let Err(e) = sock
                .send_to(&probe.encode(), SocketAddrV4::new(ip, port))
                .await
            {
                waiters.remove(nonce);
                return reply
                    .answer(Reply::Error {
                        message: format!("cannot send a probe to {name} ({ip}): {e}"),
                    })
                    .await;
            }
            let rtt = match tokio::time::timeout(timeout, answer).await {
                Ok(Ok((from, at))) if from == ip => Some(at.saturating_duration_since(sent)),
                _ => None,
            };
            waiters.remove(nonce);
            // The path as `status` shows it now.
            let snap = status.borrow().clone();
            let m = snap.as_ref().and_then(|s| {
                s.members
                    .iter()
                    .find(|m| m.overlay_ip == ip && m.name == name)
                    .cloned()
            });
            let r = match m {
                None => Reply::Error {
                    message: format!("{name} is no longer a member"),
                },
                Some(m) => Reply::Pong(Box::new(PingReply {
                    name: m.name,
                    node_id: m.node_id,
                    overlay_ip: m.overlay_ip,
                    rtt_us: rtt.map(|d| d.as_micros().max(1) as u64),
                    state: m.state,
                    path: m.path,
                    relay: m.relay,
                    endpoint: m.endpoint,
                    why_not_direct: m.why_not_direct,
                })),
            };
            reply.answer(r).await;
        });
    }

    /// This node's NAT picture and the STUN answers behind it.
    pub(super) fn netcheck(&self) -> NetcheckReport {
        let now = Instant::now();
        let mut answers: Vec<StunAnswer> = self
            .traversal
            .stun_answers()
            .map(|(server, mapped, at)| StunAnswer {
                server: server.to_string(),
                member: self
                    .membership
                    .members()
                    .find(|m| {
                        m.record.endpoints.contains(&server)
                            || SocketAddr::new(m.record.gossip_addr.ip(), m.record.wg_port)
                                == server
                    })
                    .map(|m| m.record.name.clone()),
                mapped: mapped.to_string(),
                age_secs: now.saturating_duration_since(at).as_secs(),
            })
            .collect();
        answers.sort_by(|a, b| a.server.cmp(&b.server));
        NetcheckReport {
            nat: super::status::nat_name(self.traversal.nat.kind).to_string(),
            mapped_endpoints: self
                .traversal
                .nat
                .mapped
                .iter()
                .map(|e| e.to_string())
                .collect(),
            advertise_addr: self.advertise.to_string(),
            wg_port: self.cfg.wg_port(),
            gossip_port: self.cfg.gossip_port,
            relaying: self.relays(),
            stun_servers: self.cfg.stun_servers.clone(),
            answers,
        }
    }

    /// A new configuration (SIGHUP): applies what can change at run time
    /// (tags, metrics address, on-stop), and says what needs a restart.
    pub(super) async fn reload(&mut self, new: DaemonConfig) {
        let mut applied: Vec<&str> = Vec::new();
        let old = self.cfg.clone();
        if new.tags != old.tags {
            self.cfg.tags = new.tags.clone();
            match self.republish(false).await {
                Ok(()) => applied.push("tags"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot publish the new tags; keeping the old ones");
                    self.cfg.tags = old.tags.clone();
                }
            }
        }
        if new.metrics_addr != old.metrics_addr {
            // The old endpoint goes first: the new one may take its port.
            self.ops.metrics = None;
            self.cfg.metrics_addr = None;
            match new.metrics_addr {
                None => applied.push("metrics_addr (off)"),
                Some(addr) => {
                    let rx = self.status.subscribe();
                    match start_metrics(addr, &rx).await {
                        Ok(srv) => {
                            self.ops.metrics = Some(srv);
                            self.cfg.metrics_addr = Some(addr);
                            applied.push("metrics_addr");
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "metrics are off"),
                    }
                }
            }
        }
        if new.on_stop != old.on_stop {
            self.cfg.on_stop = new.on_stop;
            applied.push("on_stop");
        }
        if new.advertise_routes != old.advertise_routes {
            self.cfg.advertise_routes = new.advertise_routes.clone();
            match self.republish(false).await {
                Ok(()) => applied.push("advertise_routes"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot publish the new routes; keeping the old ones");
                    self.cfg.advertise_routes = old.advertise_routes.clone();
                }
            }
        }
        let mut restart: Vec<&str> = Vec::new();
        if new.state_dir != old.state_dir {
            restart.push("state_dir");
        }
        if new.interface != old.interface {
            restart.push("interface");
        }
        if new.wg_port.is_some_and(|p| Some(p) != old.wg_port) {
            restart.push("wg_port");
        }
        if new.gossip_port != old.gossip_port {
            restart.push("gossip_port");
        }
        if new.probe_port != old.probe_port {
            restart.push("probe_port");
        }
        if new.advertise.is_some() && new.advertise != old.advertise {
            restart.push("advertise_addr");
        }
        if new.backend != old.backend {
            restart.push("backend");
        }
        if new.down_grace != old.down_grace {
            restart.push("down_grace_secs");
        }
        if new.relay != old.relay {
            restart.push("no_relay");
        }
        if new.relay_ports != old.relay_ports {
            restart.push("relay_ports");
        }
        if new.stun_servers != old.stun_servers {
            restart.push("stun_servers");
        }
        if new.hosts_file != old.hosts_file {
            restart.push("hosts_file");
        }
        if new.ephemeral != old.ephemeral {
            restart.push("ephemeral");
        }
        if restart.is_empty() {
            tracing::info!(applied = ?applied, "configuration reloaded");
        } else {
            tracing::warn!(applied = ?applied, needs_restart = ?restart,
                "configuration reloaded; some changes take effect only at the next start");
        }
    }

    /// The daemon was told to stop: leave the mesh first if so configured.
    pub(super) async fn on_stop(&mut self) {
        match self.cfg.on_stop {
            OnStop::Stay => tracing::info!(
                "shutting down, staying a member (members will mark this node down until it is back)"
            ),
            OnStop::Leave => {
                if self.cfg.ephemeral {
                    tracing::info!("shutting down and leaving the mesh (ephemeral node)");
                } else {
                    tracing::info!("shutting down and leaving the mesh (--on-stop leave)");
                }
                self.leave().await;
            }
        }
    }
}

/// A member of `s` by name, node id (or its start) or overlay address.
fn find_member<'a>(s: &'a Status, who: &str) -> Result<&'a crate::status::MemberStatus, String> {
    let who = who.trim();
    if who.is_empty() {
        return Err("which member? give a name, node id or overlay address".into());
    }
    if let Some(m) = s.members.iter().find(|m| m.name == who) {
        return Ok(m);
    }
    if let Ok(ip) = who.parse::<Ipv4Addr>() {
        if let Some(m) = s.members.iter().find(|m| m.overlay_ip == ip) {
            return Ok(m);
        }
    }
    let by_id: Vec<_> = s
        .members
        .iter()
        .filter(|m| who.len() >= 4 && m.node_id.starts_with(who))
        .collect();
    match by_id.as_slice() {
        [m] => Ok(m),
        [] => Err(format!(
            "no member {who:?} (names: {})",
            s.members
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => Err(format!(
            "{who:?} names more than one member; give more of the node id"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_waiters_take_only_their_nonces() {
        let w = PingWaiters::default();
        assert!(!w.answered(1, Ipv4Addr::LOCALHOST));
        let mut rx = w.add(7);
        assert!(!w.answered(8, Ipv4Addr::LOCALHOST));
        assert!(w.answered(7, Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(rx.try_recv().unwrap().0, Ipv4Addr::new(10, 0, 0, 2));
        // Each nonce counts once.
        assert!(!w.answered(7, Ipv4Addr::LOCALHOST));
    }
}
