//! The daemon: the thin tokio shell around the sans-IO cores.
//!
//! [`run`] starts a node (joining through a seed the first time) and then
//! loops over a few event sources, each handed to the core it belongs to:
//!
//! * the **tick** (250 ms, stretched in large meshes) runs [`Node::step`]:
//!   gossip snapshot → membership → paths → WireGuard reconcile → what to
//!   publish and with whom to gossip (`step.rs`);
//! * **gossip news** (a value stored) steps at once in small meshes;
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

use crate::admission::{Credential, Network};
use crate::control::{self, Reply, Request};
use crate::gossip::rounds::RoundPlanner;
use crate::gossip::transport::HelloReply;
use crate::gossip::{tls, Gossip, QuicTransport};
use crate::identity::Identity;
use crate::liveness::Liveness;
use crate::membership::Membership;
use crate::proto::{self, Signed};
use crate::state::{MembershipFile, NodeState, StateDir};
use crate::status::Status;
use crate::trust::{self, TrustState};
use crate::wg::{BackendChoice, WgInterface};

use traversal::Traversal;

use crate::tick::{tick_period, SETTLE, TICK};

/// The least time between two steps when records change.
const MIN_STEP_GAP: Duration = Duration::from_millis(50);
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
    seed_addrs: Vec<SocketAddr>,
    traversal: Traversal,
    last_rotation: usize,
    last_status: Instant,
    last_step: Instant,
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
pub async fn run_with_reload(
    cfg: DaemonConfig,
    shutdown: impl Future<Output = ()>,
    mut reload: Option<watch::Receiver<DaemonConfig>>,
) -> anyhow::Result<()> {
    let mut cfg = cfg;
    let dir = StateDir::open(&cfg.state_dir)?;
    if cfg.ephemeral && dir.file("network.key").exists() {
        anyhow::bail!(
            "{} holds the network key (this node ran `init`): it cannot be ephemeral, \
             it would delete its identity on stop",
            cfg.state_dir.display()
        );
    }
    let id = Identity::load(&dir)?;
    let (network, admission, stamp) = load_network(&dir)?;
    let mut state = dir.load_state()?;
    for s in &cfg.seeds {
        if !state.seeds.contains(s) {
            state.seeds.push(s.clone());
        }
    }

    let listener = control::bind(&dir.control_socket()).await?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(None);
    let ops = ops::Ops::start(&cfg, &status_rx).await?;
    let control_task = tokio::spawn(control::serve(listener, ctl_tx, status_rx));
    let _socket_guard = SocketGuard(dir.control_socket());

    let trust = Arc::new(TrustState::new(network, trust::system_clock()));
    if let Some(text) = &state.revoked {
        match crate::admission::verify_revocations(text, &network.key) {
            Ok(list) => {
                trust.update_revocations(list, text.clone());
            }
            Err(e) => tracing::warn!(error = %e, "ignoring the stored revocation list"),
        }
    }
    // A stamp by a member revoked since is void: ask for a new one below,
    // as a joiner does (granted while our token is good).
    if let Some(s) = &stamp {
        if let Err(crate::admission::AdmissionError::Revoked(what)) =
            own_credential(&trust, &id, &admission, s)
        {
            anyhow::bail!("this node was revoked ({what}); it is no longer a member of the mesh");
        }
    }
    let stamp = stamp.filter(|s| match own_credential(&trust, &id, &admission, s) {
        Err(crate::admission::AdmissionError::StamperRevoked(by)) => {
            tracing::warn!(stamper = %by, "the member that admitted this node was revoked; asking for a new stamp");
            false
        }
        _ => true,
    });

    // Gossip endpoint (mutual TLS from the node key and its credential).
    let credential = Credential {
        admission: admission.clone(),
        stamp: stamp.clone(),
    };
    let cert = tls::NodeCert::new(&id.signing, &credential)?;
    let (server, client) = tls::quic_configs(&cert, trust.clone())?;
    let bind: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, cfg.gossip_port).into();
    let reset = crate::gossip::transport::reset_secret(&id.signing.to_bytes());
    let transport = QuicTransport::bind_with_reset_secret(bind, server, client, trust.clone(), Some(reset))
        .with_context(|| format!("cannot bind the gossip port udp/{} (is another meshpeer running in this network namespace?)", cfg.gossip_port))?;

    // Seeds: the ones given now, then the members known from last time.
    let mut seed_addrs = Vec::new();
    for s in &state.seeds {
        match crate::net::resolve_seed(s) {
            Ok(a) => seed_addrs.extend(a),
            Err(e) => {
                tracing::warn!(seed = %s, error = %e, "cannot resolve seed; will retry through gossip")
            }
        }
    }
    let mut reach: Vec<SocketAddr> = seed_addrs.clone();
    reach.extend(state.known_members.iter().copied());
    reach.sort();
    reach.dedup();

    let advertise = cfg
        .advertise
        .or(state.advertise_addr)
        .or_else(|| reach.first().and_then(|a| crate::net::route_source(*a)))
        .or_else(|| {
            crate::net::local_ipv4_nets(&[&cfg.interface])
                .first()
                .map(|(n, _)| IpAddr::V4(n.addr()))
        })
        .ok_or_else(|| anyhow!("cannot find an address to advertise; pass --advertise-addr"))?;
    // A seed that is this node itself would "admit" us to a mesh of one.
    let own: Vec<IpAddr> = crate::net::local_ipv4_nets(&[])
        .iter()
        .map(|(n, _)| IpAddr::V4(n.addr()))
        .collect();
    if let Some(s) = seed_addrs
        .iter()
        .find(|s| (own.contains(&s.ip()) || s.ip().is_loopback()) && s.port() == cfg.gossip_port)
    {
        if stamp.is_none() {
            anyhow::bail!("the seed {s} is this node itself; give the address of a member of the mesh to join");
        }
    }
    let wg_port = cfg.wg_port.unwrap_or_else(|| {
        crate::default_wg_port(
            crate::nat::discovery::looks_public(advertise),
            &id.wg_public(),
        )
    });
    if wg_port == cfg.gossip_port || wg_port == cfg.probe_port || cfg.gossip_port == cfg.probe_port
    {
        anyhow::bail!(
            "ports must differ: WireGuard {wg_port}, gossip {}, probes {}",
            cfg.gossip_port,
            cfg.probe_port
        );
    }
    cfg.wg_port = Some(wg_port);
    ops::firewall_notice(
        &cfg,
        wg_port,
        crate::nat::discovery::looks_public(advertise),
    );
    tracing::info!(
        wireguard = %format!("{wg_port}/udp"), gossip = %format!("{}/udp", cfg.gossip_port),
        probes = %format!("{}/udp (overlay only)", cfg.probe_port),
        "ports this node uses (public members: open WireGuard and gossip)"
    );

    let mut membership = Membership::new(id.node_key(), cfg.down_grace);
    membership.holders_mut().adopt(
        state
            .holders
            .iter()
            .filter_map(|(ip, k)| Some((*ip, proto::parse_node_id(k)?))),
        state
            .names
            .iter()
            .filter_map(|(n, k)| Some((n.clone(), proto::parse_node_id(k)?))),
    );

    // First contact: a joiner gets its stamp; a member without an address
    // learns who holds what. Either way it picks a free address.
    let first_join = stamp.is_none();
    let mut stamp = stamp;
    let mut first_records: Vec<String> = Vec::new();
    if stamp.is_none() || state.overlay_ip.is_none() {
        let outcome = join::contact(
            &transport,
            &reach,
            &state.name,
            stamp.is_none(),
            stamp.is_none(),
            cfg.join_timeout,
            SLOW_SEED_WAIT.max(cfg.join_timeout),
        )
        .await?;
        let hello = match outcome {
            join::Outcome::Admitted {
                stamp: s,
                hello,
                seed,
            } => {
                tracing::info!(%seed, "admitted to the mesh");
                trust
                    .check_credential(
                        &Credential {
                            admission: admission.clone(),
                            stamp: Some(s.clone()),
                        },
                        &id.node_key(),
                    )
                    .context("the seed's stamp does not verify")?;
                save_stamp(&dir, &s)?;
                let credential = Credential {
                    admission: admission.clone(),
                    stamp: Some(s.clone()),
                };
                let cert = tls::NodeCert::new(&id.signing, &credential)?;
                let (server, client) = tls::quic_configs(&cert, trust.clone())?;
                transport.reconfigure(server, client);
                stamp = Some(s);
                hello
            }
            join::Outcome::Hello { hello, seed } => {
                tracing::info!(%seed, members = hello.records.len(), "learned the mesh");
                hello
            }
        };
        if let Some(text) = &hello.revoked {
            if let Ok(list) = crate::admission::verify_revocations(text, &network.key) {
                trust.update_revocations(list, text.clone());
                state.revoked = Some(text.clone());
            }
        }
        membership
            .holders_mut()
            .adopt(hello.holders.clone(), hello.names.clone());
        first_records = hello.records.clone();
        if state.overlay_ip.is_none() {
            let records: Vec<Arc<str>> = hello
                .records
                .iter()
                .map(|t| Arc::from(t.as_str()))
                .collect();
            let ip = trust
                .with_trust(|t| {
                    crate::membership::choose_joiner_address(
                        Instant::now(),
                        &id.node_key(),
                        network.cidr,
                        &hello.holders,
                        &hello.names,
                        &records,
                        t,
                        cfg.down_grace,
                    )
                })
                .ok_or_else(|| anyhow!("network {} is full", network.cidr))?;
            state.overlay_ip = Some(ip);
            state.ip_claimed_at = unix_ms();
            tracing::info!(%ip, members = records.len(), "chose overlay address");
            if first_join {
                eprintln!("meshpeer: overlay address {ip}");
            }
        }
    }
    let stamp = stamp.ok_or_else(|| anyhow!("not admitted"))?;
    let overlay_ip = state
        .overlay_ip
        .ok_or_else(|| anyhow!("no overlay address"))?;

    let owned_if = state.interface_created.as_deref() == Some(cfg.interface.as_str());
    let wg = WgInterface::open(
        &cfg.interface,
        id.wg_secret.to_bytes(),
        wg_port,
        owned_if,
        cfg.backend,
    )
    .await?;
    state.interface_created = Some(cfg.interface.clone());
    let owned: BTreeSet<[u8; 32]> = if owned_if {
        state
            .owned_peers
            .iter()
            .filter_map(|k| {
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .ok()?
                    .try_into()
                    .ok()
            })
            .collect()
    } else {
        BTreeSet::new()
    };
    if !owned_if {
        // A new interface has none of the routes a former one had.
        state.installed_routes.clear();
    }
    dir.save_state(&state)?;
    if let Err(e) = wg.set_address(overlay_ip, network.cidr) {
        wg.destroy().await;
        return Err(e.into());
    }

    let mut stun_servers = Vec::new();
    for s in &cfg.stun_servers {
        match crate::net::resolve_seed(s) {
            Ok(a) => stun_servers.extend(a.into_iter().filter(|a| a.is_ipv4())),
            Err(e) => tracing::warn!(server = %s, error = %e, "cannot resolve STUN server"),
        }
    }
    let traversal = Traversal::start(&wg, stun_servers, id.wg_public());
    let gossip = Gossip::start(
        &id.node_id(),
        network.id(),
        trust.clone(),
        transport,
        rand::random(),
    );
    let (hello_tx, hello_rx) = watch::channel(Arc::new(HelloReply::default()));
    let relay = relay::RelayServer::new(cfg.relay_ports);
    gossip.set_request_handler(Arc::new(join::Handler {
        trust: trust.clone(),
        signing: id.signing.clone(),
        admission: admission.clone(),
        hello: hello_rx,
        allocator: Some(Arc::new(relay.clone())),
    }));
    // What the seed handed over goes into gossip at once.
    for text in &first_records {
        if let Ok(v) = trust.with_trust(|t| crate::record::verify_record(text, t, None)) {
            gossip.inject(
                &proto::node_id_string(&v.body.node_key),
                trust::RECORD_KEY,
                text,
                v.body.version,
            );
        }
    }
    if let Some(text) = &state.revoked {
        if let Ok(list) = crate::admission::verify_revocations(text, &network.key) {
            gossip.inject(
                trust::AUTHORITY_NODE,
                trust::REVOKED_KEY,
                text,
                list.issued_at_ms,
            );
        }
    }

    let (acks_tx, mut acks_rx) = mpsc::channel(1024);
    let (alloc_tx, mut alloc_rx) = mpsc::channel::<AllocAnswer>(256);
    let (restamp_tx, mut restamp_rx) = mpsc::channel::<Signed>(1);
    let wg_public = id.wg_public();
    let liveness = Liveness::new(network.key, id.node_key(), rand::random());
    let route_state = routes::RouteState::new(&state.installed_routes);
    let hosts_state = hosts::HostsState::new(cfg.hosts_file.clone());
    let mut node = Node {
        cfg,
        dir,
        id,
        network,
        admission,
        stamp,
        state,
        advertise,
        trust,
        membership,
        liveness,
        planner: RoundPlanner::new(rand::random()),
        wg,
        gossip,
        hello_tx,
        owned,
        status: status_tx,
        last_persist: Instant::now(),
        seed_addrs,
        traversal,
        last_rotation: 0,
        last_status: Instant::now(),
        last_step: Instant::now(),
        local_nets: None,
        wg_public,
        probes: None,
        probe_shared: probes::Shared::default(),
        acks_tx,
        ip_since: Instant::now(),
        fed: Default::default(),
        published_record: None,
        left: false,
        restamp_at: None,
        restamp_tx,
        self_revoked: None,
        join_progress: first_join.then(|| JoinProgress {
            since: Instant::now(),
            last: (usize::MAX, 0),
        }),
        last_change: Instant::now(),
        relay,
        alloc_tx,
        alloc_chain: Default::default(),
        ops,
        routes: route_state,
        hosts: hosts_state,
    };
    if let Err(e) = node.republish(false).await {
        node.wg.destroy().await;
        return Err(e);
    }
    node.bind_probes().await;
    tracing::info!(
        node = %node.state.name, id = %node.id.node_id(), %overlay_ip, interface = %node.cfg.interface,
        backend = ?node.wg.backend, %advertise, "meshpeer is up"
    );

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leave_reply = None;
    let answered = node.traversal.answered();
    let mut exit_error = None;
    loop {
        if let Some(why) = node.self_revoked.take() {
            tracing::error!(%why, "this node was revoked: it is no longer a member; stopping");
            exit_error = Some(anyhow!(
                "this node was revoked ({why}); it is no longer a member of the mesh"
            ));
            break;
        }
        let small = tick.period() <= TICK;
        let liveness_at = node
            .liveness
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let rounds_at = node.planner.poll_timeout(Instant::now());
        tokio::select! {
            // A value arrived: in a small mesh, act on it now rather than at
            // the next tick (a gossip hop is 250 ms, waiting for the tick
            // adds up to one more to every join).
            _ = node.gossip.changed(), if small && node.last_step.elapsed() >= MIN_STEP_GAP => {
                node.step_or_warn().await;
            }
            _ = answered.notified() => node.on_stun_answer().await,
            Some(stamp) = restamp_rx.recv() => node.on_new_stamp(stamp).await,
            Some((peer, relay, endpoint)) = alloc_rx.recv() => {
                node.traversal.handle_allocation(&peer, &relay, endpoint);
                node.step_or_warn().await;
            }
            Some((from, nonce, summary)) = acks_rx.recv() => {
                node.on_probe_ack(from, nonce, summary);
                while let Ok((from, nonce, summary)) = acks_rx.try_recv() {
                    node.on_probe_ack(from, nonce, summary);
                }
            }
            _ = tokio::time::sleep_until(liveness_at.into()) => node.run_liveness().await,
            _ = tokio::time::sleep_until(rounds_at.into()) => node.start_rounds(),
            _ = &mut shutdown => {
                node.on_stop().await;
                break;
            }
            new = ops::next_reload(&mut reload) => node.reload(new).await,
            _ = tick.tick() => {
                node.step_or_warn().await;
                let period = tick_period(node.membership.members().count(), node.at_rest());
                if period != tick.period() {
                    tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
            }
            Some((req, reply)) = ctl_rx.recv() => match req {
                Request::Status => {
                    let r = match node.status.borrow().clone() {
                        Some(s) => Reply::Status(Box::new(s)),
                        None => Reply::Error { message: "starting up".into() },
                    };
                    reply.answer(r).await;
                }
                Request::Leave => {
                    node.leave().await;
                    leave_reply = Some(reply);
                    break;
                }
                Request::Revoke { list } => {
                    let r = node.revoke(&list).await;
                    reply.answer(r).await;
                }
                req @ (Request::Ping { .. } | Request::Netcheck) => {
                    node.handle_ops(req, reply).await;
                }
            }
        }
    }
    node.routes_down();
    node.persist(true);
    node.probes = None;
    node.gossip.shutdown().await;
    node.wg.destroy().await;
    control_task.abort();
    if node.cfg.ephemeral && node.left {
        // An ephemeral node that left is done with its identity: the next
        // start joins afresh (a crash keeps it, for a restart in place).
        let _ = std::fs::remove_file(node.dir.control_socket());
        node.dir.forget_identity();
        tracing::info!(state_dir = %node.cfg.state_dir.display(), "ephemeral node: identity deleted");
    }
    if let Some(r) = leave_reply {
        r.answer(Reply::Left).await;
    }
    if let Some(e) = exit_error {
        return Err(e);
    }
    Ok(())
}

/// The next version of our values (proto/PROTOCOL.md §4.2), kept in the
/// state (persisted).
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
    /// At rest: no change for [`SETTLE`], every path settled, no gossip
    /// news being spread.
    fn at_rest(&self) -> bool {
        self.last_change.elapsed() >= SETTLE
            && self.traversal.settled()
            && !self.planner.busy(Instant::now())
    }

    /// The next version of our values (proto/PROTOCOL.md §4.2).
    fn next_version(&mut self) -> u64 {
        next_version_of(&mut self.state, &self.gossip)
    }

    /// Whether this member offers relaying (public, and not `--no-relay`).
    fn relays(&self) -> bool {
        self.cfg.relay && self.traversal.nat.kind == crate::record::NatKind::Public
    }

    /// Publishes our record (again), with `left` for a leave.
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
        let text = body.sign(&self.id.signing);
        self.gossip
            .publish(trust::RECORD_KEY, text, version)
            .context("publishing our record")?;
        self.published_record = Some(body);
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
                self.gossip.round_with(t.addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
