//! `meshpeer init` and `meshpeer invite`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use ed25519_dalek::SigningKey;
use ipnet::Ipv4Net;
use meshpeer::admission::issue_token;
use meshpeer::identity::Identity;
use meshpeer::state::{MembershipFile, NodeState, StateDir};
use meshpeer::{ipalloc, proto};
use rand::rngs::OsRng;

use super::StateArgs;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// The overlay network (IPv4 CIDR, at most /30), e.g. 10.77.0.0/16.
    #[arg(long)]
    pub network: String,
    /// This node's name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Hours the printed token admits new nodes (0 = no expiry).
    #[arg(long, default_value_t = 0)]
    pub token_valid_hours: u64,
    #[command(flatten)]
    pub state: StateArgs,
    /// Accepted for symmetry with `up`/`join`; the interface is chosen when the daemon runs.
    #[arg(long, env = "MESHPEER_INTERFACE", hide = true)]
    pub interface: Option<String>,
}

#[derive(Args, Debug)]
pub struct InviteArgs {
    /// Hours the token admits new nodes (0 = no expiry).
    #[arg(long, default_value_t = 0)]
    pub valid_hours: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn expiry(hours: u64) -> u64 {
    if hours == 0 {
        0
    } else {
        now() + hours * 3600
    }
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

pub fn init(a: InitArgs) -> anyhow::Result<()> {
    let cidr = parse_network(&a.network)?;
    if let Some(n) = &a.name {
        super::check_name(n)?;
    }
    let dir = StateDir::create(&a.state.state_dir)?;
    let network_key = SigningKey::generate(&mut OsRng);
    let id = Identity::generate();
    let own = issue_token(&network_key, cidr, 0);
    let admission = own.admit(id.node_key(), now());
    let state = NodeState {
        name: a.name.unwrap_or_else(super::hostname),
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
        ] {
            let _ = std::fs::remove_file(dir.file(f));
        }
        return Err(e);
    }
    let token = issue_token(&network_key, cidr, expiry(a.token_valid_hours));
    eprintln!(
        "created network {cidr}; this node is {} at {}. Start it with `meshpeer up`; join others with the token below.",
        state.name,
        ipalloc::first_host(cidr)
    );
    println!("{}", token.to_text());
    Ok(())
}

pub fn invite(a: InviteArgs) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.state_dir)?;
    let key = dir.read_key("network.key")?.with_context(|| {
        format!(
            "{} holds no network key: run `meshpeer invite` on the node where `meshpeer init` ran",
            dir.path.display()
        )
    })?;
    let (network, _) = meshpeer::daemon::load_network(&dir)?;
    let network_key = SigningKey::from_bytes(&key);
    if network_key.verifying_key().to_bytes() != network.key {
        bail!(
            "{}: network.key does not match membership.json",
            dir.path.display()
        );
    }
    println!(
        "{}",
        issue_token(&network_key, network.cidr, expiry(a.valid_hours)).to_text()
    );
    Ok(())
}
