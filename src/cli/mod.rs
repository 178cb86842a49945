//! Command-line interface: one file per subcommand, shared option groups.
//! Option values are checked by the library's parsers (`meshpeer::config`)
//! and layered over the config file there; this module only declares the
//! flags and calls into the library.

pub mod config;
mod export;
mod gen;
mod init;
mod join;
mod ops;
mod revoke;
mod status;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::LazyLock;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use meshpeer::config::{self as cfg, HostsFile, OnStop, Options};
use meshpeer::daemon::DaemonConfig;
use meshpeer::wg::BackendChoice;

/// `meshpeer --version`: the build and the wire protocol it speaks.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (wire protocol v{}, ALPN {})",
        env!("CARGO_PKG_VERSION"),
        meshpeer::proto::WIRE_VERSION,
        String::from_utf8_lossy(meshpeer::gossip::tls::ALPN)
    )
});

#[derive(Parser, Debug)]
#[command(
    name = "meshpeer",
    version = VERSION.as_str(),
    about = "A self-configuring full-mesh WireGuard overlay",
    propagate_version = true
)]
pub struct Cli {
    /// A TOML config file (keys as the long options, with `_`; see
    /// README). Precedence: flag, environment, file, default.
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
    /// Print the members for other tools: hosts, Ansible, MPI, Slurm, ssh.
    Export(export::ExportArgs),
    /// Probe a member over the overlay: round trip, path, relay.
    Ping(ops::PingArgs),
    /// This node's NAT as STUN measured it, and who answered.
    Netcheck(ops::NetcheckArgs),
    /// Print another join token (needs the network key, i.e. the `init` node).
    Invite(init::InviteArgs),
    /// Leave the mesh gracefully: members drop this node at once.
    Leave(status::LeaveArgs),
    /// Throw a member (or every member of a token) out for good (needs the
    /// network key, i.e. the `init` node).
    Revoke(revoke::RevokeArgs),
    /// List the tokens issued here and what is revoked.
    Tokens(revoke::TokensArgs),
    /// Check a config file.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(gen::CompletionsArgs),
    /// Print the man page (or write one per subcommand with --dir).
    Man(gen::ManArgs),
}

/// Where the node keeps its state.
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Directory holding keys and state (files 0600) [default: /var/lib/meshpeer].
    #[arg(long, env = "MESHPEER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl StateArgs {
    /// The state directory: flag or environment, else the config file, else
    /// the default; when nothing names one and no node lives in the
    /// default, an ephemeral node's (so `status` finds a node started with
    /// `--ephemeral`).
    pub fn resolve(&self, file: &Options) -> PathBuf {
        let o = Options {
            state_dir: self.state_dir.clone(),
            ..Default::default()
        }
        .or(file.clone());
        let dir = o.state_dir();
        if o.state_dir.is_none() && !o.ephemeral() {
            let eph = PathBuf::from(meshpeer::DEFAULT_EPHEMERAL_STATE_DIR);
            if !dir.join("membership.json").exists() && eph.join("membership.json").exists() {
                return eph;
            }
        }
        dir
    }
}

/// Options of a running node. Each is also an environment variable and a
/// config file key; unset ones come from the file, then the default.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Name of the WireGuard interface meshpeer creates [default: mp0].
    #[arg(long, env = "MESHPEER_INTERFACE", value_parser = cfg::parse_interface)]
    pub interface: Option<String>,
    /// WireGuard UDP port [default: 51820 on a member with a public
    /// address; behind NAT, a port in 51822-52821 derived from the node's
    /// WireGuard key, so members behind one NAT never share a source port]
    #[arg(long, env = "MESHPEER_WG_PORT")]
    pub wg_port: Option<u16>,
    /// Gossip (QUIC) UDP port [default: 51821].
    #[arg(long, env = "MESHPEER_GOSSIP_PORT")]
    pub gossip_port: Option<u16>,
    /// Liveness probe UDP port, on the overlay address only (allow it on
    /// the mesh interface if a firewall filters it) [default: 51819].
    #[arg(long, env = "MESHPEER_PROBE_PORT")]
    pub probe_port: Option<u16>,
    /// Address other members use to reach this node (default: the address
    /// that routes to the seed, else the first non-loopback address).
    #[arg(long, env = "MESHPEER_ADVERTISE_ADDR", value_parser = cfg::parse_ip)]
    pub advertise_addr: Option<IpAddr>,
    /// WireGuard implementation: kernel if available, else userspace [default: auto].
    #[arg(long, env = "MESHPEER_BACKEND", value_enum)]
    pub backend: Option<BackendChoice>,
    /// Seconds a member may be down before its WireGuard peer is removed [default: 60].
    #[arg(long, env = "MESHPEER_DOWN_GRACE_SECS")]
    pub down_grace_secs: Option<u64>,
    /// A tag of this node (repeatable, or comma-separated in the env var;
    /// lower-case letters, digits, - _ .), published in its record: roles
    /// and groups for `export` and `--with-tag`. Changes on SIGHUP.
    #[arg(long = "tag", env = "MESHPEER_TAGS", value_delimiter = ',', value_parser = cfg::parse_tag)]
    pub tags: Option<Vec<String>>,
    /// An outside STUN server (HOST or HOST:PORT, default port 3478) to ask
    /// besides the members; repeatable, or comma-separated in the env var.
    #[arg(
        long = "stun-server",
        env = "MESHPEER_STUN_SERVERS",
        value_delimiter = ',',
        value_parser = cfg::parse_stun_server
    )]
    pub stun_servers: Option<Vec<String>>,
    /// UDP port range of relay allocations (two ports per relayed pair) on
    /// a public member that relays: open it in the firewall there
    /// [default: 52900-57899].
    #[arg(long, env = "MESHPEER_RELAY_PORTS", value_parser = cfg::parse_port_range)]
    pub relay_ports: Option<(u16, u16)>,
    /// Do not relay for members that cannot reach each other directly
    /// (public members relay by default). `--no-relay=false` undoes a
    /// `no_relay = true` in the config file.
    #[arg(
        long,
        env = "MESHPEER_NO_RELAY",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_relay: Option<bool>,
    /// Seconds a first `join` waits for any seed to answer at all before it
    /// gives up (a seed that answers but is slow gets at least 120 s) [default: 60].
    #[arg(long, env = "MESHPEER_JOIN_TIMEOUT_SECS")]
    pub join_timeout_secs: Option<u64>,
    /// Serve Prometheus metrics at http://IP:PORT/metrics (off unless
    /// given; e.g. 127.0.0.1:9477). Changes on SIGHUP.
    #[arg(long, env = "MESHPEER_METRICS_ADDR", value_parser = cfg::parse_listen_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Log level (error, warn, info, debug, trace) or a filter like
    /// `info,meshpeer::gossip=debug`; RUST_LOG is honoured below this flag
    /// and MESHPEER_LOG_LEVEL, above the config file [default: info].
    /// Changes on SIGHUP.
    #[arg(long, env = "MESHPEER_LOG_LEVEL", value_parser = cfg::parse_log_level)]
    pub log_level: Option<String>,
    /// On SIGTERM/SIGINT: `stay` a member (members mark this node down
    /// until it is back) or `leave` the mesh (as `meshpeer leave`)
    /// [default: stay]. Changes on SIGHUP.
    #[arg(long, env = "MESHPEER_ON_STOP", value_parser = cfg::parse_on_stop)]
    pub on_stop: Option<OnStop>,
    /// A subnet behind this node to route to it from the mesh, e.g. its
    /// LAN 192.168.10.0/24 (repeatable, or comma-separated in the env var).
    /// Members install it only where the token this node joined with allows
    /// it (`meshpeer invite --allow-route`), or on the node holding the
    /// network key; this node then forwards between the mesh and the subnet
    /// (it turns on IPv4 forwarding). Changes on SIGHUP.
    #[arg(
        long = "advertise-route",
        env = "MESHPEER_ADVERTISE_ROUTES",
        value_delimiter = ',',
        value_parser = cfg::parse_route
    )]
    pub advertise_routes: Option<Vec<Ipv4Net>>,
    /// The hosts(5) file where meshpeer keeps the members' names (a block
    /// between `# BEGIN meshpeer IF` and `# END meshpeer IF`; other lines are
    /// never touched), or `none` [default: /etc/hosts].
    #[arg(long, env = "MESHPEER_HOSTS_FILE", value_parser = cfg::parse_hosts_file)]
    pub hosts_file: Option<HostsFile>,
    /// A stateless node that joins afresh on every boot: keys and state in
    /// /run/meshpeer (unless --state-dir), a leave on every stop (whatever
    /// --on-stop says) after which its identity is deleted, and members
    /// forget it 60 s after a crash. Give it a reusable, expiring token
    /// (`invite --expires-in 30d`) with --token-file.
    #[arg(
        long,
        env = "MESHPEER_EPHEMERAL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub ephemeral: Option<bool>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Rename this node (kept in the state directory).
    #[arg(long, env = "MESHPEER_NAME", value_parser = cfg::parse_name)]
    pub name: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl RunArgs {
    /// The options given on the command line and in the environment.
    pub fn options(&self) -> anyhow::Result<Options> {
        let tags = match &self.tags {
            None => None,
            Some(t) => Some(cfg::check_tags(t).map_err(|e| anyhow::anyhow!("--tag: {e}"))?),
        };
        Ok(Options {
            state_dir: self.state.state_dir.clone(),
            interface: self.interface.clone(),
            name: None,
            wg_port: self.wg_port,
            gossip_port: self.gossip_port,
            probe_port: self.probe_port,
            advertise_addr: self.advertise_addr,
            backend: self.backend,
            down_grace_secs: self.down_grace_secs,
            join_timeout_secs: self.join_timeout_secs,
            tags,
            stun_servers: self.stun_servers.clone(),
            no_relay: self.no_relay,
            relay_ports: self.relay_ports,
            token_file: None,
            metrics_addr: self.metrics_addr,
            log_level: self.log_level.clone(),
            on_stop: self.on_stop,
            advertise_routes: match &self.advertise_routes {
                None => None,
                Some(r) => Some(
                    cfg::check_routes(r).map_err(|e| anyhow::anyhow!("--advertise-route: {e}"))?,
                ),
            },
            hosts_file: self.hosts_file.clone(),
            ephemeral: self.ephemeral,
        })
    }
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

/// The default node name: the host name, made a valid label.
pub fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    meshpeer::record::name_from(h.trim())
}

/// The config file layer, given `--config` / MESHPEER_CONFIG (empty
/// without one).
pub fn file_options(path: Option<&std::path::Path>) -> anyhow::Result<Options> {
    match path {
        None => Ok(Options::default()),
        Some(p) => meshpeer::config::load(p).map_err(|e| anyhow::anyhow!("{}", e.pretty())),
    }
}

/// Logging: stderr, without colours unless stderr is a terminal (journald
/// and log files get plain text) and NO_COLOR is unset; the filter can be
/// replaced at run time (SIGHUP).
pub struct Logging {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    current: std::sync::Mutex<String>,
}

impl Logging {
    pub fn init(filter: &str) -> Logging {
        use std::io::IsTerminal;
        use tracing_subscriber::prelude::*;
        let ansi = std::io::stderr().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let env_filter = cfg::env_filter(filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cfg::log_filter("info")));
        let (layer, handle) = tracing_subscriber::reload::Layer::new(env_filter);
        tracing_subscriber::registry()
            .with(layer)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init();
        Logging {
            handle,
            current: std::sync::Mutex::new(filter.to_string()),
        }
    }

    /// Replaces the filter (if it changed).
    pub fn set(&self, filter: &str) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == filter {
            return;
        }
        match cfg::env_filter(filter) {
            Ok(f) => match self.handle.reload(f) {
                Ok(()) => {
                    tracing::info!(filter, "log level changed");
                    *cur = filter.to_string();
                }
                Err(e) => tracing::warn!(error = %e, "cannot change the log level"),
            },
            Err(e) => tracing::warn!(filter, error = %e, "not a log filter; keeping the old one"),
        }
    }
}

/// The log filter: `--log-level` / MESHPEER_LOG_LEVEL, then RUST_LOG, then
/// the config file, then `info`.
pub fn log_filter(cli: Option<&str>, file: Option<&str>) -> String {
    if let Some(l) = cli {
        return cfg::log_filter(l);
    }
    if let Ok(r) = std::env::var("RUST_LOG") {
        if !r.trim().is_empty() {
            return r;
        }
    }
    cfg::log_filter(file.unwrap_or(cfg::DEFAULT_LOG_LEVEL))
}

/// What a daemon command (`up`, `join`) needs to run and reload.
pub struct DaemonSetup {
    /// The command line's layer (kept for reloads).
    pub cli: Options,
    pub config_path: Option<PathBuf>,
    pub seeds: Vec<String>,
}

impl DaemonSetup {
    /// Runs the daemon; on SIGHUP the config file is read again, layered
    /// under the same command line, and sent to the daemon (and the log
    /// level applied here).
    pub async fn run(self, first: DaemonConfig, log: &'static Logging) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered before the daemon starts: SIGHUP's default action
        // would end the process.
        let mut hup = signal(SignalKind::hangup())
            .map_err(|e| anyhow::anyhow!("cannot catch SIGHUP: {e}"))?;
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        let reloader = tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(path) = &self.config_path else {
                    tracing::info!("SIGHUP: no config file (--config) to reload");
                    continue;
                };
                let file = match meshpeer::config::load(path) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::error!("SIGHUP: keeping the running configuration: {e}");
                        continue;
                    }
                };
                tracing::info!(file = %path.display(), "SIGHUP: reloading the configuration");
                log.set(&log_filter(
                    self.cli.log_level.as_deref(),
                    file.log_level.as_deref(),
                ));
                let merged = self.cli.clone().or(file);
                tx.send_replace(merged.daemon_config(self.seeds.clone()));
            }
        });
        let r = meshpeer::daemon::run_with_reload(first, shutdown_signal(), Some(rx)).await;
        reloader.abort();
        r
    }
}

pub async fn run(cli: Cli, log: &'static Logging, file: Options) -> anyhow::Result<()> {
    let config_path = cli.config.clone();
    match cli.command {
        Command::Init(a) => init::init(a, &file),
        Command::Invite(a) => init::invite(a, &file),
        Command::Up(a) => {
            let cli_opts = a.run.options()?;
            let merged = cli_opts.clone().or(file.clone());
            let state_dir = merged.state_dir();
            let dir = meshpeer::state::StateDir::open(&state_dir)?;
            if let Some(name) = a.name.clone().or(file.name.clone()) {
                let mut st = dir.load_state()?;
                if st.name != name {
                    st.name = name;
                    dir.save_state(&st)?;
                }
            }
            let setup = DaemonSetup {
                cli: cli_opts,
                config_path,
                seeds: vec![],
            };
            setup.run(merged.daemon_config(vec![]), log).await
        }
        Command::Join(a) => join::join(a, &file, config_path, log).await,
        Command::Status(a) => status::status(a, &file).await,
        Command::Export(a) => export::export(a, &file).await,
        Command::Ping(a) => ops::ping(a, &file).await,
        Command::Netcheck(a) => ops::netcheck(a, &file).await,
        Command::Leave(a) => status::leave(a, &file).await,
        Command::Revoke(a) => revoke::revoke(a, &file).await,
        Command::Tokens(a) => revoke::tokens(a, &file),
        Command::Config(c) => config::run(c, config_path.as_deref()),
        Command::Completions(a) => gen::completions(a),
        Command::Man(a) => gen::man(a),
    }
}

/// Whether a command reads the config file (the daemon commands and every
/// command that finds the state directory).
pub fn uses_config(cmd: &Command) -> bool {
    !matches!(
        cmd,
        Command::Config(_) | Command::Completions(_) | Command::Man(_)
    )
}

/// The `--log-level` given on the command line / in the environment (only
/// the daemon commands have one).
pub fn cli_log_level(cmd: &Command) -> Option<&str> {
    match cmd {
        Command::Up(a) => a.run.log_level.as_deref(),
        Command::Join(a) => a.run.log_level.as_deref(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_relay_takes_an_optional_value() {
        let parse = |args: &[&str]| {
            let mut v = vec!["meshpeer", "up"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().command {
                Command::Up(a) => a.run.no_relay,
                _ => unreachable!(),
            }
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["--no-relay"]), Some(true));
        assert_eq!(parse(&["--no-relay=false"]), Some(false));
        assert!(Cli::try_parse_from(["meshpeer", "up", "--no-relay=maybe"]).is_err());
    }

    #[test]
    fn version_names_the_wire_protocol() {
        assert!(VERSION.contains("wire protocol v2"), "{}", *VERSION);
        assert!(VERSION.contains("ALPN meshpeer/2"), "{}", *VERSION);
    }
}
