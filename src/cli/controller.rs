//! `controller bind|restore|attach|emit`.

use super::Global;
use std::process::ExitCode;

/// `usbroute controller ...`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// What to do with the controller.
    #[command(subcommand)]
    pub command: ControllerCommand,
}

/// `usbroute controller` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ControllerCommand {
    /// Move the controller's whole IOMMU group to vfio-pci.
    Bind {
        /// PCI address of the controller.
        pci: String,
    },
}

pub(super) fn controller(_g: &Global, _a: ControllerArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
