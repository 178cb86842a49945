//! Node ids, versions and versioned values.

use std::sync::Arc;

/// A node's identifier in gossip. meshpeer uses the node key's text form; the
/// node's address and generation are not part of it (upstream chitchat's
/// `ChitchatId` had both): where a node is reached comes from its signed
/// record, and a restarted node continues its own state with higher versions.
pub type NodeId = Arc<str>;

/// The version of a key-value. Within one node's state, versions only grow,
/// and every key-value carries the version at which it was set. meshpeer sets
/// them to the version signed inside the value (see `Validator`).
pub type Version = u64;

/// A versioned value. Values are shared (`Arc<str>`): the same bytes can be
/// held by many node states (e.g. many simulated nodes in one process)
/// without copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedValue {
    pub value: Arc<str>,
    pub version: Version,
}

/// A key-value as it travels in a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValueMutation {
    pub key: String,
    pub value: Arc<str>,
    pub version: Version,
}
