//! Gossip: the patched chitchat (sans-IO Scuttlebutt over signed values,
//! `chitchat/`) driven over QUIC ([`transport`]) with mutual TLS ([`tls`]),
//! and the round planner that decides when and with whom to gossip
//! ([`rounds`], sans-IO).
//!
//! Every member publishes its signed record, observations, refutations and
//! accusations as chitchat values (keys in [`crate::trust`]); chitchat
//! stores nothing that [`TrustState`] did not validate. This module is the
//! shell: it holds the state behind a lock, hands received messages to it,
//! sends what it answers and starts the rounds the daemon asks for.

pub mod rounds;
pub mod tls;
pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use chitchat::{Chitchat, ChitchatConfig, ChitchatMessage, SetError, Summary};

use crate::membership::GossipEntry;
use crate::proto::PublicKeyBytes;
use crate::trust::{
    PeerIdentity, TrustState, ALIVE_KEY, AUTHORITY_NODE, RECORD_KEY, REVOKED_KEY, SEEN_KEY,
    SUSPECTS_KEY,
};
pub use transport::QuicTransport;
use transport::{Inbound, Request};

/// Handles requests (join, hello, relay allocations): the daemon's part.
pub trait RequestHandler: Send + Sync + 'static {
    fn request(&self, from: SocketAddr, peer: &PeerIdentity, req: Request) -> Vec<u8>;
}

/// The gossip state and what answers the network.
pub struct GossipCore {
    chitchat: Mutex<Chitchat>,
    trust: Arc<TrustState>,
    /// Notified when a remote value was stored (the daemon steps at once in
    /// small meshes).
    changed: tokio::sync::Notify,
    requests: OnceLock<Arc<dyn RequestHandler>>,
    /// Members heard from on their own connections since the daemon last
    /// asked: key -> (when, from where) (see [`Gossip::take_heard`]).
    heard: Mutex<HashMap<PublicKeyBytes, (Instant, SocketAddr)>>,
}

impl GossipCore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Chitchat> {
        // Chitchat's methods leave it consistent between calls; a panic in
        // one (a bug) should not take gossip down with it.
        self.chitchat.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inbound for GossipCore {
    fn gossip(
        &self,
        from: SocketAddr,
        peer: &PeerIdentity,
        msg: ChitchatMessage,
    ) -> Option<ChitchatMessage> {
        {
            let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
            heard.insert(peer.node_key, (Instant::now(), from));
        }
        let mut c = self.lock();
        let before = c.changes();
        let reply = c.handle_message(msg, &*self.trust);
        let changed = c.changes() != before;
        drop(c);
        if changed {
            self.changed.notify_one();
        }
        reply
    }

    fn request(&self, from: SocketAddr, peer: &PeerIdentity, req: Request) -> Vec<u8> {
        match self.requests.get() {
            Some(h) => h.request(from, peer, req),
            None => Vec::new(),
        }
    }
}

/// A node's gossip: state plus transport.
pub struct Gossip {
    core: Arc<GossipCore>,
    pub transport: QuicTransport,
}

impl Gossip {
    /// Starts answering gossip on a bound transport.
    pub fn start(
        node_id: &str,
        cluster_id: String,
        trust: Arc<TrustState>,
        transport: QuicTransport,
        seed: u64,
    ) -> Self {
        let mut config = ChitchatConfig::new(node_id, cluster_id);
        config.seed = seed;
        let core = Arc::new(GossipCore {
            chitchat: Mutex::new(Chitchat::new(config)),
            trust,
            changed: tokio::sync::Notify::new(),
            requests: OnceLock::new(),
            heard: Mutex::new(HashMap::new()),
        });
        transport.set_inbound(core.clone());
        Gossip { core, transport }
    }

    /// Where requests go (set once, before peers can ask).
    pub fn set_request_handler(&self, h: Arc<dyn RequestHandler>) {
        let _ = self.core.requests.set(h);
    }

    /// Publishes one of our values (signed text) at its signed version.
    pub fn publish(&self, key: &str, text: String, version: u64) -> Result<(), SetError> {
        self.core.lock().set(key, text, version)
    }

    /// Our node's current max version (the next one must be above it).
    pub fn self_version(&self) -> u64 {
        self.core.lock().self_version()
    }

    /// A version of our own node someone else holds above ours (we lost our
    /// counter), if any.
    pub fn take_self_seen(&self) -> Option<u64> {
        self.core.lock().take_self_seen()
    }

    /// Stores another node's value that reached us outside gossip (a joiner's
    /// hello reply, a revocation list from the CLI), if valid and newer.
    pub fn inject(&self, node_id: &str, key: &str, text: &str, version: u64) -> bool {
        let stored = self
            .core
            .lock()
            .inject(node_id, key, text, version, &*self.core.trust);
        if stored {
            self.core.changed.notify_one();
        }
        stored
    }

    /// Drops a node's state (left, down long enough, revoked).
    pub fn forget(&self, node_id: &str) {
        self.core.lock().forget(node_id);
    }

    /// Every member's values, for the membership core.
    pub fn snapshot(&self) -> Vec<GossipEntry> {
        snapshot(&self.core.lock())
    }

    /// The revocation list gossip holds (text, version).
    pub fn revocations(&self) -> Option<(Arc<str>, u64)> {
        let c = self.core.lock();
        c.node_state(AUTHORITY_NODE)
            .and_then(|s| s.get_versioned(REVOKED_KEY))
            .map(|v| (v.value.clone(), v.version))
    }

    pub fn summary(&self) -> Summary {
        self.core.lock().summary()
    }

    /// Grows whenever the state changed (ours or others' values).
    pub fn changes(&self) -> u64 {
        self.core.lock().changes()
    }

    pub fn stats(&self) -> chitchat::Stats {
        self.core.lock().stats()
    }

    /// The members heard from on their own connections since the last
    /// call, with when and from where (liveness evidence:
    /// `Liveness::handle_heard`).
    pub fn take_heard(&self) -> Vec<(PublicKeyBytes, Instant, SocketAddr)> {
        let mut heard = self.core.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.drain().map(|(k, (at, from))| (k, at, from)).collect()
    }

    /// Notified when a remote value was stored.
    pub async fn changed(&self) {
        self.core.changed.notified().await
    }

    /// Starts a round with the member at `to`, unless one is in flight or
    /// the address is held back; returns whether it started. `busy`: the
    /// round spreads news (PROTOCOL §4.4: its `Syn` carries bucket hashes
    /// in meshes of more than 32 node states).
    pub fn round_with(&self, to: SocketAddr, busy: bool) -> bool {
        if !self.transport.try_start_round(to) {
            return false;
        }
        let syn = self.core.lock().syn_busy(busy);
        self.transport.send(to, &syn);
        true
    }

    pub async fn shutdown(self) {
        self.transport.close();
    }
}

/// Every member's values in a chitchat state, for the membership core
/// (sans-IO: the daemon and the simulation call it).
pub fn snapshot(c: &Chitchat) -> Vec<GossipEntry> {
    c.node_states()
        .iter()
        .filter(|(id, _)| &***id != AUTHORITY_NODE)
        .map(|(id, s)| GossipEntry {
            node_id: id.clone(),
            record: s.get_versioned(RECORD_KEY).map(|v| v.value.clone()),
            seen: s.get_versioned(SEEN_KEY).map(|v| v.value.clone()),
            alive: s.get_versioned(ALIVE_KEY).map(|v| v.value.clone()),
            suspects: s.get_versioned(SUSPECTS_KEY).map(|v| v.value.clone()),
        })
        .collect()
}

/// The chitchat cluster id of a network.
pub fn cluster_id(network: &crate::admission::Network) -> String {
    network.id()
}
