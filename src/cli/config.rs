//! The optional config file (`--config FILE` or `MESHPEER_CONFIG`), TOML:
//!
//! ```toml
//! state_dir = "/var/lib/meshpeer"
//! interface = "mp0"
//! wg_port = 51820
//! gossip_port = 51821
//! advertise_addr = "203.0.113.10"
//! backend = "auto"            # kernel | userspace | auto
//! no_relay = false
//! stun_servers = ["stun.example.net:3478"]
//! token_file = "/etc/meshpeer/token"
//! ```
//!
//! Precedence: command-line flag, then environment variable, then this file,
//! then the built-in default. The file is applied by setting the matching
//! `MESHPEER_*` variables that are not already set, before the command line
//! is parsed; an unknown key or a wrong type is an error naming the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Config keys and the environment variable each one feeds.
const KEYS: &[(&str, &str)] = &[
    ("state_dir", "MESHPEER_STATE_DIR"),
    ("interface", "MESHPEER_INTERFACE"),
    ("wg_port", "MESHPEER_WG_PORT"),
    ("gossip_port", "MESHPEER_GOSSIP_PORT"),
    ("advertise_addr", "MESHPEER_ADVERTISE_ADDR"),
    ("backend", "MESHPEER_BACKEND"),
    ("no_relay", "MESHPEER_NO_RELAY"),
    ("stun_servers", "MESHPEER_STUN_SERVERS"),
    ("token_file", "MESHPEER_TOKEN_FILE"),
];

/// Finds `--config FILE` / `--config=FILE` in the arguments, or MESHPEER_CONFIG.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("MESHPEER_CONFIG").map(PathBuf::from)
}

/// Parses the file into `(env var, value)` pairs.
pub fn parse(path: &Path, text: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let Some((_, env)) = KEYS.iter().find(|(k, _)| *k == key) else {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            bail!(
                "config file {}: unknown key {key:?} (known: {})",
                path.display(),
                known.join(", ")
            );
        };
        let text = match (&value, key.as_str()) {
            (toml::Value::String(s), _) => s.clone(),
            (toml::Value::Integer(i), "wg_port" | "gossip_port") => i.to_string(),
            (toml::Value::Boolean(b), "no_relay") => b.to_string(),
            (toml::Value::Array(a), "stun_servers") => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .with_context(|| {
                    format!(
                        "config file {}: stun_servers must be a list of strings",
                        path.display()
                    )
                })?
                .join(","),
            _ => bail!(
                "config file {}: {key} has the wrong type ({})",
                path.display(),
                value.type_str()
            ),
        };
        out.push((*env, text));
    }
    Ok(out)
}

/// Applies the config file, if any, to the environment.
pub fn apply(args: &[OsString]) -> anyhow::Result<()> {
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    for (env, value) in parse(&path, &text)? {
        if std::env::var_os(env).is_none() {
            // SAFETY: called once at start-up from main, before any other
            // thread (the runtime, tracing) exists.
            unsafe { std::env::set_var(env, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_types_and_errors() {
        let p = Path::new("c.toml");
        let v = parse(p, "interface = \"wg7\"\nwg_port = 5000\nno_relay = true\nstun_servers = [\"a:1\", \"b\"]\n").unwrap();
        assert!(v.contains(&("MESHPEER_INTERFACE", "wg7".into())));
        assert!(v.contains(&("MESHPEER_WG_PORT", "5000".into())));
        assert!(v.contains(&("MESHPEER_NO_RELAY", "true".into())));
        assert!(v.contains(&("MESHPEER_STUN_SERVERS", "a:1,b".into())));
        let e = parse(p, "interfaces = \"x\"").unwrap_err().to_string();
        assert!(e.contains("unknown key \"interfaces\""), "{e}");
        let e = parse(p, "wg_port = \"x\"").map(|_| ()).err();
        assert!(
            e.is_none(),
            "strings are passed on; clap then names the bad value"
        );
        let e = parse(p, "no_relay = 3").unwrap_err().to_string();
        assert!(e.contains("no_relay has the wrong type"), "{e}");
        assert!(parse(p, "= =").is_err());
    }

    #[test]
    fn finds_the_flag() {
        let a: Vec<OsString> = ["meshpeer", "up", "--config", "/x.toml"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(config_path(&a), Some(PathBuf::from("/x.toml")));
        let a: Vec<OsString> = ["meshpeer", "up", "--config=/y.toml"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(config_path(&a), Some(PathBuf::from("/y.toml")));
    }
}
