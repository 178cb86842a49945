//! `meshpeer revoke` and `meshpeer tokens`: the network key holder throws
//! members or tokens out for good, and lists what it issued.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use meshpeer::admission::{verify_revocations, RevocationList, Revoked};
use meshpeer::control::{self, Reply, Request};
use meshpeer::proto;
use meshpeer::state::StateDir;

use super::init::{network_secret, Issued};
use super::StateArgs;

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The member to revoke: its name (as `status` shows it) or node id.
    /// (A node id may start with `-`: it is taken as the member, not as a
    /// flag.)
    #[arg(
        required_unless_present = "token",
        conflicts_with = "token",
        allow_hyphen_values = true
    )]
    pub member: Option<String>,
    /// Revoke a token (its id, as `meshpeer tokens` shows it): every member
    /// admitted with it is out, and it admits nobody new.
    #[arg(long, allow_hyphen_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
pub struct TokensArgs {
    #[command(flatten)]
    pub state: StateArgs,
}

use meshpeer::clock::unix_ms as now_ms;

pub async fn revoke(a: RevokeArgs, file: &meshpeer::config::Options) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.resolve(file))?;
    let secret = network_secret(&dir)?;
    let network_key = secret.verifying_key().to_bytes();
    let mut state = dir.load_state()?;
    // The newest list known here (the daemon's, else the stored one).
    let sock = dir.control_socket();
    let status = match control::request(&sock, &Request::Status, Duration::from_secs(5)).await {
        Ok(Reply::Status(s)) => Some(s),
        _ => None,
    };
    let mut entries: Vec<Revoked> = match &state.revoked {
        Some(t) => verify_revocations(t, &network_key)
            .map(|l| l.entries)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let item = if let Some(t) = &a.token {
        let raw = hex::decode(t.trim())
            .ok()
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .with_context(|| {
                format!("--token {t:?} is not a token id (32 hex digits, see `meshpeer tokens`)")
            })?;
        Revoked::Token(raw)
    } else {
        let who = a.member.clone().unwrap_or_default();
        let key = match proto::parse_node_id(&who) {
            Some(k) => k,
            None => {
                let s = status.as_ref().with_context(|| {
                    format!("to revoke {who:?} by name the daemon must run here (`meshpeer up`); or give its node id")
                })?;
                let m =
                    s.members.iter().find(|m| m.name == who).with_context(|| {
                        format!("no member named {who:?} (see `meshpeer status`)")
                    })?;
                proto::parse_node_id(&m.node_id)
                    .with_context(|| format!("member {who:?} has a bad node id"))?
            }
        };
        if status
            .as_ref()
            .is_some_and(|s| s.node_id == proto::node_id_string(&key))
        {
            bail!("{who:?} is this node itself; revoke it from nowhere else than its own mesh is pointless");
        }
        Revoked::Node(key)
    };
    if entries.contains(&item) {
        eprintln!("already revoked");
        return Ok(());
    }
    entries.push(item);
    if entries.len() > meshpeer::admission::MAX_REVOCATIONS {
        bail!(
            "the revocation list is full ({} entries)",
            meshpeer::admission::MAX_REVOCATIONS
        );
    }
    let list = RevocationList {
        network_key,
        issued_at_ms: now_ms().max(
            state
                .revoked
                .as_ref()
                .and_then(|t| verify_revocations(t, &network_key).ok())
                .map_or(0, |l| l.issued_at_ms + 1),
        ),
        entries,
    };
    let text = list.sign(&secret);
    state.revoked = Some(text.clone());
    match control::request(
        &sock,
        &Request::Revoke { list: text },
        Duration::from_secs(10),
    )
    .await
    {
        Ok(Reply::Revoked) => eprintln!("revoked; the list is spreading to every member"),
        Ok(Reply::Error { message }) => bail!("the daemon refused the revocation: {message}"),
        Ok(_) => bail!("unexpected reply from the daemon"),
        Err(control::ControlError::NotRunning(_)) => {
            // Stored: the daemon spreads it when it starts.
            dir.save_state(&state)?;
            eprintln!("revoked; the daemon is not running here, the list spreads when it starts");
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

pub fn tokens(a: TokensArgs, file: &meshpeer::config::Options) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.resolve(file))?;
    let issued: Vec<Issued> = dir.read_json("tokens.json")?.unwrap_or_default();
    let state = dir.load_state()?;
    let (network, _, _) = meshpeer::daemon::load_network(&dir)?;
    let revoked = state
        .revoked
        .as_ref()
        .and_then(|t| verify_revocations(t, &network.key).ok())
        .map(|l| l.entries)
        .unwrap_or_default();
    let now = now_ms() / 1000;
    println!("{:<34} {:<25} {:<25} STATE", "TOKEN", "ISSUED", "EXPIRES");
    for t in &issued {
        let revoked_t = revoked
            .iter()
            .any(|r| matches!(r, Revoked::Token(id) if hex::encode(id) == t.id));
        let state = if revoked_t {
            "revoked"
        } else if t.expires_at != 0 && now > t.expires_at {
            "expired"
        } else {
            "valid"
        };
        println!(
            "{:<34} {:<25} {:<25} {state}{}",
            t.id,
            meshpeer::admission::fmt_unix(t.issued_at),
            if t.expires_at == 0 {
                "never".to_string()
            } else {
                meshpeer::admission::fmt_unix(t.expires_at)
            },
            if t.allow_routes.is_empty() {
                String::new()
            } else {
                format!(" (routes {})", t.allow_routes.join(", "))
            }
        );
    }
    let nodes: Vec<String> = revoked
        .iter()
        .filter_map(|r| match r {
            Revoked::Node(k) => Some(proto::node_id_string(k)),
            Revoked::Token(_) => None,
        })
        .collect();
    if !nodes.is_empty() {
        println!("\nrevoked members:");
        for n in nodes {
            println!("  {n}");
        }
    }
    Ok(())
}
