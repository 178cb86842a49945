//! Node states and the cluster state: what this node holds about everyone,
//! with its summary kept up to date incrementally.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use lru::LruCache;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::delta::{Delta, DeltaSerializer};
use crate::digest::{bucket_of, summary_term, Digest, Summary, BUCKETS};
use crate::types::{KeyValueMutation, NodeId, Version, VersionedValue};
use crate::Validator;

/// One node's key-values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    node_id: NodeId,
    bucket: u8,
    /// Sorted by key. A node has a handful of keys: a sorted vector costs a
    /// fraction of a `BTreeMap`'s node (11 slots), and the simulation holds
    /// 10,000 × 10,000 node states.
    key_values: Vec<(Arc<str>, VersionedValue)>,
    /// The greatest version of any key-value here; everything the node set
    /// up to this version is known (or was replaced by something newer).
    max_version: Version,
}

impl NodeState {
    fn new(node_id: NodeId) -> Self {
        NodeState {
            bucket: bucket_of(&node_id),
            node_id,
            key_values: Vec::new(),
            max_version: 0,
        }
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    pub fn max_version(&self) -> Version {
        self.max_version
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_versioned(key).map(|v| v.value.as_ref())
    }

    pub fn get_versioned(&self, key: &str) -> Option<&VersionedValue> {
        self.slot(key).ok().map(|i| &self.key_values[i].1)
    }

    fn slot(&self, key: &str) -> Result<usize, usize> {
        self.key_values
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
    }

    pub fn key_values(&self) -> impl Iterator<Item = (&str, &VersionedValue)> {
        self.key_values.iter().map(|(k, v)| (k.as_ref(), v))
    }

    pub fn num_key_values(&self) -> usize {
        self.key_values.len()
    }

    /// Key-values newer than `floor`, oldest first.
    fn stale_key_values(&self, floor: Version) -> Vec<(&str, &VersionedValue)> {
        let mut kvs: Vec<(&str, &VersionedValue)> = self
            .key_values
            .iter()
            .filter(|(_, v)| v.version > floor)
            .map(|(k, v)| (k.as_ref(), v))
            .collect();
        kvs.sort_unstable_by_key(|(_, v)| v.version);
        kvs
    }

    /// Stores `value` under `key` if it is newer than what the key holds.
    fn set_versioned_value(&mut self, key: &str, value: VersionedValue) -> bool {
        self.max_version = self.max_version.max(value.version);
        match self.slot(key) {
            Ok(i) if self.key_values[i].1.version >= value.version => false,
            Ok(i) => {
                self.key_values[i].1 = value;
                true
            }
            Err(i) => {
                self.key_values.insert(i, (intern(key), value));
                true
            }
        }
    }
}

/// One shared copy of each key name (a node has a handful of keys; every
/// node state holds the same few names). Bounded: past 64 distinct names a
/// key gets its own copy.
fn intern(key: &str) -> Arc<str> {
    thread_local! {
        static KEYS: std::cell::RefCell<Vec<Arc<str>>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    KEYS.with(|keys| {
        let mut keys = keys.borrow_mut();
        if let Some(k) = keys.iter().find(|k| k.as_ref() == key) {
            return k.clone();
        }
        let k: Arc<str> = Arc::from(key);
        if keys.len() < 64 {
            keys.push(k.clone());
        }
        k
    })
}

/// What applying a delta did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Key-values stored (new or newer).
    pub stored: usize,
    /// Key-values refused by the validator (each stops its node's delta).
    pub rejected: usize,
    /// Node states created.
    pub new_nodes: usize,
    /// Nodes skipped because a budget was spent (new nodes per message, or
    /// nodes in all).
    pub over_budget: usize,
    /// The greatest version seen in a delta for our own node (a copy of our
    /// state newer than what we hold: we restarted and lost our counter).
    pub self_seen: Option<Version>,
}

/// Every node state held, with the summary and a memory of forgotten nodes.
pub(crate) struct ClusterState {
    node_states: BTreeMap<NodeId, NodeState>,
    /// Nodes forgotten on purpose, with the max version they had: old copies
    /// of their state are not taken back, newer versions are (the node came
    /// back). Bounded.
    /// Grown on use and trimmed to `forget_memory` by hand: `LruCache::new`
    /// allocates its whole capacity at once (16,384 slots, about 550 KB per
    /// node state, forgotten nodes or not).
    forgotten: LruCache<NodeId, Version>,
    forget_memory: usize,
    hash: u64,
    buckets: [u64; BUCKETS],
    bucket_counts: [u32; BUCKETS],
    /// Incremented whenever a value is stored (ours or a remote one).
    changes: u64,
}

impl ClusterState {
    pub fn new(forget_memory: usize) -> Self {
        ClusterState {
            node_states: BTreeMap::new(),
            forgotten: LruCache::unbounded(),
            forget_memory: forget_memory.max(1),
            hash: 0,
            buckets: [0; BUCKETS],
            bucket_counts: [0; BUCKETS],
            changes: 0,
        }
    }

    pub fn node_states(&self) -> &BTreeMap<NodeId, NodeState> {
        &self.node_states
    }

    pub fn node_state(&self, id: &str) -> Option<&NodeState> {
        self.node_states.get(id)
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn summary(&self) -> Summary {
        Summary {
            count: self.node_states.len() as u32,
            hash: self.hash,
        }
    }

    pub fn bucket_hashes(&self) -> Vec<u64> {
        self.buckets.to_vec()
    }

    fn add_term(&mut self, bucket: u8, term: u64) {
        self.hash = self.hash.wrapping_add(term);
        let b = &mut self.buckets[bucket as usize];
        *b = b.wrapping_add(term);
    }

    fn sub_term(&mut self, bucket: u8, term: u64) {
        self.hash = self.hash.wrapping_sub(term);
        let b = &mut self.buckets[bucket as usize];
        *b = b.wrapping_sub(term);
    }

    /// Stores a key-value of `node_id` (creating its state), keeping the
    /// summary up to date. Returns whether it was stored.
    pub fn store(&mut self, node_id: &NodeId, key: &str, value: VersionedValue) -> bool {
        let state = match self.node_states.get_mut(node_id) {
            Some(s) => s,
            None => {
                let s = NodeState::new(node_id.clone());
                let (bucket, term) = (s.bucket, summary_term(node_id, 0));
                self.bucket_counts[bucket as usize] += 1;
                self.add_term(bucket, term);
                self.forgotten.pop(node_id);
                self.node_states.entry(node_id.clone()).or_insert(s)
            }
        };
        let old = state.max_version;
        let stored = state.set_versioned_value(key, value);
        let (new, bucket) = (state.max_version, state.bucket);
        if new != old {
            self.sub_term(bucket, summary_term(node_id, old));
            self.add_term(bucket, summary_term(node_id, new));
        }
        if stored {
            self.changes += 1;
        }
        stored
    }

    /// Drops a node's state and remembers its max version.
    pub fn forget(&mut self, node_id: &str) {
        if let Some(s) = self.node_states.remove(node_id) {
            self.bucket_counts[s.bucket as usize] -= 1;
            self.sub_term(s.bucket, summary_term(node_id, s.max_version));
            self.forgotten.put(s.node_id, s.max_version);
            while self.forgotten.len() > self.forget_memory {
                self.forgotten.pop_lru();
            }
            self.changes += 1;
        }
    }

    /// The version up to which we hold (or deliberately dropped) `node_id`.
    fn held_version(&self, node_id: &str) -> Version {
        match self.node_states.get(node_id) {
            Some(s) => s.max_version,
            None => self.forgotten.peek(node_id).copied().unwrap_or(0),
        }
    }

    /// Our digest over `scope` (bucket numbers; empty: all), narrowed to
    /// whole buckets so it has at most `max_entries` entries (at least one
    /// bucket is always included).
    pub fn digest(&self, scope: &[u8], max_entries: usize) -> Digest {
        let mut wanted: Vec<u8> = if scope.is_empty() {
            (0..BUCKETS as u8).collect()
        } else {
            let mut s = scope.to_vec();
            s.sort_unstable();
            s.dedup();
            s
        };
        let mut total = 0usize;
        let mut kept = Vec::new();
        for b in wanted.drain(..) {
            let n = self.bucket_counts[b as usize] as usize;
            if !kept.is_empty() && total + n > max_entries {
                break;
            }
            total += n;
            kept.push(b);
        }
        let all = kept.len() == BUCKETS;
        let entries = self
            .node_states
            .values()
            .filter(|s| all || kept.contains(&s.bucket))
            .map(|s| (s.node_id.clone(), s.max_version))
            .collect();
        Digest {
            scope: if all { Vec::new() } else { kept },
            entries,
        }
    }

    /// Scuttlebutt reconciliation with the scuttle-depth order: the nodes of
    /// the digest's scope for which we hold newer versions than it says,
    /// unknown nodes first, then those with the most stale key-values, ties
    /// shuffled, cut at `mtu` encoded bytes.
    pub fn compute_delta<R: Rng>(&self, digest: &Digest, mtu: usize, rng: &mut R) -> Delta {
        let mut stale: BTreeMap<Staleness, Vec<(&NodeState, Version)>> = BTreeMap::new();
        for (id, state) in &self.node_states {
            if !digest.covers(id) {
                continue;
            }
            let floor = digest.entries.get(id).copied().unwrap_or(0);
            if state.max_version <= floor {
                continue;
            }
            let staleness = Staleness {
                is_unknown: floor == 0,
                max_version: state.max_version,
                num_stale: if floor == 0 {
                    state.key_values.len()
                } else {
                    state
                        .key_values
                        .iter()
                        .filter(|(_, v)| v.version > floor)
                        .count()
                },
            };
            stale.entry(staleness).or_default().push((state, floor));
        }
        let mut out = DeltaSerializer::with_mtu(mtu);
        for (_, mut group) in stale.into_iter().rev() {
            group.shuffle(rng);
            for (state, floor) in group {
                if !out.try_add_node(state.node_id.clone(), floor) {
                    return out.finish();
                }
                for (key, value) in state.stale_key_values(floor) {
                    if !out.try_add_kv(key, value) {
                        return out.finish();
                    }
                }
            }
        }
        out.finish()
    }

    /// Applies a received delta: each node's key-values in version order,
    /// each checked by `validator` before it is stored; the first one
    /// refused ends that node's part (so a bad value cannot move a node's
    /// version past good ones still to come). Nothing about our own node is
    /// taken.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_delta(
        &mut self,
        delta: Delta,
        self_id: &str,
        validator: &dyn Validator,
        max_new_nodes: usize,
        max_nodes: usize,
        max_value_bytes: usize,
    ) -> ApplyOutcome {
        let mut out = ApplyOutcome::default();
        for node in delta.node_deltas {
            if &*node.node_id == self_id {
                let top = node.key_values.last().map(|kv| kv.version);
                out.self_seen = out.self_seen.max(top);
                continue;
            }
            let mut held = self.held_version(&node.node_id);
            if !self.node_states.contains_key(&node.node_id) && held > 0 {
                // Forgotten on purpose: only a newer version brings it back,
                // and then the node is taken whole (it restarted).
                let top = node.key_values.last().map_or(0, |kv| kv.version);
                if top <= held {
                    continue;
                }
                held = 0;
            }
            if node.from_version_excluded > held {
                // Computed from a digest saying we hold more than we do
                // (forged, or we forgot the node meanwhile): applying it
                // would skip versions in between.
                continue;
            }
            let mut created = false;
            for KeyValueMutation {
                key,
                value,
                version,
            } in node.key_values
            {
                if version <= held {
                    continue;
                }
                let exists = self.node_states.contains_key(&node.node_id);
                if !exists
                    && (out.new_nodes >= max_new_nodes || self.node_states.len() >= max_nodes)
                {
                    out.over_budget += 1;
                    break;
                }
                if value.len() > max_value_bytes
                    || !validator.validate(&node.node_id, &key, &value, version)
                {
                    out.rejected += 1;
                    break;
                }
                let len = value.len();
                if self.store(&node.node_id, &key, VersionedValue { value, version }) {
                    out.stored += 1;
                    tracing::debug!(node = %node.node_id, %key, version, len, "stored a value");
                }
                if !exists && !created {
                    created = true;
                    out.new_nodes += 1;
                }
            }
        }
        out
    }
}

/// Priority of a stale node in a delta (higher first).
#[derive(Clone, Copy, Eq, PartialEq, Debug)]
struct Staleness {
    is_unknown: bool,
    max_version: u64,
    num_stale: usize,
}

impl Ord for Staleness {
    fn cmp(&self, other: &Self) -> Ordering {
        // Unknown nodes first (the oldest of them first), then the nodes with
        // the most stale key-values (the Scuttlebutt paper's scuttle-depth).
        self.is_unknown.cmp(&other.is_unknown).then_with(|| {
            if self.is_unknown {
                self.max_version.cmp(&other.max_version).reverse()
            } else {
                self.num_stale
                    .cmp(&other.num_stale)
                    .then_with(|| self.max_version.cmp(&other.max_version))
            }
        })
    }
}

impl PartialOrd for Staleness {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    struct All;
    impl Validator for All {
        fn validate(&self, _: &str, _: &str, _: &str, _: Version) -> bool {
            true
        }
    }
    /// Refuses values that say "bad".
    struct NoBad;
    impl Validator for NoBad {
        fn validate(&self, _: &str, _: &str, v: &str, _: Version) -> bool {
            v != "bad"
        }
    }

    fn vv(v: &str, version: Version) -> VersionedValue {
        VersionedValue {
            value: v.into(),
            version,
        }
    }

    fn recomputed(c: &ClusterState) -> (Summary, Vec<u64>) {
        let mut hash = 0u64;
        let mut buckets = vec![0u64; BUCKETS];
        for (id, s) in c.node_states() {
            let t = summary_term(id, s.max_version());
            hash = hash.wrapping_add(t);
            buckets[bucket_of(id) as usize] = buckets[bucket_of(id) as usize].wrapping_add(t);
        }
        (
            Summary {
                count: c.node_states().len() as u32,
                hash,
            },
            buckets,
        )
    }

    #[test]
    fn the_summary_follows_every_change() {
        let mut c = ClusterState::new(16);
        let ids: Vec<NodeId> = (0..40).map(|i| format!("node-{i}").into()).collect();
        for (i, id) in ids.iter().enumerate() {
            c.store(id, "record", vv("r", 10 + i as u64));
            c.store(id, "seen", vv("s", 20 + i as u64));
        }
        c.store(&ids[3], "record", vv("r2", 1000));
        // Older than what is held: not stored, version kept.
        assert!(!c.store(&ids[3], "record", vv("r0", 5)));
        c.forget(&ids[7]);
        let (s, b) = recomputed(&c);
        assert_eq!(c.summary(), s);
        assert_eq!(c.bucket_hashes(), b);
        assert_eq!(c.summary().count, 39);
    }

    #[test]
    fn deltas_carry_what_the_digest_lacks_and_respect_validation() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut a = ClusterState::new(16);
        let n1: NodeId = "n1".into();
        let n2: NodeId = "n2".into();
        a.store(&n1, "record", vv("r1", 5));
        a.store(&n1, "seen", vv("s1", 6));
        a.store(&n2, "record", vv("r2", 3));
        let mut b = ClusterState::new(16);
        b.store(&n1, "record", vv("r1", 5));
        let delta = a.compute_delta(&b.digest(&[], 4096), 1 << 16, &mut rng);
        assert_eq!(delta.num_key_values(), 2);
        let out = b.apply_delta(delta, "me", &All, 256, 1000, 60_000);
        assert_eq!(out.stored, 2);
        assert_eq!(out.new_nodes, 1);
        assert_eq!(a.summary(), b.summary());

        // A refused value stops its node's part: the version does not move
        // past it, so the good value after it is asked for again later.
        let mut c = ClusterState::new(16);
        a.store(&n1, "alive", vv("bad", 7));
        a.store(&n1, "suspects", vv("ok", 8));
        let d = a.compute_delta(&c.digest(&[], 4096), 1 << 16, &mut rng);
        let out = c.apply_delta(d, "me", &NoBad, 256, 1000, 60_000);
        assert_eq!(out.rejected, 1);
        assert_eq!(c.node_state("n1").map(|s| s.max_version()), Some(6));
        assert!(c.node_state("n1").unwrap().get("suspects").is_none());
    }

    #[test]
    fn budgets_forgetting_and_our_own_node() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
        let mut a = ClusterState::new(16);
        for i in 0..10 {
            a.store(&format!("n{i}").into(), "record", vv("r", 1));
        }
        a.store(&"me".into(), "record", vv("mine", 99));
        let mut b = ClusterState::new(16);
        let d = a.compute_delta(&b.digest(&[], 4096), 1 << 16, &mut rng);
        let out = b.apply_delta(d, "me", &All, 4, 1000, 60_000);
        assert_eq!(out.new_nodes, 4);
        assert_eq!(out.over_budget, 6);
        assert_eq!(out.self_seen, Some(99));
        assert!(b.node_state("me").is_none());

        // Forgotten: old copies stay out, newer versions come back.
        let d = a.compute_delta(&b.digest(&[], 4096), 1 << 16, &mut rng);
        b.apply_delta(d, "me", &All, 256, 1000, 60_000);
        assert!(b.node_state("n0").is_some() && b.node_state("n1").is_some());
        b.forget("n0");
        b.forget("n1");
        let d = a.compute_delta(&b.digest(&[], 4096), 1 << 16, &mut rng);
        b.apply_delta(d, "me", &All, 256, 1000, 60_000);
        assert!(b.node_state("n0").is_none() && b.node_state("n1").is_none());
        a.store(&"n0".into(), "record", vv("back", 2));
        let d = a.compute_delta(&b.digest(&[], 4096), 1 << 16, &mut rng);
        b.apply_delta(d, "me", &All, 256, 1000, 60_000);
        assert_eq!(
            b.node_state("n0").and_then(|s| s.get("record")),
            Some("back")
        );
        assert!(b.node_state("n1").is_none());
    }

    #[test]
    fn digests_are_narrowed_to_whole_buckets() {
        let mut c = ClusterState::new(16);
        for i in 0..500 {
            c.store(&format!("node-{i}").into(), "k", vv("v", 1));
        }
        let all = c.digest(&[], 4096);
        assert!(all.scope.is_empty());
        assert_eq!(all.entries.len(), 500);
        let part = c.digest(&[], 50);
        assert!(!part.scope.is_empty());
        assert!(part.entries.len() <= 50 || part.scope.len() == 1);
        assert!(part.entries.keys().all(|id| part.covers(id)));
        // Every node of the kept buckets is in it.
        let n_in_scope = c.node_states().keys().filter(|id| part.covers(id)).count();
        assert_eq!(n_in_scope, part.entries.len());
    }
}
