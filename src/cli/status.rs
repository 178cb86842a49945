//! `meshpeer status` and `meshpeer leave`: clients of the control socket.

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use meshpeer::control::{self, Reply, Request};
use meshpeer::state::StateDir;

use super::StateArgs;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print one JSON object (schema in `meshpeer::status`) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
pub struct LeaveArgs {
    #[command(flatten)]
    pub state: StateArgs,
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.state_dir)?;
    match control::request(
        &dir.control_socket(),
        &Request::Status,
        Duration::from_secs(5),
    )
    .await?
    {
        Reply::Status(s) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.render());
            }
            Ok(())
        }
        Reply::Error { message } => bail!("the daemon says: {message}"),
        Reply::Left | Reply::Revoked => bail!("unexpected reply"),
    }
}

pub async fn leave(a: LeaveArgs) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.state_dir)?;
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
        Reply::Status(_) | Reply::Revoked => bail!("unexpected reply"),
    }
}
