//! Text side of the cross-platform userspace API
//! (<https://www.wireguard.com/xplatform/>): parsing `set=1` bodies into typed
//! changes and rendering `get=1` answers. Pure functions, no I/O.

use std::fmt::Write as _;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use super::config::{DeviceConfig, DeviceOp, Key, PeerOp, PeerSection, SetRequest};
use super::error::UapiError;

/// Live counters of a peer, shown by `get`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub last_handshake: Option<SystemTime>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Parses the lines of a `set=1` request (without the `set=1` line and the
/// terminating blank line). Any invalid line rejects the whole request.
pub fn parse_set<'a, I>(lines: I) -> Result<SetRequest, UapiError>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut req = SetRequest::default();
    for line in lines {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(UapiError::Protocol(format!(
                "failed to parse line {line:?}"
            )));
        };
        if key == "public_key" {
            req.peers.push(PeerSection {
                public_key: parse_key(key, value)?,
                ops: Vec::new(),
            });
            continue;
        }
        match req.peers.last_mut() {
            None => req.device.push(parse_device_line(key, value)?),
            Some(section) => section.ops.push(parse_peer_line(key, value)?),
        }
    }
    Ok(req)
}

fn parse_device_line(key: &str, value: &str) -> Result<DeviceOp, UapiError> {
    Ok(match key {
        "private_key" => {
            let k = parse_key(key, value)?;
            DeviceOp::PrivateKey(if k == [0; 32] { None } else { Some(k) })
        }
        "listen_port" => DeviceOp::ListenPort(parse_uint(key, value, u16::MAX.into())? as u16),
        "fwmark" => DeviceOp::Fwmark(parse_uint(key, value, u32::MAX.into())? as u32),
        "replace_peers" => {
            parse_true(key, value)?;
            DeviceOp::ReplacePeers
        }
        _ => {
            return Err(UapiError::invalid(format!(
                "invalid UAPI device key: {key}"
            )))
        }
    })
}

fn parse_peer_line(key: &str, value: &str) -> Result<PeerOp, UapiError> {
    Ok(match key {
        "update_only" => {
            parse_true(key, value)?;
            PeerOp::UpdateOnly
        }
        "remove" => {
            parse_true(key, value)?;
            PeerOp::Remove
        }
        "preshared_key" => PeerOp::PresharedKey(parse_key(key, value)?),
        "endpoint" => PeerOp::Endpoint(parse_endpoint(value)?),
        "persistent_keepalive_interval" => {
            PeerOp::PersistentKeepalive(parse_uint(key, value, u16::MAX.into())? as u16)
        }
        "replace_allowed_ips" => {
            parse_true(key, value)?;
            PeerOp::ReplaceAllowedIps
        }
        "allowed_ip" => match value.strip_prefix('-') {
            Some(v) => PeerOp::RemoveAllowedIp(parse_prefix(v)?),
            None => PeerOp::AllowedIp(parse_prefix(value)?),
        },
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::invalid(format!(
                    "invalid protocol version: {value}"
                )));
            }
            PeerOp::ProtocolVersion
        }
        _ => return Err(UapiError::invalid(format!("invalid UAPI peer key: {key}"))),
    })
}

fn parse_true(key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(UapiError::invalid(format!(
            "invalid value for {key}: {value:?}"
        )))
    }
}

/// Decimal digits only (like Go's `strconv.ParseUint(v, 10, n)`).
fn parse_uint(key: &str, value: &str, max: u64) -> Result<u64, UapiError> {
    let bad = || UapiError::invalid(format!("invalid value for {key}: {value:?}"));
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(bad()),
    }
}

/// 64 hex digits, either case.
pub fn parse_key(key: &str, value: &str) -> Result<Key, UapiError> {
    let mut out = [0u8; 32];
    if value.len() != 64 || hex::decode_to_slice(value, &mut out).is_err() {
        return Err(UapiError::invalid(format!("invalid key for {key}")));
    }
    Ok(out)
}

fn parse_prefix(value: &str) -> Result<IpNet, UapiError> {
    value
        .parse::<IpNet>()
        .map_err(|_| UapiError::invalid(format!("failed to set allowed ip: {value:?}")))
}

/// `a.b.c.d:port`, `[v6]:port` or `[v6%zone]:port` (zone as a number or an
/// interface name).
pub fn parse_endpoint(value: &str) -> Result<SocketAddr, UapiError> {
    let bad = || UapiError::invalid(format!("failed to set endpoint {value:?}"));
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let rest = value.strip_prefix('[').ok_or_else(bad)?;
    let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
    let (ip, zone) = host.split_once('%').ok_or_else(bad)?;
    let ip: Ipv6Addr = ip.parse().map_err(|_| bad())?;
    let port = parse_uint("endpoint", port, u16::MAX.into()).map_err(|_| bad())? as u16;
    let scope = match zone.parse::<u32>() {
        Ok(n) => n,
        Err(_) => crate::wg::netlink::index(zone).map_err(|_| bad())?,
    };
    Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)))
}

/// Renders the body of a `get=1` answer (without the `errno=` line), in
/// wireguard-go's order and format.
pub fn render_get(cfg: &DeviceConfig, stats: &dyn Fn(u64) -> PeerStats) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |args: std::fmt::Arguments<'_>| {
        let _ = out.write_fmt(args);
        out.push('\n');
    };
    if let Some(k) = &cfg.private_key {
        line(format_args!("private_key={}", hex::encode(k)));
    }
    if cfg.listen_port != 0 {
        line(format_args!("listen_port={}", cfg.listen_port));
    }
    if cfg.fwmark != 0 {
        line(format_args!("fwmark={}", cfg.fwmark));
    }
    for p in &cfg.peers {
        let s = stats(p.id);
        line(format_args!("public_key={}", hex::encode(p.public_key)));
        line(format_args!(
            "preshared_key={}",
            hex::encode(p.preshared_key)
        ));
        line(format_args!("protocol_version=1"));
        if let Some(e) = &p.endpoint {
            line(format_args!("endpoint={}", format_endpoint(e)));
        }
        let since = s
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        line(format_args!("last_handshake_time_sec={}", since.as_secs()));
        line(format_args!(
            "last_handshake_time_nsec={}",
            since.subsec_nanos()
        ));
        line(format_args!("tx_bytes={}", s.tx_bytes));
        line(format_args!("rx_bytes={}", s.rx_bytes));
        line(format_args!(
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        ));
        for net in &p.allowed_ips {
            line(format_args!("allowed_ip={net}"));
        }
    }
    out
}

fn format_endpoint(e: &SocketAddr) -> String {
    match e {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => {
            format!("[{}%{}]:{}", v6.ip(), v6.scope_id(), v6.port())
        }
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
        SocketAddr::V4(v4) => v4.to_string(),
    }
}

/// Whether the first 4 bytes are a WireGuard message header (type 1..=4
/// followed by three zero bytes).
pub fn is_wireguard_message(datagram: &[u8]) -> bool {
    matches!(datagram, [1..=4, 0, 0, 0, ..])
}
