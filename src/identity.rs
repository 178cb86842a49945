//! A node's keys: the ed25519 signing key (its identity; the node id derives
//! from it) and the x25519 WireGuard key.

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::proto::{self, PublicKeyBytes};
use crate::state::{StateDir, StateError};

pub struct Identity {
    pub signing: SigningKey,
    pub wg_secret: StaticSecret,
}

impl Identity {
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut OsRng),
            wg_secret: StaticSecret::random_from_rng(OsRng),
        }
    }

    pub fn node_key(&self) -> PublicKeyBytes {
        self.signing.verifying_key().to_bytes()
    }

    /// The node id: URL-safe base64 of the signing key.
    pub fn node_id(&self) -> String {
        proto::node_id_string(&self.node_key())
    }

    pub fn wg_public(&self) -> [u8; 32] {
        PublicKey::from(&self.wg_secret).to_bytes()
    }

    pub fn save(&self, dir: &StateDir) -> Result<(), StateError> {
        dir.write_key("node.key", &self.signing.to_bytes())?;
        dir.write_key("wireguard.key", &self.wg_secret.to_bytes())
    }

    pub fn load(dir: &StateDir) -> Result<Self, StateError> {
        let missing = |f: &str| StateError::Corrupt {
            path: dir.file(f),
            detail: "missing (is this a meshpeer state directory?)".into(),
        };
        let signing = dir
            .read_key("node.key")?
            .ok_or_else(|| missing("node.key"))?;
        let wg = dir
            .read_key("wireguard.key")?
            .ok_or_else(|| missing("wireguard.key"))?;
        Ok(Self {
            signing: SigningKey::from_bytes(&signing),
            wg_secret: StaticSecret::from(wg),
        })
    }
}
