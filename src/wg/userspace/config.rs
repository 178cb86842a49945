//! The device configuration as UAPI sees it, the typed changes of a `set`
//! request, and the pure function that applies them with wireguard-go's
//! semantics.

use std::collections::HashMap;
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

    /// Adds `net` to peer `idx`. A prefix belongs to one peer: inserting it
    /// moves it. `owners` (prefix -> peer id) is the truth while a request
    /// is applied; the lists catch up in [`Self::sweep_allowed_ips`]. With
    /// a scan of every peer's list per line instead, a `set` of n allowed
    /// IPs took O(n^2) (40,000: 19 s; the socket accepts 16 MiB).
    fn insert_allowed_ip(&mut self, idx: usize, net: IpNet, owners: &mut HashMap<IpNet, u64>) {
        let net = net.trunc();
        let id = self.peers[idx].id;
        if owners.insert(net, id) != Some(id) {
            self.peers[idx].allowed_ips.push(net);
        }
    }

    /// Removes peer `idx` and its prefixes from `owners`.
    fn remove_peer(&mut self, idx: usize, owners: &mut HashMap<IpNet, u64>) {
        let p = self.peers.remove(idx);
        for n in &p.allowed_ips {
            if owners.get(n) == Some(&p.id) {
                owners.remove(n);
            }
        }
    }

    /// Drops from each peer's list the prefixes it no longer holds (moved,
    /// removed) and all but the last copy of the others (a prefix that came
    /// back is where it was added last), in one pass.
    fn sweep_allowed_ips(&mut self, owners: &HashMap<IpNet, u64>) {
        for p in &mut self.peers {
            let id = p.id;
            let mut seen = std::collections::HashSet::new();
            let mut kept: Vec<IpNet> = p
                .allowed_ips
                .iter()
                .rev()
                .filter(|n| owners.get(n) == Some(&id) && seen.insert(**n))
                .copied()
                .collect();
            kept.reverse();
            p.allowed_ips = kept;
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
        let mut owners: HashMap<IpNet, u64> = c
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |n| (*n, p.id)))
            .collect();
        for section in &req.peers {
            c.apply_peer(section, own, &mut owners);
        }
        c.sweep_allowed_ips(&owners);
        Ok(c)
    }

    fn apply_peer(
        &mut self,
        section: &PeerSection,
        own: Option<Key>,
        owners: &mut HashMap<IpNet, u64>,
    ) {
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
                        self.remove_peer(i, owners);
                        idx = None;
                    }
                }
                PeerOp::Remove => {
                    self.remove_peer(i, owners);
                    idx = None;
                }
                PeerOp::PresharedKey(k) => self.peers[i].preshared_key = *k,
                PeerOp::Endpoint(e) => self.peers[i].endpoint = Some(*e),
                PeerOp::PersistentKeepalive(s) => self.peers[i].persistent_keepalive = *s,
                PeerOp::ReplaceAllowedIps => {
                    let id = self.peers[i].id;
                    for n in self.peers[i].allowed_ips.drain(..) {
                        if owners.get(&n) == Some(&id) {
                            owners.remove(&n);
                        }
                    }
                }
                PeerOp::AllowedIp(net) => self.insert_allowed_ip(i, *net, owners),
                PeerOp::RemoveAllowedIp(net) => {
                    let net = net.trunc();
                    if owners.get(&net) == Some(&self.peers[i].id) {
                        owners.remove(&net);
                    }
                }
                PeerOp::ProtocolVersion => {}
            }
        }
    }
}
