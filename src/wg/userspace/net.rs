//! Binding the device's UDP sockets: IPv4 `0.0.0.0:port` and, when the host
//! has IPv6, `[::]:port` with `IPV6_V6ONLY`, as wireguard-go does.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use tokio::net::UdpSocket;

/// Socket buffer size asked for (wireguard-go asks for 7 MiB).
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// The bound sockets of a device.
#[derive(Debug, Clone)]
pub struct Bound {
    pub v4: Arc<UdpSocket>,
    pub v6: Option<Arc<UdpSocket>>,
    pub port: u16,
}

impl Bound {
    /// The socket to send to `to` from.
    pub fn for_addr(&self, to: &SocketAddr) -> Option<&Arc<UdpSocket>> {
        match to {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    /// Sets `SO_MARK` (0 clears it) on both sockets.
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        set_mark(self.v4.as_raw_fd(), mark)?;
        if let Some(v6) = &self.v6 {
            set_mark(v6.as_raw_fd(), mark)?;
        }
        Ok(())
    }
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

/// Binds `port` (0 = random) on IPv4 and, if available, IPv6. Must be called
/// within a tokio runtime.
pub fn bind(port: u16, fwmark: u32) -> io::Result<Bound> {
    // With a random port, the IPv6 socket may find it taken: try again.
    let attempts = if port == 0 { 100 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let v4 = bind_one(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), fwmark)?;
        let actual = v4.local_addr()?.port();
        match bind_one(SocketAddr::from((Ipv6Addr::UNSPECIFIED, actual)), fwmark) {
            Ok(v6) => {
                return Ok(Bound {
                    v4: Arc::new(v4),
                    v6: Some(Arc::new(v6)),
                    port: actual,
                })
            }
            Err(e) if ipv6_unavailable(&e) => {
                tracing::debug!(error = %e, "no IPv6 UDP socket, continuing with IPv4 only");
                return Ok(Bound {
                    v4: Arc::new(v4),
                    v6: None,
                    port: actual,
                });
            }
            Err(e) if port == 0 && e.raw_os_error() == Some(libc::EADDRINUSE) => {
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EADDRINUSE)))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Best effort: socket buffers of [`SOCKET_BUFFER`] each way (root may
/// exceed `net.core.rmem_max`). Larger buffers help throughput, and carry
/// a busy process over the moments it is not scheduled instead of dropping
/// what arrives meanwhile.
pub(crate) fn grow_buffers(raw: RawFd) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
}

fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

fn bind_one(addr: SocketAddr, fwmark: u32) -> io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = check(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    if family == libc::AF_INET6 {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    if fwmark != 0 {
        set_mark(raw, fwmark)?;
    }
    grow_buffers(raw);
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: an all-zero sockaddr_in is valid.
            let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = a.port().to_be();
            sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            // SAFETY: `sa` is a valid sockaddr_in of the given length.
            check(unsafe {
                libc::bind(
                    raw,
                    (&sa as *const libc::sockaddr_in).cast(),
                    mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            })?;
        }
        SocketAddr::V6(a) => {
            // SAFETY: an all-zero sockaddr_in6 is valid.
            let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr.s6_addr = a.ip().octets();
            // SAFETY: `sa` is a valid sockaddr_in6 of the given length.
            check(unsafe {
                libc::bind(
                    raw,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            })?;
        }
    }
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}
