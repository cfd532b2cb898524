//! `list`, `show`, `controllers`, `record-sysfs`.

use super::Global;
use std::path::PathBuf;
use std::process::ExitCode;

/// `usbroute list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print `{"controllers": [...], "devices": [...]}` instead of a tree.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute show SELECTOR`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Which devices (see `usbroute help selectors`).
    pub selector: String,
    /// Print a JSON array of device objects.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute controllers`.
#[derive(Debug, clap::Args)]
pub struct ControllersArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute record-sysfs DIR`.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Where to write the recording (created; must be empty if it exists).
    pub dir: PathBuf,
}

pub(super) fn list(_g: &Global, _a: ListArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn show(_g: &Global, _a: ShowArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn controllers(_g: &Global, _a: ControllersArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn record(_g: &Global, _a: RecordArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
