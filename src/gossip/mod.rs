//! Gossip: chitchat (Scuttlebutt anti-entropy + phi-accrual failure
//! detection) carried over QUIC ([`transport`]) with mutual TLS ([`tls`]).
//!
//! Each node publishes exactly one key, [`RECORD_KEY`], whose value is its
//! signed membership record. chitchat does not authenticate what it relays,
//! so nothing read from it is trusted until [`crate::membership`] verified it.

pub mod tls;
pub mod transport;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};

use crate::membership::GossipEntry;
pub use transport::QuicTransport;

/// The chitchat key under which a node publishes its record.
pub const RECORD_KEY: &str = "record";
/// The chitchat key of a node's signed observations ([`crate::observe`]).
pub const SEEN_KEY: &str = "seen";

/// The gossip round interval of a small mesh (up to [`SMALL_MESH`] live
/// members): [`Gossip::small_mesh_round`] starts rounds at this rate.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);
/// chitchat's own interval, at least: each chitchat round also does its
/// housekeeping (failure detector over every member, key GC over every
/// key, sets of every address), and at hundreds of members on a 2-core
/// testnet that housekeeping four times a second was a fifth of a node's
/// CPU. Large meshes gossip at this rate (and the transport thins further,
/// see [`transport::FULL_RATE_MEMBERS`]).
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// Up to this many live members, [`Gossip::small_mesh_round`] adds rounds
/// at [`GossipTiming::interval`] to chitchat's own.
pub const SMALL_MESH: usize = 30;
/// Members a small-mesh round goes to while records are changing (a join,
/// a leave, a new endpoint): chitchat's own rounds pick 3 as well.
pub const BUSY_FANOUT: usize = 3;
/// Members a small-mesh round goes to while nothing changes: one is enough
/// to carry heartbeats between chitchat's own rounds, and every round
/// costs a digest of every member each way (at 10 members and fanout 3,
/// 45 KiB/s of gossip per node, sent and received, and 1 % of a core).
pub const QUIET_FANOUT: usize = 1;
/// Heartbeat gaps longer than this are not learned by the failure detector
/// (chitchat's default is 10 s). In a mesh of hundreds, where most members
/// sit behind NAT and only reach the public ones, a member's heartbeat can
/// take longer than 10 s to reach everyone; with the default such a member
/// would never count as live anywhere.
const MAX_HEARTBEAT_GAP: Duration = Duration::from_secs(30);
/// The failure detector's prior heartbeat gap (until it has learned the
/// real one): lenient, so a member is not called down in its first
/// seconds.
const PRIOR_HEARTBEAT_GAP: Duration = Duration::from_secs(1);

/// Timing of gossip and failure detection.
#[derive(Debug, Clone)]
pub struct GossipTiming {
    /// Round interval in small meshes (chitchat's own rounds run at
    /// `max(interval, HOUSEKEEPING_INTERVAL)`).
    pub interval: Duration,
    /// How long chitchat keeps a dead node's state before forgetting it.
    pub dead_node_grace: Duration,
}

impl Default for GossipTiming {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            dead_node_grace: Duration::from_secs(600),
        }
    }
}

/// Who this node is in gossip.
#[derive(Debug, Clone)]
pub struct GossipIdentity {
    /// The node id (URL-safe base64 of the node key).
    pub node_id: String,
    /// Distinguishes runs of one node (unix ms at start).
    pub generation: u64,
    /// The gossip address other members should use.
    pub advertise: SocketAddr,
    /// The network's cluster id ([`crate::admission::Network::id`]).
    pub cluster_id: String,
}

pub struct Gossip {
    handle: ChitchatHandle,
    /// Extra rounds in small meshes (None: chitchat's own interval is
    /// already the configured one).
    extra_rounds: Option<Duration>,
    pub transport: QuicTransport,
    /// Notified when a member's record arrives or changes (see
    /// [`Gossip::records_changed`]).
    records_changed: Arc<tokio::sync::Notify>,
    /// Keeps the chitchat listener behind `records_changed` subscribed.
    _listener: chitchat::ListenerHandle,
}

impl Gossip {
    /// Starts chitchat on an already bound transport.
    pub async fn start(
        who: GossipIdentity,
        seeds: Vec<String>,
        timing: &GossipTiming,
        transport: QuicTransport,
        record: String,
    ) -> anyhow::Result<Self> {
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(who.node_id, who.generation, who.advertise),
            cluster_id: who.cluster_id,
            gossip_interval: timing.interval.max(HOUSEKEEPING_INTERVAL),
            listen_addr: transport.local_addr()?,
            seed_nodes: seeds,
            failure_detector_config: FailureDetectorConfig {
                initial_interval: timing.interval.max(PRIOR_HEARTBEAT_GAP),
                max_interval: MAX_HEARTBEAT_GAP,
                dead_node_grace_period: timing.dead_node_grace,
                ..Default::default()
            },
            marked_for_deletion_grace_period: timing.dead_node_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let handle =
            spawn_chitchat(config, vec![(RECORD_KEY.to_string(), record)], &transport).await?;
        let records_changed = Arc::new(tokio::sync::Notify::new());
        let notify = Arc::clone(&records_changed);
        // Runs under chitchat's lock: only a notification, nothing else.
        let listener = handle
            .chitchat()
            .lock()
            .await
            .subscribe_event(RECORD_KEY, move |_| notify.notify_one());
        let extra_rounds = (timing.interval < HOUSEKEEPING_INTERVAL).then_some(timing.interval);
        Ok(Self {
            handle,
            extra_rounds,
            transport,
            records_changed,
            _listener: listener,
        })
    }

    /// Notified when a member's record arrives or changes, so the daemon
    /// can act on it before its next tick.
    pub fn records_changed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.records_changed)
    }

    /// Publishes a new version of this node's record.
    pub async fn publish(&self, record: String) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        guard.self_node_state().set(RECORD_KEY, record);
    }

    /// Publishes this node's signed observations of other members.
    pub async fn publish_seen(&self, seen: String) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        guard.self_node_state().set(SEEN_KEY, seen);
    }

    /// A snapshot of every node chitchat knows, for the membership core.
    pub async fn snapshot(&self) -> Vec<GossipEntry> {
        let chitchat: Arc<_> = self.handle.chitchat();
        let guard = chitchat.lock().await;
        let live: HashSet<&ChitchatId> = guard.live_nodes().collect();
        guard
            .node_states()
            .iter()
            .map(|(id, state)| GossipEntry {
                node_id: id.node_id.to_string(),
                record: state.get(RECORD_KEY).map(str::to_string),
                seen: state.get(SEEN_KEY).map(str::to_string),
                live: live.contains(id),
            })
            .collect()
    }

    /// Gossip addresses of all other nodes currently live (for the restart
    /// list and the transport).
    pub async fn live_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(true).await
    }

    /// Gossip addresses of the other nodes chitchat knows (only the live
    /// ones if `live`).
    async fn addrs(&self, live: bool) -> Vec<SocketAddr> {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        let me = guard.self_chitchat_id().clone();
        let ids: Vec<&ChitchatId> = if live {
            guard.live_nodes().collect()
        } else {
            guard.node_states().keys().collect()
        };
        ids.into_iter()
            .filter(|id| **id != me)
            .map(|id| id.gossip_advertise_addr)
            .collect()
    }

    /// How often the daemon should call [`Gossip::small_mesh_round`] (None:
    /// never).
    pub fn extra_round_every(&self) -> Option<Duration> {
        self.extra_rounds
    }

    /// In a small mesh (up to [`SMALL_MESH`] live members), starts a round
    /// with `fanout` random live members (any known member while none is
    /// live yet), as chitchat's own round does but without its
    /// housekeeping: small meshes keep fast gossip (a hop every 250 ms by
    /// default), large ones run at chitchat's slower interval. The daemon
    /// passes [`BUSY_FANOUT`] while records change, else [`QUIET_FANOUT`].
    pub async fn small_mesh_round(&self, fanout: usize) {
        use rand::seq::SliceRandom;
        let mut addrs = self.live_addrs().await;
        if addrs.len() > SMALL_MESH {
            return;
        }
        if addrs.is_empty() {
            addrs = self.addrs(false).await;
        }
        for addr in addrs.choose_multiple(&mut rand::thread_rng(), fanout) {
            self.gossip_to(*addr);
        }
    }

    /// Starts a gossip round with `addr` now (used to find the mesh again).
    pub fn gossip_to(&self, addr: SocketAddr) {
        if let Err(e) = self.handle.gossip(addr) {
            tracing::debug!(%addr, error = %e, "cannot trigger gossip");
        }
    }

    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
        self.transport.close();
    }
}
