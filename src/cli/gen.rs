//! `meshpeer completions SHELL` and `meshpeer man`: generated from the clap
//! definition, so they always match the binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write meshpeer.1 and one page per subcommand (meshpeer-status.1,
    /// ...) into DIR instead of printing meshpeer.1.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn completions(a: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "meshpeer", &mut std::io::stdout());
    Ok(())
}

pub fn man(a: ManArgs) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match a.dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            use std::io::Write;
            std::io::stdout().write_all(&out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_man_pages_render() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "meshpeer", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("export") && text.contains("with-tag"),
                "{shell}"
            );
        }
        let mut out = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH meshpeer"), "{text}");
        assert!(text.contains("netcheck"), "{text}");
    }
}
