//! WireGuard: one interface per node, two interchangeable backends.
//!
//! * **kernel** (the default wherever the kernel has WireGuard): the
//!   interface is created and configured over netlink by wireguard-control.
//! * **userspace** (automatic fallback, e.g. no `wireguard` module): meshpeer's
//!   own device ([`userspace`]), a TUN interface driven by boringtun's
//!   `noise::Tunn`, which serves the standard UAPI socket
//!   (`/var/run/wireguard/<if>.sock`). wireguard-control's userspace backend
//!   and `wg show` talk to it exactly as to wireguard-go.
//!
//! Both are driven by the same code: [`WgInterface::apply`] turns the
//! [`PeerChange`]s of [`crate::reconcile`] into one wireguard-control
//! `DeviceUpdate`. Only this module calls wireguard-control.
//! The overlay address and link state are set over rtnetlink
//! ([`netlink`]); routes with iproute2 (`ip`), as wg-quick does.

pub(crate) mod netlink;
pub mod userspace;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::SystemTime;

use ipnet::Ipv4Net;
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use crate::reconcile::{ActualPeer, PeerChange};

/// MTU of the overlay interface (1500 minus WireGuard's IPv6 worst case).
pub const MTU: u32 = 1420;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("invalid interface name {name:?}: {detail}")]
    BadName { name: String, detail: String },
    #[error(
        "interface {0} already exists and was not created by meshpeer; choose another --interface"
    )]
    Foreign(String),
    #[error("no permission to create interface {0} (run as root or with CAP_NET_ADMIN)")]
    Permission(String),
    #[error("userspace WireGuard for {0}: {1}")]
    Userspace(String, userspace::UserspaceError),
    #[error("WireGuard interface {iface}: {action}: {source}")]
    Io {
        iface: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`ip {args}` failed: {detail}")]
    Ip { args: String, detail: String },
}

/// Which WireGuard implementation serves the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl BackendKind {
    fn backend(self) -> Backend {
        match self {
            BackendKind::Kernel => Backend::Kernel,
            BackendKind::Userspace => Backend::Userspace,
        }
    }
}

/// What [`WgInterface::add_route`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAdd {
    Added,
    /// A route to that subnet existed: through this interface or not.
    Exists {
        via_us: bool,
    },
}

/// Backend selection from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Kernel if available, else userspace.
    Auto,
    Kernel,
    Userspace,
}

/// The node's WireGuard interface.
pub struct WgInterface {
    pub name: String,
    iface: InterfaceName,
    pub backend: BackendKind,
    device: Option<userspace::UserspaceDevice>,
}

/// Whether a link of that name exists in this thread's network namespace
/// (if_nametoindex asks the kernel, unlike /sys, which may belong to another
/// namespace).
pub fn link_exists(name: &str) -> bool {
    netlink::index(name).is_ok()
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOENT) | Some(libc::EPROTONOSUPPORT)
    ) || e.kind() == io::ErrorKind::Unsupported
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

impl WgInterface {
    /// Creates (or, if `owned`, adopts) the interface and sets the key and port.
    pub async fn open(
        name: &str,
        private_key: [u8; 32],
        listen_port: u16,
        owned: bool,
        choice: BackendChoice,
    ) -> Result<Self, WgError> {
        let iface: InterfaceName =
            name.parse()
                .map_err(
                    |e: wireguard_control::InvalidInterfaceName| WgError::BadName {
                        name: name.to_string(),
                        detail: e.to_string(),
                    },
                )?;
        if link_exists(name) && !owned {
            return Err(WgError::Foreign(name.to_string()));
        }
        let update = || {
            DeviceUpdate::new()
                .set_private_key(Key(private_key))
                .set_listen_port(listen_port)
        };
        if choice != BackendChoice::Userspace {
            match update().apply(&iface, Backend::Kernel) {
                Ok(()) => {
                    tracing::info!(interface = name, "using the kernel's WireGuard");
                    let me = Self {
                        name: name.to_string(),
                        iface,
                        backend: BackendKind::Kernel,
                        device: None,
                    };
                    return Ok(me);
                }
                Err(e) if is_permission(&e) => return Err(WgError::Permission(name.to_string())),
                Err(e) if choice == BackendChoice::Kernel || !is_unsupported(&e) => {
                    return Err(WgError::Io {
                        iface: name.to_string(),
                        action: "create (kernel)",
                        source: e,
                    })
                }
                Err(e) => {
                    tracing::warn!(interface = name, error = %e, "the kernel has no WireGuard; using meshpeer's embedded userspace WireGuard");
                }
            }
        }
        if link_exists(name) {
            // A leftover TUN of a crashed userspace run: its device is gone.
            let _ = run_ip(&["link", "del", "dev", name]);
        }
        let device = userspace::UserspaceDevice::start(name)
            .await
            .map_err(|e| match &e {
                userspace::UserspaceError::Tun {
                    source: tun::Error::Io(io),
                    ..
                } if is_permission(io) => WgError::Permission(name.to_string()),
                _ => WgError::Userspace(name.to_string(), e),
            })?;
        let me = Self {
            name: name.to_string(),
            iface,
            backend: BackendKind::Userspace,
            device: Some(device),
        };
        me.update(update(), "configure")?;
        Ok(me)
    }

    fn update(&self, update: DeviceUpdate, action: &'static str) -> Result<(), WgError> {
        update
            .apply(&self.iface, self.backend.backend())
            .map_err(|source| WgError::Io {
                iface: self.name.clone(),
                action,
                source,
            })
    }

    /// Puts `ip/prefix` on the interface (replacing any other address) and
    /// brings it up.
    pub fn set_address(&self, ip: Ipv4Addr, cidr: Ipv4Net) -> Result<(), WgError> {
        let io = |action: &'static str| {
            let iface = self.name.clone();
            move |source: io::Error| WgError::Io {
                iface,
                action,
                source,
            }
        };
        let index = netlink::index(&self.name).map_err(io("finding the interface"))?;
        let prefix = cidr.prefix_len();
        let current =
            netlink::ipv4_addresses(index).map_err(io("reading the interface's addresses"))?;
        if current != [(ip, prefix)] {
            for (other, len) in current.into_iter().filter(|a| *a != (ip, prefix)) {
                netlink::del_ipv4(index, other, len)
                    .map_err(io("removing a former overlay address"))?;
            }
            netlink::add_ipv4(index, ip, prefix).map_err(io("setting the overlay address"))?;
        }
        netlink::set_up(index, MTU).map_err(io("bringing the interface up"))
    }

    /// Routes `net` through the interface (`ip route add NET dev IF`). A
    /// route to exactly `net` that exists already is left as it is: the
    /// answer says whether it goes through this interface.
    pub fn add_route(&self, net: Ipv4Net) -> Result<RouteAdd, WgError> {
        let n = net.to_string();
        match run_ip(&["-4", "route", "add", &n, "dev", &self.name]) {
            Ok(()) => Ok(RouteAdd::Added),
            Err(WgError::Ip { detail, .. }) if detail.contains("File exists") => {
                let out = Command::new("ip")
                    .args(["-4", "-o", "route", "show", "exact", &n])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default();
                let ours = out.lines().any(|l| {
                    l.split_whitespace()
                        .collect::<Vec<_>>()
                        .windows(2)
                        .any(|w| w == ["dev", self.name.as_str()])
                });
                Ok(RouteAdd::Exists { via_us: ours })
            }
            Err(e) => Err(e),
        }
    }

    /// Removes the route to `net` through the interface (gone already: fine).
    pub fn del_route(&self, net: Ipv4Net) -> Result<(), WgError> {
        match run_ip(&["-4", "route", "del", &net.to_string(), "dev", &self.name]) {
            Err(WgError::Ip { detail, .. })
                if detail.contains("No such process") || detail.contains("Cannot find device") =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// The peers the device holds now.
    pub fn peers(&self) -> Result<Vec<ActualPeer>, WgError> {
        let now = SystemTime::now();
        let age = |t: Option<SystemTime>| {
            t.filter(|t| *t > SystemTime::UNIX_EPOCH)
                .map(|t| now.duration_since(t).unwrap_or_default())
        };
        if let Some(dev) = &self.device {
            // Our own device: read in process (`wg show` still uses UAPI).
            return Ok(dev
                .peer_snapshot()
                .into_iter()
                .map(|(p, s)| ActualPeer {
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p
                        .allowed_ips
                        .iter()
                        .map(|a| (a.addr(), a.prefix_len()))
                        .collect(),
                    keepalive: Some(p.persistent_keepalive).filter(|k| *k != 0),
                    handshake_age: age(s.last_handshake),
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                })
                .collect());
        }
        let dev =
            Device::get(&self.iface, self.backend.backend()).map_err(|source| WgError::Io {
                iface: self.name.clone(),
                action: "read",
                source,
            })?;
        Ok(dev
            .peers
            .into_iter()
            .map(|p| ActualPeer {
                public_key: p.config.public_key.0,
                endpoint: p.config.endpoint,
                allowed_ips: p
                    .config
                    .allowed_ips
                    .iter()
                    .map(|a| (a.address, a.cidr))
                    .collect(),
                keepalive: p.config.persistent_keepalive_interval.filter(|k| *k != 0),
                handshake_age: age(p.stats.last_handshake_time),
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
            })
            .collect())
    }

    /// Applies reconcile's changes in one update.
    pub fn apply(&self, changes: &[PeerChange]) -> Result<(), WgError> {
        if changes.is_empty() {
            return Ok(());
        }
        let with_ips = |mut p: PeerConfigBuilder, ips: &[Ipv4Net]| {
            p = p.replace_allowed_ips();
            for n in ips {
                p = p.add_allowed_ip(IpAddr::V4(n.network()), n.prefix_len());
            }
            p
        };
        let mut update = DeviceUpdate::new();
        let mut pokes = Vec::new();
        let mut n_main = 0;
        for c in changes {
            let key = Key(*c.public_key());
            let peer = match c {
                PeerChange::Add {
                    allowed_ips,
                    endpoint,
                    keepalive,
                    ..
                } => {
                    let mut p = with_ips(PeerConfigBuilder::new(&key), allowed_ips)
                        .set_persistent_keepalive_interval(*keepalive);
                    if let Some(e) = endpoint {
                        p = p.set_endpoint(*e);
                    }
                    p
                }
                PeerChange::Update {
                    endpoint,
                    allowed_ips,
                    keepalive,
                    ..
                } => {
                    let mut p = PeerConfigBuilder::new(&key);
                    if let Some(e) = endpoint {
                        p = p.set_endpoint(*e);
                    }
                    if let Some(ips) = allowed_ips {
                        p = with_ips(p, ips);
                    }
                    if let Some(k) = keepalive {
                        p = p.set_persistent_keepalive_interval(*k);
                    }
                    p
                }
                PeerChange::Remove { .. } => PeerConfigBuilder::new(&key).remove(),
                PeerChange::Poke { keepalive, .. } => {
                    // Applied below as two separate updates: keepalive off,
                    // then on, which makes WireGuard send one at once. (In one
                    // update, the userspace device would only see the end state.)
                    pokes.push((key, *keepalive));
                    continue;
                }
            };
            update = update.add_peer(peer);
            n_main += 1;
        }
        if n_main > 0 {
            self.update(update, "update peers")?;
        }
        if !pokes.is_empty() {
            let off = pokes.iter().fold(DeviceUpdate::new(), |u, (k, _)| {
                u.add_peer(PeerConfigBuilder::new(k).set_persistent_keepalive_interval(0))
            });
            self.update(off, "poke peers (keepalive off)")?;
            let on = pokes.iter().fold(DeviceUpdate::new(), |u, (k, ka)| {
                u.add_peer(PeerConfigBuilder::new(k).set_persistent_keepalive_interval(*ka))
            });
            self.update(on, "poke peers (keepalive on)")?;
        }
        Ok(())
    }

    /// For the userspace device: a sender and a receiver of the non-WireGuard
    /// datagrams on the WireGuard port (STUN). `None` for the kernel.
    pub fn raw_channel(
        &self,
    ) -> Option<(
        userspace::RawSender,
        tokio::sync::mpsc::Receiver<userspace::RawDatagram>,
    )> {
        self.device
            .as_ref()
            .map(|d| (d.raw_sender(), d.subscribe_raw(256)))
    }

    /// Removes the interface (meshpeer created it).
    pub async fn destroy(mut self) {
        if let Some(dev) = self.device.take() {
            dev.shutdown().await;
        }
        if link_exists(&self.name) {
            let _ = run_ip(&["link", "del", "dev", &self.name]);
        }
    }
}

fn run_ip(args: &[&str]) -> Result<(), WgError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| WgError::Ip {
            args: args.join(" "),
            detail: format!("cannot run ip (is iproute2 installed?): {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(WgError::Ip {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
