//! `meshpeer init` and `meshpeer invite`.

use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use ed25519_dalek::SigningKey;
use ipnet::Ipv4Net;
use meshpeer::admission::{issue_token, stamp, Stamper, Token};
use meshpeer::identity::Identity;
use meshpeer::proto::Route;
use meshpeer::state::{MembershipFile, NodeState, StateDir};
use meshpeer::{ipalloc, proto};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};

use super::StateArgs;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The overlay network (IPv4 CIDR, at most /30), e.g. 10.77.0.0/16.
    #[arg(long)]
    pub network: String,
    /// This node's name (default: the host name).
    #[arg(long, env = "MESHPEER_NAME", value_parser = meshpeer::config::parse_name)]
    pub name: Option<String>,
    /// How long the printed token admits new nodes: e.g. 30s, 10m, 24h, 7d,
    /// or `never` (a token that never expires must be asked for).
    #[arg(long, default_value = "24h", value_parser = parse_expires_in)]
    pub expires_in: Expiry,
    #[command(flatten)]
    pub state: StateArgs,
    /// Accepted for symmetry with `up`/`join`; the interface is chosen when the daemon runs.
    #[arg(long, env = "MESHPEER_INTERFACE", hide = true)]
    pub interface: Option<String>,
}

#[derive(Args, Debug)]
pub struct InviteArgs {
    /// How long the token admits new nodes: e.g. 30s, 10m, 24h, 7d, or
    /// `never`.
    #[arg(long, default_value = "24h", value_parser = parse_expires_in)]
    pub expires_in: Expiry,
    /// A subnet members admitted with this token may advertise as a route
    /// (repeatable), e.g. 192.168.10.0/24.
    #[arg(long = "allow-route", value_parser = parse_route)]
    pub allow_routes: Vec<Route>,
    #[command(flatten)]
    pub state: StateArgs,
}

/// A token lifetime: seconds, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    In(u64),
    Never,
}

/// Parses `30s`, `10m`, `24h`, `7d` or `never`.
pub fn parse_expires_in(s: &str) -> Result<Expiry, String> {
    if s == "never" {
        return Ok(Expiry::Never);
    }
    let bad = || format!("{s:?} is not a duration like 30s, 10m, 24h, 7d, or `never`");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!("{s:?}: a token must live longer than 0 s"));
    }
    n.checked_mul(mult).map(Expiry::In).ok_or_else(bad)
}

/// Parses a route (an IPv4 or IPv6 CIDR).
pub fn parse_route(s: &str) -> Result<Route, String> {
    let net: ipnet::IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR like 192.168.10.0/24"))?;
    let net = net.trunc();
    Ok(Route {
        addr: net.addr(),
        prefix: net.prefix_len(),
    })
}

use meshpeer::clock::unix_secs as now;

fn expiry(e: Expiry) -> u64 {
    match e {
        Expiry::Never => 0,
        Expiry::In(secs) => now() + secs,
    }
}

/// One token issued here (`tokens.json` on the node that holds the network
/// key: what `meshpeer tokens` lists; the token itself is not kept).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    pub id: String,
    pub issued_at: u64,
    /// 0: never.
    pub expires_at: u64,
    #[serde(default)]
    pub allow_routes: Vec<String>,
}

pub fn record_issued(dir: &StateDir, token: &Token) -> anyhow::Result<()> {
    let (_, d) = Token::parse(&token.to_text())?;
    let mut list: Vec<Issued> = dir.read_json("tokens.json")?.unwrap_or_default();
    list.push(Issued {
        id: hex::encode(d.token_id),
        issued_at: now(),
        expires_at: d.expires_at,
        allow_routes: d
            .allow_routes
            .iter()
            .map(|r| format!("{}/{}", r.addr, r.prefix))
            .collect(),
    });
    dir.write_json("tokens.json", &list)?;
    Ok(())
}

pub fn parse_network(s: &str) -> anyhow::Result<Ipv4Net> {
    let net: Ipv4Net = s
        .parse()
        .with_context(|| format!("--network {s:?} is not an IPv4 CIDR like 10.77.0.0/16"))?;
    if net.prefix_len() > 30 {
        bail!(
            "--network {s}: a /{} has no room for members; use /30 or larger",
            net.prefix_len()
        );
    }
    Ok(net.trunc())
}

pub fn init(a: InitArgs, file: &meshpeer::config::Options) -> anyhow::Result<()> {
    let cidr = parse_network(&a.network)?;
    let name = a.name.clone().or_else(|| file.name.clone());
    let dir = StateDir::create(&a.state.resolve(file))?;
    let network_key = SigningKey::generate(&mut OsRng);
    let id = Identity::generate();
    // The founder admits itself with a token of its own, stamped by the
    // network key (it may advertise any route).
    let own = issue_token(&network_key, cidr, 0, vec![]);
    let (_, own_d) = Token::parse(&own.to_text())?;
    let admission = own.admit(id.node_key(), now());
    let nk = network_key.verifying_key().to_bytes();
    let own_stamp = stamp(
        &network_key,
        Stamper::Network,
        nk,
        id.node_key(),
        own_d.token_id,
        now(),
    );
    let state = NodeState {
        name: name.unwrap_or_else(super::hostname),
        overlay_ip: Some(ipalloc::first_host(cidr)),
        ip_claimed_at: 1, // the founder's claim predates every joiner's
        ..Default::default()
    };
    // Write secrets first; membership.json last marks the node complete.
    let write = || -> anyhow::Result<()> {
        dir.write_key("network.key", &network_key.to_bytes())?;
        id.save(&dir)?;
        dir.save_state(&state)?;
        dir.write_json(
            "membership.json",
            &MembershipFile {
                network_key: proto::node_id_string(&network_key.verifying_key().to_bytes()),
                cidr,
                admission: base64::engine::general_purpose::STANDARD
                    .encode(proto::encode(&admission)),
                stamp: Some(
                    base64::engine::general_purpose::STANDARD.encode(proto::encode(&own_stamp)),
                ),
            },
        )?;
        Ok(())
    };
    if let Err(e) = write() {
        for f in [
            "network.key",
            "node.key",
            "wireguard.key",
            "state.json",
            "membership.json",
            "tokens.json",
        ] {
            let _ = std::fs::remove_file(dir.file(f));
        }
        return Err(e);
    }
    let token = issue_token(&network_key, cidr, expiry(a.expires_in), vec![]);
    record_issued(&dir, &token)?;
    eprintln!(
        "created network {cidr}; this node is {} at {}. Start it with `meshpeer up`; join others with the token below ({}).\n\
         The network key is in {} (back it up; only this node can invite and revoke).\n\
         Ports: WireGuard {}/udp, gossip {}/udp and relay allocations {}-{}/udp must be open on public members (README: Firewall).",
        state.name,
        ipalloc::first_host(cidr),
        describe_expiry(a.expires_in),
        dir.file("network.key").display(),
        meshpeer::DEFAULT_WG_PORT,
        meshpeer::DEFAULT_GOSSIP_PORT,
        meshpeer::relay::DEFAULT_PORTS.0,
        meshpeer::relay::DEFAULT_PORTS.1,
    );
    println!("{}", token.to_text());
    Ok(())
}

fn describe_expiry(e: Expiry) -> String {
    match e {
        Expiry::Never => "it never expires".into(),
        Expiry::In(s) => format!("it expires at {}", meshpeer::admission::fmt_unix(now() + s)),
    }
}

/// The network key of the node in `dir` (only where `init` ran).
pub fn network_secret(dir: &StateDir) -> anyhow::Result<SigningKey> {
    let key = dir.read_key("network.key")?.with_context(|| {
        format!(
            "{} holds no network key: run this on the node where `meshpeer init` ran",
            dir.path.display()
        )
    })?;
    let (network, _, _) = meshpeer::daemon::load_network(dir)?;
    let network_key = SigningKey::from_bytes(&key);
    if network_key.verifying_key().to_bytes() != network.key {
        bail!(
            "{}: network.key does not match membership.json",
            dir.path.display()
        );
    }
    Ok(network_key)
}

pub fn invite(a: InviteArgs, file: &meshpeer::config::Options) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.resolve(file))?;
    let network_key = network_secret(&dir)?;
    let (network, _, _) = meshpeer::daemon::load_network(&dir)?;
    let token = issue_token(
        &network_key,
        network.cidr,
        expiry(a.expires_in),
        a.allow_routes.clone(),
    );
    record_issued(&dir, &token)?;
    eprintln!(
        "token {} ({})",
        {
            let (_, d) = Token::parse(&token.to_text())?;
            hex::encode(d.token_id)
        },
        describe_expiry(a.expires_in)
    );
    println!("{}", token.to_text());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_routes_parse() {
        assert_eq!(parse_expires_in("30s"), Ok(Expiry::In(30)));
        assert_eq!(parse_expires_in("10m"), Ok(Expiry::In(600)));
        assert_eq!(parse_expires_in("24h"), Ok(Expiry::In(86_400)));
        assert_eq!(parse_expires_in("7d"), Ok(Expiry::In(604_800)));
        assert_eq!(parse_expires_in("never"), Ok(Expiry::Never));
        for bad in ["", "10", "h", "10x", "-5m", "0s", "99999999999999999999d"] {
            assert!(parse_expires_in(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_route("192.168.10.7/24").unwrap(),
            Route {
                addr: "192.168.10.0".parse().unwrap(),
                prefix: 24
            }
        );
        assert!(parse_route("not a net").is_err());
    }
}
