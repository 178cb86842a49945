//! Digests (what a node holds: each node's max version) and summaries (a
//! fixed-size fingerprint of a digest, compared before any digest is sent).

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use crate::serialize::*;
use crate::types::{NodeId, Version};

/// Number of buckets node states are spread over for large meshes (see
/// [`Summary`]).
pub const BUCKETS: usize = 64;

/// The bucket a node id falls into: the first byte of SHA-256(node id) mod
/// [`BUCKETS`].
pub fn bucket_of(node_id: &str) -> u8 {
    let h = Sha256::digest(node_id.as_bytes());
    h[0] % BUCKETS as u8
}

/// One node's term in a summary: the first 8 bytes (little endian) of
/// SHA-256(node id || max version as u64 little endian).
pub fn summary_term(node_id: &str, max_version: Version) -> u64 {
    let mut h = Sha256::new();
    h.update(node_id.as_bytes());
    h.update(max_version.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]))
}

/// A fingerprint of a node's digest: how many node states it holds and the
/// wrapping sum of their [`summary_term`]s. Two nodes with equal summaries
/// hold the same versions of the same nodes (but for a 2^-64 accident).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Summary {
    pub count: u32,
    pub hash: u64,
}

impl Serializable for Summary {
    fn serialize(&self, buf: &mut Vec<u8>) {
        self.count.serialize(buf);
        self.hash.serialize(buf);
    }
    fn serialized_len(&self) -> usize {
        12
    }
}

impl Deserializable for Summary {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        Ok(Summary {
            count: u32::deserialize(buf)?,
            hash: u64::deserialize(buf)?,
        })
    }
}

/// What a node holds, for the nodes of a scope: node id -> max version.
///
/// `scope` lists the buckets the digest covers (empty: all of them). A node
/// of the scope that is missing from `entries` is one the sender does not
/// hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Digest {
    pub scope: Vec<u8>,
    pub entries: BTreeMap<NodeId, Version>,
}

impl Digest {
    /// Whether `node_id` falls in this digest's scope.
    pub fn covers(&self, node_id: &str) -> bool {
        self.scope.is_empty() || self.scope.contains(&bucket_of(node_id))
    }
}

impl Serializable for Digest {
    fn serialize(&self, buf: &mut Vec<u8>) {
        (self.scope.len() as u8).serialize(buf);
        buf.extend_from_slice(&self.scope);
        (self.entries.len() as u32).serialize(buf);
        for (node_id, version) in &self.entries {
            node_id.as_ref().serialize(buf);
            version.serialize(buf);
        }
    }

    fn serialized_len(&self) -> usize {
        1 + self.scope.len()
            + 4
            + self
                .entries
                .keys()
                .map(|id| id.as_ref().serialized_len() + 8)
                .sum::<usize>()
    }
}

/// Decoding bound: a digest of more entries is refused (see
/// `Limits::max_digest_entries`, which senders respect).
pub const MAX_DIGEST_ENTRIES_DECODE: u32 = 65_536;

impl Deserializable for Digest {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let n_scope = u8::deserialize(buf)? as usize;
        anyhow::ensure!(n_scope <= BUCKETS, "digest scope of {n_scope} buckets");
        let scope_bytes = buf
            .get(..n_scope)
            .ok_or_else(|| anyhow::anyhow!("digest scope truncated"))?
            .to_vec();
        anyhow::ensure!(
            scope_bytes.iter().all(|b| (*b as usize) < BUCKETS),
            "digest scope names a bucket out of range"
        );
        *buf = &buf[n_scope..];
        let n = u32::deserialize(buf)?;
        anyhow::ensure!(
            n <= MAX_DIGEST_ENTRIES_DECODE,
            "digest of {n} entries is over the limit"
        );
        let mut entries = BTreeMap::new();
        for _ in 0..n {
            let node_id = NodeId::deserialize(buf)?;
            let version = Version::deserialize(buf)?;
            anyhow::ensure!(
                entries.insert(node_id, version).is_none(),
                "digest names a node twice"
            );
        }
        Ok(Digest {
            scope: scope_bytes,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_and_refuses_garbage() {
        let mut d = Digest {
            scope: vec![3, 7],
            ..Default::default()
        };
        d.entries.insert("a".into(), 5);
        d.entries.insert("bb".into(), u64::MAX);
        test_serdeser_aux(&d, 1 + 2 + 4 + (2 + 1 + 8) + (2 + 2 + 8));
        // Out-of-range bucket, duplicate node, truncation: errors, not panics.
        assert!(Digest::deserialize(&mut &[1u8, 64, 0, 0, 0, 0][..]).is_err());
        let mut bytes = Vec::new();
        0u8.serialize(&mut bytes);
        2u32.serialize(&mut bytes);
        for _ in 0..2 {
            "a".serialize(&mut bytes);
            1u64.serialize(&mut bytes);
        }
        assert!(Digest::deserialize(&mut &bytes[..]).is_err());
        for cut in 0..bytes.len() {
            let _ = Digest::deserialize(&mut &bytes[..cut]);
        }
    }

    #[test]
    fn terms_and_buckets_are_fixed_functions() {
        // Pinned: every implementation must compute the same values.
        assert_eq!(summary_term("a", 1), summary_term("a", 1));
        assert_ne!(summary_term("a", 1), summary_term("a", 2));
        assert!((bucket_of("anything") as usize) < BUCKETS);
    }
}
