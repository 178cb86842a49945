//! Addresses: parsing seeds, finding this host's addresses, choosing what to
//! advertise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("seed address {0:?} is empty")]
    Empty(String),
    #[error("seed address {addr:?}: bad port {port:?} (expected 1-65535)")]
    BadPort { addr: String, port: String },
    #[error("seed address {0:?}: cannot resolve host name: {1}")]
    Resolve(String, String),
    #[error("seed address {0:?} resolves to no address")]
    NoAddress(String),
}

/// Splits `host`, `host:port`, `[v6]:port` or a bare IPv6 address.
pub fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), AddrError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(AddrError::Empty(s.to_string()));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip.to_string(), default_port));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let p: u16 =
                port.parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| AddrError::BadPort {
                        addr: s.to_string(),
                        port: port.to_string(),
                    })?;
            if host.is_empty() {
                return Err(AddrError::Empty(s.to_string()));
            }
            Ok((host.to_string(), p))
        }
        _ => Ok((s.to_string(), default_port)),
    }
}

/// Checks a seed's syntax and returns it in `host:port` form (resolution is
/// left to the moment of use, so DNS names keep working after changes).
pub fn normalize_seed(s: &str, default_port: u16) -> Result<String, AddrError> {
    let (host, port) = split_host_port(s, default_port)?;
    if host.contains(':') {
        Ok(format!("[{host}]:{port}"))
    } else {
        Ok(format!("{host}:{port}"))
    }
}

/// Resolves a normalized seed to socket addresses.
pub fn resolve_seed(seed: &str) -> Result<Vec<SocketAddr>, AddrError> {
    let addrs: Vec<SocketAddr> = seed
        .to_socket_addrs()
        .map_err(|e| AddrError::Resolve(seed.to_string(), e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(AddrError::NoAddress(seed.to_string()));
    }
    Ok(addrs)
}

/// The IPv4 networks of this host's interfaces, without loopback,
/// link-local, and the interfaces named in `exclude`.
pub fn local_ipv4_nets(exclude: &[&str]) -> Vec<(Ipv4Net, String)> {
    let Ok(ifs) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    ifs.into_iter()
        .filter(|i| !exclude.contains(&i.name.as_str()))
        .filter_map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => {
                let ip = v4.ip;
                if ip.is_loopback() || ip.is_link_local() || ip.is_unspecified() {
                    return None;
                }
                let prefix = u32::from(v4.netmask).count_ones() as u8;
                Ipv4Net::new(ip, prefix).ok().map(|n| (n, i.name))
            }
            if_addrs::IfAddr::V6(_) => None,
        })
        .collect()
}

/// Where the kernel's IPv4 forwarding switch is.
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Whether IPv4 forwarding is on (`net.ipv4.ip_forward`).
pub fn ip_forward() -> std::io::Result<bool> {
    Ok(std::fs::read_to_string(IP_FORWARD)?.trim() == "1")
}

/// Turns IPv4 forwarding on or off.
pub fn set_ip_forward(on: bool) -> std::io::Result<()> {
    std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" })
}

/// The local address the kernel would use to reach `dest` (no packet is sent).
pub fn route_source(dest: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match dest {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(dest).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_with_and_without_ports() {
        assert_eq!(
            normalize_seed("203.0.113.10", 51821).unwrap(),
            "203.0.113.10:51821"
        );
        assert_eq!(
            normalize_seed("203.0.113.10:7000", 51821).unwrap(),
            "203.0.113.10:7000"
        );
        assert_eq!(
            normalize_seed("seed.example.org", 1).unwrap(),
            "seed.example.org:1"
        );
        assert_eq!(
            normalize_seed("seed.example.org:9", 1).unwrap(),
            "seed.example.org:9"
        );
        assert_eq!(normalize_seed("2001:db8::1", 5).unwrap(), "[2001:db8::1]:5");
        assert_eq!(
            normalize_seed("[2001:db8::1]:6", 5).unwrap(),
            "[2001:db8::1]:6"
        );
        assert!(matches!(
            normalize_seed("host:0", 1),
            Err(AddrError::BadPort { .. })
        ));
        assert!(matches!(
            normalize_seed("host:x", 1),
            Err(AddrError::BadPort { .. })
        ));
        assert!(matches!(normalize_seed(" ", 1), Err(AddrError::Empty(_))));
        assert!(matches!(normalize_seed(":5", 1), Err(AddrError::Empty(_))));
    }
}
