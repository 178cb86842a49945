//! `meshpeer join SEED`: admit this node with a token and run the daemon.

use std::path::PathBuf;

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
    /// The join token. Prefer --token-file: a token given here (or in
    /// MESHPEER_TOKEN) is handed to a re-executed meshpeer through a pipe, so
    /// it shows in `ps` only for the moment of start-up.
    #[arg(long, env = "MESHPEER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the join token (used when no --token / MESHPEER_TOKEN
    /// is given; config key `token_file`).
    #[arg(long, env = "MESHPEER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long, env = "MESHPEER_NAME", value_parser = meshpeer::config::parse_name)]
    pub name: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Environment variable naming the pipe a re-executed `join` reads its
/// token from.
const TOKEN_FD_ENV: &str = "MESHPEER_TOKEN_FD";

/// A token on the command line or in the environment is visible to others
/// (`ps`, /proc) for as long as the process lives, and `join` runs the
/// daemon: re-execute without it, handing it over through a pipe.
fn scrub_and_reexec(token: &str) -> anyhow::Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!(
            "cannot create a pipe to hand the token over: {}",
            std::io::Error::last_os_error()
        );
    }
    let (rd, wr) = (fds[0], fds[1]);
    // A token is far smaller than a pipe's buffer: the write cannot block.
    // SAFETY: `wr` is the pipe's write end, open; the buffer is valid.
    let n = unsafe { libc::write(wr, token.as_ptr().cast(), token.len()) };
    // SAFETY: closing our copy of the write end, opened just above.
    unsafe { libc::close(wr) };
    if n != token.len() as isize {
        bail!("cannot hand the token over through a pipe");
    }
    let mut args = std::env::args_os();
    let exe = std::env::current_exe().context("cannot find the meshpeer executable")?;
    let argv0 = args.next();
    let mut rest = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--token" {
            skip = true;
            continue;
        }
        if s.starts_with("--token=") {
            continue;
        }
        rest.push(a);
    }
    let mut cmd = std::process::Command::new(exe);
    if let Some(a0) = argv0 {
        cmd.arg0(a0);
    }
    let err = cmd
        .args(rest)
        .env_remove("MESHPEER_TOKEN")
        .env(TOKEN_FD_ENV, rd.to_string())
        .exec();
    Err(anyhow::anyhow!("cannot re-execute meshpeer: {err}"))
}

/// Reads the token a scrubbing parent handed over (see [`scrub_and_reexec`]).
fn token_from_fd() -> anyhow::Result<Option<String>> {
    let Some(v) = std::env::var_os(TOKEN_FD_ENV) else {
        return Ok(None);
    };
    let fd: i32 = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{TOKEN_FD_ENV} is not a file descriptor"))?;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    // SAFETY: the parent opened this descriptor for us and nothing else in
    // this process uses it; the File takes ownership and closes it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    f.read_to_string(&mut text)
        .context("cannot read the token handed over by the parent process")?;
    Ok(Some(text))
}

pub async fn join(
    a: JoinArgs,
    file: &meshpeer::config::Options,
    config_path: Option<PathBuf>,
    log: &'static super::Logging,
) -> anyhow::Result<()> {
    let seed = meshpeer::net::normalize_seed(&a.seed, DEFAULT_GOSSIP_PORT)?;
    // The run options are checked before any state is written.
    let cli_opts = a.run.options()?;
    let merged = cli_opts.clone().or(file.clone());
    let name = a.name.clone().or_else(|| file.name.clone());
    let token_file = a.token_file.clone().or_else(|| file.token_file.clone());
    let text = if let Some(t) = token_from_fd()? {
        t
    } else {
        match (&a.token, &token_file) {
            (Some(t), _) => {
                // Check it first, so a bad token fails here with its reason.
                Token::parse(t).context("invalid join token")?;
                match scrub_and_reexec(t)? {}
            }
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read --token-file {}", f.display()))?,
            (None, None) => {
                bail!("a join token is needed: --token-file FILE (or --token, MESHPEER_TOKEN)")
            }
        }
    };
    let (token, delegation) = Token::parse(&text).context("invalid join token")?;
    let now_secs = meshpeer::clock::unix_secs();
    let path = &merged.state_dir();
    let fresh = !path.join("membership.json").exists();
    if fresh && delegation.expires_at != 0 && now_secs > delegation.expires_at {
        bail!(
            "the token expired at {} (now {}); ask for a new one (`meshpeer invite` on the first node)",
            meshpeer::admission::fmt_unix(delegation.expires_at),
            meshpeer::admission::fmt_unix(now_secs)
        );
    }

    // An existing node of the same network just runs again (idempotent join);
    // one of another network is refused.
    let existing = path.join("membership.json").exists();
    let created = if existing {
        let dir = StateDir::open(path)?;
        let (network, _, _) = meshpeer::daemon::load_network(&dir)?;
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
        let now = meshpeer::clock::unix_secs();
        let admission = token.admit(id.node_key(), now);
        let cidr = ipnet::Ipv4Net::new(delegation.cidr_addr, delegation.cidr_prefix)
            .context("token names an invalid network")?;
        let write = || -> anyhow::Result<()> {
            id.save(&dir)?;
            dir.save_state(&NodeState {
                name: name.clone().unwrap_or_else(super::hostname),
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
                    stamp: None,
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

    let setup = super::DaemonSetup {
        cli: cli_opts,
        config_path,
        seeds: vec![seed.clone()],
    };
    let result = setup.run(merged.daemon_config(vec![seed]), log).await;
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
    for f in StateDir::IDENTITY_FILES {
        let _ = std::fs::remove_file(path.join(f));
    }
    let _ = std::fs::remove_dir(path);
}
