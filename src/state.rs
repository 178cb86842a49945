//! The state directory: keys and what a node must remember across restarts.
//!
//! Layout (all files 0600, the directory 0700):
//!
//! | file | content |
//! |---|---|
//! | `node.key` | ed25519 signing key (base64), the node's identity |
//! | `wireguard.key` | x25519 WireGuard private key (base64) |
//! | `network.key` | the network key (base64); only where `init` ran or one was copied |
//! | `membership.json` | network key, CIDR, this node's admission credential and stamp |
//! | `state.json` | overlay IP, version counter, known members, interface ownership, holders, revocations |
//! | `control.sock` | the running daemon's control socket |
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of
//! the directory): a crash leaves the old or the new content, never half.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {0} does not exist (run `meshpeer init` or `meshpeer join` first, or pass --state-dir)")]
    Missing(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{0} already holds a node; remove it or use another --state-dir")]
    AlreadyInitialized(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `membership.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembershipFile {
    /// Network key, URL-safe base64.
    pub network_key: String,
    pub cidr: ipnet::Ipv4Net,
    /// This node's admission credential, base64 of the encoded `Signed`.
    pub admission: String,
    /// The stamp of the member that admitted it (base64 of the encoded
    /// `Signed`); absent until the first join succeeded.
    #[serde(default)]
    pub stamp: Option<String>,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub overlay_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub ip_claimed_at: u64,
    #[serde(default)]
    pub record_version: u64,
    /// Gossip addresses of members seen last time: how a restarted node finds
    /// the mesh without its seed.
    #[serde(default)]
    pub known_members: Vec<SocketAddr>,
    /// Seeds given on the command line, kept for restarts.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// The interface this node created (and therefore owns).
    #[serde(default)]
    pub interface_created: Option<String>,
    /// Peers this node added to its interface (WireGuard keys, base64).
    #[serde(default)]
    pub owned_peers: Vec<String>,
    /// Address advertised to other members, if fixed by the user.
    #[serde(default)]
    pub advertise_addr: Option<std::net::IpAddr>,
    /// Who holds which overlay address (proto/PROTOCOL.md §3.1): node keys
    /// in URL-safe base64.
    #[serde(default)]
    pub holders: Vec<(Ipv4Addr, String)>,
    /// Who holds which name.
    #[serde(default)]
    pub names: Vec<(String, String)>,
    /// The newest revocation list held (its gossip text).
    #[serde(default)]
    pub revoked: Option<String>,
    /// Kernel routes meshpeer added through its interface (members'
    /// subnets): removed when no longer wanted, and only those.
    #[serde(default)]
    pub installed_routes: Vec<ipnet::Ipv4Net>,
    /// meshpeer turned IPv4 forwarding on (it was off): turned off again
    /// when this node stops advertising routes.
    #[serde(default)]
    pub forwarding_turned_on: bool,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    /// Opens an existing state directory.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if !path.is_dir() {
            return Err(StateError::Missing(path.to_path_buf()));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Creates the directory (0700) for a new node; refuses if one lives there.
    pub fn create(path: &Path) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_err(path))?;
        let dir = Self {
            path: path.to_path_buf(),
        };
        if dir.file("node.key").exists() {
            return Err(StateError::AlreadyInitialized(path.to_path_buf()));
        }
        Ok(dir)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The files that make a node (keys, admission, state): what `join`
    /// writes. The network key and the token log of an `init` node are not
    /// among them.
    pub const IDENTITY_FILES: [&'static str; 4] =
        ["node.key", "wireguard.key", "state.json", "membership.json"];

    /// Deletes this node's identity (an ephemeral node that left), then the
    /// directory itself if nothing else is in it. Best effort: a file that
    /// cannot be removed is logged.
    pub fn forget_identity(&self) {
        for f in Self::IDENTITY_FILES {
            match fs::remove_file(self.file(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %self.file(f).display(), error = %e, "cannot delete")
                }
            }
        }
        let _ = fs::remove_dir(&self.path);
    }

    pub fn control_socket(&self) -> PathBuf {
        self.file("control.sock")
    }

    /// Writes `bytes` to `name` atomically with mode 0600.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let target = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &target)?;
            fs::File::open(&self.path)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            StateError::Io {
                path: target.clone(),
                source: e,
            }
        })
    }

    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.file(name);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let mut text = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
            path: self.file(name),
            detail: e.to_string(),
        })?;
        text.push(b'\n');
        self.write_atomic(name, &text)
    }

    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path: self.file(name),
                detail: e.to_string(),
            })
    }

    /// Writes a 32-byte secret as base64 text.
    pub fn write_key(&self, name: &str, key: &[u8; 32]) -> Result<(), StateError> {
        let text = base64::engine::general_purpose::STANDARD.encode(key) + "\n";
        self.write_atomic(name, text.as_bytes())
    }

    pub fn read_key(&self, name: &str) -> Result<Option<[u8; 32]>, StateError> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        let corrupt = |detail: &str| StateError::Corrupt {
            path: self.file(name),
            detail: detail.to_string(),
        };
        let text = String::from_utf8(bytes).map_err(|_| corrupt("not text"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| corrupt("not base64"))?;
        raw.try_into()
            .map(Some)
            .map_err(|_| corrupt("not a 32-byte key"))
    }

    pub fn load_state(&self) -> Result<NodeState, StateError> {
        Ok(self.read_json("state.json")?.unwrap_or_default())
    }

    pub fn save_state(&self, state: &NodeState) -> Result<(), StateError> {
        self.write_json("state.json", state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_are_private_and_round_trip() {
        let tmp = std::env::temp_dir().join(format!("mp-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let dir = StateDir::create(&tmp).unwrap();
        dir.write_key("node.key", &[5; 32]).unwrap();
        assert_eq!(dir.read_key("node.key").unwrap(), Some([5; 32]));
        let mode = fs::metadata(dir.file("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            StateDir::create(&tmp),
            Err(StateError::AlreadyInitialized(_))
        ));
        let st = NodeState {
            name: "a".into(),
            overlay_ip: Some("10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        dir.save_state(&st).unwrap();
        assert_eq!(dir.load_state().unwrap(), st);
        fs::write(dir.file("state.json"), b"{not json").unwrap();
        assert!(matches!(dir.load_state(), Err(StateError::Corrupt { .. })));
        fs::write(dir.file("wireguard.key"), b"short\n").unwrap();
        assert!(matches!(
            dir.read_key("wireguard.key"),
            Err(StateError::Corrupt { .. })
        ));
        fs::remove_dir_all(&tmp).unwrap();
        assert!(matches!(StateDir::open(&tmp), Err(StateError::Missing(_))));
    }
}
