//! `ports ...` and `toggle`.

use super::Global;
use std::process::ExitCode;

/// `usbroute ports`.
#[derive(Debug, clap::Args)]
pub struct PortsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `usbroute toggle [PROFILE]`.
#[derive(Debug, clap::Args)]
pub struct ToggleArgs {
    /// Profile to apply; without it, flip between the two `toggle` profiles.
    pub profile: Option<String>,
}

pub(super) fn ports(_g: &Global, _a: PortsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn toggle(_g: &Global, _a: ToggleArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
