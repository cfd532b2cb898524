//! `usbroute vm devices` and `usbroute vm qmp` (`vm_qmp.rs`): looking at a VM over its
//! QMP monitor. QEMU serves one client per monitor: when a running daemon holds the VM's,
//! `vm devices` asks the daemon to list it over its connection instead of waiting in
//! QEMU's queue.

use super::output::print_json;
use super::Global;
use crate::backend::qemu::{QemuBackend, QemuOptions};
use crate::backend::HostMatch;
use crate::daemon::protocol::VmDevice;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    /// Every usb-host device the VM has, and whether it is really attached. When a
    /// running daemon holds that VM's monitor, the daemon lists it (QEMU serves one
    /// client per monitor).
    Devices {
        /// The VM's QMP socket.
        #[arg(long, value_name = "SOCKET", required_unless_present = "vm")]
        qmp: Option<PathBuf>,
        /// A VM of the running daemon's config, of any hypervisor (a libvirt domain too):
        /// the daemon lists it over its own connection.
        #[arg(long, value_name = "NAME", conflicts_with = "qmp")]
        vm: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send one raw QMP command and print QEMU's `return` value as JSON (for scripts and
    /// debugging; the daemon does not learn of what it changes).
    Qmp {
        /// The VM's QMP socket (a monitor nobody else holds: QEMU serves one client each).
        #[arg(long, value_name = "SOCKET")]
        qmp: PathBuf,
        /// The QMP command, e.g. `query-status`.
        command: String,
        /// Its arguments, a JSON object, e.g. '{"path": "/machine/peripheral"}'.
        arguments: Option<String>,
        /// Give up after this many seconds (connecting, greeting and reply together).
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        timeout: f64,
        /// Retry while the socket is missing or refuses, until the timeout: wait for QEMU
        /// to be ready to answer.
        #[arg(long)]
        wait: bool,
    },
}

pub(super) fn vm(g: &Global, a: VmArgs) -> anyhow::Result<ExitCode> {
    let (qmp, json) = match a.command {
        VmCommand::Devices { qmp, vm, json } => match (qmp, vm) {
            (_, Some(vm)) => {
                let devices = super::daemon::vm_devices_through_daemon(g, &vm)?;
                return show(&devices, json);
            }
            (Some(qmp), None) => (qmp, json),
            (None, None) => unreachable!("clap requires --qmp or --vm"),
        },
        VmCommand::Qmp {
            qmp,
            command,
            arguments,
            timeout,
            wait,
        } => {
            let deadline = Duration::try_from_secs_f64(timeout)
                .ok()
                .filter(|t| !t.is_zero())
                .context("--timeout must be a positive number of seconds")?;
            let arguments = super::vm_qmp::parse_arguments(arguments.as_deref())?;
            refuse_if_daemon_holds(g, &qmp)?;
            let reply = super::vm::block_on(super::vm_qmp::run_command(
                &qmp, &command, arguments, deadline, wait,
            ))?;
            println!("{reply}");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let devices = list(g, &qmp)?;
    show(&devices, json)
}

fn show(devices: &[VmDevice], json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&devices)?;
    } else {
        print_devices(devices);
    }
    Ok(ExitCode::SUCCESS)
}

/// A raw command does not go through the daemon (it would not learn what the command
/// changed): on a monitor a running daemon holds, say so at once instead of waiting in
/// QEMU's queue until the deadline.
fn refuse_if_daemon_holds(g: &Global, qmp: &Path) -> anyhow::Result<()> {
    let Some(vm) = super::daemon::daemon_vm(g, qmp).filter(|vm| vm.up) else {
        return Ok(());
    };
    anyhow::bail!(
        "the usbroute daemon holds the monitor {} of VM `{}`, and QEMU serves one client per \
         monitor; give usbroute its own monitor: add \
         `-qmp unix:/run/usbroute/{}.qmp,server=on,wait=off` (`-qmp` may be repeated), set \
         the VM's `qmp` to it, and send raw commands to the other one",
        qmp.display(),
        vm.name,
        vm.name
    )
}

/// The VM's devices: through a daemon holding its monitor (said on stderr, so stdout is
/// the same either way), else over QMP directly.
fn list(g: &Global, qmp: &Path) -> anyhow::Result<Vec<VmDevice>> {
    if let Some(vm) = super::daemon::daemon_vm(g, qmp).filter(|vm| vm.up) {
        eprintln!(
            "usbroute: listed by the usbroute daemon, which holds the monitor {} of VM `{}` \
             (QEMU serves one client per monitor)",
            qmp.display(),
            vm.name
        );
        return super::daemon::vm_devices_through_daemon(g, &vm.name);
    }
    let listed = super::vm::block_on(async {
        let vm = QemuBackend::connect(qmp, QemuOptions::default()).await?;
        vm.list_devices().await
    })?;
    Ok(listed.iter().map(VmDevice::from).collect())
}

fn print_devices(devices: &[VmDevice]) {
    if devices.is_empty() {
        println!("no usb-host devices");
        return;
    }
    let width = devices.iter().map(|d| d.id.len()).max().unwrap_or(2).max(2);
    println!("{:width$}  ATTACHED  OURS  MATCH", "ID");
    for d in devices {
        println!(
            "{:width$}  {:8}  {:4}  {}",
            d.id,
            if d.attached { "yes" } else { "no" },
            if d.ours { "yes" } else { "no" },
            describe_match(&d.matcher)
        );
    }
}

fn describe_match(m: &HostMatch) -> String {
    match m {
        HostMatch::Address { bus, address } => format!("bus {bus} addr {address}"),
        HostMatch::Port { bus, port } => format!("port {bus}-{port}"),
        HostMatch::Id {
            vendor_id,
            product_id,
        } => format!("id {vendor_id}:{product_id}"),
        HostMatch::Other {} => "other (hostdevice or no match properties)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<crate::cli::Cli, clap::Error> {
        crate::cli::Cli::try_parse_from(std::iter::once("usbroute").chain(args.iter().copied()))
    }

    #[test]
    fn vm_devices_takes_a_qmp_socket_or_a_vm_name_and_not_both() {
        assert!(parse(&["vm", "devices", "--vm", "lab"]).is_ok());
        assert!(parse(&["vm", "devices", "--qmp", "/run/a.qmp"]).is_ok());

        let neither = parse(&["vm", "devices"]).unwrap_err();
        let both = parse(&["vm", "devices", "--vm", "lab", "--qmp", "/q"]).unwrap_err();

        assert_eq!(neither.kind(), ErrorKind::MissingRequiredArgument);
        assert!(neither.to_string().contains("--qmp"), "{neither}");
        assert_eq!(both.kind(), ErrorKind::ArgumentConflict);
    }
}
