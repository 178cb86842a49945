//! Error types of the userspace WireGuard device.

use std::io;
use std::path::PathBuf;

/// Errno values reported on the UAPI socket. Like wireguard-go, they are
/// negated (`errno=-22`): the `wg` tool sets `errno = -value`.
const EIO: i64 = libc::EIO as i64;
const EPROTO: i64 = libc::EPROTO as i64;
const EINVAL: i64 = libc::EINVAL as i64;
const EADDRINUSE: i64 = libc::EADDRINUSE as i64;

/// An error of a UAPI `get`/`set` operation. It never leaves the device
/// half-updated: a failed `set` changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// The request was well formed but a key or value is invalid (EINVAL).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request could not be parsed as UAPI lines (EPROTO).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Binding the UDP socket or setting its mark failed (EADDRINUSE, as
    /// wireguard-go reports it).
    #[error("cannot bind or configure the UDP socket: {0}")]
    Bind(#[source] io::Error),
    /// Reading or writing the UAPI connection failed (EIO).
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
}

impl UapiError {
    /// The value of the `errno=` line for this error, negative as
    /// wireguard-go sends it.
    pub fn errno(&self) -> i64 {
        -match self {
            UapiError::Invalid(_) => EINVAL,
            UapiError::Protocol(_) => EPROTO,
            UapiError::Bind(_) => EADDRINUSE,
            UapiError::Io(_) => EIO,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        UapiError::Invalid(msg.into())
    }
}

/// An error of the device itself (start, shutdown, raw sends).
#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    #[error("UAPI socket {} is in use by another device", path.display())]
    SocketInUse { path: PathBuf },
    #[error("cannot create TUN interface {name}: {source}")]
    Tun {
        name: String,
        #[source]
        source: tun::Error,
    },
    #[error("I/O error while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the device has no UDP socket for this address family")]
    NotBound,
    #[error(transparent)]
    Uapi(#[from] UapiError),
}

impl UserspaceError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| UserspaceError::Io { context, source }
    }
}
