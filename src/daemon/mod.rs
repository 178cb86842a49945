//! The daemon: the thin tokio shell around the sans-IO cores.
//!
//! [`run`] starts a node (joining through a seed the first time) and then
//! loops over a few event sources, each handed to the core it belongs to:
//!
//! * the **tick** (250 ms, stretched in large meshes) runs [`Node::step`]:
//!   gossip snapshot → membership → paths → WireGuard reconcile → what to
//!   publish and with whom to gossip (`step.rs`);
//! * **gossip news** (a value stored) steps at once in small meshes;
//! * **relay allocation answers** ask for a step soon: the answers within
//!   `tick::answer_step_gap` of the last step share one (`Node::step_soon`);
//! * **liveness**: probe answers and the liveness timer go to
//!   [`crate::liveness`]; its probes go out on the overlay (`probes.rs`);
//! * **rounds**: the round planner's timer starts gossip rounds;
//! * **STUN answers** on the WireGuard port (connectivity checks);
//! * **control requests** (status, leave, revoke; ping and netcheck go to
//!   `ops.rs`) from the control socket;
//! * **reloads** (SIGHUP: a new configuration, applied by `ops.rs`).
//!
//! Nothing here decides membership, liveness or paths: the cores do.

mod hosts;
mod join;
mod ops;
mod probes;
mod relay;
mod routes;
mod run;
mod start;
mod status;
mod step;
mod traversal;
mod values;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use base64::Engine;
use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};

use crate::admission::Network;
use crate::control::{self, Reply};
use crate::gossip::rounds::RoundPlanner;
use crate::gossip::transport::HelloReply;
use crate::gossip::Gossip;
use crate::identity::Identity;
use crate::liveness::Liveness;
use crate::membership::Membership;
use crate::proto::{self, Signed};
use crate::state::{MembershipFile, NodeState, StateDir};
use crate::status::Status;
use crate::trust::{self, TrustState};
use crate::wg::{BackendChoice, WgInterface};

use traversal::Traversal;

use crate::tick::SETTLE;

/// How long a leaving node keeps gossiping its leave record.
const LEAVE_LINGER: Duration = Duration::from_secs(2);
/// A seed from which nothing at all answers fails the first join after this
/// long (`--join-timeout-secs` sets it).
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// A seed that answers the handshake but is slow to admit (hundreds of
/// joiners at once) is waited for this long in all.
const SLOW_SEED_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub interface: String,
    /// `None`: [`crate::default_wg_port`] for this member.
    pub wg_port: Option<u16>,
    pub gossip_port: u16,
    /// UDP port of liveness probes, on the overlay address.
    pub probe_port: u16,
    /// Seeds in `host:port` form (already validated).
    pub seeds: Vec<String>,
    pub advertise: Option<IpAddr>,
    pub backend: BackendChoice,
    pub down_grace: Duration,
    /// Whether this member relays for others when it is public.
    pub relay: bool,
    /// Outside STUN servers, `host:port`.
    pub stun_servers: Vec<String>,
    /// How long a first join waits for any seed to answer at all.
    pub join_timeout: Duration,
    /// Tags published in the record.
    pub tags: Vec<String>,
    /// UDP port range of relay allocations (first, last).
    pub relay_ports: (u16, u16),
    /// Where to serve Prometheus metrics (`GET /metrics`); off when `None`.
    pub metrics_addr: Option<SocketAddr>,
    /// Leave the mesh when stopped, or stay a member (always leave when
    /// ephemeral).
    pub on_stop: crate::config::OnStop,
    /// Subnets behind this node, published in its record (a gateway).
    pub advertise_routes: Vec<Ipv4Net>,
    /// The hosts(5) file whose managed block lists the members' names;
    /// `None`: off.
    pub hosts_file: Option<PathBuf>,
    /// A stateless node: its record says so (members forget it soon after
    /// it goes down), it leaves when stopped and then deletes its identity,
    /// so its next start is a fresh join.
    pub ephemeral: bool,
}

impl DaemonConfig {
    /// The WireGuard port (resolved at start when not configured).
    pub fn wg_port(&self) -> u16 {
        self.wg_port.unwrap_or(crate::DEFAULT_WG_PORT)
    }
}

pub(crate) use crate::clock::unix_ms;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(what: &str, text: &str) -> anyhow::Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .with_context(|| format!("membership.json: {what} is not base64"))
}

/// The network this node belongs to, its admission and (once admitted)
/// its stamp.
pub fn load_network(dir: &StateDir) -> anyhow::Result<(Network, Signed, Option<Signed>)> {
    let m: MembershipFile = dir.read_json("membership.json")?.ok_or_else(|| {
        anyhow!(
            "{} holds no membership (run `meshpeer init` or `meshpeer join`)",
            dir.path.display()
        )
    })?;
    let key = proto::parse_node_id(&m.network_key)
        .ok_or_else(|| anyhow!("{}: bad network key", dir.file("membership.json").display()))?;
    let admission: Signed = proto::decode("admission", &unb64("admission", &m.admission)?)
        .context("membership.json: admission")?;
    let stamp = match &m.stamp {
        Some(s) => Some(
            proto::decode::<Signed>("stamp", &unb64("stamp", s)?)
                .context("membership.json: stamp")?,
        ),
        None => None,
    };
    Ok((Network { key, cidr: m.cidr }, admission, stamp))
}

/// Checks our own credential against the current revocations.
fn own_credential(
    trust: &TrustState,
    id: &Identity,
    admission: &Signed,
    stamp: &Signed,
) -> Result<(), crate::admission::AdmissionError> {
    crate::admission::verify_credential(
        admission,
        stamp,
        &trust.network.key,
        &id.node_key(),
        trust.now_unix(),
        &trust.revocations(),
    )
    .map(|_| ())
}

fn save_stamp(dir: &StateDir, stamp: &Signed) -> anyhow::Result<()> {
    let mut m: MembershipFile = dir
        .read_json("membership.json")?
        .ok_or_else(|| anyhow!("membership.json vanished"))?;
    m.stamp = Some(b64(&proto::encode(stamp)));
    dir.write_json("membership.json", &m)?;
    Ok(())
}

/// A running node: identity, cores and shells.
pub(crate) struct Node {
    cfg: DaemonConfig,
    dir: StateDir,
    id: Identity,
    network: Network,
    admission: Signed,
    stamp: Signed,
    state: NodeState,
    advertise: IpAddr,
    trust: Arc<TrustState>,
    membership: Membership,
    liveness: Liveness,
    planner: RoundPlanner,
    wg: WgInterface,
    gossip: Gossip,
    hello_tx: watch::Sender<Arc<HelloReply>>,
    owned: BTreeSet<[u8; 32]>,
    status: watch::Sender<Option<Status>>,
    last_persist: Instant,
    /// When `state.known_members` was last refreshed.
    known_at: Instant,
    seed_addrs: Vec<SocketAddr>,
    traversal: Traversal,
    last_rotation: usize,
    last_status: Instant,
    last_step: Instant,
    /// Gossip's node states at our last step (more now: a join), and when
    /// a join last got a step of its own (`tick::JOIN_SPELL`).
    states_at_step: u32,
    last_join_step: Option<Instant>,
    /// A step allocation answers asked for, due at this instant (`tick::answer_step_at`): answers
    /// within the gap share it.
    step_due: Option<Instant>,
    /// Steps run, and the time they took (`status`: `loop_steps`,
    /// `loop_step_ms`).
    steps: u64,
    step_time: Duration,
    /// When freed memory was last handed back to the system
    /// (`tick::trim_due`).
    trimmed_at: Option<Instant>,
    /// Times the event loop woke up (`status`: `loop_wakeups`; a mesh at
    /// rest should wake it a few times a second at most).
    wakeups: u64,
    /// The host's IPv4 networks and when they were read.
    local_nets: Option<(Instant, Vec<Ipv4Net>)>,
    /// Our WireGuard public key (derived from the secret once).
    wg_public: [u8; 32],
    probes: Option<probes::ProbeSocket>,
    probe_shared: probes::Shared,
    acks_tx: mpsc::Sender<probes::Ack>,
    /// When we took our current overlay address (we may lose it to a
    /// competing claim only while it is provisional).
    ip_since: Instant,
    /// Values already fed to liveness (node id, key) -> text, to skip
    /// re-verifying them every step.
    fed: crate::liveness::ValueFeed,
    /// What the last published record said (to republish only on change).
    published_record: Option<crate::record::RecordBody>,
    /// When the last step saw a change (membership events, WireGuard
    /// changes, path changes).
    last_change: Instant,
    /// Our relay (allocations for others), when we relay.
    relay: relay::RelayServer,
    /// Answers to our allocation requests: (peer, relay, endpoint).
    alloc_tx: mpsc::Sender<AllocAnswer>,
    /// The last allocation request (Allocate or Release) sent per (peer,
    /// relay): the next one for the same pair waits for it, so a release
    /// never overtakes the allocation asked for after it (`step.rs`).
    alloc_chain: relay::RequestChain<([u8; 32], [u8; 32])>,
    /// Metrics endpoint and the like (`ops.rs`).
    ops: ops::Ops,
    /// Members' subnets routed here, and our own (`routes.rs`).
    routes: routes::RouteState,
    /// The members' names in the hosts file (`hosts.rs`); `None`: off.
    hosts: Option<hosts::HostsState>,
    /// Set once this node published its leave.
    left: bool,
    /// Re-stamping (our stamper was revoked): when to ask next, and where
    /// the new stamp arrives.
    restamp_at: Option<Instant>,
    restamp_tx: mpsc::Sender<Signed>,
    /// Set when a revocation names this node or its token: the daemon
    /// stops with this reason.
    self_revoked: Option<String>,
    /// A first join tells the user on stderr how many members it reached,
    /// until all or [`JOIN_PROGRESS_FOR`].
    join_progress: Option<JoinProgress>,
}

/// How long a first join reports its progress on stderr.
const JOIN_PROGRESS_FOR: Duration = Duration::from_secs(60);

struct JoinProgress {
    since: Instant,
    /// (connected, members) last printed.
    last: (usize, usize),
}

/// An answer to an allocation request: (peer, relay) WireGuard keys, and
/// the endpoint to use (None: refused or unreachable).
type AllocAnswer = ([u8; 32], [u8; 32], Option<SocketAddr>);

/// Runs the node until `shutdown` resolves or a `leave` request arrives.
pub async fn run(cfg: DaemonConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with_reload(cfg, shutdown, None).await
}

/// [`run`], taking new configurations from `reload` (sent on SIGHUP): what
/// can change at run time is applied, the rest is logged as needing a
/// restart (see `ops.rs`).
///
/// The control socket answers from the start (`status` says "starting up"
/// while a first join waits for its seed); `start.rs` brings the node up,
/// `run.rs` is the loop.
pub async fn run_with_reload(
    cfg: DaemonConfig,
    shutdown: impl Future<Output = ()>,
    reload: Option<watch::Receiver<DaemonConfig>>,
) -> anyhow::Result<()> {
    let boot = start::Boot::open(cfg)?;
    let listener = control::bind(&boot.dir.control_socket()).await?;
    let (ctl_tx, ctl_rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(None);
    let ops = ops::Ops::start(&boot.cfg, &status_rx).await?;
    let control_task = tokio::spawn(control::serve(listener, ctl_tx, status_rx));
    let _socket_guard = SocketGuard(boot.dir.control_socket());
    let result = match boot.start(ops, status_tx).await {
        Ok((node, inbox)) => node.run(inbox, ctl_rx, shutdown, reload).await,
        Err(e) => Err(e),
    };
    control_task.abort();
    result
}

/// The next version of our values (proto/PROTOCOL.md §4.2), kept in the
/// state (persisted).
/// How often the members known for a restart are refreshed.
const KNOWN_MEMBERS_EVERY: Duration = Duration::from_secs(10);

fn next_version_of(state: &mut NodeState, gossip: &Gossip) -> u64 {
    let seen = gossip.take_self_seen().unwrap_or(0);
    let v = crate::record::next_version(
        state.record_version.max(seen),
        gossip.self_version(),
        unix_ms(),
    );
    state.record_version = v;
    v
}

/// Removes the control socket when the daemon ends.
struct SocketGuard(PathBuf);
impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Node {
    /// Quiet: no change (membership, WireGuard peers, paths) for
    /// [`SETTLE`]. Paths may still be checked; see [`Self::at_rest`].
    fn quiet(&self) -> bool {
        self.last_change.elapsed() >= SETTLE
    }

    /// At rest: no change for [`SETTLE`], every path settled, no gossip
    /// news being spread.
    fn at_rest(&self) -> bool {
        self.quiet() && self.traversal.settled() && !self.planner.busy(Instant::now())
    }

    /// The next version of our values (proto/PROTOCOL.md §4.2).
    fn next_version(&mut self) -> u64 {
        next_version_of(&mut self.state, &self.gossip)
    }

    /// Whether this member offers relaying (public, and not `--no-relay`).
    fn relays(&self) -> bool {
        self.cfg.relay && self.traversal.nat.kind == crate::record::NatKind::Public
    }

    /// Publishes our record (`left` for a leave) under a new version, when
    /// it says something the last one published did not.
    async fn republish(&mut self, left: bool) -> anyhow::Result<()> {
        let relay = self.relays();
        let version = self.next_version();
        let local = self.local_nets();
        let body = values::build_record(&values::RecordInputs {
            id: &self.id,
            network: &self.network,
            admission: &self.admission,
            stamp: &self.stamp,
            state: &self.state,
            wg_port: self.cfg.wg_port(),
            gossip_port: self.cfg.gossip_port,
            advertise: self.advertise,
            nat: &self.traversal.nat,
            observed: &self.traversal.observed_self,
            local_nets: &local,
            relay,
            ephemeral: self.cfg.ephemeral,
            left,
            tags: &self.cfg.tags,
            routes: &self.cfg.advertise_routes,
            version,
        });
        // Only a record that says something new goes out: every new
        // version makes the whole mesh gossip busily for a few seconds (a
        // symmetric NAT's mapped ports change with every STUN round, and
        // they are not in the record).
        let same = self.published_record.as_ref().is_some_and(|p| {
            let mut p = p.clone();
            p.version = body.version;
            p == body
        });
        if same {
            return Ok(());
        }
        let text = body.sign(&self.id.signing);
        self.gossip
            .publish(trust::RECORD_KEY, text, version)
            .context("publishing our record")?;
        self.published_record = Some(body);
        self.planner.handle_own_news(std::time::Instant::now());
        Ok(())
    }

    /// (Re)binds the probe socket on our overlay address.
    async fn bind_probes(&mut self) {
        let Some(ip) = self.state.overlay_ip else {
            return;
        };
        if self.probes.as_ref().is_some_and(|p| p.ip == ip) {
            return;
        }
        self.probes = None;
        match probes::ProbeSocket::bind(
            ip,
            self.cfg.probe_port,
            self.probe_shared.clone(),
            self.acks_tx.clone(),
        )
        .await
        {
            Ok(p) => self.probes = Some(p),
            Err(e) => tracing::warn!(%ip, port = self.cfg.probe_port, error = %e,
                "cannot bind the liveness probe socket; members will see this node through others only"),
        }
    }

    fn persist(&mut self, force: bool) {
        self.state.owned_peers = self
            .owned
            .iter()
            .map(|k| base64::engine::general_purpose::STANDARD.encode(k))
            .collect();
        self.state.holders = self
            .membership
            .holders()
            .ips()
            .into_iter()
            .map(|(ip, k)| (ip, proto::node_id_string(&k)))
            .collect();
        self.state.names = self
            .membership
            .holders()
            .names()
            .into_iter()
            .map(|(n, k)| (n, proto::node_id_string(&k)))
            .collect();
        if force || self.last_persist.elapsed() > Duration::from_secs(10) {
            if let Err(e) = self.dir.save_state(&self.state) {
                tracing::warn!(error = %e, "cannot save state");
            }
            self.last_persist = Instant::now();
        }
    }

    /// A revocation list from `meshpeer revoke`: trusted, persisted, spread.
    async fn revoke(&mut self, text: &str) -> Reply {
        let list = match crate::admission::verify_revocations(text, &self.network.key) {
            Ok(l) => l,
            Err(e) => {
                return Reply::Error {
                    message: e.to_string(),
                }
            }
        };
        let version = list.issued_at_ms;
        if !self
            .gossip
            .inject(trust::AUTHORITY_NODE, trust::REVOKED_KEY, text, version)
        {
            return Reply::Error {
                message: "a newer revocation list is already in the mesh; try again".into(),
            };
        }
        self.step_or_warn().await;
        Reply::Revoked
    }

    /// Publishes a signed leave record and pushes it to members for a while.
    async fn leave(&mut self) {
        tracing::info!("leaving the mesh");
        self.remove_hosts_block();
        self.left = true;
        if let Err(e) = self.republish(true).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot publish the leave record");
        }
        let deadline = Instant::now() + LEAVE_LINGER;
        let targets = self.round_targets();
        while Instant::now() < deadline {
            for t in &targets {
                self.gossip.round_with(t.addr, true);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
