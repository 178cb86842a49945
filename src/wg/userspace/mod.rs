//! A userspace WireGuard device for Linux: a TUN interface driven by
//! `boringtun::noise::Tunn`, configured through the cross-platform UAPI
//! socket (`/var/run/wireguard/<ifname>.sock`) with wireguard-go's
//! semantics, so the stock `wg` tool works with it.
//!
//! Layout: `uapi` (text protocol, pure), `config` (configuration model and
//! the pure `apply`), `allowed_ips` (longest-prefix match), `net` (UDP
//! sockets), `peer` (runtime peer state), `dataplane` (packet loops and
//! timers), `ipc` (the unix socket server), `device` (the public device).
//!
//! Behaviour worth knowing:
//! - A `set` is parsed and applied to a copy first, and sockets are bound
//!   before anything is committed: an invalid request changes nothing.
//!   Errors are answered like wireguard-go, negated: `errno=-22` (EINVAL),
//!   `-71` (EPROTO, unparsable line), `-98` (EADDRINUSE, bind failure).
//! - Updating an existing peer (endpoint, keepalive, allowed IPs) keeps its
//!   session. A changed preshared key replaces its `Tunn` (new handshake),
//!   as boringtun cannot change it in place. A removed and re-added peer,
//!   also within one request or by `replace_peers`, is a new peer.
//! - The UDP sockets are bound after the first `set` (to `listen_port`, or a
//!   random port if none was given), and rebound when the port changes.
//! - `errno` values and the `get` format follow wireguard-go; the socket
//!   directory is created with mode 0700, the socket gets 0700.

mod allowed_ips;
mod config;
mod dataplane;
mod device;
mod error;
mod ipc;
pub(crate) mod net;
mod peer;
mod uapi;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod tests;

pub use allowed_ips::AllowedIps;
pub use config::{
    public_key_of, DeviceConfig, DeviceOp, Key, PeerConfig, PeerOp, PeerSection, SetRequest,
};
pub use device::{RawDatagram, RawSender, UserspaceDevice, MTU, SOCKET_DIR};
pub use error::{UapiError, UserspaceError};
pub use uapi::{is_wireguard_message, parse_endpoint, parse_key, parse_set, render_get, PeerStats};
