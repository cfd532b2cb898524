//! `serve`, `status`, `why`, `reload`.

use super::Global;
use std::process::ExitCode;

/// `usbroute serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Log what would be done, do nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `usbroute status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute why SELECTOR`.
#[derive(Debug, clap::Args)]
pub struct WhyArgs {
    /// Which device.
    pub selector: String,
}

/// `usbroute reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {}

pub(super) fn serve(_g: &Global, _a: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn status(_g: &Global, _a: StatusArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn why(_g: &Global, _a: WhyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn reload(_g: &Global, _a: ReloadArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
