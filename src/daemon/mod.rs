//! The daemon: the thin tokio shell around the membership core.
//!
//! One loop, one tick (500 ms): read the gossip snapshot, feed it to
//! [`Membership`], resolve address conflicts, reconcile WireGuard, refresh the
//! status, persist what a restart needs. Control requests (status, leave) are
//! served between ticks. Nothing here decides membership: that is the core's.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};

use crate::admission::Network;
use crate::control::{self, Reply, Request};
use crate::gossip::{self, tls, Gossip, GossipTiming, QuicTransport};
use crate::identity::Identity;
use crate::ipalloc::{self, Claim};
use crate::membership::{Event, GossipEntry, Liveness, Membership};
use crate::nat::discovery::NatInfo;
use crate::nat::paths::Path;
use crate::proto::{self, Signed};
use crate::reconcile::{reconcile, PeerChange, FRESH_HANDSHAKE};
use crate::record::NatKind;
use crate::record::RecordBody;
use crate::state::{MembershipFile, NodeState, StateDir};
use crate::status::{MemberState, MemberStatus, Status};
use crate::wg::{BackendChoice, WgInterface};

mod rtt;
mod traversal;
use traversal::Traversal;

/// The daemon's tick when the mesh is small; see [`tick_period`].
const TICK: Duration = Duration::from_millis(250);
/// Up to this many known members, the tick is [`TICK`]; above, it grows in
/// proportion, up to [`MAX_TICK`].
const TICK_MEMBERS: usize = 40;
const MAX_TICK: Duration = Duration::from_secs(2);
/// The least time between two steps when records change.
const MIN_STEP_GAP: Duration = Duration::from_millis(50);
/// How often `status` is rebuilt when nothing changed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the host's addresses are read again.
const LOCAL_NETS_EVERY: Duration = Duration::from_secs(2);
/// How often every peer is poked (a keepalive each way, see
/// `reconcile::reconcile`) and the next endpoint candidate tried: the
/// members' shared beat.
const POKE_EVERY: Duration = Duration::from_secs(10);
/// How long after a record arrived or changed small-mesh gossip rounds
/// keep their full fanout.
const BUSY_GOSSIP: Duration = Duration::from_secs(10);
/// How long a leaving node keeps gossiping its leave record.
const LEAVE_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub interface: String,
    /// `None`: [`crate::default_wg_port`] for this member.
    pub wg_port: Option<u16>,
    pub gossip_port: u16,
    /// Seeds in `host:port` form (already validated).
    pub seeds: Vec<String>,
    pub advertise: Option<IpAddr>,
    pub backend: BackendChoice,
    pub down_grace: Duration,
    pub timing: GossipTiming,
    /// Whether this member relays for others when it is public.
    pub relay: bool,
    /// Outside STUN servers, `host:port`.
    pub stun_servers: Vec<String>,
    /// How long a fresh joiner tries its seeds before giving up.
    pub join_timeout: Duration,
}

impl DaemonConfig {
    /// The WireGuard port (resolved at start when not configured).
    pub fn wg_port(&self) -> u16 {
        self.wg_port.unwrap_or(crate::DEFAULT_WG_PORT)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Loads the network this node belongs to.
pub fn load_network(dir: &StateDir) -> anyhow::Result<(Network, Signed)> {
    let m: MembershipFile = dir.read_json("membership.json")?.ok_or_else(|| {
        anyhow!(
            "{} holds no membership (run `meshpeer init` or `meshpeer join`)",
            dir.path.display()
        )
    })?;
    let key = proto::parse_node_id(&m.network_key)
        .ok_or_else(|| anyhow!("{}: bad network key", dir.file("membership.json").display()))?;
    let admission_bytes = base64::engine::general_purpose::STANDARD
        .decode(&m.admission)
        .context("membership.json: admission is not base64")?;
    let admission: Signed =
        proto::decode("admission", &admission_bytes).context("membership.json: admission")?;
    Ok((Network { key, cidr: m.cidr }, admission))
}

struct Node {
    cfg: DaemonConfig,
    dir: StateDir,
    id: Identity,
    network: Network,
    admission: Signed,
    state: NodeState,
    advertise: IpAddr,
    membership: Membership,
    wg: WgInterface,
    gossip: Gossip,
    records_tx: watch::Sender<Vec<String>>,
    owned: BTreeSet<[u8; 32]>,
    status: watch::Sender<Option<Status>>,
    last_persist: Instant,
    reach_backoff: Duration,
    next_reach: Instant,
    seed_addrs: Vec<SocketAddr>,
    traversal: Traversal,
    last_rotation: usize,
    last_status: Instant,
    /// When the last step started.
    last_step: Instant,
    /// The host's IPv4 networks and when they were read.
    local_nets: Option<(Instant, Vec<Ipv4Net>)>,
    prober: rtt::Prober,
    /// Our WireGuard public key (derived from the secret once).
    wg_public: [u8; 32],
}

/// Runs the node until `shutdown` resolves or a `leave` request arrives.
pub async fn run(cfg: DaemonConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut cfg = cfg;
    let dir = StateDir::open(&cfg.state_dir)?;
    let id = Identity::load(&dir)?;
    let (network, admission) = load_network(&dir)?;
    let mut state = dir.load_state()?;
    for s in &cfg.seeds {
        if !state.seeds.contains(s) {
            state.seeds.push(s.clone());
        }
    }

    let listener = control::bind(&dir.control_socket()).await?;
    let (ctl_tx, mut ctl_rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(None);
    let control_task = tokio::spawn(control::serve(listener, ctl_tx, status_rx));
    let _socket_guard = SocketGuard(dir.control_socket());

    // Gossip endpoint (mutual TLS from the node key and its credential).
    let cert = tls::NodeCert::new(&id.signing, &admission)?;
    let (server, client) = tls::quic_configs(&cert, network.key)?;
    let (records_tx, records_rx) = watch::channel(Vec::new());
    let bind: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, cfg.gossip_port).into();
    let transport = QuicTransport::bind(bind, server, client, records_rx)
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
    let wg_port = cfg.wg_port.unwrap_or_else(|| {
        crate::default_wg_port(
            crate::nat::discovery::looks_public(advertise),
            &id.wg_public(),
        )
    });
    cfg.wg_port = Some(wg_port);

    let membership = Membership::new(network.key, id.node_key(), cfg.down_grace);

    // A node without an overlay address learns the members first, to pick a
    // free one; a fresh joiner that cannot reach any seed gives up with an error.
    if state.overlay_ip.is_none() {
        let reply = hello_any(&transport, &reach, cfg.join_timeout).await?;
        let entries: Vec<GossipEntry> = reply
            .into_iter()
            .filter_map(|text| {
                let v = crate::record::verify_record(&text, &network.key, None).ok()?;
                Some(GossipEntry {
                    node_id: proto::node_id_string(&v.body.node_key),
                    record: Some(text),
                    seen: None,
                    live: true,
                })
            })
            .collect();
        // A scratch view: only chitchat feeds the real one.
        let mut seen = Membership::new(network.key, id.node_key(), cfg.down_grace);
        seen.handle_snapshot(Instant::now(), &entries);
        let ip = ipalloc::choose(
            network.cidr,
            &id.node_key(),
            &seen.taken_ips(&id.node_key()),
        )
        .ok_or_else(|| anyhow!("network {} is full", network.cidr))?;
        state.overlay_ip = Some(ip);
        state.ip_claimed_at = unix_ms();
        tracing::info!(%ip, members = entries.len(), "joined; chose overlay address");
    }
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
    let mut node_state = state;
    let record = build_record(
        (&id, &network, &admission),
        &mut node_state,
        &cfg,
        advertise,
        (&traversal.nat, &traversal.observed_self),
        Flags {
            relay: false,
            left: false,
        },
    );
    dir.save_state(&node_state)?;
    let who = gossip::GossipIdentity {
        node_id: id.node_id(),
        generation: unix_ms(),
        advertise: SocketAddr::new(advertise, cfg.gossip_port),
        cluster_id: network.id(),
    };
    let gossip = match Gossip::start(
        who,
        node_state.seeds.clone(),
        &cfg.timing,
        transport,
        record,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            wg.destroy().await;
            return Err(e);
        }
    };
    tracing::info!(
        node = %node_state.name, id = %id.node_id(), %overlay_ip, interface = %cfg.interface,
        backend = ?wg.backend, %advertise, "meshpeer is up"
    );

    let prober = rtt::Prober::new(&cfg.interface);
    let wg_public = id.wg_public();
    let mut node = Node {
        cfg,
        dir,
        id,
        network,
        admission,
        state: node_state,
        advertise,
        membership,
        wg,
        gossip,
        records_tx,
        owned,
        status: status_tx,
        last_persist: Instant::now(),
        reach_backoff: Duration::from_secs(1),
        next_reach: Instant::now(),
        seed_addrs,
        traversal,
        last_rotation: 0,
        last_status: Instant::now(),
        last_step: Instant::now(),
        local_nets: None,
        prober,
        wg_public,
    };

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leave_reply = None;
    let answered = node.traversal.answered();
    let records_changed = node.gossip.records_changed();
    // Small-mesh rounds go to more members while records change (see
    // `gossip::BUSY_FANOUT`); a node starts busy.
    let mut busy_until = Instant::now() + BUSY_GOSSIP;
    // Gossip rounds of a small mesh, between chitchat's own (see
    // `Gossip::small_mesh_round`), unless chitchat's own are as frequent.
    let mut rounds = node.gossip.extra_round_every().map(|period| {
        let mut i = tokio::time::interval(period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    });
    loop {
        let small = tick.period() <= TICK;
        tokio::select! {
            // A record arrived or changed: in a small mesh, act on it now
            // rather than at the next tick (one gossip hop is 250 ms, so
            // waiting for the tick adds up to a hop to every join). Not in
            // large meshes, where records change all the time and the
            // stretched tick is what bounds a node's cost.
            _ = records_changed.notified(), if small && node.last_step.elapsed() >= MIN_STEP_GAP => {
                busy_until = Instant::now() + BUSY_GOSSIP;
                node.step_or_warn().await;
            }
            // A connectivity check was answered: handshake there now, not
            // at the next tick.
            _ = answered.notified() => node.on_stun_answer().await,
            Some(_) = async { Some(rounds.as_mut()?.tick().await) }, if rounds.is_some() => {
                let fanout = if Instant::now() < busy_until {
                    gossip::BUSY_FANOUT
                } else {
                    gossip::QUIET_FANOUT
                };
                node.gossip.small_mesh_round(fanout).await
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down (members will mark this node down)");
                break;
            }
            _ = tick.tick() => {
                node.step_or_warn().await;
                let period = tick_period(node.membership.members().count());
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
            }
        }
    }
    node.persist(true);
    node.gossip.shutdown().await;
    node.wg.destroy().await;
    control_task.abort();
    if let Some(r) = leave_reply {
        r.answer(Reply::Left).await;
    }
    Ok(())
}

/// The daemon's tick for a mesh of `members` known members (not left). A
/// tick's work grows with the number of members (snapshot, desired peers,
/// device reading, paths), so at hundreds of members a fixed tick makes
/// every node's idle cost grow with N and the mesh's with N²; stretching
/// the tick keeps a node's cost about flat, at the price of reacting a
/// little later in large meshes. Events that need an answer at once (a
/// STUN answer, a control request) do not wait for the tick.
fn tick_period(members: usize) -> Duration {
    if members <= TICK_MEMBERS {
        return TICK;
    }
    (TICK * members as u32 / TICK_MEMBERS as u32).min(MAX_TICK)
}

/// Removes the control socket when the daemon ends.
struct SocketGuard(PathBuf);
impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn hello_any(
    transport: &QuicTransport,
    reach: &[SocketAddr],
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    if reach.is_empty() {
        bail!("this node has no overlay address and no seed to join through (pass a seed: `meshpeer join SEED`)");
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    let mut backoff = Duration::from_millis(500);
    // Each pass gives the seeds longer (8, 16, then 32 s): a seed that is
    // slow to answer (hundreds of nodes joining at once) is not helped by
    // being asked again from scratch.
    let mut limit = Duration::from_secs(8);
    while tokio::time::Instant::now() < deadline {
        for addr in reach {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match transport
                .hello_within(*addr, limit.min(left.max(Duration::from_secs(1))))
                .await
            {
                Ok(r) => return Ok(r.records),
                Err(e @ gossip::transport::ProbeError::Refused { .. }) => {
                    return Err(anyhow!("cannot join: {e}"))
                }
                Err(e) => {
                    tracing::info!(seed = %addr, error = %e, "seed not reachable yet");
                    last_err = Some(e);
                }
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        limit = (limit * 2).min(Duration::from_secs(32));
    }
    Err(anyhow!(
        "cannot join: no seed answered within {timeout:?}{}",
        last_err
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    ))
}

/// Builds and signs this node's record, bumping its version.
/// The two booleans of a record, named.
struct Flags {
    relay: bool,
    left: bool,
}

fn build_record(
    (id, network, admission): (&Identity, &Network, &Signed),
    state: &mut NodeState,
    cfg: &DaemonConfig,
    advertise: IpAddr,
    (nat, observed): (&NatInfo, &[SocketAddr]),
    Flags { relay, left }: Flags,
) -> String {
    // Candidates, best first: the server-reflexive endpoint (if the NAT keeps
    // one mapping for all destinations), or, when STUN cannot tell (kernel
    // WireGuard), the endpoint our peers observe; then host addresses.
    let mut endpoints = Vec::new();
    if nat.kind == NatKind::EndpointIndependent {
        endpoints.extend(nat.mapped.first().copied());
    }
    if nat.kind == NatKind::Unknown {
        endpoints.extend(observed.iter().take(2).copied());
    }
    let host = SocketAddr::new(advertise, cfg.wg_port());
    if !endpoints.contains(&host) {
        endpoints.push(host);
    }
    for (net, _) in crate::net::local_ipv4_nets(&[&cfg.interface]) {
        let a = SocketAddr::new(IpAddr::V4(net.addr()), cfg.wg_port());
        if !endpoints.contains(&a)
            && !network.cidr.contains(&net.addr())
            && endpoints.len() < crate::record::MAX_ENDPOINTS
        {
            endpoints.push(a);
        }
    }
    state.record_version = (state.record_version + 1).max(unix_ms());
    let body = RecordBody {
        network_key: network.key,
        node_key: id.node_key(),
        version: state.record_version,
        name: state.name.clone(),
        overlay_ip: state
            .overlay_ip
            .unwrap_or(ipalloc::first_host(network.cidr)),
        ip_claimed_at: state.ip_claimed_at,
        wg_public_key: id.wg_public(),
        wg_port: cfg.wg_port(),
        endpoints,
        gossip_addr: SocketAddr::new(advertise, cfg.gossip_port),
        tags: vec![],
        routes: vec![],
        left,
        nat: nat.kind,
        relay,
        admission: admission.clone(),
    };
    body.sign(&id.signing)
}

impl Node {
    /// One step; a failed one is logged and retried at the next.
    async fn step_or_warn(&mut self) {
        if let Err(e) = self.step().await {
            tracing::warn!(error = %format!("{e:#}"), "reconcile step failed; retrying");
        }
    }

    async fn step(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        self.last_step = now;
        let entries = self.gossip.snapshot().await;
        let events = self.membership.handle_snapshot(now, &entries);
        for e in &events {
            log_event(e);
        }
        // What a joiner's hello is answered with: refreshed on change.
        if !events.is_empty() || self.records_tx.borrow().is_empty() {
            self.records_tx
                .send_replace(entries.iter().filter_map(|e| e.record.clone()).collect());
        }

        // Address conflict: the earlier claim keeps it; we move.
        let my_ip = self
            .state
            .overlay_ip
            .ok_or_else(|| anyhow!("no overlay address"))?;
        let mine = Claim {
            ip: my_ip,
            claimed_at: self.state.ip_claimed_at,
            node_key: self.id.node_key(),
        };
        if self.membership.loses_claim(&mine) {
            let taken = self.membership.taken_ips(&self.id.node_key());
            let ip = ipalloc::choose(self.network.cidr, &self.id.node_key(), &taken)
                .ok_or_else(|| anyhow!("network {} is full", self.network.cidr))?;
            tracing::warn!(old = %my_ip, new = %ip, "another member claimed our overlay address first; moving");
            self.state.overlay_ip = Some(ip);
            self.state.ip_claimed_at = unix_ms();
            self.wg.set_address(ip, self.network.cidr)?;
            self.republish(false).await;
            self.dir.save_state(&self.state)?;
        }

        // WireGuard: desired vs actual.
        let local = self.local_nets();
        // NAT: learn our mapping (STUN on the WireGuard port); republish
        // when it changed.
        let me = self.id.node_key();
        if self
            .traversal
            .discover(
                now,
                &self.membership,
                &me,
                &local,
                self.advertise,
                self.cfg.wg_port(),
            )
            .await
        {
            self.republish(false).await;
        }
        if self.relays() && self.traversal.ensure_forwarding() {
            self.republish(false).await;
        }

        let traversal = &self.traversal;
        let desired = self
            .membership
            .desired_peers(now, &local, &|k| traversal.hearing(now, k));
        let actual = self.wg.peers()?;
        let desired = self.traversal.select_paths(
            now,
            desired,
            &actual,
            &self.membership,
            &me,
            self.wg_public,
            &local,
        );
        // Round-trip probes: live members, again at once on a path change.
        let probe: Vec<([u8; 32], std::net::Ipv4Addr)> = self
            .membership
            .members()
            .filter(|x| x.record.node_key != me && x.liveness == Liveness::Live)
            .map(|x| (x.record.wg_public_key, x.record.overlay_ip))
            .collect();
        self.prober.poll(now, &probe, &self.traversal.changed);

        // Observed endpoints: publish what we see of members whose NAT is
        // unknown; learn what others see of us.
        let local_ips: Vec<IpAddr> = local.iter().map(|n| IpAddr::V4(n.addr())).collect();
        let obs = self.traversal.observe(
            now,
            &entries,
            &self.membership,
            &me,
            &actual,
            &local_ips,
            &self.network.key,
        );
        if let Some(seen) = obs.publish {
            let text = crate::observe::Observations {
                network_key: self.network.key,
                observer: me,
                issued_at: unix_ms(),
                seen,
            }
            .sign(&self.id.signing);
            self.gossip.publish_seen(text).await;
        }
        if obs.changed {
            self.republish(false).await;
        }
        // The poke beat is wall-clock time, shared by every member: both
        // ends of a pair send their checks in the same beat, which is what
        // opens both NATs at once (see `nat::checks`).
        let rotation = (unix_ms() / POKE_EVERY.as_millis() as u64) as usize;
        let poke = rotation != self.last_rotation;
        self.last_rotation = rotation;
        let traversal = &self.traversal;
        let mut changes = reconcile(&desired, &actual, &self.owned, rotation, poke, &|k| {
            !traversal.hearing(now, k)
        });
        if traversal.checks_punch() {
            // Connectivity checks do the punching (and force the handshake
            // when a candidate answers): a poke only keeps live sessions
            // talking. Poking a peer without a session would start a
            // handshake every 10 s that mostly goes nowhere, and at
            // hundreds of members those X25519 operations are the largest
            // CPU cost.
            let sessions: std::collections::HashSet<[u8; 32]> = actual
                .iter()
                .filter(|a| {
                    a.handshake_age
                        .is_some_and(|age| age < crate::reconcile::FRESH_HANDSHAKE)
                })
                .map(|a| a.public_key)
                .collect();
            changes.retain(|c| match c {
                PeerChange::Poke { public_key, .. } => sessions.contains(public_key),
                _ => true,
            });
        }
        if !changes.is_empty() {
            for c in &changes {
                log_change(c, &self.membership);
            }
            self.wg.apply(&changes)?;
            for c in &changes {
                match c {
                    PeerChange::Add { public_key, .. } => {
                        self.owned.insert(*public_key);
                    }
                    PeerChange::Remove { public_key } => {
                        self.owned.remove(public_key);
                    }
                    PeerChange::Update { .. } | PeerChange::Poke { .. } => {}
                }
            }
            self.persist(true);
        }
        // Only members we now have a WireGuard peer for get answers to
        // their checks.
        self.traversal
            .set_wg_peers(desired.iter().map(|d| &d.public_key));
        // Connectivity checks: handshakes to candidates that answered, then
        // the next checks (and punches).
        self.traversal.force_handshakes(now).await;
        self.traversal.send_checks(now, poke).await;

        // Never alone for good: with no live member, knock on every address
        // we know (seeds and last-known members), with backoff.
        let me = self.id.node_id();
        let live = entries.iter().filter(|e| e.live && e.node_id != me).count();
        let expected: std::collections::HashSet<SocketAddr> = self
            .membership
            .members()
            .filter(|m| {
                m.record.nat == NatKind::Public
                    || crate::membership::on_local_net(&local, &m.record.gossip_addr)
            })
            .map(|m| m.record.gossip_addr)
            .collect();
        let live_addrs = self.gossip.live_addrs().await;
        self.gossip.transport.set_live(live_addrs.clone(), expected);
        if live == 0 {
            if Instant::now() >= self.next_reach {
                let mut addrs = self.seed_addrs.clone();
                addrs.extend(self.state.known_members.iter().copied());
                for a in addrs {
                    self.gossip.gossip_to(a);
                }
                self.next_reach = Instant::now() + self.reach_backoff;
                self.reach_backoff = (self.reach_backoff * 2).min(Duration::from_secs(30));
            }
        } else {
            self.reach_backoff = Duration::from_secs(1);
        }

        // Status from this tick's reading of the device (before the changes
        // just applied). Rebuilt when something changed, else every 2 s:
        // at hundreds of members, building it is a good part of a tick.
        if !events.is_empty() || !changes.is_empty() || self.last_status.elapsed() >= STATUS_EVERY {
            self.status.send_replace(Some(self.build_status(&actual)));
            self.last_status = Instant::now();
        }
        if self.last_persist.elapsed() > Duration::from_secs(10) {
            if !live_addrs.is_empty() && live_addrs != self.state.known_members {
                self.state.known_members = live_addrs;
            }
            self.persist(false);
        }
        Ok(())
    }

    /// The host's IPv4 networks (not our overlay), read again every
    /// [`LOCAL_NETS_EVERY`]: reading them is a few syscalls per interface,
    /// and they change rarely.
    fn local_nets(&mut self) -> Vec<Ipv4Net> {
        match &self.local_nets {
            Some((at, nets)) if at.elapsed() < LOCAL_NETS_EVERY => nets.clone(),
            _ => {
                let nets: Vec<Ipv4Net> = crate::net::local_ipv4_nets(&[&self.cfg.interface])
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                self.local_nets = Some((Instant::now(), nets.clone()));
                nets
            }
        }
    }

    /// Whether this member offers relaying (public, and not `--no-relay`).
    fn relays(&self) -> bool {
        self.cfg.relay && self.traversal.nat.kind == NatKind::Public
    }

    /// A STUN answer arrived on the WireGuard port: handshakes to checked
    /// candidates now, and a new NAT picture published now (one gossip hop
    /// earlier for every member than waiting for the next tick).
    async fn on_stun_answer(&mut self) {
        self.traversal.force_handshakes(Instant::now()).await;
        if self.traversal.take_discovery_news() {
            let local = self.local_nets();
            if self
                .traversal
                .refresh_nat(&local, self.advertise, self.cfg.wg_port())
            {
                self.republish(false).await;
            }
        }
    }

    async fn republish(&mut self, left: bool) {
        let relay = self.relays() && self.traversal.forwarding();
        let record = build_record(
            (&self.id, &self.network, &self.admission),
            &mut self.state,
            &self.cfg,
            self.advertise,
            (&self.traversal.nat, &self.traversal.observed_self),
            Flags { relay, left },
        );
        self.gossip.publish(record).await;
    }

    fn persist(&mut self, force: bool) {
        self.state.owned_peers = self
            .owned
            .iter()
            .map(|k| base64::engine::general_purpose::STANDARD.encode(k))
            .collect();
        if force || self.last_persist.elapsed() > Duration::from_secs(10) {
            if let Err(e) = self.dir.save_state(&self.state) {
                tracing::warn!(error = %e, "cannot save state");
            }
            self.last_persist = Instant::now();
        }
    }

    /// Publishes a signed leave record and pushes it to every live member.
    async fn leave(&mut self) {
        tracing::info!("leaving the mesh");
        self.republish(true).await;
        let deadline = Instant::now() + LEAVE_LINGER;
        while Instant::now() < deadline {
            for a in self.gossip.live_addrs().await {
                self.gossip.gossip_to(a);
            }
            tokio::time::sleep(self.cfg.timing.interval / 2).await;
        }
    }

    fn build_status(&self, actual: &[crate::reconcile::ActualPeer]) -> Status {
        let peer_of = |k: &[u8; 32]| actual.iter().find(|p| &p.public_key == k);
        let fresh = |k: &[u8; 32]| {
            peer_of(k)
                .and_then(|p| p.handshake_age)
                .is_some_and(|a| a < FRESH_HANDSHAKE)
        };
        let name_of = |k: &[u8; 32]| {
            self.membership
                .members()
                .find(|x| &x.record.wg_public_key == k)
                .map(|x| x.record.name.clone())
                .unwrap_or_default()
        };
        let mut members: Vec<MemberStatus> = self
            .membership
            .members()
            .map(|m| {
                let r = &m.record;
                let is_self = r.node_key == self.id.node_key();
                let peer = peer_of(&r.wg_public_key);
                let age = peer.and_then(|p| p.handshake_age);
                let path = self.traversal.paths.get(&r.wg_public_key).copied();
                let reachable = match path {
                    Some(Path::Relayed { via }) => fresh(&via),
                    _ => fresh(&r.wg_public_key),
                };
                let state = if is_self {
                    MemberState::Myself
                } else if matches!(m.liveness, Liveness::Down { .. }) {
                    MemberState::Down
                } else if reachable {
                    MemberState::Connected
                } else {
                    MemberState::Connecting
                };
                let endpoint = if is_self {
                    Some(SocketAddr::new(self.advertise, self.cfg.wg_port()))
                } else if let Some(Path::Relayed { via }) = path {
                    peer_of(&via).and_then(|p| p.endpoint)
                } else {
                    peer.and_then(|p| p.endpoint)
                };
                let (path_text, relay, why) = match path {
                    _ if is_self || state == MemberState::Down => (None, None, None),
                    Some(Path::Direct) => (Some("direct".to_string()), None, None),
                    Some(Path::Relayed { via }) => (
                        Some("relayed".to_string()),
                        Some(name_of(&via)),
                        Some(traversal::relay_reason(
                            self.traversal.nat.kind,
                            r.nat,
                            &self.traversal.nat.mapped,
                            &r.endpoints,
                        )),
                    ),
                    Some(Path::Trying) | None => (Some("trying".to_string()), None, None),
                };
                MemberStatus {
                    name: r.name.clone(),
                    node_id: proto::node_id_string(&r.node_key),
                    overlay_ip: r.overlay_ip,
                    public_key: proto::key_b64(&r.wg_public_key),
                    endpoint: endpoint.map(|e| e.to_string()),
                    state,
                    path: path_text,
                    relay,
                    why_not_direct: why,
                    nat: nat_name(r.nat).to_string(),
                    last_handshake_secs: age.map(|a| a.as_secs()),
                    rtt_us: self
                        .prober
                        .rtt
                        .get(&r.wg_public_key)
                        .copied()
                        .flatten()
                        .map(|d| d.as_micros() as u64),
                    rx_bytes: peer.map_or(0, |p| p.rx_bytes),
                    tx_bytes: peer.map_or(0, |p| p.tx_bytes),
                    tags: r.tags.clone(),
                }
            })
            .collect();
        members.sort_by_key(|m| m.overlay_ip);
        let (sent, received) = self.gossip.transport.byte_counts();
        Status {
            node: self.state.name.clone(),
            node_id: self.id.node_id(),
            network: self.network.cidr.to_string(),
            interface: self.cfg.interface.clone(),
            backend: self.wg.backend,
            listen_port: self.cfg.wg_port(),
            gossip_addr: SocketAddr::new(self.advertise, self.cfg.gossip_port).to_string(),
            gossip_bytes_sent: sent,
            gossip_bytes_received: received,
            nat: nat_name(self.traversal.nat.kind).to_string(),
            mapped_endpoints: self
                .traversal
                .nat
                .mapped
                .iter()
                .map(|e| e.to_string())
                .collect(),
            relaying: self.relays() && self.traversal.forwarding(),
            myself: members
                .iter()
                .find(|m| m.state == MemberState::Myself)
                .cloned(),
            members,
        }
    }
}

fn nat_name(k: NatKind) -> &'static str {
    match k {
        NatKind::Unknown => "unknown",
        NatKind::Public => "public",
        NatKind::EndpointIndependent => "endpoint-independent",
        NatKind::EndpointDependent => "symmetric",
    }
}

fn log_event(e: &Event) {
    match e {
        Event::Joined {
            name,
            node,
            overlay_ip,
        } => tracing::info!(member = %name, %node, %overlay_ip, "member joined"),
        Event::Updated { name, version } => {
            tracing::debug!(member = %name, version, "member updated its record")
        }
        Event::Left { name } => tracing::info!(member = %name, "member left"),
        Event::Down { name } => tracing::warn!(member = %name, "member is down"),
        Event::Up { name } => tracing::info!(member = %name, "member is back up"),
        Event::Forgotten { name } => tracing::info!(member = %name, "member forgotten"),
        Event::Rejected { node, reason } => {
            tracing::warn!(%node, %reason, "dropped a record that failed verification")
        }
        Event::Replay { node, held, got } => {
            tracing::warn!(%node, held, got, "dropped a replayed (older) record")
        }
    }
}

fn log_change(c: &PeerChange, m: &Membership) {
    let name = m
        .members()
        .find(|x| &x.record.wg_public_key == c.public_key())
        .map(|x| x.record.name.clone())
        .unwrap_or_else(|| "(gone)".into());
    let peer = proto::short_key(c.public_key());
    match c {
        PeerChange::Add {
            allowed_ips,
            endpoint,
            ..
        } => {
            tracing::info!(%peer, member = %name, ?allowed_ips, ?endpoint, "adding WireGuard peer")
        }
        PeerChange::Update {
            endpoint,
            allowed_ips,
            ..
        } => {
            tracing::info!(%peer, member = %name, ?endpoint, ?allowed_ips, "updating WireGuard peer")
        }
        PeerChange::Remove { .. } => {
            tracing::info!(%peer, member = %name, "removing WireGuard peer")
        }
        PeerChange::Poke { .. } => {
            tracing::debug!(%peer, member = %name, "retrying the handshake (hole punch)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_stretches_with_the_mesh_and_is_bounded() {
        assert_eq!(tick_period(0), TICK);
        assert_eq!(tick_period(TICK_MEMBERS), TICK);
        assert_eq!(tick_period(2 * TICK_MEMBERS), 2 * TICK);
        assert!(tick_period(100) > tick_period(60));
        assert_eq!(tick_period(10_000), MAX_TICK);
        // Monotone: a larger mesh never ticks faster.
        let mut last = Duration::ZERO;
        for n in 0..1000 {
            let t = tick_period(n);
            assert!(t >= last, "tick for {n} members shrank");
            last = t;
        }
    }
}
