//! The daemon's NAT-traversal shell: moves STUN datagrams on the WireGuard
//! socket, drives [`Discovery`], and applies [`PathSelector`]'s choice of
//! direct or relayed paths. The decisions are in `crate::nat` (sans-IO).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use crate::membership::{on_local_net, DesiredPeer, GossipEntry, Liveness, Membership};
use crate::nat::allocs::Allocations;
use crate::nat::checks::{Checks, Need, Validated};
use crate::nat::discovery::{looks_public, Discovery, NatInfo};
use crate::nat::endpoints::{self, PeerView, StunCandidate};
use crate::nat::paths::{Path, PathSelector};
use crate::nat::stun::{self, StunMessage};
use crate::observe::{self, ObservationBook, Observed, Seen};
use crate::proto::PublicKeyBytes;
use crate::reconcile::ActualPeer;
use crate::record::NatKind;
use crate::wg::{userspace::RawSender, WgInterface};

/// What one observation step asks of the daemon.
pub struct ObserveStep {
    /// New observations to sign and publish.
    pub publish: Option<Vec<Seen>>,
    /// Our observed endpoints changed: republish the record.
    pub changed: bool,
}

/// How often our own observations may be republished.
const SEEN_REPUBLISH: Duration = Duration::from_secs(10);

pub struct Traversal {
    book: ObservationBook,
    published_seen: Option<Vec<Seen>>,
    seen_at: Option<Instant>,
    rejected_seen: HashSet<PublicKeyBytes>,
    /// Where members observe our WireGuard packets (used in the record when
    /// STUN cannot tell, see `build_record`).
    pub observed_self: Vec<SocketAddr>,
    /// Peers without a direct path that a punch can reach, with their
    /// candidates: the connectivity checks go there.
    need: Vec<([u8; 32], Vec<SocketAddr>)>,
    checks: Checks,
    /// Signalled when a STUN answer arrived (the daemon then acts on
    /// connectivity checks at once instead of at the next tick).
    answered: Arc<Notify>,
    /// Peers with a fresh handshake that we hear from (no checks).
    working: HashSet<[u8; 32]>,
    /// Working peers whose packets go unanswered, with the endpoint in
    /// use: checked, and moved only if another candidate answers.
    suspect: HashMap<[u8; 32], SocketAddr>,
    /// Relayed peers whose session is on another port of their relay
    /// (`EndpointPlan::repoint`): their endpoint is replaced, working or not.
    repoint: HashSet<[u8; 32]>,
    /// Checks answered since the last `force_handshakes`.
    validated: Vec<Validated>,
    /// A discovery answer arrived (see `take_discovery_news`).
    discovery_news: bool,
    discovery: Discovery,
    selector: PathSelector,
    sender: Option<RawSender>,
    /// STUN answers on the WireGuard port: transaction id, the mapped
    /// address they report (`None`: a refused check), and who sent them.
    responses: Option<mpsc::Receiver<StunAnswer>>,
    /// What STUN says about our NAT.
    pub nat: NatInfo,
    /// The path chosen for each peer (by WireGuard key).
    pub paths: BTreeMap<[u8; 32], Path>,
    /// The peers whose path changed in the last `select_paths`.
    pub changed: Vec<[u8; 32]>,
    /// Relay allocations per peer (WireGuard key).
    allocations: Allocations,
    /// Outside STUN servers (`--stun-server`), asked before members.
    outside: Vec<SocketAddr>,
    /// Our WireGuard key (checks name their sender).
    my_wg_key: [u8; 32],
    /// First 8 bytes of the WireGuard keys we have peers for: a check from
    /// anyone else is refused (their handshake would be dropped).
    wg_peers: Arc<std::sync::RwLock<HashSet<[u8; 8]>>>,
}

/// A STUN answer on the WireGuard port: transaction id, the mapped address
/// it reports (`None`: a refused check), and who sent it.
type StunAnswer = ([u8; 12], Option<SocketAddr>, SocketAddr);

impl Traversal {
    /// Starts answering STUN on the WireGuard port (userspace backend; the
    /// kernel's WireGuard socket cannot carry STUN, so a kernel node learns
    /// nothing here and publishes `NatKind::Unknown`).
    pub fn start(wg: &WgInterface, outside: Vec<SocketAddr>, my_wg_key: [u8; 32]) -> Self {
        let answered = Arc::new(Notify::new());
        let wg_peers: Arc<std::sync::RwLock<HashSet<[u8; 8]>>> = Arc::default();
        let (sender, responses) = match wg.raw_channel() {
            Some((sender, mut raw)) => {
                let (tx, rx) = mpsc::channel(1024);
                let reply = sender.clone();
                let signal = Arc::clone(&answered);
                let peers = Arc::clone(&wg_peers);
                tokio::spawn(async move {
                    while let Some((from, bytes)) = raw.recv().await {
                        match stun::parse(&bytes) {
                            Some(StunMessage::Request {
                                txid,
                                for_key,
                                from_key,
                            }) => {
                                // A check meant for another member (it
                                // shares our public address) stays
                                // unanswered; one from a member we have no
                                // peer for yet is refused.
                                let is_peer = |k: &[u8; 8]| {
                                    peers.read().unwrap_or_else(|p| p.into_inner()).contains(k)
                                };
                                let answer = match stun::answer_request(
                                    for_key, from_key, &my_wg_key, is_peer,
                                ) {
                                    stun::Answer::Answer => {
                                        Some(stun::binding_response(txid, from))
                                    }
                                    stun::Answer::Refuse => Some(stun::refusal(txid)),
                                    stun::Answer::Ignore => None,
                                };
                                if let Some(a) = answer {
                                    let _ = reply.send(from, &a).await;
                                }
                            }
                            Some(StunMessage::Response { txid, mapped }) => {
                                let _ = tx.try_send((txid, Some(mapped), from));
                                signal.notify_one();
                            }
                            Some(StunMessage::Refused { txid }) => {
                                let _ = tx.try_send((txid, None, from));
                            }
                            Some(StunMessage::ClassicRequest { txid }) => {
                                if let Some(r) = stun::classic_binding_response(txid, from) {
                                    let _ = reply.send(from, &r).await;
                                }
                            }
                            None => {
                                tracing::trace!(%from, "ignored a non-STUN datagram on the WireGuard port")
                            }
                        }
                    }
                });
                (Some(sender), Some(rx))
            }
            None => (None, None),
        };
        Self {
            book: ObservationBook::default(),
            published_seen: None,
            seen_at: None,
            rejected_seen: HashSet::new(),
            observed_self: Vec::new(),
            need: Vec::new(),
            answered,
            my_wg_key,
            wg_peers,
            checks: Checks::default(),
            working: HashSet::new(),
            suspect: HashMap::new(),
            repoint: HashSet::new(),
            validated: Vec::new(),
            discovery_news: false,
            discovery: Discovery::new(rand::random()),
            selector: PathSelector::default(),
            sender,
            responses,
            nat: NatInfo {
                kind: NatKind::Unknown,
                mapped: vec![],
            },
            paths: BTreeMap::new(),
            changed: Vec::new(),
            allocations: Allocations::default(),
            outside,
        }
    }

    /// One discovery step; returns true when the NAT picture changed (the
    /// record must be republished).
    pub async fn discover(
        &mut self,
        now: Instant,
        m: &Membership,
        me: &PublicKeyBytes,
        local: &[ipnet::Ipv4Net],
        advertise: IpAddr,
        wg_port: u16,
    ) -> bool {
        if let Some(sender) = self.sender.clone() {
            self.stun_round(now, m, me, local, &sender).await;
        }
        self.discovery_news = false;
        self.refresh_nat(local, advertise, wg_port)
    }

    /// Whether a discovery answer arrived since the last `discover` or
    /// `take_discovery_news` (the daemon then calls [`Self::refresh_nat`]
    /// at once rather than at the next tick).
    pub fn take_discovery_news(&mut self) -> bool {
        std::mem::take(&mut self.discovery_news)
    }

    /// Recomputes the NAT picture from the observations; true when it
    /// changed (the record must be republished).
    pub fn refresh_nat(
        &mut self,
        local: &[ipnet::Ipv4Net],
        advertise: IpAddr,
        wg_port: u16,
    ) -> bool {
        let local_ips: Vec<IpAddr> = local.iter().map(|n| IpAddr::V4(n.addr())).collect();
        let hint = local_ips.contains(&advertise) && looks_public(advertise);
        let info = self.discovery.info(&local_ips, wg_port, hint);
        if info != self.nat {
            tracing::info!(nat = ?info.kind, mapped = ?info.mapped, "NAT picture changed");
            self.nat = info;
            return true;
        }
        false
    }

    async fn stun_round(
        &mut self,
        now: Instant,
        m: &Membership,
        me: &PublicKeyBytes,
        local: &[ipnet::Ipv4Net],
        sender: &RawSender,
    ) {
        self.drain_responses(now);
        let members = m
            .members()
            .filter(|x| x.liveness == Liveness::Live)
            .filter_map(|x| {
                x.record.endpoints.first().map(|e| StunCandidate {
                    node_key: x.record.node_key,
                    nat: x.record.nat,
                    endpoint: *e,
                })
            });
        let targets =
            endpoints::stun_targets(me, &self.outside, members, |a| on_local_net(local, a));
        for (to, bytes) in self.discovery.poll_transmit(now, &targets) {
            if let Err(e) = sender.send(to, &bytes).await {
                tracing::debug!(%to, error = %e, "cannot send a STUN request");
            }
        }
    }

    /// The STUN answers behind [`Self::nat`] (for `meshpeer netcheck`).
    pub fn stun_answers(&self) -> impl Iterator<Item = (SocketAddr, SocketAddr, Instant)> + '_ {
        self.discovery.observations()
    }

    /// Signalled whenever a STUN answer arrives on the WireGuard port: call
    /// [`Traversal::force_handshakes`] then.
    pub fn answered(&self) -> Arc<Notify> {
        Arc::clone(&self.answered)
    }

    /// Hands the STUN answers received so far to the connectivity checks
    /// (answers to them) or to discovery (the rest).
    fn drain_responses(&mut self, now: Instant) {
        if let Some(rx) = &mut self.responses {
            while let Ok((txid, mapped, from)) = rx.try_recv() {
                let Some(mapped) = mapped else {
                    self.checks.handle_refusal(&txid, from);
                    continue;
                };
                match self.checks.handle_response(now, &txid, from) {
                    Some(v) => self.validated.push(v),
                    None => {
                        if self.discovery.handle_response(now, txid, from, mapped) {
                            self.discovery_news = true;
                        }
                    }
                }
            }
        }
    }

    /// Connectivity checks ([`Checks`]): a STUN binding request from the
    /// WireGuard port to every candidate of each peer without a direct path
    /// that a punch can reach, in a burst when the peer appears or its
    /// candidates change and then on every poke (`poke`: the shared 10 s
    /// beat, so both ends punch at the same moment). Each request also
    /// opens our NAT towards that candidate. (Not on the kernel backend:
    /// its socket is the kernel's.)
    pub async fn send_checks(&mut self, now: Instant, poke: bool) {
        let Some(sender) = &self.sender else { return };
        let need: Vec<Need<'_>> = self
            .need
            .iter()
            .map(|(key, candidates)| Need {
                key: *key,
                candidates,
            })
            .collect();
        let out = self
            .checks
            .poll(now, &need, poke, &mut || rand::random::<[u8; 12]>());
        for (txid, key, to) in out {
            let _ = sender
                .send(to, &stun::check_request(txid, &key, &self.my_wg_key))
                .await;
        }
    }

    /// For each peer whose check was answered and that still has no direct
    /// path: a WireGuard handshake to the candidate that answered, now
    /// (instead of WireGuard's next retry, up to 5 s later). Call after the
    /// peer changes were applied.
    pub async fn force_handshakes(&mut self, now: Instant) {
        self.drain_responses(now);
        let Some(sender) = &self.sender else {
            self.validated.clear();
            return;
        };
        for v in std::mem::take(&mut self.validated) {
            if !v.force
                || self.working.contains(&v.key)
                || self.suspect.get(&v.key) == Some(&v.endpoint)
            {
                continue;
            }
            sender.initiate_handshake(&v.key, v.endpoint).await;
        }
    }

    /// For each relayed peer whose allocation was just granted: a WireGuard
    /// handshake through the relay now (see `Allocations::take_granted`),
    /// unless its path works on that port already. The relay drops it while
    /// the other end has not latched its port, but it latches ours, so the
    /// other end's own greeting (on its grant) gets through and is
    /// answered. Call in the step, after the peer changes were applied (the
    /// path choice and `repoint` are this step's).
    pub async fn greet_grants(&mut self) {
        let granted = self.allocations.take_granted();
        let Some(sender) = &self.sender else { return };
        for (key, endpoint) in granted {
            let still = self
                .allocations
                .relayed_at(&key)
                .is_some_and(|(_, e)| e == endpoint);
            if still && (!self.selector.working(&key) || self.repoint.contains(&key)) {
                sender.initiate_handshake(&key, endpoint).await;
            }
        }
    }

    /// The WireGuard peers we have (after the latest changes): only their
    /// checks are answered.
    pub fn set_wg_peers<'a>(&self, keys: impl Iterator<Item = &'a [u8; 32]>) {
        let set: HashSet<[u8; 8]> = keys
            .map(|k| {
                let mut p = [0u8; 8];
                p.copy_from_slice(&k[..8]);
                p
            })
            .collect();
        *self.wg_peers.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    /// Whether every peer's path works or is relayed (no punching or
    /// checking going on): the daemon may tick slowly.
    pub fn settled(&self) -> bool {
        self.need.is_empty()
            && self
                .paths
                .values()
                .all(|p| matches!(p, Path::Direct | Path::Relayed { .. }))
    }

    /// Whether connectivity checks run (userspace backend: they need the
    /// WireGuard socket).
    pub fn checks_punch(&self) -> bool {
        self.sender.is_some()
    }

    /// Liveness says our path to this WireGuard key is broken.
    /// Our relay allocation for this WireGuard key (if any) is asked again
    /// at the next step.
    pub fn refresh_allocation(&mut self, key: &[u8; 32]) {
        self.allocations.refresh(key);
    }

    pub fn path_broken(&mut self, key: &[u8; 32]) {
        self.selector.broken(key);
        self.allocations.refresh(key);
    }

    /// Whether the path to this WireGuard key works (idle or not).
    pub fn working(&self, key: &[u8; 32]) -> bool {
        self.selector.working(key)
    }

    /// Whether this relayed peer's endpoint must move to our allocation's
    /// port although its path works (see `EndpointPlan::repoint`).
    pub fn repoint(&self, key: &[u8; 32]) -> bool {
        self.repoint.contains(key)
    }

    /// Whether the data plane heard from this WireGuard key lately.
    pub fn hearing(&self, now: Instant, key: &[u8; 32]) -> bool {
        self.selector.hearing(now, key)
    }

    /// Chooses direct or relayed paths and rewrites the desired peers.
    #[allow(clippy::too_many_arguments)]
    pub fn select_paths(
        &mut self,
        now: Instant,
        desired: Vec<DesiredPeer>,
        actual: &[ActualPeer],
        m: &Membership,
        me: &PublicKeyBytes,
        my_wg_key: [u8; 32],
        local: &[ipnet::Ipv4Net],
    ) -> Vec<DesiredPeer> {
        // Every live relay the membership knows, not only those we have a
        // session with: both ends of a pair must choose from the same list
        // (see `paths::pick_relay`), and a public relay is reached on demand.
        let mut relays: Vec<([u8; 32], &[u8])> = m
            .members()
            .filter(|x| &x.record.node_key != me && x.liveness == Liveness::Live)
            .filter(|x| x.record.relay && x.record.nat == NatKind::Public)
            .map(|x| (x.record.wg_public_key, x.stamp_signature.as_slice()))
            .collect();
        relays.sort();
        // Record versions of every member (relays and peers): a newer one
        // asks a relayed pair's allocation again.
        let versions: HashMap<[u8; 32], u64> = m
            .members()
            .map(|x| (x.record.wg_public_key, x.record.version))
            .collect();
        let handshakes: HashMap<[u8; 32], Option<Duration>> = actual
            .iter()
            .map(|a| (a.public_key, a.handshake_age))
            .collect();
        // A punch cannot work when either side is behind a symmetric NAT
        // and the other is not public.
        let our_nat = self.nat.kind;
        let nats: HashMap<[u8; 32], NatKind> = m
            .members()
            .map(|x| (x.record.wg_public_key, x.record.nat))
            .collect();
        let nat_of = |k: &[u8; 32]| nats.get(k).copied().unwrap_or(NatKind::Unknown);
        let hopeless = |k: &[u8; 32]| crate::nat::paths::punch_hopeless(our_nat, nat_of(k));
        let our_public: Vec<IpAddr> = self.nat.mapped.iter().map(|m| m.ip()).collect();
        let unlikely: HashSet<[u8; 32]> = desired
            .iter()
            .filter(|d| {
                endpoints::punch_unlikely(&our_public, &d.endpoints, |e| on_local_net(local, e))
            })
            .map(|d| d.public_key)
            .collect();
        let grace =
            |k: &[u8; 32]| crate::nat::paths::punch_grace(our_nat, nat_of(k), unlikely.contains(k));
        // Peers behind NAT send keepalives, so their silence means a broken
        // path, but only when we send none ourselves (we are public): a
        // persistent keepalive is due 25 s after the last packet either
        // way (our userspace device; kernel WireGuard resets its timer on
        // any authenticated packet as well), so of two
        // members behind NAT only the one whose timer runs first sends,
        // and the other's silence says nothing. Counting it made every such
        // pair at rest drop to a relay for a step every 40 s (testnet,
        // mixed 100: "path stopped working", silent 40 s, handshake fresh).
        // Between two members behind NAT, unanswered data and liveness
        // find a broken path.
        let we_send_keepalives = crate::membership::keepalive_for(our_nat) > 0;
        let sends_keepalives = |k: &[u8; 32]| !we_send_keepalives && nat_of(k) != NatKind::Public;
        let allocations = &self.allocations;
        let relayed_at = |k: &[u8; 32]| allocations.relayed_at(k);
        // Relays' addresses and WireGuard ports: any other port there is
        // one of their allocation ports.
        let relay_addrs: HashMap<IpAddr, ([u8; 32], Vec<u16>)> = m
            .members()
            .filter(|x| x.record.relay && x.record.nat == NatKind::Public)
            .flat_map(|x| {
                let ports: Vec<u16> = x.record.endpoints.iter().map(|e| e.port()).collect();
                let ips: Vec<IpAddr> = x
                    .record
                    .endpoints
                    .iter()
                    .map(|e| e.ip())
                    .chain(std::iter::once(x.record.gossip_addr.ip()))
                    .collect();
                ips.into_iter()
                    .map(move |ip| (ip, (x.record.wg_public_key, ports.clone())))
            })
            .collect();
        let relay_of = |e: &SocketAddr| {
            relay_addrs
                .get(&e.ip())
                .filter(|(_, ports)| !ports.contains(&e.port()))
                .map(|(k, _)| *k)
        };
        let paths = self.selector.select(
            now,
            &desired,
            actual,
            &relays,
            &my_wg_key,
            &grace,
            &sends_keepalives,
            &relayed_at,
            &relay_of,
        );
        let mut desired = desired;
        // A relayed session whose packets have gone unanswered for a while
        // counts as dead too: the relay may have ended the allocation (it
        // held one end gone for a moment) while both ends kept its ports.
        let selector = &self.selector;
        let dead = |k: &[u8; 32]| {
            handshakes.get(k).is_none_or(|age| {
                crate::nat::allocs::session_dead(
                    selector.working(k),
                    *age,
                    selector.unanswered(now, k),
                )
            })
        };
        self.allocations.plan(now, &paths, &versions, &dead);
        // Each peer's endpoints and checks (`nat::endpoints::plan`).
        self.need.clear();
        self.working.clear();
        self.suspect.clear();
        self.repoint.clear();
        let endpoint_of: HashMap<[u8; 32], SocketAddr> = actual
            .iter()
            .filter_map(|a| a.endpoint.map(|e| (a.public_key, e)))
            .collect();
        let raw = self.sender.is_some();
        for d in desired.iter_mut() {
            let k = d.public_key;
            let relayed = matches!(paths.get(&k), Some(Path::Relayed { .. }));
            let view = PeerView {
                candidates: std::mem::take(&mut d.endpoints),
                relayed,
                relay_endpoint: relayed
                    .then(|| self.allocations.relayed_at(&k).map(|(_, e)| e))
                    .flatten(),
                working: self.selector.working(&k),
                unanswered: self.selector.unanswered(now, &k),
                hopeless: hopeless(&k),
                current: endpoint_of.get(&k).copied(),
                validated: self.checks.validated(now, &k),
                answers_checks: endpoints::answers_checks(nat_of(&k), self.checks.holds(now, &k)),
            };
            let plan = endpoints::plan(&view, raw, |e| on_local_net(local, e));
            d.endpoints = plan.endpoints;
            if plan.working {
                self.working.insert(k);
            }
            if plan.repoint {
                self.repoint.insert(k);
            }
            if let Some(c) = plan.suspect {
                self.suspect.insert(k, c);
            }
            if plan.hurry_discovery {
                self.discovery.hurry(now);
            }
            if !plan.check.is_empty() {
                self.need.push((k, plan.check));
            }
        }
        self.changed.clear();
        for (k, p) in &paths {
            if self.paths.get(k) != Some(p) {
                self.changed.push(*k);
                let name = m
                    .members()
                    .find(|x| &x.record.wg_public_key == k)
                    .map(|x| x.record.name.clone())
                    .unwrap_or_default();
                let via = |v: &[u8; 32]| {
                    m.members()
                        .find(|x| &x.record.wg_public_key == v)
                        .map(|x| x.record.name.clone())
                        .unwrap_or_default()
                };
                match p {
                    Path::Direct => tracing::info!(member = %name, "path is direct"),
                    Path::Relayed { via: v } => {
                        tracing::info!(member = %name, relay = %via(v), "no direct path yet; relaying")
                    }
                    Path::Trying => tracing::debug!(member = %name, "trying a direct path"),
                }
            }
        }
        self.paths = paths;
        desired
    }

    /// Allocations to ask relays for: (peer, relay), WireGuard keys.
    pub fn take_alloc_requests(&mut self) -> Vec<([u8; 32], [u8; 32])> {
        self.allocations.take_requests()
    }

    /// Allocations to give back: (peer, relay), WireGuard keys.
    pub fn take_alloc_releases(&mut self) -> Vec<([u8; 32], [u8; 32])> {
        self.allocations.take_releases()
    }

    /// A relay answered our request for the pair with `peer`: the endpoint
    /// to use (None: refused, asked again later).
    pub fn handle_allocation(
        &mut self,
        peer: &[u8; 32],
        relay: &[u8; 32],
        endpoint: Option<SocketAddr>,
    ) {
        self.allocations.handle_answer(peer, relay, endpoint);
    }

    /// Observed endpoints, both ways: what we see of members whose NAT is
    /// unknown (published, at most every 10 s and only on change), and what
    /// live members see of us (`observed_self`).
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        now: Instant,
        entries: &[GossipEntry],
        m: &Membership,
        me: &PublicKeyBytes,
        actual: &[ActualPeer],
        local: &[IpAddr],
        network_key: &PublicKeyBytes,
    ) -> ObserveStep {
        let live_keys: HashSet<PublicKeyBytes> = m
            .members()
            .filter(|x| x.liveness == Liveness::Live)
            .map(|x| x.record.node_key)
            .collect();
        let live = |k: &PublicKeyBytes| live_keys.contains(k);
        for e in entries {
            let (Some(text), Some(observer)) = (&e.seen, crate::proto::parse_node_id(&e.node_id))
            else {
                continue;
            };
            if &observer == me || !live(&observer) {
                continue;
            }
            match self.book.handle(network_key, &observer, text) {
                Ok(()) => {
                    self.rejected_seen.remove(&observer);
                }
                Err(err) => {
                    if self.rejected_seen.insert(observer) {
                        tracing::warn!(node = %e.node_id, error = %err, "rejected observations");
                    }
                }
            }
        }
        self.book.retain(|k| live(k));
        let ours = self.book.endpoints_of(me, local);
        let changed = ours != self.observed_self;
        if changed {
            tracing::info!(observed = ?ours, "members observe our WireGuard endpoint at");
            self.observed_self = ours;
        }

        let endpoint_of: HashMap<[u8; 32], SocketAddr> = actual
            .iter()
            .filter_map(|a| a.endpoint.map(|e| (a.public_key, e)))
            .collect();
        let observed: Vec<Observed<'_>> = m
            .members()
            .filter(|x| &x.record.node_key != me && x.liveness == Liveness::Live)
            .map(|x| Observed {
                node_key: x.record.node_key,
                nat_unknown: x.record.nat == NatKind::Unknown,
                candidates: &x.record.endpoints,
                device_endpoint: (self.paths.get(&x.record.wg_public_key) == Some(&Path::Direct))
                    .then(|| endpoint_of.get(&x.record.wg_public_key).copied())
                    .flatten(),
            })
            .collect();
        let seen = observe::to_publish(&observed);
        let due = self
            .seen_at
            .is_none_or(|t| now.saturating_duration_since(t) >= SEEN_REPUBLISH);
        let publish = (due && self.published_seen.as_ref() != Some(&seen)).then(|| {
            self.seen_at = Some(now);
            self.published_seen = Some(seen.clone());
            seen
        });
        ObserveStep { publish, changed }
    }
}

/// Why a pair is relayed instead of direct, for `status`.
pub fn relay_reason(
    ours: NatKind,
    theirs: NatKind,
    our_mapped: &[SocketAddr],
    their_endpoints: &[SocketAddr],
) -> String {
    if ours == NatKind::EndpointDependent {
        return "our NAT maps each destination to a new port (symmetric)".into();
    }
    if theirs == NatKind::EndpointDependent {
        return "their NAT maps each destination to a new port (symmetric)".into();
    }
    if our_mapped
        .first()
        .is_some_and(|m| their_endpoints.iter().any(|e| e.ip() == m.ip()))
    {
        return "both behind the same public address, and the NAT does not hairpin".into();
    }
    if theirs == NatKind::Unknown {
        return "no public candidate known for them".into();
    }
    "hole punch has not succeeded".into()
}
