//! `meshpeer export FORMAT`: the running daemon's members for other tools
//! (renderings in `meshpeer::export`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use meshpeer::config::Options;
use meshpeer::export::{self, Format};

use super::status::{fetch, TagFilter};
use super::StateArgs;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// What to print.
    #[arg(value_enum)]
    pub format: Format,
    #[command(flatten)]
    pub tags: TagFilter,
    /// Slots per node: `slots=N` in the MPI hostfile, `CPUs=N` for Slurm
    /// (left out by default: Open MPI counts cores, Slurm asks the node).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: Option<u32>,
    /// Write to FILE (atomically: a temporary file renamed over it) instead
    /// of standard output.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub state: StateArgs,
}

pub async fn export(a: ExportArgs, file: &Options) -> anyhow::Result<()> {
    let status = fetch(&a.state, file).await?;
    let text = export::render(
        a.format,
        &status,
        &a.tags.filter(),
        &export::Options { slots: a.slots },
    );
    match &a.output {
        None => print!("{text}"),
        Some(path) => export::write_atomic(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?,
    }
    Ok(())
}
