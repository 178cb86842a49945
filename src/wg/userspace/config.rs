//! The device configuration as UAPI sees it, the typed changes of a `set`
//! request, and the pure function that applies them with wireguard-go's
//! semantics.

use std::net::SocketAddr;

use ipnet::IpNet;
use x25519_dalek::{PublicKey, StaticSecret};

use super::error::UapiError;

/// A 32-byte key (private, public or preshared).
pub type Key = [u8; 32];

/// The public key of a private key.
pub fn public_key_of(private: &Key) -> Key {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// One peer as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Identity of this peer *instance*: a peer removed and added again (even
    /// in the same request, or by `replace_peers`) gets a new id, and so a new
    /// session and new counters, as in wireguard-go.
    pub id: u64,
    pub public_key: Key,
    /// All zero means no preshared key.
    pub preshared_key: Key,
    pub endpoint: Option<SocketAddr>,
    /// Seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// Prefixes with host bits cleared, each owned by at most one peer.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerConfig {
    fn new(id: u64, public_key: Key) -> Self {
        PeerConfig {
            id,
            public_key,
            preshared_key: [0; 32],
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
        }
    }
}

/// The whole configuration of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Option<Key>,
    /// The requested port (0 = random) until bound, then the bound port.
    pub listen_port: u16,
    pub fwmark: u32,
    /// In creation order.
    pub peers: Vec<PeerConfig>,
    next_peer_id: u64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            private_key: None,
            listen_port: 0,
            fwmark: 0,
            peers: Vec::new(),
            next_peer_id: 1,
        }
    }
}

/// A device-level line of a `set` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOp {
    /// `None` for an all-zero key, which removes the private key.
    PrivateKey(Option<Key>),
    ListenPort(u16),
    Fwmark(u32),
    ReplacePeers,
}

/// A peer-level line of a `set` request; it applies to the peer named by the
/// `public_key` line that opens its section, and to no other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOp {
    UpdateOnly,
    Remove,
    PresharedKey(Key),
    Endpoint(SocketAddr),
    PersistentKeepalive(u16),
    ReplaceAllowedIps,
    AllowedIp(IpNet),
    /// `allowed_ip=-prefix` (newer wireguard-tools): remove one prefix.
    RemoveAllowedIp(IpNet),
    ProtocolVersion,
}

/// The lines following one `public_key=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSection {
    pub public_key: Key,
    pub ops: Vec<PeerOp>,
}

/// A parsed `set=1` request, in request order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub device: Vec<DeviceOp>,
    pub peers: Vec<PeerSection>,
}

impl DeviceConfig {
    /// The public key of the device, if it has a private key.
    pub fn public_key(&self) -> Option<Key> {
        self.private_key.as_ref().map(public_key_of)
    }

    pub fn peer(&self, public_key: &Key) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| &p.public_key == public_key)
    }

    fn position(&self, public_key: &Key) -> Option<usize> {
        self.peers.iter().position(|p| &p.public_key == public_key)
    }

    fn set_private_key(&mut self, key: Option<Key>) {
        if key == self.private_key {
            return;
        }
        if let Some(k) = &key {
            // wireguard-go removes the peers whose public key is our own.
            let own = public_key_of(k);
            self.peers.retain(|p| p.public_key != own);
        }
        self.private_key = key;
    }

    fn insert_allowed_ip(&mut self, idx: usize, net: IpNet) {
        let net = net.trunc();
        // A prefix belongs to one peer: inserting it moves it.
        for (i, p) in self.peers.iter_mut().enumerate() {
            if i != idx {
                p.allowed_ips.retain(|n| *n != net);
            }
        }
        let ips = &mut self.peers[idx].allowed_ips;
        if !ips.contains(&net) {
            ips.push(net);
        }
    }

    /// Applies `req` to a copy of `self`, line by line as wireguard-go does,
    /// and returns the new configuration. All values were validated by the
    /// parser, so this cannot fail half-way; it returns a `Result` so that
    /// future checks keep the all-or-nothing contract.
    pub fn apply(&self, req: &SetRequest) -> Result<DeviceConfig, UapiError> {
        let mut c = self.clone();
        for op in &req.device {
            match op {
                DeviceOp::PrivateKey(k) => c.set_private_key(*k),
                DeviceOp::ListenPort(p) => c.listen_port = *p,
                DeviceOp::Fwmark(m) => c.fwmark = *m,
                DeviceOp::ReplacePeers => c.peers.clear(),
            }
        }
        // Once per request, not per peer section: deriving the public key
        // is an X25519 base-point multiplication, and the daemon's periodic
        // poke names every peer with a session.
        let own = c.public_key();
        for section in &req.peers {
            c.apply_peer(section, own);
        }
        Ok(c)
    }

    fn apply_peer(&mut self, section: &PeerSection, own: Option<Key>) {
        // A peer with our own public key is a "dummy": its lines are ignored.
        let dummy = own == Some(section.public_key);
        let mut created = false;
        let mut idx = if dummy {
            None
        } else if let Some(i) = self.position(&section.public_key) {
            Some(i)
        } else {
            let id = self.next_peer_id;
            self.next_peer_id += 1;
            self.peers.push(PeerConfig::new(id, section.public_key));
            created = true;
            Some(self.peers.len() - 1)
        };
        for op in &section.ops {
            let Some(i) = idx else {
                continue;
            };
            match op {
                PeerOp::UpdateOnly => {
                    if created {
                        self.peers.remove(i);
                        idx = None;
                    }
                }
                PeerOp::Remove => {
                    self.peers.remove(i);
                    idx = None;
                }
                PeerOp::PresharedKey(k) => self.peers[i].preshared_key = *k,
                PeerOp::Endpoint(e) => self.peers[i].endpoint = Some(*e),
                PeerOp::PersistentKeepalive(s) => self.peers[i].persistent_keepalive = *s,
                PeerOp::ReplaceAllowedIps => self.peers[i].allowed_ips.clear(),
                PeerOp::AllowedIp(net) => self.insert_allowed_ip(i, *net),
                PeerOp::RemoveAllowedIp(net) => {
                    let net = net.trunc();
                    self.peers[i].allowed_ips.retain(|n| *n != net);
                }
                PeerOp::ProtocolVersion => {}
            }
        }
    }
}
