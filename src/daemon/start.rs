//! Starting a node, in the order it happens: the state directory and what
//! it says about our trust ([`Boot::open`]), the gossip endpoint, the
//! addresses and ports, first contact (a joiner's stamp, a member's view
//! of who holds what, our overlay address), the WireGuard interface, and
//! finally the gossip engine and the [`Node`] that the loop (`run.rs`)
//! drives.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use base64::Engine;
use tokio::sync::{mpsc, watch};

use super::{
    hosts, join, load_network, ops, own_credential, probes, relay, routes, save_stamp, traversal,
    unix_ms, DaemonConfig, JoinProgress, Node, SLOW_SEED_WAIT,
};
use crate::admission::{AdmissionError, Credential, Network};
use crate::gossip::rounds::RoundPlanner;
use crate::gossip::transport::HelloReply;
use crate::gossip::{tls, Gossip, QuicTransport};
use crate::identity::Identity;
use crate::liveness::Liveness;
use crate::membership::Membership;
use crate::proto::{self, Signed};
use crate::state::{NodeState, StateDir};
use crate::status::Status;
use crate::trust::{self, TrustState};
use crate::wg::WgInterface;

/// What a starting node has read from its state directory.
pub(super) struct Boot {
    pub cfg: DaemonConfig,
    pub dir: StateDir,
    pub id: Identity,
    pub network: Network,
    pub admission: Signed,
    pub state: NodeState,
    pub trust: Arc<TrustState>,
    /// Our stamp, `None` for a joiner (or a member whose stamper was
    /// revoked: it asks for a new one as a joiner does).
    pub stamp: Option<Signed>,
}

/// Where the loop's inputs arrive (the senders are in the [`Node`]).
pub(super) struct Inbox {
    pub acks: mpsc::Receiver<probes::Ack>,
    pub allocs: mpsc::Receiver<super::AllocAnswer>,
    pub restamps: mpsc::Receiver<Signed>,
}

/// Where the node's traffic goes and comes from, chosen at start.
struct Reach {
    /// The seeds given now, resolved.
    seed_addrs: Vec<SocketAddr>,
    /// The seeds and the members known from last time: whom first contact
    /// tries.
    reach: Vec<SocketAddr>,
    advertise: IpAddr,
    wg_port: u16,
}

impl Boot {
    /// Opens the state directory: identity, network, admission, stamp and
    /// state; the seeds given now are remembered. A node revoked while it
    /// was down stops here.
    pub fn open(cfg: DaemonConfig) -> anyhow::Result<Self> {
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
        let trust = Arc::new(TrustState::new(network, trust::system_clock()));
        if let Some(text) = &state.revoked {
            match crate::admission::verify_revocations(text, &network.key) {
                Ok(list) => {
                    trust.update_revocations(list, text.clone());
                }
                Err(e) => tracing::warn!(error = %e, "ignoring the stored revocation list"),
            }
        }
        let stamp = match stamp {
            Some(s) => match own_credential(&trust, &id, &admission, &s) {
                Err(AdmissionError::Revoked(what)) => anyhow::bail!(
                    "this node was revoked ({what}); it is no longer a member of the mesh"
                ),
                // A stamp by a member revoked since is void: ask for a new
                // one, as a joiner does (granted while our token is good).
                Err(AdmissionError::StamperRevoked(by)) => {
                    tracing::warn!(stamper = %by, "the member that admitted this node was revoked; asking for a new stamp");
                    None
                }
                _ => Some(s),
            },
            None => None,
        };
        Ok(Self {
            cfg,
            dir,
            id,
            network,
            admission,
            state,
            trust,
            stamp,
        })
    }

    /// The gossip endpoint: QUIC with mutual TLS from the node key and our
    /// credential, and a stateless-reset key that survives restarts.
    fn bind_gossip(&self) -> anyhow::Result<QuicTransport> {
        let credential = Credential {
            admission: self.admission.clone(),
            stamp: self.stamp.clone(),
        };
        let cert = tls::NodeCert::new(&self.id.signing, &credential)?;
        let (server, client) = tls::quic_configs(&cert, self.trust.clone())?;
        let bind: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, self.cfg.gossip_port).into();
        let reset = crate::gossip::transport::reset_secret(&self.id.signing.to_bytes());
        QuicTransport::bind_with_reset_secret(bind, server, client, self.trust.clone(), Some(reset))
            .with_context(|| {
                format!(
                    "cannot bind the gossip port udp/{} (is another meshpeer running in this network namespace?)",
                    self.cfg.gossip_port
                )
            })
    }

    /// Seeds and known members, the address we advertise and our ports
    /// (which must differ); tells the operator which ports to open.
    fn reach(&mut self) -> anyhow::Result<Reach> {
        let cfg = &self.cfg;
        let mut seed_addrs = Vec::new();
        for s in &self.state.seeds {
            match crate::net::resolve_seed(s) {
                Ok(a) => seed_addrs.extend(a),
                Err(e) => {
                    tracing::warn!(seed = %s, error = %e, "cannot resolve seed; will retry through gossip")
                }
            }
        }
        let mut reach: Vec<SocketAddr> = seed_addrs.clone();
        reach.extend(self.state.known_members.iter().copied());
        reach.sort();
        reach.dedup();
        let advertise = cfg
            .advertise
            .or(self.state.advertise_addr)
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
        if let Some(s) = seed_addrs.iter().find(|s| {
            (own.contains(&s.ip()) || s.ip().is_loopback()) && s.port() == cfg.gossip_port
        }) {
            if self.stamp.is_none() {
                anyhow::bail!("the seed {s} is this node itself; give the address of a member of the mesh to join");
            }
        }
        let public = crate::nat::discovery::looks_public(advertise);
        let wg_port = cfg
            .wg_port
            .unwrap_or_else(|| crate::default_wg_port(public, &self.id.wg_public()));
        if wg_port == cfg.gossip_port
            || wg_port == cfg.probe_port
            || cfg.gossip_port == cfg.probe_port
        {
            anyhow::bail!(
                "ports must differ: WireGuard {wg_port}, gossip {}, probes {}",
                cfg.gossip_port,
                cfg.probe_port
            );
        }
        self.cfg.wg_port = Some(wg_port);
        ops::firewall_notice(&self.cfg, wg_port, public);
        tracing::info!(
            wireguard = %format!("{wg_port}/udp"), gossip = %format!("{}/udp", self.cfg.gossip_port),
            probes = %format!("{}/udp (overlay only)", self.cfg.probe_port),
            "ports this node uses (public members: open WireGuard and gossip)"
        );
        Ok(Reach {
            seed_addrs,
            reach,
            advertise,
            wg_port,
        })
    }

    /// The membership core, with the holders of addresses and names we
    /// knew last time.
    fn membership(&self) -> Membership {
        let mut membership = Membership::new(self.id.node_key(), self.cfg.down_grace);
        membership.holders_mut().adopt(
            self.state
                .holders
                .iter()
                .filter_map(|(ip, k)| Some((*ip, proto::parse_node_id(k)?))),
            self.state
                .names
                .iter()
                .filter_map(|(n, k)| Some((n.clone(), proto::parse_node_id(k)?))),
        );
        membership
    }

    /// First contact, for a joiner or a member without an address: a
    /// joiner gets its stamp (saved, and the TLS identity renewed); either
    /// learns who holds what and picks a free address. Returns the records
    /// the seed handed over (they go into gossip at once).
    async fn first_contact(
        &mut self,
        transport: &QuicTransport,
        reach: &[SocketAddr],
        membership: &mut Membership,
    ) -> anyhow::Result<Vec<String>> {
        if self.stamp.is_some() && self.state.overlay_ip.is_some() {
            return Ok(Vec::new());
        }
        let joining = self.stamp.is_none();
        let outcome = join::contact(
            transport,
            reach,
            &self.state.name,
            joining,
            joining,
            self.cfg.join_timeout,
            SLOW_SEED_WAIT.max(self.cfg.join_timeout),
        )
        .await?;
        let hello = match outcome {
            join::Outcome::Admitted { stamp, hello, seed } => {
                tracing::info!(%seed, "admitted to the mesh");
                let credential = Credential {
                    admission: self.admission.clone(),
                    stamp: Some(stamp.clone()),
                };
                self.trust
                    .check_credential(&credential, &self.id.node_key())
                    .context("the seed's stamp does not verify")?;
                save_stamp(&self.dir, &stamp)?;
                let cert = tls::NodeCert::new(&self.id.signing, &credential)?;
                let (server, client) = tls::quic_configs(&cert, self.trust.clone())?;
                transport.reconfigure(server, client);
                self.stamp = Some(stamp);
                hello
            }
            join::Outcome::Hello { hello, seed } => {
                tracing::info!(%seed, members = hello.records.len(), "learned the mesh");
                hello
            }
        };
        if let Some(text) = &hello.revoked {
            if let Ok(list) = crate::admission::verify_revocations(text, &self.network.key) {
                self.trust.update_revocations(list, text.clone());
                self.state.revoked = Some(text.clone());
            }
        }
        membership
            .holders_mut()
            .adopt(hello.holders.clone(), hello.names.clone());
        if self.state.overlay_ip.is_none() {
            self.choose_address(&hello, joining)?;
        }
        Ok(hello.records)
    }

    /// Our overlay address: one that nobody in the seed's view holds.
    fn choose_address(&mut self, hello: &HelloReply, first_join: bool) -> anyhow::Result<()> {
        let records: Vec<Arc<str>> = hello
            .records
            .iter()
            .map(|t| Arc::from(t.as_str()))
            .collect();
        let (key, cidr, grace) = (self.id.node_key(), self.network.cidr, self.cfg.down_grace);
        let ip = self
            .trust
            .with_trust(|t| {
                crate::membership::choose_joiner_address(
                    Instant::now(),
                    &key,
                    cidr,
                    &hello.holders,
                    &hello.names,
                    &records,
                    t,
                    grace,
                )
            })
            .ok_or_else(|| anyhow!("network {cidr} is full"))?;
        self.state.overlay_ip = Some(ip);
        self.state.ip_claimed_at = unix_ms();
        tracing::info!(%ip, members = records.len(), "chose overlay address");
        if first_join {
            eprintln!("meshpeer: overlay address {ip}");
        }
        Ok(())
    }

    /// Opens (or creates) the WireGuard interface with our address. The
    /// peers we created on it before are ours to manage; on an interface
    /// we did not create, none are.
    async fn open_interface(
        &mut self,
        wg_port: u16,
    ) -> anyhow::Result<(WgInterface, BTreeSet<[u8; 32]>, std::net::Ipv4Addr)> {
        let overlay_ip = self
            .state
            .overlay_ip
            .ok_or_else(|| anyhow!("no overlay address"))?;
        let cfg = &self.cfg;
        let owned_if = self.state.interface_created.as_deref() == Some(cfg.interface.as_str());
        let wg = WgInterface::open(
            &cfg.interface,
            self.id.wg_secret.to_bytes(),
            wg_port,
            owned_if,
            cfg.backend,
        )
        .await?;
        self.state.interface_created = Some(cfg.interface.clone());
        let owned: BTreeSet<[u8; 32]> = if owned_if {
            self.state
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
            // A new interface has none of the routes a former one had.
            self.state.installed_routes.clear();
            BTreeSet::new()
        };
        self.dir.save_state(&self.state)?;
        if let Err(e) = wg.set_address(overlay_ip, self.network.cidr) {
            wg.destroy().await;
            return Err(e.into());
        }
        Ok((wg, owned, overlay_ip))
    }

    /// The gossip engine on `transport`, answering join, hello and relay
    /// requests, holding what the seed handed over and our revocation list.
    fn start_gossip(
        &self,
        transport: QuicTransport,
        first_records: &[String],
        relay: &relay::RelayServer,
    ) -> (Gossip, watch::Sender<Arc<HelloReply>>) {
        let trust = &self.trust;
        let gossip = Gossip::start(
            &self.id.node_id(),
            self.network.id(),
            trust.clone(),
            transport,
            rand::random(),
        );
        let (hello_tx, hello_rx) = watch::channel(Arc::new(HelloReply::default()));
        gossip.set_request_handler(Arc::new(join::Handler {
            trust: trust.clone(),
            signing: self.id.signing.clone(),
            admission: self.admission.clone(),
            hello: hello_rx,
            allocator: Some(Arc::new(relay.clone())),
        }));
        for text in first_records {
            if let Ok(v) = trust.with_trust(|t| crate::record::verify_record(text, t, None)) {
                gossip.inject(
                    &proto::node_id_string(&v.body.node_key),
                    trust::RECORD_KEY,
                    text,
                    v.body.version,
                );
            }
        }
        if let Some(text) = &self.state.revoked {
            if let Ok(list) = crate::admission::verify_revocations(text, &self.network.key) {
                gossip.inject(
                    trust::AUTHORITY_NODE,
                    trust::REVOKED_KEY,
                    text,
                    list.issued_at_ms,
                );
            }
        }
        (gossip, hello_tx)
    }

    /// Everything from the gossip endpoint to a running [`Node`] that has
    /// published its record and listens for probes.
    pub async fn start(
        mut self,
        ops: ops::Ops,
        status: watch::Sender<Option<Status>>,
    ) -> anyhow::Result<(Node, Inbox)> {
        let transport = self.bind_gossip()?;
        let reach = self.reach()?;
        let mut membership = self.membership();
        let first_join = self.stamp.is_none();
        let first_records = self
            .first_contact(&transport, &reach.reach, &mut membership)
            .await?;
        let stamp = self.stamp.clone().ok_or_else(|| anyhow!("not admitted"))?;
        let (wg, owned, overlay_ip) = self.open_interface(reach.wg_port).await?;
        let mut stun_servers = Vec::new();
        for s in &self.cfg.stun_servers {
            match crate::net::resolve_seed(s) {
                Ok(a) => stun_servers.extend(a.into_iter().filter(|a| a.is_ipv4())),
                Err(e) => tracing::warn!(server = %s, error = %e, "cannot resolve STUN server"),
            }
        }
        let traversal = traversal::Traversal::start(&wg, stun_servers, self.id.wg_public());
        let relay = relay::RelayServer::new(self.cfg.relay_ports);
        let (gossip, hello_tx) = self.start_gossip(transport, &first_records, &relay);
        let (acks_tx, acks) = mpsc::channel(1024);
        let (alloc_tx, allocs) = mpsc::channel(256);
        let (restamp_tx, restamps) = mpsc::channel(1);
        let Boot {
            cfg,
            dir,
            id,
            network,
            admission,
            state,
            trust,
            ..
        } = self;
        let routes = routes::RouteState::new(&state.installed_routes);
        let hosts = hosts::HostsState::new(cfg.hosts_file.clone());
        let now = Instant::now();
        let mut node = Node {
            liveness: {
                // Whatever a previous run of ours accused, we no longer
                // stand by: an empty list goes out first (PROTOCOL §5.3).
                let mut l = Liveness::new(network.key, id.node_key(), rand::random());
                l.withdraw_previous();
                l
            },
            planner: RoundPlanner::new(rand::random()),
            wg_public: id.wg_public(),
            cfg,
            dir,
            id,
            network,
            admission,
            stamp,
            state,
            advertise: reach.advertise,
            trust,
            membership,
            wg,
            gossip,
            hello_tx,
            owned,
            status,
            last_persist: now,
            known_at: now,
            seed_addrs: reach.seed_addrs,
            traversal,
            last_rotation: 0,
            last_status: now,
            last_step: now,
            states_at_step: 0,
            last_join_step: None,
            step_due: None,
            steps: 0,
            step_time: std::time::Duration::ZERO,
            trimmed_at: None,
            wakeups: 0,
            local_nets: None,
            probes: None,
            probe_shared: probes::Shared::default(),
            acks_tx,
            ip_since: now,
            fed: Default::default(),
            published_record: None,
            left: false,
            restamp_at: None,
            restamp_tx,
            self_revoked: None,
            join_progress: first_join.then_some(JoinProgress {
                since: now,
                last: (usize::MAX, 0),
            }),
            last_change: now,
            relay,
            alloc_tx,
            alloc_chain: Default::default(),
            ops,
            routes,
            hosts,
        };
        if let Err(e) = node.republish(false).await {
            node.wg.destroy().await;
            return Err(e);
        }
        node.bind_probes().await;
        tracing::info!(
            node = %node.state.name, id = %node.id.node_id(),
            %overlay_ip, interface = %node.cfg.interface,
            backend = ?node.wg.backend, advertise = %node.advertise, "meshpeer is up"
        );
        Ok((
            node,
            Inbox {
                acks,
                allocs,
                restamps,
            },
        ))
    }
}
