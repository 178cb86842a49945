//! Command-line interface: one file per subcommand, shared option groups.

pub mod config;
mod init;
mod join;
mod revoke;
mod status;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use meshpeer::daemon::DaemonConfig;
use meshpeer::wg::BackendChoice;
use meshpeer::{DEFAULT_GOSSIP_PORT, DEFAULT_INTERFACE, DEFAULT_STATE_DIR};

#[derive(Parser, Debug)]
#[command(
    name = "meshpeer",
    version,
    about = "A self-configuring full-mesh WireGuard overlay"
)]
pub struct Cli {
    /// A TOML config file (keys as the long options, with `_`): see README.
    #[arg(long, global = true, env = "MESHPEER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new network with this node as its first member; prints a join token.
    Init(init::InitArgs),
    /// Run the daemon for an existing node (what a systemd unit runs).
    Up(UpArgs),
    /// Join a network through one member (the seed) and run the daemon.
    Join(join::JoinArgs),
    /// Show the members and how each is reached.
    Status(status::StatusArgs),
    /// Print another join token (needs the network key, i.e. the `init` node).
    Invite(init::InviteArgs),
    /// Leave the mesh gracefully: members drop this node at once.
    Leave(status::LeaveArgs),
    /// Throw a member (or every member of a token) out for good (needs the
    /// network key, i.e. the `init` node).
    Revoke(revoke::RevokeArgs),
    /// List the tokens issued here and what is revoked.
    Tokens(revoke::TokensArgs),
}

/// Where the node keeps its state.
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Directory holding keys and state (files 0600).
    #[arg(long, env = "MESHPEER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// Options of a running node.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Name of the WireGuard interface meshpeer creates.
    #[arg(long, env = "MESHPEER_INTERFACE", default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// WireGuard UDP port [default: 51820 on a member with a public
    /// address; behind NAT, a port in 51822-52821 derived from the node's
    /// WireGuard key, so members behind one NAT never share a source port]
    #[arg(long, env = "MESHPEER_WG_PORT")]
    pub wg_port: Option<u16>,
    /// Gossip (QUIC) UDP port.
    #[arg(long, env = "MESHPEER_GOSSIP_PORT", default_value_t = DEFAULT_GOSSIP_PORT)]
    pub gossip_port: u16,
    /// Liveness probe UDP port, on the overlay address only (allow it on
    /// the mesh interface if a firewall filters it).
    #[arg(long, env = "MESHPEER_PROBE_PORT", default_value_t = meshpeer::liveness::DEFAULT_PROBE_PORT)]
    pub probe_port: u16,
    /// Address other members use to reach this node (default: the address
    /// that routes to the seed, else the first non-loopback address).
    #[arg(long, env = "MESHPEER_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,
    /// WireGuard implementation: kernel if available, else userspace.
    #[arg(long, env = "MESHPEER_BACKEND", value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Seconds a member may be down before its WireGuard peer is removed.
    #[arg(long, env = "MESHPEER_DOWN_GRACE_SECS", default_value_t = 60)]
    pub down_grace_secs: u64,
    /// A tag of this node (repeatable; lower-case letters, digits, - _ .),
    /// published in its record: roles and groups for exports and filters.
    #[arg(long = "tag", env = "MESHPEER_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// An outside STUN server (HOST or HOST:PORT, default port 3478) to ask
    /// besides the members; repeatable, or comma-separated in the env var.
    #[arg(
        long = "stun-server",
        env = "MESHPEER_STUN_SERVERS",
        value_delimiter = ','
    )]
    pub stun_servers: Vec<String>,
    /// UDP port range of relay allocations (two ports per relayed pair) on
    /// a public member that relays: open it in the firewall there.
    #[arg(long, env = "MESHPEER_RELAY_PORTS", default_value = "52900-57899", value_parser = parse_port_range)]
    pub relay_ports: (u16, u16),
    /// Do not relay for members that cannot reach each other directly
    /// (public members relay by default).
    #[arg(long, env = "MESHPEER_NO_RELAY", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_relay: bool,
    /// Seconds a first `join` waits for any seed to answer at all before it
    /// gives up (a seed that answers but is slow gets at least 120 s).
    #[arg(long, env = "MESHPEER_JOIN_TIMEOUT_SECS", default_value_t = 60)]
    pub join_timeout_secs: u64,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Rename this node (kept in the state directory).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl RunArgs {
    pub fn daemon_config(&self, seeds: Vec<String>) -> anyhow::Result<DaemonConfig> {
        for s in &self.stun_servers {
            meshpeer::net::normalize_seed(s, 3478)
                .map_err(|e| anyhow::anyhow!("--stun-server: {e}"))?;
        }
        for t in &self.tags {
            if !meshpeer::record::valid_tag(t) {
                anyhow::bail!(
                    "--tag {t:?}: a tag has 1 to 32 characters of a-z, 0-9, '-', '_' and '.'"
                );
            }
        }
        if self.tags.len() > meshpeer::record::MAX_TAGS {
            anyhow::bail!("at most {} tags", meshpeer::record::MAX_TAGS);
        }
        let mut tags = self.tags.clone();
        tags.sort();
        tags.dedup();
        Ok(DaemonConfig {
            state_dir: self.state.state_dir.clone(),
            interface: self.interface.clone(),
            wg_port: self.wg_port,
            gossip_port: self.gossip_port,
            probe_port: self.probe_port,
            seeds,
            advertise: self.advertise_addr,
            backend: self.backend,
            down_grace: Duration::from_secs(self.down_grace_secs),
            tags,
            join_timeout: Duration::from_secs(self.join_timeout_secs),
            relay: !self.no_relay,
            relay_ports: self.relay_ports,
            stun_servers: self
                .stun_servers
                .iter()
                .filter_map(|s| meshpeer::net::normalize_seed(s, 3478).ok())
                .collect(),
        })
    }
}

/// Parses `FIRST-LAST` (a UDP port range of at least two ports).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a port range like 52900-57899");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b <= a {
        return Err(format!(
            "{s:?}: the range must hold at least two ports, not starting at 0"
        ));
    }
    Ok((a, b))
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Checks a node name given with --name: a host name label, since members
/// reach each other by it.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if !meshpeer::record::valid_name(name) {
        anyhow::bail!(
            "--name {name:?}: a node name is a host name label: 1 to {} characters of a-z, 0-9 and '-', not starting or ending with '-'",
            meshpeer::record::MAX_NAME_LEN
        );
    }
    Ok(())
}

/// The default node name: the host name, made a valid label.
pub fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    meshpeer::record::name_from(h.trim())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init(a) => init::init(a),
        Command::Invite(a) => init::invite(a),
        Command::Up(a) => {
            let dir = meshpeer::state::StateDir::open(&a.run.state.state_dir)?;
            if let Some(name) = a.name {
                check_name(&name)?;
                let mut st = dir.load_state()?;
                st.name = name;
                dir.save_state(&st)?;
            }
            meshpeer::daemon::run(a.run.daemon_config(vec![])?, shutdown_signal()).await
        }
        Command::Join(a) => join::join(a).await,
        Command::Status(a) => status::status(a).await,
        Command::Leave(a) => status::leave(a).await,
        Command::Revoke(a) => revoke::revoke(a).await,
        Command::Tokens(a) => revoke::tokens(a),
    }
}
