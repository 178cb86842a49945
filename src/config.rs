//! The configuration of a running node, typed: the TOML file
//! (`--config FILE`), the option values the command line and environment
//! give, and how they layer.
//!
//! Precedence: command-line flag, then environment variable, then the file,
//! then the built-in default. The command line (with its environment
//! variables) and the file each become an [`Options`] (every field
//! optional); [`Options::or`] layers one over the other and
//! [`Options::daemon_config`] applies the defaults.
//!
//! The file has one key per long option (with `_` for `-`), e.g.:
//!
//! ```toml
//! state_dir = "/var/lib/meshpeer"
//! interface = "mp0"
//! wg_port = 51820
//! gossip_port = 51821
//! advertise_addr = "203.0.113.10"
//! backend = "auto"            # kernel | userspace | auto
//! tags = ["compute", "gpu"]
//! metrics_addr = "127.0.0.1:9477"
//! log_level = "info"
//! on_stop = "stay"            # stay | leave
//! advertise_routes = ["192.168.10.0/24"]
//! hosts_file = "/etc/hosts"   # or "none"
//! ```
//!
//! Every error in a file names its line and column ([`ConfigError::At`]):
//! an unknown key, a value of the wrong type, or a bad value (a port out of
//! range, an address that does not parse, a tag with a capital letter...).
//! The value checks are the same functions the command line uses, so a bad
//! value reads the same wherever it came from.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::daemon::DaemonConfig;
use crate::wg::BackendChoice;

/// Default seconds a crashed member keeps its WireGuard peer.
pub const DEFAULT_DOWN_GRACE_SECS: u64 = 60;
/// Default seconds a first `join` waits for any seed to answer.
pub const DEFAULT_JOIN_TIMEOUT_SECS: u64 = 60;
/// The log filter when none is given (`--log-level`, `RUST_LOG`, the file).
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// The hosts file whose managed block lists the members' names, when none
/// is configured.
pub const DEFAULT_HOSTS_FILE: &str = "/etc/hosts";
/// Modules held at a level when the log level is a bare level: QUIC and
/// gossip are chatty at `info` and below; the userspace WireGuard logs every
/// handshake retry at `warn` (every 5 s for 90 s per member that does not
/// answer: 2.2 M lines in 20 minutes at 250 members under load), which
/// meshpeer's own path and liveness logs already say once.
const QUIET_MODULES: &[(&str, &str)] = &[
    ("quinn", "warn"),
    ("chitchat", "warn"),
    ("boringtun", "error"),
];

/// Every key the file accepts.
pub const KEYS: &[&str] = &[
    "state_dir",
    "interface",
    "name",
    "wg_port",
    "gossip_port",
    "probe_port",
    "advertise_addr",
    "backend",
    "down_grace_secs",
    "join_timeout_secs",
    "tags",
    "stun_servers",
    "no_relay",
    "relay_ports",
    "token_file",
    "metrics_addr",
    "log_level",
    "on_stop",
    "advertise_routes",
    "hosts_file",
    "ephemeral",
];

/// What the daemon does when it is stopped (SIGTERM, SIGINT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStop {
    /// Stay a member: others mark this node down and keep its record; it
    /// comes back with `meshpeer up` (a reboot, an upgrade).
    #[default]
    Stay,
    /// Leave the mesh: a signed leave record, and members drop this node at
    /// once (as `meshpeer leave`).
    Leave,
}

impl FromStr for OnStop {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stay" => Ok(OnStop::Stay),
            "leave" => Ok(OnStop::Leave),
            _ => Err(format!("{s:?} is neither `stay` nor `leave`")),
        }
    }
}

/// Where the members' names go (`--hosts-file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostsFile {
    /// Nowhere (`none`).
    Off,
    /// A managed block in this hosts(5) file.
    Path(PathBuf),
}

impl HostsFile {
    /// The file, unless off.
    pub fn path(&self) -> Option<&Path> {
        match self {
            HostsFile::Off => None,
            HostsFile::Path(p) => Some(p),
        }
    }
}

impl OnStop {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStop::Stay => "stay",
            OnStop::Leave => "leave",
        }
    }
}

/// The options of a node, each optional: one layer (the command line with
/// its environment variables, or the file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub state_dir: Option<PathBuf>,
    pub interface: Option<String>,
    pub name: Option<String>,
    pub wg_port: Option<u16>,
    pub gossip_port: Option<u16>,
    pub probe_port: Option<u16>,
    pub advertise_addr: Option<IpAddr>,
    pub backend: Option<BackendChoice>,
    pub down_grace_secs: Option<u64>,
    pub join_timeout_secs: Option<u64>,
    /// Sorted, without duplicates.
    pub tags: Option<Vec<String>>,
    /// Normalized `host:port`.
    pub stun_servers: Option<Vec<String>>,
    pub no_relay: Option<bool>,
    /// First and last port.
    pub relay_ports: Option<(u16, u16)>,
    pub token_file: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub log_level: Option<String>,
    pub on_stop: Option<OnStop>,
    /// Subnets behind this node (sorted, without duplicates).
    pub advertise_routes: Option<Vec<Ipv4Net>>,
    pub hosts_file: Option<HostsFile>,
    pub ephemeral: Option<bool>,
}

macro_rules! layer {
    ($top:ident, $below:ident, $($f:ident),*) => {
        Options { $($f: $top.$f.or($below.$f)),* }
    };
}

impl Options {
    /// `self` over `below`: each option from `self` if set there, else from
    /// `below`.
    pub fn or(self, below: Options) -> Options {
        layer!(
            self,
            below,
            state_dir,
            interface,
            name,
            wg_port,
            gossip_port,
            probe_port,
            advertise_addr,
            backend,
            down_grace_secs,
            join_timeout_secs,
            tags,
            stun_servers,
            no_relay,
            relay_ports,
            token_file,
            metrics_addr,
            log_level,
            on_stop,
            advertise_routes,
            hosts_file,
            ephemeral
        )
    }

    /// The state directory (default [`crate::DEFAULT_STATE_DIR`], or
    /// [`crate::DEFAULT_EPHEMERAL_STATE_DIR`] for an ephemeral node).
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            PathBuf::from(if self.ephemeral() {
                crate::DEFAULT_EPHEMERAL_STATE_DIR
            } else {
                crate::DEFAULT_STATE_DIR
            })
        })
    }

    /// Whether the node is ephemeral (default: no).
    pub fn ephemeral(&self) -> bool {
        self.ephemeral.unwrap_or(false)
    }

    /// The daemon's configuration, defaults filled in. Values were checked
    /// when the layers were built, so this cannot fail.
    pub fn daemon_config(&self, seeds: Vec<String>) -> DaemonConfig {
        DaemonConfig {
            state_dir: self.state_dir(),
            interface: self
                .interface
                .clone()
                .unwrap_or_else(|| crate::DEFAULT_INTERFACE.to_string()),
            wg_port: self.wg_port,
            gossip_port: self.gossip_port.unwrap_or(crate::DEFAULT_GOSSIP_PORT),
            probe_port: self
                .probe_port
                .unwrap_or(crate::liveness::DEFAULT_PROBE_PORT),
            seeds,
            advertise: self.advertise_addr,
            backend: self.backend.unwrap_or(BackendChoice::Auto),
            down_grace: Duration::from_secs(
                self.down_grace_secs.unwrap_or(DEFAULT_DOWN_GRACE_SECS),
            ),
            relay: !self.no_relay.unwrap_or(false),
            relay_ports: self.relay_ports.unwrap_or(crate::relay::DEFAULT_PORTS),
            stun_servers: self.stun_servers.clone().unwrap_or_default(),
            join_timeout: Duration::from_secs(
                self.join_timeout_secs.unwrap_or(DEFAULT_JOIN_TIMEOUT_SECS),
            ),
            tags: self.tags.clone().unwrap_or_default(),
            metrics_addr: self.metrics_addr,
            advertise_routes: self.advertise_routes.clone().unwrap_or_default(),
            hosts_file: match &self.hosts_file {
                None => Some(PathBuf::from(DEFAULT_HOSTS_FILE)),
                Some(h) => h.path().map(Path::to_path_buf),
            },
            on_stop: if self.ephemeral() {
                OnStop::Leave
            } else {
                self.on_stop.unwrap_or_default()
            },
            ephemeral: self.ephemeral(),
        }
    }

    /// The log filter directive (see [`log_filter`]) from this layer, or the
    /// default.
    pub fn log_filter(&self) -> String {
        log_filter(self.log_level.as_deref().unwrap_or(DEFAULT_LOG_LEVEL))
    }
}

/// A log level as tracing's `EnvFilter` reads it: a bare level (`error`,
/// `warn`, `info`, `debug`, `trace`) keeps the chatty QUIC and gossip
/// libraries at `warn` and the userspace WireGuard at `error`
/// ([`QUIET_MODULES`]); anything else (`info,meshpeer::gossip=trace`,
/// `info,boringtun=warn`) is used as given.
pub fn log_filter(level: &str) -> String {
    let level = level.trim();
    let bare = matches!(
        level.to_ascii_lowercase().as_str(),
        "error" | "warn" | "info" | "debug" | "trace"
    );
    if bare {
        let mut s = level.to_ascii_lowercase();
        for (m, at) in QUIET_MODULES {
            s.push_str(&format!(",{m}={at}"));
        }
        s
    } else {
        level.to_string()
    }
}

// ---------------------------------------------------------------------------
// Value checks, shared by the file and the command line (clap value parsers)
// ---------------------------------------------------------------------------

/// A tag: 1 to 32 characters of a-z, 0-9, '-', '_' and '.'.
pub fn parse_tag(s: &str) -> Result<String, String> {
    if crate::record::valid_tag(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a tag: a tag has 1 to 32 characters of a-z, 0-9, '-', '_' and '.'"
        ))
    }
}

/// A list of tags: each valid, at most [`crate::record::MAX_TAGS`]; sorted
/// and deduplicated.
pub fn check_tags(tags: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(tags.len());
    for t in tags {
        out.push(parse_tag(t)?);
    }
    out.sort();
    out.dedup();
    if out.len() > crate::record::MAX_TAGS {
        return Err(format!(
            "{} tags: a node has at most {}",
            out.len(),
            crate::record::MAX_TAGS
        ));
    }
    Ok(out)
}

/// A node name: a host name label.
pub fn parse_name(s: &str) -> Result<String, String> {
    if crate::record::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a node name: a node name is a host name label: 1 to {} characters of a-z, 0-9 and '-', not starting or ending with '-'",
            crate::record::MAX_NAME_LEN
        ))
    }
}

/// A network interface name as Linux takes it: 1 to 15 bytes, no '/', ':'
/// or white space, not `.` or `..`.
pub fn parse_interface(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not an interface name: 1 to 15 characters, without '/', ':' or spaces"
        ))
    }
}

/// An IP address to advertise.
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address like 203.0.113.10"))
}

/// `IP:PORT` to listen on (IPv6 as `[::1]:9477`).
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address and port like 127.0.0.1:9477 or [::1]:9477"))
}

/// A STUN server, `HOST` or `HOST:PORT` (default port 3478), normalized.
pub fn parse_stun_server(s: &str) -> Result<String, String> {
    crate::net::normalize_seed(s, 3478).map_err(|e| format!("STUN server {s:?}: {e}"))
}

/// The WireGuard backend.
pub fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    match s {
        "auto" => Ok(BackendChoice::Auto),
        "kernel" => Ok(BackendChoice::Kernel),
        "userspace" => Ok(BackendChoice::Userspace),
        _ => Err(format!(
            "{s:?} is not a backend: `auto`, `kernel` or `userspace`"
        )),
    }
}

/// Longest log level or filter accepted.
pub const MAX_LOG_FILTER: usize = 1024;

/// A log filter as the daemon uses it: levels per module
/// (`info,meshpeer::gossip=debug`). Span and field filters (`[...]`) are
/// refused: tracing compiles field values to regular expressions (a short
/// filter in a config file made building it take minutes) and its
/// directive ordering asserts on some of them even as literals (both found
/// by fuzzing, FUZZING.md).
pub fn env_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if filter.contains(['[', ']', '{', '}']) {
        return Err("span and field filters ([...]) are not supported; \
                    use levels per module, like `info,meshpeer::gossip=debug`"
            .into());
    }
    // Module paths, levels, '=' and ',' only: tracing's directive parser
    // slices by byte and panics inside a multibyte character (fuzzing).
    if let Some(c) = filter
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_:=,.- ".contains(*c)))
    {
        return Err(format!(
            "{c:?} cannot appear in a log filter (module paths, levels, '=' and ',' only)"
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(filter)
        .map_err(|e| e.to_string())
}

/// A log level or filter directive (checked by parsing it as tracing does).
pub fn parse_log_level(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("an empty log level: use error, warn, info, debug or trace".into());
    }
    if s.len() > MAX_LOG_FILTER {
        return Err(format!(
            "a log filter of {} characters; at most {MAX_LOG_FILTER}",
            s.len()
        ));
    }
    env_filter(&log_filter(s))
        .map(|_| s.trim().to_string())
        .map_err(|e| {
            format!("{s:?} is not a log level (error, warn, info, debug, trace, or a filter like `info,meshpeer::gossip=debug`): {e}")
        })
}

/// `FIRST-LAST`: a UDP port range of at least two ports (relay
/// allocations).
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

/// A subnet to advertise (`--advertise-route`): an IPv4 CIDR like
/// 192.168.10.0/24 (see [`crate::routes::parse_route`]).
pub fn parse_route(s: &str) -> Result<Ipv4Net, String> {
    crate::routes::parse_route(s)
}

/// A list of routes: each valid, at most [`crate::routes::MAX_ROUTES`];
/// sorted and deduplicated.
pub fn check_routes(routes: &[Ipv4Net]) -> Result<Vec<Ipv4Net>, String> {
    crate::routes::check_routes(routes)
}

/// The hosts file: a path, or `none` (no names written).
pub fn parse_hosts_file(s: &str) -> Result<HostsFile, String> {
    match s.trim() {
        "" => Err("an empty path: give a file, or `none` to write no names".into()),
        "none" | "off" => Ok(HostsFile::Off),
        _ => Ok(HostsFile::Path(PathBuf::from(s))),
    }
}

/// What to do on stop: `stay` or `leave`.
pub fn parse_on_stop(s: &str) -> Result<OnStop, String> {
    s.parse()
}

// ---------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An error at a place in the file (line and column from 1).
    #[error("{}:{line}:{column}: {message}", path.display())]
    At {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
        /// The line of the file the error is on (for a caret display).
        source_line: String,
    },
}

impl ConfigError {
    /// The error with the offending line and a caret under the column,
    /// as compilers print it.
    pub fn pretty(&self) -> String {
        match self {
            ConfigError::At {
                line,
                column,
                source_line,
                ..
            } => {
                let num = line.to_string();
                let pad = " ".repeat(num.len());
                let caret_pad: String = source_line
                    .chars()
                    .take(column.saturating_sub(1))
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                format!("{self}\n{pad} |\n{num} | {source_line}\n{pad} | {caret_pad}^")
            }
            other => other.to_string(),
        }
    }
}

/// Line and column (from 1, columns in characters) of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize, String) {
    let offset = offset.min(text.len());
    let mut start = offset;
    while start > 0 && !text.is_char_boundary(start) {
        start -= 1;
    }
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = text[line_start..start].chars().count() + 1;
    let line_end = text[line_start..]
        .find('\n')
        .map(|i| line_start + i)
        .unwrap_or(text.len());
    let source_line = text[line_start..line_end]
        .trim_end_matches('\r')
        .to_string();
    (line, column, source_line)
}

/// The file as serde sees it: each value with its place.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    state_dir: Option<Spanned<PathBuf>>,
    interface: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    wg_port: Option<Spanned<i64>>,
    gossip_port: Option<Spanned<i64>>,
    probe_port: Option<Spanned<i64>>,
    advertise_addr: Option<Spanned<String>>,
    backend: Option<Spanned<String>>,
    down_grace_secs: Option<Spanned<i64>>,
    join_timeout_secs: Option<Spanned<i64>>,
    tags: Option<Spanned<Vec<Spanned<String>>>>,
    stun_servers: Option<Spanned<Vec<Spanned<String>>>>,
    no_relay: Option<Spanned<bool>>,
    relay_ports: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
    metrics_addr: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    on_stop: Option<Spanned<String>>,
    advertise_routes: Option<Spanned<Vec<Spanned<String>>>>,
    hosts_file: Option<Spanned<String>>,
    ephemeral: Option<Spanned<bool>>,
}

/// A checked list and the place of the whole list.
type SpannedList<U> = (Range<usize>, Vec<U>);

/// Parses the text of config file `path` (named in errors).
pub fn parse(path: &Path, text: &str) -> Result<Options, ConfigError> {
    let at = |span: Range<usize>, message: String| {
        let (line, column, source_line) = line_col(text, span.start);
        ConfigError::At {
            path: path.to_path_buf(),
            line,
            column,
            message,
            source_line,
        }
    };
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let (_, _, line) = line_col(text, span.start);
        at(span, explain_toml(e.message(), &line))
    })?;
    // `key = value` checked by `f`, the error at the value.
    fn check<T, U>(
        v: Option<Spanned<T>>,
        key: &str,
        f: impl Fn(&T) -> Result<U, String>,
        at: &impl Fn(Range<usize>, String) -> ConfigError,
    ) -> Result<Option<U>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) => {
                let span = s.span();
                f(s.get_ref())
                    .map(Some)
                    .map_err(|m| at(span, format!("{key}: {m}")))
            }
        }
    }
    fn each<U>(
        v: Option<Spanned<Vec<Spanned<String>>>>,
        key: &str,
        f: impl Fn(&str) -> Result<U, String>,
        at: &impl Fn(Range<usize>, String) -> ConfigError,
    ) -> Result<Option<SpannedList<U>>, ConfigError> {
        let Some(list) = v else { return Ok(None) };
        let span = list.span();
        let mut out = Vec::new();
        for item in list.into_inner() {
            let s = item.span();
            out.push(f(item.get_ref()).map_err(|m| at(s, format!("{key}: {m}")))?);
        }
        Ok(Some((span, out)))
    }
    let port =
        |v: &i64| u16::try_from(*v).map_err(|_| format!("{v} is not a UDP port (0 to 65535)"));
    let secs = |v: &i64| u64::try_from(*v).map_err(|_| format!("{v}: seconds cannot be negative"));
    let tags = match each(raw.tags, "tags", parse_tag, &at)? {
        None => None,
        Some((span, list)) => Some(check_tags(&list).map_err(|m| at(span, format!("tags: {m}")))?),
    };
    let advertise_routes = match each(raw.advertise_routes, "advertise_routes", parse_route, &at)? {
        None => None,
        Some((span, list)) => {
            Some(check_routes(&list).map_err(|m| at(span, format!("advertise_routes: {m}")))?)
        }
    };
    Ok(Options {
        state_dir: check(
            raw.state_dir,
            "state_dir",
            |p: &PathBuf| {
                if p.as_os_str().is_empty() {
                    Err("an empty path".to_string())
                } else {
                    Ok(p.clone())
                }
            },
            &at,
        )?,
        interface: check(raw.interface, "interface", |s| parse_interface(s), &at)?,
        name: check(raw.name, "name", |s| parse_name(s), &at)?,
        wg_port: check(raw.wg_port, "wg_port", port, &at)?,
        gossip_port: check(raw.gossip_port, "gossip_port", port, &at)?,
        probe_port: check(raw.probe_port, "probe_port", port, &at)?,
        advertise_addr: check(raw.advertise_addr, "advertise_addr", |s| parse_ip(s), &at)?,
        backend: check(raw.backend, "backend", |s| parse_backend(s), &at)?,
        down_grace_secs: check(raw.down_grace_secs, "down_grace_secs", secs, &at)?,
        join_timeout_secs: check(
            raw.join_timeout_secs,
            "join_timeout_secs",
            |v| match secs(v)? {
                0 => Err("0 s: a join needs some time".to_string()),
                v => Ok(v),
            },
            &at,
        )?,
        tags,
        stun_servers: each(raw.stun_servers, "stun_servers", parse_stun_server, &at)?
            .map(|(_, v)| v),
        no_relay: raw.no_relay.map(Spanned::into_inner),
        relay_ports: check(raw.relay_ports, "relay_ports", |s| parse_port_range(s), &at)?,
        token_file: raw.token_file.map(Spanned::into_inner),
        metrics_addr: check(
            raw.metrics_addr,
            "metrics_addr",
            |s| parse_listen_addr(s),
            &at,
        )?,
        log_level: check(raw.log_level, "log_level", |s| parse_log_level(s), &at)?,
        on_stop: check(raw.on_stop, "on_stop", |s| parse_on_stop(s), &at)?,
        advertise_routes,
        hosts_file: check(raw.hosts_file, "hosts_file", |s| parse_hosts_file(s), &at)?,
        ephemeral: raw.ephemeral.map(Spanned::into_inner),
    })
}

/// toml's message, with the list of known keys made readable, a
/// suggestion for a misspelt key, and the key named (from `line`, the line
/// of the file the error is on) when toml does not say it.
fn explain_toml(message: &str, line: &str) -> String {
    let message = message
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or_default();
        let hint = KEYS
            .iter()
            .filter(|k| close(k, key))
            .map(|k| format!(" (did you mean `{k}`?)"))
            .next()
            .unwrap_or_default();
        return format!("unknown key `{key}`{hint}; known keys: {}", KEYS.join(", "));
    }
    let message = message.replace("invalid type: ", "wrong type: ");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| KEYS.contains(k));
    match key {
        Some(k) => format!("{k}: {message}"),
        None => message,
    }
}

/// Whether two keys differ by a little (edit distance at most 2).
fn close(a: &str, b: &str) -> bool {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}

/// Reads and parses config file `path`.
pub fn load(path: &Path) -> Result<Options, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Options, ConfigError> {
        parse(Path::new("c.toml"), text)
    }

    fn err_at(text: &str) -> (usize, usize, String) {
        match p(text) {
            Err(ConfigError::At {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("expected an error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn every_key_parses_typed() {
        let o = p(r#"
state_dir = "/srv/mp"
interface = "wg7"
name = "node01"
wg_port = 5000
gossip_port = 5001
probe_port = 5002
advertise_addr = "203.0.113.10"
backend = "userspace"
down_grace_secs = 30
join_timeout_secs = 10
tags = ["gpu", "compute", "gpu"]
stun_servers = ["stun.example.net", "192.0.2.1:1234"]
no_relay = true
relay_ports = "40000-40100"
token_file = "/etc/meshpeer/token"
metrics_addr = "127.0.0.1:9477"
log_level = "debug"
on_stop = "leave"
advertise_routes = ["192.168.10.0/24", "10.20.0.0/16", "192.168.10.0/24"]
hosts_file = "/srv/hosts"
"#)
        .unwrap();
        assert_eq!(o.state_dir, Some(PathBuf::from("/srv/mp")));
        assert_eq!(o.interface.as_deref(), Some("wg7"));
        assert_eq!(o.name.as_deref(), Some("node01"));
        assert_eq!(
            (o.wg_port, o.gossip_port, o.probe_port),
            (Some(5000), Some(5001), Some(5002))
        );
        assert_eq!(o.advertise_addr, Some("203.0.113.10".parse().unwrap()));
        assert_eq!(o.backend, Some(BackendChoice::Userspace));
        assert_eq!(o.tags, Some(vec!["compute".into(), "gpu".into()]));
        assert_eq!(
            o.stun_servers,
            Some(vec![
                "stun.example.net:3478".into(),
                "192.0.2.1:1234".into()
            ])
        );
        assert_eq!(o.no_relay, Some(true));
        assert_eq!(o.relay_ports, Some((40000, 40100)));
        assert_eq!(o.metrics_addr, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(o.on_stop, Some(OnStop::Leave));
        assert_eq!(
            o.advertise_routes,
            Some(vec![
                "10.20.0.0/16".parse().unwrap(),
                "192.168.10.0/24".parse().unwrap()
            ])
        );
        assert_eq!(o.hosts_file, Some(HostsFile::Path("/srv/hosts".into())));
        let cfg = o.daemon_config(vec![]);
        assert_eq!(cfg.hosts_file, Some(PathBuf::from("/srv/hosts")));
        assert_eq!(cfg.advertise_routes.len(), 2);
        assert_eq!(cfg.down_grace, Duration::from_secs(30));
        assert_eq!(cfg.join_timeout, Duration::from_secs(10));
        assert!(!cfg.relay);
        // Every key of KEYS is known to the parser.
        for k in KEYS {
            if let Err(e) = p(&format!("{k} = []")) {
                assert!(!e.to_string().contains("unknown key"), "{k}: {e}");
            }
        }
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let o = p("# nothing\n").unwrap();
        assert_eq!(o, Options::default());
        let cfg = o.daemon_config(vec![]);
        assert_eq!(cfg.interface, crate::DEFAULT_INTERFACE);
        assert_eq!(cfg.gossip_port, crate::DEFAULT_GOSSIP_PORT);
        assert_eq!(cfg.on_stop, OnStop::Stay);
        assert!(cfg.relay);
        assert_eq!(cfg.metrics_addr, None);
        assert_eq!(cfg.hosts_file, Some(PathBuf::from(DEFAULT_HOSTS_FILE)));
        assert!(cfg.advertise_routes.is_empty());
        let off = p("hosts_file = \"none\"").unwrap().daemon_config(vec![]);
        assert_eq!(off.hosts_file, None);
    }

    #[test]
    fn errors_point_at_line_and_column() {
        // Unknown key, with a suggestion.
        let (l, c, m) = err_at("interface = \"mp0\"\ninterfaces = \"x\"\n");
        assert_eq!((l, c), (2, 1), "{m}");
        assert!(m.contains("unknown key `interfaces`"), "{m}");
        assert!(m.contains("did you mean `interface`"), "{m}");
        // Wrong type.
        let (l, c, m) = err_at("\n\nno_relay = 3\n");
        assert_eq!((l, c), (3, 12), "{m}");
        assert!(
            m.contains("wrong type") || m.contains("expected a boolean"),
            "{m}"
        );
        assert!(m.starts_with("no_relay: wrong type"), "{m}");
        // Port out of range.
        let (l, c, m) = err_at("wg_port = 70000");
        assert_eq!((l, c), (1, 11), "{m}");
        assert_eq!(m, "wg_port: 70000 is not a UDP port (0 to 65535)");
        let (l, _, m) = err_at("gossip_port = -1");
        assert_eq!(l, 1, "{m}");
        assert!(m.contains("not a UDP port"), "{m}");
        let (_, _, m) = err_at("gossip_port = \"51821\"");
        assert!(m.starts_with("gossip_port: wrong type: string"), "{m}");
        let (_, _, m) = err_at("down_grace_secs = -5");
        assert!(m.contains("cannot be negative"), "{m}");
        let (_, _, m) = err_at("join_timeout_secs = 0");
        assert!(m.contains("needs some time"), "{m}");
        // A bad address.
        let (l, c, m) = err_at("# x\nadvertise_addr = \"203.0.113.300\"");
        assert_eq!((l, c), (2, 18), "{m}");
        assert!(
            m.starts_with("advertise_addr:") && m.contains("not an IP address"),
            "{m}"
        );
        let (_, _, m) = err_at("metrics_addr = \"127.0.0.1\"");
        assert!(m.contains("address and port"), "{m}");
        // A bad tag, inside a list: the column of that tag.
        let (l, c, m) = err_at("tags = [\"ok\", \"Bad\"]");
        assert_eq!((l, c), (1, 15), "{m}");
        assert!(m.contains("\"Bad\" is not a tag"), "{m}");
        // Bad enums.
        let (_, _, m) = err_at("backend = \"wireguard-go\"");
        assert!(m.contains("not a backend"), "{m}");
        let (_, _, m) = err_at("on_stop = \"quit\"");
        assert!(m.contains("neither `stay` nor `leave`"), "{m}");
        let (_, _, m) = err_at("log_level = \"info,meshpeer=loudest\"");
        assert!(m.contains("not a log level"), "{m}");
        let (_, _, m) = err_at("interface = \"a/b\"");
        assert!(m.contains("not an interface name"), "{m}");
        let (_, _, m) = err_at("name = \"Node 1\"");
        assert!(m.contains("host name label"), "{m}");
        let (_, _, m) = err_at("relay_ports = \"9000-8000\"");
        assert!(
            m.starts_with("relay_ports:") && m.contains("at least two ports"),
            "{m}"
        );
        let (_, _, m) = err_at("stun_servers = [\"x:y\"]");
        assert!(m.contains("STUN server"), "{m}");
        // A bad route, inside a list: the column of that route.
        let (l, c, m) = err_at("advertise_routes = [\"192.168.1.0/24\", \"192.168.2.1/24\"]");
        assert_eq!((l, c), (1, 39), "{m}");
        assert!(
            m.starts_with("advertise_routes:") && m.contains("did you mean 192.168.2.0/24"),
            "{m}"
        );
        let (_, _, m) = err_at("advertise_routes = [\"fd00::/64\"]");
        assert!(m.contains("IPv6"), "{m}");
        let (_, _, m) = err_at("advertise_routes = \"192.168.1.0/24\"");
        assert!(m.contains("advertise_routes: wrong type"), "{m}");
        let (_, _, m) = err_at("hosts_file = \"\"");
        assert!(m.contains("hosts_file: an empty path"), "{m}");
        // Not TOML at all.
        let (l, _, _) = err_at("a = = b");
        assert_eq!(l, 1);
        // A section is not a key of ours either.
        let (l, _, m) = err_at("[daemon]\nx = 1");
        assert_eq!(l, 1, "{m}");
    }

    #[test]
    fn pretty_shows_the_line_and_a_caret() {
        let e = p("interface = \"mp0\"\nwg_port = 70000\n").unwrap_err();
        let s = e.pretty();
        assert!(s.starts_with("c.toml:2:11: "), "{s}");
        assert!(s.contains("2 | wg_port = 70000"), "{s}");
        assert!(s.ends_with("  |           ^"), "{s:?}");
    }

    #[test]
    fn layers_take_the_first_set_value() {
        let flags = Options {
            interface: Some("flag0".into()),
            ..Default::default()
        };
        let file = p("interface = \"file0\"\nwg_port = 5000\ntags = [\"a\"]").unwrap();
        let o = flags.or(file);
        assert_eq!(o.interface.as_deref(), Some("flag0"));
        assert_eq!(o.wg_port, Some(5000));
        assert_eq!(o.tags, Some(vec!["a".to_string()]));
        // An explicit `false` from above beats the file's `true`.
        let o = Options {
            no_relay: Some(false),
            ..Default::default()
        }
        .or(p("no_relay = true").unwrap());
        assert!(o.daemon_config(vec![]).relay);
    }

    #[test]
    fn log_filters() {
        assert_eq!(
            log_filter("debug"),
            "debug,quinn=warn,chitchat=warn,boringtun=error"
        );
        assert_eq!(log_filter("info,meshpeer=trace"), "info,meshpeer=trace");
        assert!(parse_log_level("info,meshpeer::gossip=debug").is_ok());
        assert!(parse_log_level("").is_err());
        // Span and field filters are refused (regex blow-up, tracing's
        // ordering assert); so is a filter beyond the length cap.
        let e = parse_log_level("info[conn{peer=(a|aa)*b}]=debug").unwrap_err();
        assert!(e.contains("span and field filters"), "{e}");
        assert!(parse_log_level("i,-IIII[O={O={}],-n,-IIII[O={O={}],-ve").is_err());
        assert!(parse_log_level(&"info,".repeat(300)).is_err());
        // Non-ASCII made tracing's parser panic (a byte slice inside a
        // character).
        let e = parse_log_level("info,Ťܐ=debug").unwrap_err();
        assert!(e.contains("cannot appear"), "{e}");
        assert!(parse_log_level("warn,meshpeer::daemon=trace,quinn=error").is_ok());
    }

    /// Mutations of a valid file (bytes flipped, cut, repeated, spliced):
    /// the parser answers Ok or an error at a place inside the text, and
    /// never panics. (Deterministic; a fuzz target can call [`parse`] the
    /// same way.)
    #[test]
    fn mangled_files_never_panic() {
        use rand::{Rng, SeedableRng};
        let base = "state_dir = \"/srv/mp\"\ninterface = \"wg7\"\nwg_port = 5000\ntags = [\"gpu\", \"a.b\"]\nstun_servers = [\"[::1]:3478\"]\nmetrics_addr = \"127.0.0.1:9477\"\nlog_level = \"info,meshpeer=debug\"\non_stop = \"leave\"\nno_relay = true\n";
        let alphabet = b"=[]{}\"'#\n\\ ,.:-_0123456789aZ\xc3\xa9\t";
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..3000 {
            let mut b = base.as_bytes().to_vec();
            for _ in 0..rng.gen_range(1..6) {
                let i = rng.gen_range(0..=b.len());
                match rng.gen_range(0..4) {
                    0 if i < b.len() => b[i] = alphabet[rng.gen_range(0..alphabet.len())],
                    1 => b.insert(i, alphabet[rng.gen_range(0..alphabet.len())]),
                    2 => b.truncate(i),
                    _ => {
                        let j = rng.gen_range(0..=b.len());
                        let (lo, hi) = (i.min(j), i.max(j));
                        let piece = b[lo..hi].to_vec();
                        b.splice(lo..lo, piece);
                    }
                }
            }
            let text = String::from_utf8_lossy(&b);
            if let Err(ConfigError::At { line, column, .. }) = p(&text) {
                assert!(line >= 1 && column >= 1);
                assert!(line <= text.lines().count().max(1) + 1, "{text:?}");
            }
        }
    }

    #[test]
    fn line_col_counts_characters() {
        let t = "é = 1\nab = \"ü\" x";
        let (l, c, s) = line_col(t, t.find('x').unwrap());
        assert_eq!((l, c, s.as_str()), (2, 10, "ab = \"ü\" x"));
        assert_eq!(line_col("", 5).0, 1);
    }
}
