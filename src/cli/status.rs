//! `meshpeer status` and `meshpeer leave`: clients of the control socket.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use meshpeer::config::Options;
use meshpeer::control::{self, Reply, Request};
use meshpeer::export::Filter;
use meshpeer::state::StateDir;
use meshpeer::status::{MemberStatus, Status};

use super::StateArgs;

/// Which members to show (`status`, `export`).
#[derive(Args, Debug, Clone)]
pub struct TagFilter {
    /// Only members carrying this tag (repeatable: every tag given; or
    /// comma-separated in the env var).
    #[arg(
        long = "with-tag",
        env = "MESHPEER_WITH_TAG",
        value_delimiter = ',',
        value_parser = meshpeer::config::parse_tag
    )]
    pub with_tags: Vec<String>,
}

impl TagFilter {
    pub fn filter(&self) -> Filter {
        Filter {
            with_tags: self.with_tags.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print one JSON object (schema in `meshpeer::status`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every second until Ctrl-C (on a terminal); otherwise print
    /// again each time a member's state, path or tags change (with --json:
    /// one object per line).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub tags: TagFilter,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
pub struct LeaveArgs {
    #[command(flatten)]
    pub state: StateArgs,
}

/// The running daemon's status.
pub async fn fetch(state: &StateArgs, file: &Options) -> anyhow::Result<Status> {
    let dir = StateDir::open(&state.resolve(file))?;
    match control::request(
        &dir.control_socket(),
        &Request::Status,
        Duration::from_secs(5),
    )
    .await?
    {
        Reply::Status(s) => Ok(*s),
        Reply::Error { message } => bail!("the daemon says: {message}"),
        _ => bail!("unexpected reply from the daemon"),
    }
}

/// What `--watch` compares when stdout is not a terminal: who is there and
/// how each is reached, without the counters that move every second.
fn shape(s: &Status) -> Vec<String> {
    s.members
        .iter()
        .map(|m: &MemberStatus| {
            format!(
                "{} {} {} {:?} {:?} {:?} {:?} {:?}",
                m.name,
                m.overlay_ip,
                m.state.as_str(),
                m.path,
                m.relay,
                m.endpoint,
                m.tags,
                m.conflict
            )
        })
        .collect()
}

fn show(s: &Status, json: bool, compact: bool) -> anyhow::Result<String> {
    Ok(if json {
        if compact {
            serde_json::to_string(s)? + "\n"
        } else {
            serde_json::to_string_pretty(s)? + "\n"
        }
    } else {
        s.render()
    })
}

pub async fn status(a: StatusArgs, file: &Options) -> anyhow::Result<()> {
    let filter = a.tags.filter();
    if !a.watch {
        let s = filter.apply(&fetch(&a.state, file).await?);
        print!("{}", show(&s, a.json, false)?);
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tick.tick() => {}
        }
        let s = filter.apply(&fetch(&a.state, file).await?);
        let mut out = std::io::stdout().lock();
        if tty {
            // Home, the new text, then clear what is left of the old one:
            // no blank flash between two frames.
            let text = show(&s, a.json, false)?;
            let mut frame = String::from("\x1b[H");
            for line in text.lines() {
                frame.push_str(line);
                frame.push_str("\x1b[K\n");
            }
            frame.push_str("\x1b[K\nevery 1s, Ctrl-C to stop\x1b[K\n\x1b[J");
            if last.is_none() {
                frame.insert_str(0, "\x1b[2J");
            }
            out.write_all(frame.as_bytes())?;
            last = Some(Vec::new());
        } else {
            let now = shape(&s);
            if last.as_ref() != Some(&now) {
                out.write_all(show(&s, a.json, true)?.as_bytes())?;
                if !a.json {
                    out.write_all(b"\n")?;
                }
                last = Some(now);
            }
        }
        out.flush()?;
    }
}

pub async fn leave(a: LeaveArgs, file: &Options) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.resolve(file))?;
    match control::request(
        &dir.control_socket(),
        &Request::Leave,
        Duration::from_secs(30),
    )
    .await?
    {
        Reply::Left => {
            eprintln!("left the mesh; members drop this node now");
            Ok(())
        }
        Reply::Error { message } => bail!("the daemon says: {message}"),
        _ => bail!("unexpected reply from the daemon"),
    }
}
