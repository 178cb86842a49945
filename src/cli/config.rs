//! `meshpeer config check [FILE]`: parses a config file as the daemon would
//! and points at the line and column of the first error. The parser is
//! `meshpeer::config`.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a config file: unknown keys, wrong types and bad values are
    /// reported with their line and column.
    Check {
        /// The file (default: --config / MESHPEER_CONFIG).
        file: Option<PathBuf>,
    },
}

pub fn run(cmd: ConfigCommand, global: Option<&Path>) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Check { file } => {
            let Some(path) = file.as_deref().or(global) else {
                bail!("which file? `meshpeer config check FILE` (or --config FILE)");
            };
            match meshpeer::config::load(path) {
                Ok(o) => {
                    let set = meshpeer::config::KEYS
                        .iter()
                        .filter(|k| is_set(&o, k))
                        .count();
                    println!("{}: ok ({set} keys set)", path.display());
                    Ok(())
                }
                // The location and the line itself, then a non-zero exit.
                Err(e) => bail!("{}", e.pretty()),
            }
        }
    }
}

fn is_set(o: &meshpeer::config::Options, key: &str) -> bool {
    match key {
        "state_dir" => o.state_dir.is_some(),
        "interface" => o.interface.is_some(),
        "name" => o.name.is_some(),
        "wg_port" => o.wg_port.is_some(),
        "gossip_port" => o.gossip_port.is_some(),
        "probe_port" => o.probe_port.is_some(),
        "advertise_addr" => o.advertise_addr.is_some(),
        "backend" => o.backend.is_some(),
        "down_grace_secs" => o.down_grace_secs.is_some(),
        "join_timeout_secs" => o.join_timeout_secs.is_some(),
        "tags" => o.tags.is_some(),
        "stun_servers" => o.stun_servers.is_some(),
        "no_relay" => o.no_relay.is_some(),
        "relay_ports" => o.relay_ports.is_some(),
        "token_file" => o.token_file.is_some(),
        "metrics_addr" => o.metrics_addr.is_some(),
        "log_level" => o.log_level.is_some(),
        "on_stop" => o.on_stop.is_some(),
        "advertise_routes" => o.advertise_routes.is_some(),
        "hosts_file" => o.hosts_file.is_some(),
        "ephemeral" => o.ephemeral.is_some(),
        _ => false,
    }
}
