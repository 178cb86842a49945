//! Scuttlebutt gossip state: chitchat 0.11.2, patched for meshpeer.
//!
//! Every node holds a *node state* (key-values with versions) per node of the
//! cluster and may only write its own; gossip rounds bring everyone up to
//! date with Scuttlebutt anti-entropy (digests of max versions, deltas of
//! what the other side lacks, the most-behind nodes first). What changed from
//! upstream, and why, is in `CHANGES.md`; in short:
//!
//! * **Sans-IO.** [`Chitchat`] is a state machine with no sockets, no tasks
//!   and no clock: the caller decides when and with whom to gossip
//!   ([`Chitchat::syn`]), hands it every message received
//!   ([`Chitchat::handle_message`]) and sends what it returns. The same code
//!   runs in the daemon, in tests and in a simulation of thousands of nodes.
//!   Randomness (which equally stale node goes first) comes from a seeded
//!   generator.
//! * **Validated values.** Every remote key-value goes through a
//!   [`Validator`] before it is stored; a refused one is dropped and does not
//!   create a node state. meshpeer's validator checks signatures, so no
//!   member can make others store anything its owner did not sign.
//! * **No heartbeats, no failure detector, no deletions.** Liveness is the
//!   caller's business; values are only ever replaced by newer ones; the
//!   caller forgets nodes ([`Chitchat::forget`]).
//! * **Summary first.** A round opens with a 12-byte summary of the
//!   sender's digest; digests and deltas travel only when summaries differ,
//!   so rounds between nodes in sync cost two small messages.
//! * **Bounded input.** Decoders refuse oversize or malformed input with an
//!   error (upstream asserted on some); deltas inflate to at most 1 MiB;
//!   budgets limit node states created per message and in all.
//!
//! # Driving contract
//!
//! ```
//! use chitchat::{Chitchat, ChitchatConfig, ChitchatMessage, Validator};
//! struct Trusting;
//! impl Validator for Trusting {
//!     fn validate(&self, _node: &str, _key: &str, _value: &str, _version: u64) -> bool { true }
//! }
//! let mut a = Chitchat::new(ChitchatConfig::new("a", "cluster"));
//! let mut b = Chitchat::new(ChitchatConfig::new("b", "cluster"));
//! a.set("record", "hello", 1).unwrap();
//! // A round, as the caller's transport would carry it:
//! let mut msg = a.syn();
//! let mut at_b = true;
//! loop {
//!     let reply = if at_b { b.handle_message(msg, &Trusting) } else { a.handle_message(msg, &Trusting) };
//!     match reply { Some(r) => { msg = r; at_b = !at_b; } None => break }
//! }
//! assert_eq!(b.node_state("a").and_then(|s| s.get("record")), Some("hello"));
//! assert_eq!(a.summary(), b.summary());
//! ```

mod delta;
mod digest;
mod message;
pub mod serialize;
mod state;
mod types;

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;

pub use delta::{Delta, MAX_DECOMPRESSED};
pub use digest::{bucket_of, summary_term, Digest, Summary, BUCKETS};
pub use message::{ChitchatMessage, PROTOCOL_VERSION};
pub use serialize::{Deserializable, Serializable};
pub use state::{ApplyOutcome, NodeState};
pub use types::{KeyValueMutation, NodeId, Version, VersionedValue};

use state::ClusterState;

/// Decides whether a remote key-value may be stored. Called for every
/// key-value of every delta received, before anything is stored, and for
/// values given to [`Chitchat::inject`]; never for the node's own
/// [`Chitchat::set`].
pub trait Validator {
    fn validate(&self, node_id: &str, key: &str, value: &str, version: Version) -> bool;
}

/// Caps on what this node builds and accepts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest delta we send (encoded bytes).
    pub mtu: usize,
    /// Most entries in a digest we send.
    pub max_digest_entries: usize,
    /// Most node states one message may create.
    pub max_new_nodes_per_message: usize,
    /// Most node states held in all.
    pub max_nodes: usize,
    /// Largest value accepted or set (bytes).
    pub max_value_bytes: usize,
    /// Above this many node states, a `Syn` carries bucket hashes, so a
    /// mismatch is narrowed to the buckets that differ.
    pub bucket_threshold: usize,
    /// Above this many node states, a busy round's `Syn`
    /// ([`Chitchat::syn_busy`]) carries bucket hashes too: the 512 bytes
    /// of hashes cost less than the two whole digests that a round
    /// started by news would otherwise exchange.
    pub busy_bucket_threshold: usize,
    /// How many forgotten nodes are remembered (with their last version).
    pub forget_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mtu: delta::DEFAULT_MTU,
            max_digest_entries: 4096,
            max_new_nodes_per_message: 256,
            max_nodes: 100_000,
            max_value_bytes: 60_000,
            bucket_threshold: 1024,
            busy_bucket_threshold: 32,
            forget_memory: 16_384,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChitchatConfig {
    pub node_id: NodeId,
    /// Nodes of different clusters refuse each other's rounds.
    pub cluster_id: String,
    pub limits: Limits,
    /// Seed of the generator that orders equally stale nodes in deltas.
    pub seed: u64,
}

impl ChitchatConfig {
    pub fn new(node_id: impl Into<NodeId>, cluster_id: impl Into<String>) -> Self {
        ChitchatConfig {
            node_id: node_id.into(),
            cluster_id: cluster_id.into(),
            limits: Limits::default(),
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    #[error("version {version} is not above the node's current version {current}")]
    StaleVersion { version: Version, current: Version },
    #[error("value of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// Counters of what gossip did (for status and metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub rounds_started: u64,
    pub rounds_in_sync: u64,
    pub messages_handled: u64,
    pub values_stored: u64,
    pub values_rejected: u64,
    pub nodes_over_budget: u64,
    pub bad_cluster: u64,
}

/// The gossip state machine of one node.
pub struct Chitchat {
    config: ChitchatConfig,
    cluster: ClusterState,
    rng: SmallRng,
    stats: Stats,
    /// The highest version of our own node seen in others' deltas.
    self_seen: Option<Version>,
}

impl Chitchat {
    pub fn new(config: ChitchatConfig) -> Self {
        let rng = SmallRng::seed_from_u64(config.seed);
        let cluster = ClusterState::new(config.limits.forget_memory);
        Chitchat {
            config,
            cluster,
            rng,
            stats: Stats::default(),
            self_seen: None,
        }
    }

    pub fn node_id(&self) -> &NodeId {
        &self.config.node_id
    }

    pub fn cluster_id(&self) -> &str {
        &self.config.cluster_id
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Sets one of our own key-values. `version` must be above every
    /// version our node holds (meshpeer signs it into the value).
    pub fn set(
        &mut self,
        key: &str,
        value: impl Into<Arc<str>>,
        version: Version,
    ) -> Result<(), SetError> {
        let value: Arc<str> = value.into();
        if value.len() > self.config.limits.max_value_bytes {
            return Err(SetError::TooLarge {
                len: value.len(),
                max: self.config.limits.max_value_bytes,
            });
        }
        let current = self
            .cluster
            .node_state(&self.config.node_id)
            .map_or(0, NodeState::max_version);
        if version <= current {
            return Err(SetError::StaleVersion { version, current });
        }
        let id = self.config.node_id.clone();
        self.cluster
            .store(&id, key, VersionedValue { value, version });
        Ok(())
    }

    /// Stores a key-value of another node that reached us outside gossip
    /// (restored from disk, handed over at join, or self-authenticating like
    /// a revocation list), if the validator accepts it and it is newer than
    /// what that node's state holds. Returns whether it was stored.
    pub fn inject(
        &mut self,
        node_id: &str,
        key: &str,
        value: impl Into<Arc<str>>,
        version: Version,
        validator: &dyn Validator,
    ) -> bool {
        let value: Arc<str> = value.into();
        if node_id == &*self.config.node_id
            || value.len() > self.config.limits.max_value_bytes
            || !validator.validate(node_id, key, &value, version)
        {
            return false;
        }
        let held = self
            .cluster
            .node_state(node_id)
            .map_or(0, NodeState::max_version);
        if version <= held {
            return false;
        }
        self.cluster.store(
            &NodeId::from(node_id),
            key,
            VersionedValue { value, version },
        )
    }

    /// Drops a node's state (it left, or was down long enough). Old copies
    /// relayed by others are not taken back; a newer version of it is.
    pub fn forget(&mut self, node_id: &str) {
        if node_id != &*self.config.node_id {
            self.cluster.forget(node_id);
        }
    }

    pub fn node_states(&self) -> &BTreeMap<NodeId, NodeState> {
        self.cluster.node_states()
    }

    pub fn node_state(&self, node_id: &str) -> Option<&NodeState> {
        self.cluster.node_state(node_id)
    }

    /// Our own node's max version.
    pub fn self_version(&self) -> Version {
        self.node_state(&self.config.node_id)
            .map_or(0, NodeState::max_version)
    }

    pub fn summary(&self) -> Summary {
        self.cluster.summary()
    }

    /// Grows by one whenever a value is stored or a node forgotten: the
    /// caller compares it to tell whether the state changed.
    pub fn changes(&self) -> u64 {
        self.cluster.changes()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The highest version of our own node that someone else holds, if it
    /// is above ours (we lost our version counter): set our next values
    /// above it. Cleared by the call.
    pub fn take_self_seen(&mut self) -> Option<Version> {
        let own = self.self_version();
        self.self_seen.take().filter(|v| *v > own)
    }

    /// The message that opens a round.
    pub fn syn(&mut self) -> ChitchatMessage {
        self.syn_busy(false)
    }

    /// The message that opens a round; `busy`: the round spreads news
    /// (the summaries likely differ), so above
    /// [`Limits::busy_bucket_threshold`] node states it carries bucket
    /// hashes and the answer is narrowed to the buckets that differ.
    pub fn syn_busy(&mut self, busy: bool) -> ChitchatMessage {
        self.stats.rounds_started += 1;
        let summary = self.cluster.summary();
        let l = &self.config.limits;
        let threshold = if busy {
            l.busy_bucket_threshold.min(l.bucket_threshold)
        } else {
            l.bucket_threshold
        };
        let buckets = if summary.count as usize > threshold {
            self.cluster.bucket_hashes()
        } else {
            Vec::new()
        };
        ChitchatMessage::Syn {
            cluster_id: self.config.cluster_id.clone(),
            summary,
            buckets,
        }
    }

    /// Handles a message of a round; returns the answer to send back, if
    /// any.
    pub fn handle_message(
        &mut self,
        msg: ChitchatMessage,
        validator: &dyn Validator,
    ) -> Option<ChitchatMessage> {
        self.stats.messages_handled += 1;
        let max_entries = self.config.limits.max_digest_entries;
        match msg {
            ChitchatMessage::Syn {
                cluster_id,
                summary,
                buckets,
            } => {
                if cluster_id != self.config.cluster_id {
                    self.stats.bad_cluster += 1;
                    return Some(ChitchatMessage::BadCluster);
                }
                let ours = self.cluster.summary();
                if summary == ours {
                    return Some(ChitchatMessage::SynAck { digest: None });
                }
                let scope: Vec<u8> = if buckets.len() == BUCKETS {
                    let mine = self.cluster.bucket_hashes();
                    (0..BUCKETS as u8)
                        .filter(|b| mine[*b as usize] != buckets[*b as usize])
                        .collect()
                } else {
                    Vec::new()
                };
                // All buckets equal but summaries not (only counts could
                // differ, which hashes capture; or an accident): everything.
                let scope = if scope.len() == BUCKETS {
                    Vec::new()
                } else {
                    scope
                };
                Some(ChitchatMessage::SynAck {
                    digest: Some(self.cluster.digest(&scope, max_entries)),
                })
            }
            ChitchatMessage::SynAck { digest: None } => {
                self.stats.rounds_in_sync += 1;
                None
            }
            ChitchatMessage::SynAck {
                digest: Some(theirs),
            } => {
                let delta =
                    self.cluster
                        .compute_delta(&theirs, self.config.limits.mtu, &mut self.rng);
                let ours = self.cluster.digest(&theirs.scope, max_entries);
                Some(ChitchatMessage::Ack {
                    delta,
                    digest: Some(ours),
                })
            }
            ChitchatMessage::Ack { delta, digest } => {
                self.apply(delta, validator);
                digest.map(|theirs| ChitchatMessage::Ack {
                    delta: self.cluster.compute_delta(
                        &theirs,
                        self.config.limits.mtu,
                        &mut self.rng,
                    ),
                    digest: None,
                })
            }
            ChitchatMessage::BadCluster => {
                tracing::warn!("a member refused our gossip: wrong cluster");
                None
            }
        }
    }

    fn apply(&mut self, delta: Delta, validator: &dyn Validator) {
        let l = &self.config.limits;
        let out = self.cluster.apply_delta(
            delta,
            &self.config.node_id,
            validator,
            l.max_new_nodes_per_message,
            l.max_nodes,
            l.max_value_bytes,
        );
        self.stats.values_stored += out.stored as u64;
        self.stats.values_rejected += out.rejected as u64;
        self.stats.nodes_over_budget += out.over_budget as u64;
        if let Some(v) = out.self_seen {
            self.self_seen = Some(self.self_seen.map_or(v, |s| s.max(v)));
        }
    }
}

#[cfg(test)]
mod tests;
