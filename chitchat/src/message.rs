//! Gossip messages and their encoding.
//!
//! `magic (u16 LE 45139) || protocol version (u8) || type (u8) || fields`,
//! with chitchat's primitive encodings (fixed-width little-endian integers,
//! strings as u16 length + UTF-8). Protocol version 1 is meshpeer's
//! (upstream chitchat 0.11 is version 0 and is refused).

use anyhow::{bail, Context};

use crate::delta::Delta;
use crate::digest::{Digest, Summary, BUCKETS};
use crate::serialize::{Deserializable, Serializable};

const MAGIC_NUMBER: u16 = 45_139;
/// Wire version of the messages (upstream chitchat 0.11 sends 0).
pub const PROTOCOL_VERSION: u8 = 1;

/// One step of a gossip round (see the crate documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChitchatMessage {
    /// A opens a round with its summary (and its bucket hashes in large
    /// meshes).
    Syn {
        cluster_id: String,
        summary: Summary,
        buckets: Vec<u64>,
    },
    /// B answers: in sync (`None`), or its digest of the buckets that differ.
    SynAck { digest: Option<Digest> },
    /// A delta, with the sender's digest of the same scope when the other
    /// side still owes one (A's answer to a SynAck), or without (B's last
    /// word).
    Ack {
        delta: Delta,
        digest: Option<Digest>,
    },
    /// B refuses: A belongs to another cluster.
    BadCluster,
}

#[repr(u8)]
enum MessageType {
    Syn = 0,
    SynAck = 1,
    Ack = 2,
    BadCluster = 3,
}

fn serialize_digest(d: &Option<Digest>, buf: &mut Vec<u8>) {
    match d {
        None => buf.push(0),
        Some(d) => {
            buf.push(1);
            d.serialize(buf);
        }
    }
}

fn digest_len(d: &Option<Digest>) -> usize {
    1 + d.as_ref().map_or(0, Serializable::serialized_len)
}

fn deserialize_digest(buf: &mut &[u8]) -> anyhow::Result<Option<Digest>> {
    match u8::deserialize(buf)? {
        0 => Ok(None),
        1 => Ok(Some(Digest::deserialize(buf)?)),
        b => bail!("invalid digest flag {b}"),
    }
}

impl Serializable for ChitchatMessage {
    fn serialize(&self, buf: &mut Vec<u8>) {
        MAGIC_NUMBER.serialize(buf);
        PROTOCOL_VERSION.serialize(buf);
        match self {
            ChitchatMessage::Syn {
                cluster_id,
                summary,
                buckets,
            } => {
                buf.push(MessageType::Syn as u8);
                cluster_id.serialize(buf);
                summary.serialize(buf);
                (buckets.len() as u8).serialize(buf);
                for b in buckets {
                    b.serialize(buf);
                }
            }
            ChitchatMessage::SynAck { digest } => {
                buf.push(MessageType::SynAck as u8);
                serialize_digest(digest, buf);
            }
            ChitchatMessage::Ack { delta, digest } => {
                buf.push(MessageType::Ack as u8);
                serialize_digest(digest, buf);
                delta.serialize(buf);
            }
            ChitchatMessage::BadCluster => buf.push(MessageType::BadCluster as u8),
        }
    }

    fn serialized_len(&self) -> usize {
        4 + match self {
            ChitchatMessage::Syn {
                cluster_id,
                buckets,
                ..
            } => cluster_id.serialized_len() + 12 + 1 + 8 * buckets.len(),
            ChitchatMessage::SynAck { digest } => digest_len(digest),
            ChitchatMessage::Ack { delta, digest } => digest_len(digest) + delta.serialized_len(),
            ChitchatMessage::BadCluster => 0,
        }
    }
}

impl Deserializable for ChitchatMessage {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let magic = u16::deserialize(buf).context("message too short")?;
        if magic != MAGIC_NUMBER {
            bail!("not a chitchat message (magic {magic})");
        }
        let version = u8::deserialize(buf)?;
        if version != PROTOCOL_VERSION {
            bail!("chitchat protocol version {version}, expected {PROTOCOL_VERSION}");
        }
        let kind = u8::deserialize(buf)?;
        let msg = if kind == MessageType::Syn as u8 {
            let cluster_id = String::deserialize(buf)?;
            let summary = Summary::deserialize(buf)?;
            let n = u8::deserialize(buf)? as usize;
            if n != 0 && n != BUCKETS {
                bail!("a summary has 0 or {BUCKETS} buckets, not {n}");
            }
            let mut buckets = Vec::with_capacity(n);
            for _ in 0..n {
                buckets.push(u64::deserialize(buf)?);
            }
            ChitchatMessage::Syn {
                cluster_id,
                summary,
                buckets,
            }
        } else if kind == MessageType::SynAck as u8 {
            ChitchatMessage::SynAck {
                digest: deserialize_digest(buf)?,
            }
        } else if kind == MessageType::Ack as u8 {
            let digest = deserialize_digest(buf)?;
            let delta = Delta::deserialize(buf)?;
            ChitchatMessage::Ack { delta, digest }
        } else if kind == MessageType::BadCluster as u8 {
            ChitchatMessage::BadCluster
        } else {
            bail!("unknown chitchat message type {kind}");
        };
        if !buf.is_empty() {
            bail!("{} trailing bytes after a chitchat message", buf.len());
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::DeltaSerializer;
    use crate::types::VersionedValue;

    #[test]
    fn messages_round_trip() {
        let mut digest = Digest::default();
        digest.entries.insert("n".into(), 3);
        let mut s = DeltaSerializer::with_mtu(4096);
        assert!(s.try_add_node("n".into(), 0));
        assert!(s.try_add_kv(
            "record",
            &VersionedValue {
                value: "v".into(),
                version: 3
            }
        ));
        let msgs = vec![
            ChitchatMessage::Syn {
                cluster_id: "c".into(),
                summary: Summary { count: 2, hash: 9 },
                buckets: vec![],
            },
            ChitchatMessage::Syn {
                cluster_id: "c".into(),
                summary: Summary { count: 2, hash: 9 },
                buckets: vec![7; BUCKETS],
            },
            ChitchatMessage::SynAck { digest: None },
            ChitchatMessage::SynAck {
                digest: Some(digest.clone()),
            },
            ChitchatMessage::Ack {
                delta: s.finish(),
                digest: Some(digest),
            },
            ChitchatMessage::BadCluster,
        ];
        for m in msgs {
            let bytes = m.serialize_to_vec();
            assert_eq!(bytes.len(), m.serialized_len());
            assert_eq!(ChitchatMessage::deserialize(&mut &bytes[..]).unwrap(), m);
            // Every truncation and every single-byte change decodes to an
            // error or to some message, never a panic.
            for cut in 0..bytes.len() {
                let _ = ChitchatMessage::deserialize(&mut &bytes[..cut]);
            }
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x5a;
                let _ = ChitchatMessage::deserialize(&mut &b[..]);
            }
        }
    }

    #[test]
    fn upstream_messages_and_trailing_bytes_are_refused() {
        // chitchat 0.11's version byte is 0.
        let mut b = Vec::new();
        MAGIC_NUMBER.serialize(&mut b);
        0u8.serialize(&mut b);
        b.push(3);
        assert!(ChitchatMessage::deserialize(&mut &b[..]).is_err());
        let mut ok = ChitchatMessage::BadCluster.serialize_to_vec();
        ok.push(0);
        assert!(ChitchatMessage::deserialize(&mut &ok[..]).is_err());
    }
}
