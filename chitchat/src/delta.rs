//! Deltas: the key-values one node sends another, as a compressed stream of
//! operations cut at a size limit (the "MTU" of upstream chitchat).
//!
//! Changes from chitchat 0.11.2: no tombstones, no garbage-collection
//! versions and no `SetMaxVersion` operation (meshpeer never deletes a
//! key-value, it only replaces it with a newer signed one); the encoded
//! stream is kept with the delta, so a delta is compressed once (upstream
//! compressed it twice: once to measure, once to send).

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Context as _;

use crate::serialize::*;
use crate::types::{KeyValueMutation, NodeId, Version, VersionedValue};

/// Most bytes a received delta may inflate to.
pub const MAX_DECOMPRESSED: usize = 1 << 20;

/// A delta: for some nodes, the key-values newer than a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub(crate) node_deltas: Vec<NodeDelta>,
    /// The compressed stream, as sent or received.
    encoded: Vec<u8>,
}

impl Default for Delta {
    fn default() -> Self {
        DeltaSerializer::with_mtu(DEFAULT_MTU).finish()
    }
}

/// Default cut of a delta we send (bytes, encoded).
pub const DEFAULT_MTU: usize = 64 * 1024;

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.node_deltas.is_empty()
    }

    /// Number of key-values carried.
    pub fn num_key_values(&self) -> usize {
        self.node_deltas.iter().map(|n| n.key_values.len()).sum()
    }
}

/// The part of a delta about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeDelta {
    pub node_id: NodeId,
    /// The sender computed this from the receiver's digest saying it holds
    /// everything up to this version: the key-values here are those newer
    /// than it, in increasing version order (possibly cut short).
    pub from_version_excluded: Version,
    pub key_values: Vec<KeyValueMutation>,
}

enum DeltaOp {
    Node {
        node_id: NodeId,
        from_version_excluded: Version,
    },
    KeyValue(KeyValueMutation),
}

#[repr(u8)]
enum DeltaOpTag {
    Node = 0,
    KeyValue = 1,
}

impl Serializable for DeltaOp {
    fn serialize(&self, buf: &mut Vec<u8>) {
        match self {
            DeltaOp::Node {
                node_id,
                from_version_excluded,
            } => {
                buf.push(DeltaOpTag::Node as u8);
                node_id.as_ref().serialize(buf);
                from_version_excluded.serialize(buf);
            }
            DeltaOp::KeyValue(kv) => {
                buf.push(DeltaOpTag::KeyValue as u8);
                kv.key.serialize(buf);
                kv.value.as_ref().serialize(buf);
                kv.version.serialize(buf);
            }
        }
    }

    fn serialized_len(&self) -> usize {
        1 + match self {
            DeltaOp::Node { node_id, .. } => node_id.as_ref().serialized_len() + 8,
            DeltaOp::KeyValue(kv) => {
                kv.key.serialized_len() + kv.value.as_ref().serialized_len() + 8
            }
        }
    }
}

impl Deserializable for DeltaOp {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let tag = u8::deserialize(buf)?;
        if tag == DeltaOpTag::Node as u8 {
            Ok(DeltaOp::Node {
                node_id: NodeId::deserialize(buf)?,
                from_version_excluded: Version::deserialize(buf)?,
            })
        } else if tag == DeltaOpTag::KeyValue as u8 {
            Ok(DeltaOp::KeyValue(KeyValueMutation {
                key: String::deserialize(buf)?,
                value: Arc::<str>::deserialize(buf)?,
                version: Version::deserialize(buf)?,
            }))
        } else {
            anyhow::bail!("unknown delta operation {tag}")
        }
    }
}

impl Serializable for Delta {
    fn serialize(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&self.encoded);
    }

    fn serialized_len(&self) -> usize {
        self.encoded.len()
    }
}

impl Deserializable for Delta {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let start = *buf;
        let ops: Vec<DeltaOp> = deserialize_stream(buf, MAX_DECOMPRESSED)?;
        let encoded = start[..start.len() - buf.len()].to_vec();
        let mut builder = DeltaBuilder::default();
        for op in ops {
            builder.apply_op(op)?;
        }
        Ok(builder.finish(encoded))
    }
}

/// Rebuilds node deltas from operations, checking their order: one node
/// operation per node, each key-value after its node, versions strictly
/// increasing within a node.
#[derive(Default)]
struct DeltaBuilder {
    seen: HashSet<NodeId>,
    node_deltas: Vec<NodeDelta>,
}

impl DeltaBuilder {
    fn apply_op(&mut self, op: DeltaOp) -> anyhow::Result<()> {
        match op {
            DeltaOp::Node {
                node_id,
                from_version_excluded,
            } => {
                anyhow::ensure!(
                    self.seen.insert(node_id.clone()),
                    "delta names node {node_id} twice"
                );
                self.node_deltas.push(NodeDelta {
                    node_id,
                    from_version_excluded,
                    key_values: Vec::new(),
                });
            }
            DeltaOp::KeyValue(kv) => {
                let node = self
                    .node_deltas
                    .last_mut()
                    .context("delta has a key-value before any node")?;
                let floor = node
                    .key_values
                    .last()
                    .map_or(node.from_version_excluded, |last| last.version);
                anyhow::ensure!(
                    kv.version > floor,
                    "delta versions of node {} do not increase ({} after {floor})",
                    node.node_id,
                    kv.version
                );
                node.key_values.push(kv);
            }
        }
        Ok(())
    }

    fn finish(self, encoded: Vec<u8>) -> Delta {
        Delta {
            node_deltas: self.node_deltas,
            encoded,
        }
    }
}

/// Builds a delta that stays within `mtu` encoded bytes: callers add nodes
/// and key-values until a `try_add_*` returns false.
pub struct DeltaSerializer {
    mtu: usize,
    builder: DeltaBuilder,
    writer: CompressedStreamWriter,
}

const BLOCK_THRESHOLD: usize = 16_384;

impl DeltaSerializer {
    pub fn with_mtu(mtu: usize) -> Self {
        let mtu = mtu.max(128);
        let block = BLOCK_THRESHOLD.min(mtu).min(u16::MAX as usize) as u16;
        DeltaSerializer {
            mtu,
            builder: DeltaBuilder::default(),
            writer: CompressedStreamWriter::with_block_threshold(block),
        }
    }

    fn try_add_op(&mut self, op: DeltaOp) -> bool {
        if op.serialized_len() > u16::MAX as usize
            || self.writer.serialized_len_upperbound_after(&op) > self.mtu
        {
            return false;
        }
        self.writer.append(&op);
        // Callers add nodes once and versions in increasing order (the state
        // iterates them sorted); an op the builder refuses would be a bug
        // here, and is dropped rather than sent.
        if let Err(e) = self.builder.apply_op(op) {
            tracing::error!(error = %e, "chitchat built an inconsistent delta");
        }
        true
    }

    /// Adds a node; false if it would exceed the MTU.
    pub fn try_add_node(&mut self, node_id: NodeId, from_version_excluded: Version) -> bool {
        self.try_add_op(DeltaOp::Node {
            node_id,
            from_version_excluded,
        })
    }

    /// Adds a key-value of the last node added; false if it would exceed
    /// the MTU.
    pub fn try_add_kv(&mut self, key: &str, value: &VersionedValue) -> bool {
        self.try_add_op(DeltaOp::KeyValue(KeyValueMutation {
            key: key.to_string(),
            value: value.value.clone(),
            version: value.version,
        }))
    }

    pub fn finish(self) -> Delta {
        let encoded = self.writer.finish();
        self.builder.finish(encoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(v: &str, version: Version) -> VersionedValue {
        VersionedValue {
            value: v.into(),
            version,
        }
    }

    #[test]
    fn empty_and_small_deltas_round_trip() {
        test_serdeser_aux(&Delta::default(), 1);
        let mut s = DeltaSerializer::with_mtu(DEFAULT_MTU);
        assert!(s.try_add_node("n1".into(), 3));
        assert!(s.try_add_kv("record", &vv("abc", 4)));
        assert!(s.try_add_kv("seen", &vv("xyz", 9)));
        assert!(s.try_add_node("n2".into(), 0));
        assert!(s.try_add_kv("record", &vv("r", 1)));
        let d = s.finish();
        assert_eq!(d.num_key_values(), 3);
        let bytes = d.serialize_to_vec();
        let back = Delta::deserialize(&mut &bytes[..]).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn the_mtu_cuts_the_delta() {
        let mut s = DeltaSerializer::with_mtu(300);
        assert!(s.try_add_node("n1".into(), 0));
        let mut added = 0;
        // Incompressible values, so the cut shows.
        for i in 1..100u64 {
            let v: String = (0..40)
                .map(|j| char::from(b'a' + ((i * 31 + j * 7) % 26) as u8))
                .collect();
            if !s.try_add_kv(&format!("k{i}"), &vv(&v, i)) {
                break;
            }
            added += 1;
        }
        let d = s.finish();
        assert!(added > 0 && added < 99, "{added}");
        assert!(d.serialized_len() <= 300, "{}", d.serialized_len());
    }

    fn encode(ops: &[DeltaOp]) -> Vec<u8> {
        let mut w = CompressedStreamWriter::with_block_threshold(1000);
        for op in ops {
            w.append(op);
        }
        w.finish()
    }

    #[test]
    fn malformed_deltas_are_errors() {
        let kv = |v| {
            DeltaOp::KeyValue(KeyValueMutation {
                key: "k".into(),
                value: "v".into(),
                version: v,
            })
        };
        let node = |id: &str, from| DeltaOp::Node {
            node_id: id.into(),
            from_version_excluded: from,
        };
        // A key-value before any node.
        assert!(Delta::deserialize(&mut &encode(&[kv(1)])[..]).is_err());
        // A node twice.
        assert!(Delta::deserialize(&mut &encode(&[node("a", 0), node("a", 0)])[..]).is_err());
        // Versions going back, or not above the floor (upstream: an assert).
        assert!(Delta::deserialize(&mut &encode(&[node("a", 0), kv(5), kv(5)])[..]).is_err());
        assert!(Delta::deserialize(&mut &encode(&[node("a", 7), kv(5)])[..]).is_err());
        // Fine.
        assert!(Delta::deserialize(&mut &encode(&[node("a", 0), kv(5), kv(6)])[..]).is_ok());
    }
}
