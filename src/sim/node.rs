//! One simulated member: the daemon's cores, driven the way the daemon's
//! step drives them, with a simulated WireGuard device.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::{Chitchat, ChitchatConfig};
use ed25519_dalek::SigningKey;

use crate::gossip::rounds::{self, RoundPlanner, Target};
use crate::liveness::{self, Liveness, ValueFeed};
use crate::membership::{self, DesiredPeer, Membership};
use crate::proto::{self, PublicKeyBytes, Signed};
use crate::reconcile::{self, ActualPeer, PeerChange};
use crate::record::RecordBody;
use crate::trust::{self, TrustState};

use super::net::NatClass;

/// A peer on the simulated WireGuard device.
pub struct DevPeer {
    pub peer: ActualPeer,
    /// When it was added (a session needs both ends to have the other).
    pub added: Instant,
}

pub struct SimNode {
    pub idx: u32,
    pub signing: SigningKey,
    pub key: PublicKeyBytes,
    pub node_id: String,
    pub wg_key: [u8; 32],
    pub name: String,
    pub nat: NatClass,
    pub region: u8,
    /// The address it advertises (public, or its private LAN address).
    pub advertise: Ipv4Addr,
    /// Its endpoint as others reach it (the NAT's mapping, if any).
    pub mapped: Option<SocketAddr>,
    pub admission: Signed,
    pub stamp: Option<Signed>,
    pub overlay_ip: Option<Ipv4Addr>,
    pub ip_claimed_at: u64,
    pub ip_since: Instant,
    pub record_version: u64,
    pub chitchat: Chitchat,
    pub membership: Membership,
    pub liveness: Liveness,
    pub feed: ValueFeed,
    pub planner: RoundPlanner,
    pub device: HashMap<[u8; 32], DevPeer>,
    pub owned: BTreeSet<[u8; 32]>,
    /// Round targets as of the last step (members and paths change only in
    /// steps, as in the daemon).
    pub targets: Vec<Target>,
    /// Overlay addresses of the members whose pings it answers.
    pub probe_members: HashSet<Ipv4Addr>,
    /// The summary its probes and answers carry (set at each step).
    pub summary: liveness::Summary,
    /// Rounds in flight by destination node.
    pub rounds: BTreeMap<u32, Instant>,
    /// When we last opened a round with each node (its gossip connection
    /// idles out after `CONN_IDLE`).
    pub conns: BTreeMap<u32, Instant>,
    /// Seeds to knock on while no member is reachable.
    pub bootstrap: Vec<SocketAddr>,
    pub alive: bool,
    pub joined: bool,
    pub last_step: Option<Instant>,
    pub step_at: Option<Instant>,
    pub liveness_at: Option<Instant>,
    /// When the liveness timer last ran.
    pub liveness_ran: Option<Instant>,
    pub rounds_ran: Option<Instant>,
    /// `suspects` and `alive` values published.
    pub accusations_published: u64,
    pub refutations_published: u64,
    pub rounds_at: Option<Instant>,
    pub last_rotation: usize,
    /// chitchat's change counter at the last step.
    pub stepped_changes: u64,
    /// chitchat's node states at the last step, and when a join last got a
    /// step of its own (`tick::JOIN_SPELL`), as in the daemon.
    pub stepped_states: u32,
    pub last_join_step: Option<Instant>,
    /// Last time something changed at a step (tick stretching at rest).
    pub last_change: Instant,
    /// Whether it was at rest at its last step (the daemon's `at_rest`:
    /// nothing changed for `tick::SETTLE`, every path up, no busy rounds).
    pub at_rest: bool,
}

/// What a step asks the simulation to do.
#[derive(Default)]
pub struct StepOut {
    /// Gossip rounds to open: destinations (node ids are resolved by the
    /// simulation from addresses).
    pub rounds: Vec<SocketAddr>,
    pub peers_added: usize,
    pub peers_removed: usize,
    /// The node moved to another overlay address (lost a race).
    pub moved: Option<(Ipv4Addr, Ipv4Addr)>,
    pub events: Vec<membership::Event>,
}

impl SimNode {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        idx: u32,
        signing: SigningKey,
        wg_key: [u8; 32],
        nat: NatClass,
        region: u8,
        advertise: Ipv4Addr,
        mapped: Option<SocketAddr>,
        admission: Signed,
        cluster_id: &str,
        network_key: PublicKeyBytes,
        seed: u64,
        now: Instant,
    ) -> Self {
        let key = signing.verifying_key().to_bytes();
        let node_id = proto::node_id_string(&key);
        let mut cfg = ChitchatConfig::new(node_id.as_str(), cluster_id);
        cfg.seed = seed;
        SimNode {
            idx,
            key,
            node_id,
            wg_key,
            name: format!("n{idx}"),
            nat,
            region,
            advertise,
            mapped,
            admission,
            stamp: None,
            overlay_ip: None,
            ip_claimed_at: 0,
            ip_since: now,
            record_version: 0,
            chitchat: Chitchat::new(cfg),
            membership: Membership::new(key, membership::DEFAULT_DOWN_GRACE),
            liveness: Liveness::new(network_key, key, seed ^ 0x11),
            feed: ValueFeed::default(),
            planner: RoundPlanner::new(seed ^ 0x22),
            device: HashMap::new(),
            owned: BTreeSet::new(),
            targets: Vec::new(),
            probe_members: HashSet::new(),
            summary: liveness::Summary::default(),
            rounds: BTreeMap::new(),
            conns: BTreeMap::new(),
            bootstrap: Vec::new(),
            alive: true,
            joined: false,
            last_step: None,
            step_at: None,
            liveness_at: None,
            liveness_ran: None,
            rounds_ran: None,
            accusations_published: 0,
            refutations_published: 0,
            rounds_at: None,
            last_rotation: 0,
            stepped_changes: 0,
            stepped_states: 0,
            last_join_step: None,
            last_change: now,
            at_rest: false,
            signing,
        }
    }

    pub fn gossip_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.advertise), crate::DEFAULT_GOSSIP_PORT)
    }

    pub fn wg_port(&self) -> u16 {
        crate::default_wg_port(self.nat == NatClass::Public, &self.wg_key)
    }

    /// The next version of our values (record::next_version, as the daemon).
    pub fn next_version(&mut self, unix_ms: u64) -> u64 {
        let seen = self.chitchat.take_self_seen().unwrap_or(0);
        let v = crate::record::next_version(
            self.record_version.max(seen),
            self.chitchat.self_version(),
            unix_ms,
        );
        self.record_version = v;
        v
    }

    /// Builds and publishes our record (as `daemon::values::build_record`:
    /// the server-reflexive endpoint first behind an endpoint-independent
    /// NAT, then the host address). Returns its size in bytes (text).
    pub fn publish_record(&mut self, network: &crate::admission::Network, unix_ms: u64) -> usize {
        let (Some(stamp), Some(ip)) = (self.stamp.clone(), self.overlay_ip) else {
            return 0;
        };
        let version = self.next_version(unix_ms);
        let mut endpoints = Vec::new();
        if self.nat.kind() == crate::record::NatKind::EndpointIndependent {
            endpoints.extend(self.mapped);
        }
        endpoints.push(SocketAddr::new(IpAddr::V4(self.advertise), self.wg_port()));
        let body = RecordBody {
            network_key: network.key,
            node_key: self.key,
            version,
            name: self.name.clone(),
            overlay_ip: ip,
            ip_claimed_at: self.ip_claimed_at,
            wg_public_key: self.wg_key,
            wg_port: self.wg_port(),
            endpoints,
            gossip_addr: self.gossip_addr(),
            tags: vec![],
            routes: vec![],
            left: false,
            ephemeral: false,
            nat: self.nat.kind(),
            relay: self.nat == NatClass::Public,
            admission: self.admission.clone(),
            stamp,
        };
        let text = body.sign(&self.signing);
        let len = text.len();
        if let Err(e) = self.chitchat.set(trust::RECORD_KEY, text, version) {
            tracing::warn!(error = %e, "sim: cannot publish a record");
        }
        len
    }

    /// The daemon's step (`daemon::step`), minus the parts that are I/O:
    /// gossip snapshot → membership → our address → desired peers →
    /// reconcile against the device → liveness views and summary → values
    /// to publish → rounds. `chosen` says whether a path to a member (by
    /// WireGuard key) is chosen (the daemon's `Direct` or `Relayed`: probes
    /// may take it), `path_up` whether its WireGuard session works;
    /// `hearing` whether the data plane hears from it.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        now: Instant,
        unix_ms: u64,
        trust: &TrustState,
        network: &crate::admission::Network,
        chosen: &dyn Fn(&[u8; 32]) -> bool,
        path_up: &dyn Fn(&[u8; 32]) -> bool,
        hearing: &dyn Fn(&[u8; 32]) -> bool,
    ) -> StepOut {
        let mut out = StepOut::default();
        self.last_step = Some(now);
        self.stepped_changes = self.chitchat.changes();
        self.stepped_states = self.chitchat.summary().count;
        let entries = crate::gossip::snapshot(&self.chitchat);
        let liveness = &self.liveness;
        out.events = trust.with_trust(|t| {
            self.membership
                .handle_snapshot(now, &entries, t, &|k| liveness.down_for(k, unix_ms))
        });
        for id in self.membership.to_forget(&entries) {
            self.chitchat.forget(id);
        }
        self.feed.feed(
            now,
            &mut self.liveness,
            &self.membership,
            &network.key,
            &entries,
        );
        drop(entries);
        // Our address: moved while provisional if another member won it.
        if let Some(ip) = self.overlay_ip {
            if self.membership.must_move(&ip)
                && now.saturating_duration_since(self.ip_since) < membership::PROVISIONAL
            {
                let taken = self.membership.taken_ips(&self.key);
                if let Some(new) = crate::ipalloc::choose(network.cidr, &self.key, &taken) {
                    self.overlay_ip = Some(new);
                    self.ip_claimed_at = unix_ms;
                    self.ip_since = now;
                    self.publish_record(network, unix_ms);
                    self.planner.handle_own_news(now);
                    out.moved = Some((ip, new));
                }
            }
        }
        // Desired peers → reconcile → the device.
        let keepalive = membership::keepalive_for(self.nat.kind());
        let desired: Vec<DesiredPeer> =
            self.membership
                .desired_peers(now, &[], &|k| hearing(k), keepalive);
        let actual: Vec<ActualPeer> = self
            .device
            .values()
            .map(|d| {
                let mut a = d.peer.clone();
                a.handshake_age = path_up(&a.public_key).then_some(Duration::ZERO);
                a
            })
            .collect();
        let rotation = (unix_ms / 10_000) as usize;
        let poke = rotation != self.last_rotation;
        self.last_rotation = rotation;
        let mut changes =
            reconcile::reconcile(&desired, &actual, &self.owned, rotation, poke, &|k| {
                !path_up(k)
            });
        // The userspace device punches with connectivity checks: no pokes.
        changes.retain(|c| !matches!(c, PeerChange::Poke { .. }));
        drop(actual);
        drop(desired);
        for c in &changes {
            match c {
                PeerChange::Add {
                    public_key,
                    allowed_ips,
                    endpoint,
                    keepalive,
                } => {
                    self.device.insert(
                        *public_key,
                        DevPeer {
                            peer: ActualPeer {
                                public_key: *public_key,
                                endpoint: *endpoint,
                                allowed_ips: allowed_ips
                                    .iter()
                                    .map(|n| (IpAddr::V4(n.addr()), n.prefix_len()))
                                    .collect(),
                                keepalive: (*keepalive != 0).then_some(*keepalive),
                                handshake_age: None,
                                rx_bytes: 0,
                                tx_bytes: 0,
                            },
                            added: now,
                        },
                    );
                    self.owned.insert(*public_key);
                    out.peers_added += 1;
                }
                PeerChange::Update {
                    public_key,
                    endpoint,
                    allowed_ips,
                    keepalive,
                } => {
                    if let Some(d) = self.device.get_mut(public_key) {
                        if let Some(e) = endpoint {
                            d.peer.endpoint = Some(*e);
                        }
                        if let Some(ips) = allowed_ips {
                            d.peer.allowed_ips = ips
                                .iter()
                                .map(|n| (IpAddr::V4(n.addr()), n.prefix_len()))
                                .collect();
                        }
                        if let Some(k) = keepalive {
                            d.peer.keepalive = (*k != 0).then_some(*k);
                        }
                    }
                }
                PeerChange::Remove { public_key } => {
                    self.device.remove(public_key);
                    self.owned.remove(public_key);
                    out.peers_removed += 1;
                }
                PeerChange::Poke { .. } => {}
            }
        }
        // Liveness: whom we can probe, our summary.
        let views = self.membership.liveness_views(chosen, path_up);
        self.liveness.handle_members(now, &views);
        self.probe_members.clear();
        self.probe_members
            .extend(views.iter().map(|v| v.overlay_ip));
        drop(views);
        let summary: liveness::Summary = self.chitchat.summary().into();
        self.liveness.set_summary(summary);
        self.summary = summary;
        self.publish_liveness_values(unix_ms);
        // Rounds: targets as the daemon computes them.
        self.targets = rounds::round_targets(&self.membership, &self.key, &[], &|k| path_up(k));
        self.planner
            .handle_down(rounds::down_targets(&self.membership, now, &[], &|k| {
                path_up(k)
            }));
        if !out.events.is_empty() || !changes.is_empty() {
            self.last_change = now;
        }
        out.rounds = self.start_rounds(now);
        out
    }

    /// Accusations and refutations the liveness core wants published.
    pub fn publish_liveness_values(&mut self, unix_ms: u64) {
        let (chitchat, record_version) = (&mut self.chitchat, &mut self.record_version);
        let mut next = || {
            let seen = chitchat.take_self_seen().unwrap_or(0);
            let v = crate::record::next_version(
                (*record_version).max(seen),
                chitchat.self_version(),
                unix_ms,
            );
            *record_version = v;
            v
        };
        let values = liveness::values_to_publish(&mut self.liveness, &self.signing, &mut next);
        for (key, text, version) in values {
            if key == trust::SUSPECTS_KEY {
                self.accusations_published += 1;
            } else {
                self.refutations_published += 1;
            }
            if let Err(e) = self.chitchat.set(key, Arc::<str>::from(text), version) {
                tracing::warn!(error = %e, "sim: cannot publish a liveness value");
            }
        }
    }

    /// The planner's rounds now (`daemon::step::start_rounds`).
    pub fn start_rounds(&mut self, now: Instant) -> Vec<SocketAddr> {
        self.planner.handle_changes(now, self.chitchat.changes());
        let partner = rounds::rest_partner(self.liveness.monitored(), &self.targets);
        self.planner
            .poll(now, &self.targets, partner, &self.bootstrap)
    }
}
