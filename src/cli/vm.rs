//! `attach`, `detach`, `vm devices`: directly over QMP (`--qmp`), or through the daemon (`--vm`).

use super::Global;
use crate::backend::AttachMode;
use std::path::PathBuf;
use std::process::ExitCode;

/// `usbroute attach SELECTOR`.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// Which device (must match exactly one).
    pub selector: String,
    /// The VM's QMP socket (talk to QEMU directly, without a daemon).
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// How QEMU finds the device: address (exact, now), port (follows the port), id (any such device).
    #[arg(long, value_enum, default_value = "address")]
    pub by: ByArg,
}

/// `--by` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ByArg {
    /// hostbus + hostaddr.
    Address,
    /// hostbus + hostport.
    Port,
    /// vendorid + productid.
    Id,
}

impl From<ByArg> for AttachMode {
    fn from(b: ByArg) -> Self {
        match b {
            ByArg::Address => AttachMode::Address,
            ByArg::Port => AttachMode::Port,
            ByArg::Id => AttachMode::Id,
        }
    }
}

/// `usbroute detach SELECTOR|QEMU-ID`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// A selector, or the QEMU device id shown by `vm devices`.
    pub target: String,
    /// The VM's QMP socket.
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
}

/// `usbroute vm ...`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// What to look at.
    #[command(subcommand)]
    pub command: VmCommand,
}

/// `usbroute vm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Every usb-host device the VM has, and whether it is really attached.
    Devices {
        /// The VM's QMP socket.
        #[arg(long, value_name = "SOCKET")]
        qmp: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn attach(_g: &Global, _a: AttachArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn detach(_g: &Global, _a: DetachArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(super) fn vm(_g: &Global, _a: VmArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
