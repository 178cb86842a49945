//! Prometheus metrics (`--metrics-addr IP:PORT`, `GET /metrics`).
//!
//! Everything is read from the status snapshot the daemon publishes (the
//! `watch` channel `daemon::run` feeds every few seconds and on every
//! change), so a scrape never waits on the daemon's loop. The text is the
//! Prometheus exposition format 0.0.4, written by `prometheus-client`; the
//! HTTP side is hyper's HTTP/1 server.
//!
//! Metrics (all prefixed `meshpeer_`; `peer` is the member's name):
//!
//! | metric | type | |
//! |---|---|---|
//! | `info{node,network,backend,nat,version,wire_version}` | gauge (1) | this node |
//! | `members{state}` | gauge | members per state: self, connected, idle, connecting, down |
//! | `peer_handshake_age_seconds{peer}` | gauge | age of the last WireGuard handshake (peers that had one) |
//! | `peer_rtt_seconds{peer}` | gauge | round trip of the last liveness probe answer |
//! | `peer_receive_bytes_total{peer}`, `peer_transmit_bytes_total{peer}` | counter | WireGuard bytes (reset when the peer is re-added) |
//! | `peer_path{peer,path}` | gauge (0/1) | the path in use: direct, relayed, trying |
//! | `peer_relay{peer,relay}` | gauge (1) | the relay a relayed peer goes through |
//! | `relaying` | gauge (0/1) | this node relays for others |
//! | `relayed_peers` | gauge | members this node reaches through a relay |
//! | `relay_allocations`, `relay_forwarded_datagrams`, `relay_dropped_datagrams` | gauge | relay use: pairs allocated now, datagrams forwarded and dropped by the current allocations |
//! | `gossip_sent_bytes_total`, `gossip_received_bytes_total` | counter | gossip (QUIC) payload bytes |
//! | `gossip_rounds_total`, `gossip_rounds_in_sync_total` | counter | rounds started, and those that found the other side in sync |
//! | `gossip_connections` | gauge | open QUIC connections (gossip, joins, relay requests) |
//! | `gossip_values_stored_total`, `gossip_values_rejected_total` | counter | values stored from others, refused by validation |
//! | `loop_wakeups_total` | counter | times the daemon's event loop woke up (a few a second at rest; more means something spins) |
//! | `loop_steps_total` | counter | steps the daemon ran (membership, paths, WireGuard, what to publish) |
//! | `loop_step_seconds_total` | counter | wall time of those steps (a loaded machine shows here first) |
//! | `routes_installed` | gauge | members' subnets routed through the mesh interface here |
//! | `routes_refused` | gauge | advertised subnets (members' and our own) this node refuses |
//! | `mesh_converged` | gauge (0/1) | see [`converged`] |
//! | `mesh_unconverged_seconds` | gauge | 0 while converged, else the time since the mesh stopped being converged (or since the daemon started, if it never was) |
//! | `status_age_seconds` | gauge | age of the snapshot served |
//! | `ready` | gauge (0/1) | 0 while the daemon is still joining (no snapshot yet) |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::status::{MemberState, Status};

/// The states `members{state}` reports (each always present, 0 if none).
pub const STATES: [MemberState; 5] = [
    MemberState::Myself,
    MemberState::Connected,
    MemberState::Idle,
    MemberState::Connecting,
    MemberState::Down,
];

/// The paths `peer_path{path}` reports.
pub const PATHS: [&str; 3] = ["direct", "relayed", "trying"];

/// How long one HTTP connection may take in all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the mesh, as this node sees it, has converged: no member is
/// `connecting` (every other member is connected or idle, i.e. has a
/// working path, or is down, i.e. liveness settled that it is gone).
pub fn converged(status: &Status) -> bool {
    !status
        .members
        .iter()
        .any(|m| m.state == MemberState::Connecting)
}

/// Tracks convergence over the snapshots seen.
#[derive(Debug, Clone)]
pub struct Convergence {
    started: Instant,
    converged: bool,
    /// When the mesh last went from converged to not converged.
    broke_at: Option<Instant>,
}

impl Convergence {
    pub fn new(now: Instant) -> Self {
        Convergence {
            started: now,
            converged: false,
            broke_at: None,
        }
    }

    /// A new snapshot (or none yet: still joining).
    pub fn observe(&mut self, now: Instant, status: Option<&Status>) {
        let c = status.is_some_and(converged);
        if self.converged && !c {
            self.broke_at = Some(now);
        }
        self.converged = c;
    }

    pub fn is_converged(&self) -> bool {
        self.converged
    }

    /// 0 while converged; else the time since it stopped being converged,
    /// or since the start if it never was.
    pub fn unconverged_for(&self, now: Instant) -> Duration {
        if self.converged {
            Duration::ZERO
        } else {
            now.saturating_duration_since(self.broke_at.unwrap_or(self.started))
        }
    }
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Gauges of seconds (fractions).
type Seconds = Gauge<f64, std::sync::atomic::AtomicU64>;

fn seconds_family() -> Family<Labels, Seconds> {
    Family::default()
}

fn seconds(v: f64) -> Seconds {
    let g = Seconds::default();
    g.set(v);
    g
}

/// Gauges of counts and 0/1 flags.
fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

fn flag(b: bool) -> Gauge {
    gauge(i64::from(b))
}

/// A counter of seconds (fractions).
fn seconds_counter(v: f64) -> Counter<f64, std::sync::atomic::AtomicU64> {
    let c = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    c.inc_by(v);
    c
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

/// The metrics text for a snapshot (`None`: still joining) taken
/// `status_age` ago.
pub fn render(
    status: Option<&Status>,
    convergence: &Convergence,
    now: Instant,
    status_age: Duration,
) -> String {
    let mut reg = Registry::with_prefix("meshpeer");
    reg.register(
        "ready",
        "1 once the daemon has joined and publishes status, 0 while it is starting",
        flag(status.is_some()),
    );
    let Some(s) = status else {
        return encode(&reg);
    };
    let info = gauge_family();
    info.get_or_create(&labels(&[
        ("node", &s.node),
        ("network", &s.network),
        (
            "backend",
            match s.backend {
                crate::wg::BackendKind::Kernel => "kernel",
                crate::wg::BackendKind::Userspace => "userspace",
            },
        ),
        ("nat", &s.nat),
        ("version", env!("CARGO_PKG_VERSION")),
        ("wire_version", &crate::proto::WIRE_VERSION.to_string()),
    ]))
    .set(1);
    reg.register("info", "This node (value 1)", info);

    let members = gauge_family();
    for st in STATES {
        let n = s.members.iter().filter(|m| m.state == st).count();
        members
            .get_or_create(&labels(&[("state", st.as_str())]))
            .set(n as i64);
    }
    reg.register(
        "members",
        "Members of the mesh as this node sees them, per state",
        members,
    );

    let handshake = seconds_family();
    let rtt = seconds_family();
    let rx: Family<Labels, Counter> = Family::default();
    let tx: Family<Labels, Counter> = Family::default();
    let path = gauge_family();
    let relay = gauge_family();
    let mut relayed = 0u64;
    for m in s.members.iter().filter(|m| m.state != MemberState::Myself) {
        let peer = labels(&[("peer", &m.name)]);
        if let Some(a) = m.last_handshake_secs {
            handshake.get_or_create(&peer).set(a as f64);
        }
        if let Some(us) = m.rtt_us {
            rtt.get_or_create(&peer).set(us as f64 / 1e6);
        }
        rx.get_or_create(&peer).inc_by(m.rx_bytes);
        tx.get_or_create(&peer).inc_by(m.tx_bytes);
        if let Some(p) = &m.path {
            for want in PATHS {
                path.get_or_create(&labels(&[("peer", &m.name), ("path", want)]))
                    .set(i64::from(p == want));
            }
        }
        if let (Some("relayed"), Some(r)) = (m.path.as_deref(), &m.relay) {
            relayed += 1;
            relay
                .get_or_create(&labels(&[("peer", &m.name), ("relay", r)]))
                .set(1);
        }
    }
    reg.register_with_unit(
        "peer_handshake_age",
        "Age of the last WireGuard handshake with the peer",
        Unit::Seconds,
        handshake,
    );
    reg.register_with_unit(
        "peer_rtt",
        "Round trip of the last answered liveness probe to the peer, over the overlay",
        Unit::Seconds,
        rtt,
    );
    reg.register_with_unit(
        "peer_receive",
        "Bytes received from the peer through WireGuard",
        Unit::Bytes,
        rx,
    );
    reg.register_with_unit(
        "peer_transmit",
        "Bytes sent to the peer through WireGuard",
        Unit::Bytes,
        tx,
    );
    reg.register(
        "peer_path",
        "The path to the peer: 1 for the one in use (direct, relayed, trying)",
        path,
    );
    reg.register(
        "peer_relay",
        "The relay a relayed peer is reached through (value 1)",
        relay,
    );
    reg.register(
        "relaying",
        "1 if this node relays for members that cannot reach each other directly",
        flag(s.relaying),
    );
    reg.register(
        "relayed_peers",
        "Members this node reaches through a relay",
        gauge(relayed as i64),
    );
    reg.register(
        "relay_allocations",
        "Relayed pairs this node forwards for now (when relaying)",
        gauge(s.relay_allocations as i64),
    );
    reg.register(
        "relay_forwarded_datagrams",
        "Sealed datagrams forwarded by the current relay allocations",
        gauge(i64::try_from(s.relay_forwarded).unwrap_or(i64::MAX)),
    );
    reg.register(
        "relay_dropped_datagrams",
        "Datagrams dropped by the current relay allocations (wrong sender, over the rate)",
        gauge(i64::try_from(s.relay_dropped).unwrap_or(i64::MAX)),
    );
    reg.register(
        "routes_installed",
        "Members' subnets routed through the mesh interface here",
        gauge(s.routes_installed as i64),
    );
    let refused = s
        .members
        .iter()
        .flat_map(|m| &m.routes)
        .filter(|r| r.state == "refused")
        .count();
    reg.register(
        "routes_refused",
        "Advertised subnets (members' and this node's own) this node refuses",
        gauge(refused as i64),
    );

    reg.register_with_unit(
        "gossip_sent",
        "Gossip (QUIC) payload bytes sent",
        Unit::Bytes,
        counter(s.gossip_bytes_sent),
    );
    reg.register_with_unit(
        "gossip_received",
        "Gossip (QUIC) payload bytes received",
        Unit::Bytes,
        counter(s.gossip_bytes_received),
    );
    reg.register(
        "gossip_rounds",
        "Gossip rounds this node started",
        counter(s.gossip_rounds),
    );
    reg.register(
        "gossip_rounds_in_sync",
        "Gossip rounds that found the other side already in sync",
        counter(s.gossip_rounds_in_sync),
    );
    reg.register(
        "gossip_connections",
        "Open QUIC connections (gossip, joins, relay requests)",
        gauge(s.gossip_connections as i64),
    );
    reg.register(
        "loop_wakeups",
        "Times the daemon's event loop woke up",
        counter(s.loop_wakeups),
    );
    reg.register(
        "loop_steps",
        "Steps the daemon ran (membership, paths, WireGuard, what to publish)",
        counter(s.loop_steps),
    );
    reg.register(
        "loop_step_seconds",
        "Wall time the daemon's steps took",
        seconds_counter(s.loop_step_ms as f64 / 1000.0),
    );
    reg.register(
        "gossip_values_stored",
        "Gossip values stored from other members",
        counter(s.gossip_values_stored),
    );
    reg.register(
        "gossip_values_rejected",
        "Gossip values refused (failed validation)",
        counter(s.gossip_values_rejected),
    );

    reg.register(
        "mesh_converged",
        "1 when no member is connecting (every other member is connected, idle or down)",
        flag(convergence.is_converged()),
    );
    reg.register_with_unit(
        "mesh_unconverged",
        "0 while converged; else time since the mesh stopped being converged (or since start)",
        Unit::Seconds,
        seconds(convergence.unconverged_for(now).as_secs_f64()),
    );
    reg.register_with_unit(
        "status_age",
        "Age of the status snapshot these metrics come from",
        Unit::Seconds,
        seconds(status_age.as_secs_f64()),
    );
    encode(&reg)
}

fn encode(reg: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, reg);
    out
}

/// What the HTTP handler reads: the latest snapshot, when it arrived, and
/// the convergence tracker.
struct Shared {
    convergence: Convergence,
    status: Option<Status>,
    at: Instant,
}

/// A running metrics endpoint; stops when dropped.
pub struct MetricsServer {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` from the snapshots of `status`.
    pub async fn start(
        addr: SocketAddr,
        mut status: watch::Receiver<Option<Status>>,
    ) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let now = Instant::now();
        let shared = Arc::new(Mutex::new(Shared {
            convergence: Convergence::new(now),
            status: None,
            at: now,
        }));
        // Follows the snapshots (for convergence, which needs every one).
        let watcher = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    {
                        let snap = status.borrow_and_update().clone();
                        let now = Instant::now();
                        let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
                        sh.convergence.observe(now, snap.as_ref());
                        sh.status = snap;
                        sh.at = now;
                    }
                    if status.changed().await.is_err() {
                        break;
                    }
                }
            })
        };
        let acceptor = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&req, &shared)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                });
            }
        });
        Ok(MetricsServer {
            addr: local,
            tasks: vec![watcher, acceptor],
        })
    }
}

fn handle<B>(req: &Request<B>, shared: &Mutex<Shared>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let text = {
                let sh = shared.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                render(
                    sh.status.as_ref(),
                    &sh.convergence,
                    now,
                    now.saturating_duration_since(sh.at),
                )
            };
            reply(StatusCode::OK, prometheus_text::CONTENT_TYPE, text)
        }
        "/" => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "meshpeer metrics: GET /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found (metrics are at /metrics)\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::MemberStatus;

    fn member(name: &str, state: MemberState, path: Option<&str>) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            node_id: "id".into(),
            overlay_ip: "10.77.0.1".parse().unwrap(),
            public_key: "k".into(),
            endpoint: None,
            state,
            path: path.map(str::to_string),
            relay: (path == Some("relayed")).then(|| "r1".to_string()),
            why_not_direct: None,
            nat: "public".into(),
            last_handshake_secs: Some(5),
            rtt_us: Some(1500),
            rx_bytes: 100,
            tx_bytes: 200,
            tags: vec![],
            ephemeral: false,
            conflict: None,
            routes: vec![],
        }
    }

    fn status(members: Vec<MemberStatus>) -> Status {
        Status {
            node: "a".into(),
            node_id: "id".into(),
            network: "10.77.0.0/16".into(),
            interface: "mp0".into(),
            backend: crate::wg::BackendKind::Userspace,
            listen_port: 51820,
            gossip_addr: "192.0.2.1:51821".into(),
            gossip_bytes_sent: 7,
            gossip_bytes_received: 8,
            gossip_rounds: 3,
            gossip_rounds_in_sync: 2,
            gossip_connections: 4,
            loop_wakeups: 7,
            loop_steps: 5,
            loop_step_ms: 1500,
            gossip_values_stored: 1,
            gossip_values_rejected: 0,
            nat: "public".into(),
            mapped_endpoints: vec![],
            relaying: true,
            relay_allocations: 2,
            relay_forwarded: 40,
            relay_dropped: 1,
            routes_installed: 2,
            myself: None,
            members,
        }
    }

    #[test]
    fn renders_every_family() {
        let s = status(vec![
            member("a", MemberState::Myself, None),
            member("b", MemberState::Connected, Some("direct")),
            member("c", MemberState::Connecting, Some("relayed")),
        ]);
        let now = Instant::now();
        let mut c = Convergence::new(now);
        c.observe(now, Some(&s));
        let t = render(Some(&s), &c, now, Duration::from_secs(1));
        for line in [
            "meshpeer_ready 1",
            "meshpeer_members{state=\"self\"} 1",
            "meshpeer_members{state=\"connected\"} 1",
            "meshpeer_members{state=\"idle\"} 0",
            "meshpeer_members{state=\"connecting\"} 1",
            "meshpeer_members{state=\"down\"} 0",
            "meshpeer_peer_handshake_age_seconds{peer=\"b\"} 5.0",
            "meshpeer_peer_rtt_seconds{peer=\"b\"} 0.0015",
            "meshpeer_peer_receive_bytes_total{peer=\"b\"} 100",
            "meshpeer_peer_transmit_bytes_total{peer=\"c\"} 200",
            "meshpeer_peer_path{peer=\"b\",path=\"direct\"} 1",
            "meshpeer_peer_path{peer=\"b\",path=\"relayed\"} 0",
            "meshpeer_peer_path{peer=\"c\",path=\"relayed\"} 1",
            "meshpeer_peer_relay{peer=\"c\",relay=\"r1\"} 1",
            "meshpeer_relaying 1",
            "meshpeer_relayed_peers 1",
            "meshpeer_relay_allocations 2",
            "meshpeer_relay_forwarded_datagrams 40",
            "meshpeer_relay_dropped_datagrams 1",
            "meshpeer_routes_installed 2",
            "meshpeer_routes_refused 0",
            "meshpeer_gossip_sent_bytes_total 7",
            "meshpeer_gossip_received_bytes_total 8",
            "meshpeer_gossip_rounds_total 3",
            "meshpeer_gossip_rounds_in_sync_total 2",
            "meshpeer_gossip_connections 4",
            "meshpeer_loop_wakeups_total 7",
            "meshpeer_loop_steps_total 5",
            "meshpeer_loop_step_seconds_total 1.5",
            "meshpeer_gossip_values_stored_total 1",
            "meshpeer_gossip_values_rejected_total 0",
            "meshpeer_mesh_converged 0",
            "meshpeer_status_age_seconds 1.0",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        assert!(t.contains("meshpeer_info{node=\"a\""), "{t}");
        assert!(t.contains("# TYPE meshpeer_members gauge"), "{t}");
        // Still joining: only readiness.
        let t = render(None, &c, now, Duration::ZERO);
        assert_eq!(t.lines().filter(|l| !l.starts_with('#')).count(), 1, "{t}");
        assert!(t.contains("meshpeer_ready 0"));
    }

    #[test]
    fn convergence_is_tracked_over_snapshots() {
        let t0 = Instant::now();
        let ok = status(vec![
            member("a", MemberState::Myself, None),
            member("b", MemberState::Idle, Some("direct")),
            member("d", MemberState::Down, None),
        ]);
        let bad = status(vec![
            member("a", MemberState::Myself, None),
            member("b", MemberState::Connecting, Some("trying")),
        ]);
        assert!(converged(&ok) && !converged(&bad));
        let mut c = Convergence::new(t0);
        assert_eq!(
            c.unconverged_for(t0 + Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        c.observe(t0 + Duration::from_secs(4), Some(&ok));
        assert!(c.is_converged());
        assert_eq!(
            c.unconverged_for(t0 + Duration::from_secs(9)),
            Duration::ZERO
        );
        c.observe(t0 + Duration::from_secs(10), Some(&bad));
        c.observe(t0 + Duration::from_secs(12), Some(&bad));
        assert_eq!(
            c.unconverged_for(t0 + Duration::from_secs(15)),
            Duration::from_secs(5)
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let (tx, rx) = watch::channel(None);
        let srv = MetricsServer::start("127.0.0.1:0".parse().unwrap(), rx)
            .await
            .unwrap();
        tx.send_replace(Some(status(vec![member("a", MemberState::Myself, None)])));
        let get = |path: &'static str| {
            let addr = srv.addr;
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            }
        };
        // The watcher picks the snapshot up asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = get("/metrics").await;
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            assert!(r.contains("text/plain; version=0.0.4"), "{r}");
            if r.contains("meshpeer_ready 1") {
                assert!(r.contains("meshpeer_members{state=\"self\"} 1"), "{r}");
                break;
            }
            assert!(Instant::now() < deadline, "never ready: {r}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }
}
