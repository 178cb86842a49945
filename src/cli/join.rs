//! `meshpeer join SEED`: admit this node with a token and run the daemon.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;
use meshpeer::admission::Token;
use meshpeer::identity::Identity;
use meshpeer::state::{MembershipFile, NodeState, StateDir};
use meshpeer::{proto, DEFAULT_GOSSIP_PORT};

use super::RunArgs;

#[derive(Args, Debug)]
pub struct JoinArgs {
    /// A member's address: host or host:port (default port 51821, the gossip port).
    pub seed: String,
    /// The join token (visible in `ps`: prefer --token-file or MESHPEER_TOKEN).
    #[arg(long, env = "MESHPEER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the join token (used when no --token / MESHPEER_TOKEN is given).
    #[arg(long, env = "MESHPEER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn join(a: JoinArgs) -> anyhow::Result<()> {
    let seed = meshpeer::net::normalize_seed(&a.seed, DEFAULT_GOSSIP_PORT)?;
    a.run.daemon_config(vec![])?; // check the run options before writing any state
    if let Some(n) = &a.name {
        super::check_name(n)?;
    }
    let text = match (&a.token, &a.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read --token-file {}", f.display()))?,
        (None, None) => bail!("a join token is needed: --token, --token-file or MESHPEER_TOKEN"),
    };
    let (token, delegation) = Token::parse(&text).context("invalid join token")?;
    let path = &a.run.state.state_dir;

    // An existing node of the same network just runs again (idempotent join);
    // one of another network is refused.
    let existing = path.join("membership.json").exists();
    let created = if existing {
        let dir = StateDir::open(path)?;
        let (network, _) = meshpeer::daemon::load_network(&dir)?;
        if network.key != delegation.network_key {
            bail!(
                "{} already holds a node of another network; use another --state-dir",
                path.display()
            );
        }
        false
    } else {
        let dir = StateDir::create(path)?;
        let id = Identity::generate();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let admission = token.admit(id.node_key(), now);
        let cidr = ipnet::Ipv4Net::new(delegation.cidr_addr, delegation.cidr_prefix)
            .context("token names an invalid network")?;
        let write = || -> anyhow::Result<()> {
            id.save(&dir)?;
            dir.save_state(&NodeState {
                name: a.name.clone().unwrap_or_else(super::hostname),
                seeds: vec![seed.clone()],
                ..Default::default()
            })?;
            dir.write_json(
                "membership.json",
                &MembershipFile {
                    network_key: proto::node_id_string(&delegation.network_key),
                    cidr,
                    admission: base64::engine::general_purpose::STANDARD
                        .encode(proto::encode(&admission)),
                },
            )?;
            Ok(())
        };
        if let Err(e) = write() {
            remove_fresh_state(path);
            return Err(e);
        }
        true
    };

    let result =
        meshpeer::daemon::run(a.run.daemon_config(vec![seed])?, super::shutdown_signal()).await;
    if result.is_err() && created {
        // Nothing half-written: a join that never got in leaves no node behind.
        let joined = StateDir::open(path)
            .and_then(|d| d.load_state())
            .map(|s| s.overlay_ip.is_some())
            .unwrap_or(false);
        if !joined {
            remove_fresh_state(path);
        }
    }
    result
}

fn remove_fresh_state(path: &std::path::Path) {
    for f in ["node.key", "wireguard.key", "state.json", "membership.json"] {
        let _ = std::fs::remove_file(path.join(f));
    }
    let _ = std::fs::remove_dir(path);
}
