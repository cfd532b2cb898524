//! Shell completions and the man page.

use super::Cli;
use clap::CommandFactory;
use std::process::ExitCode;

/// `usbroute completions SHELL`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// `usbroute man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {}

pub(super) fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "usbroute", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub(super) fn man(_args: ManArgs) -> anyhow::Result<ExitCode> {
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}
