//! `attach` and `detach`: directly over QMP (`--qmp`), or through the daemon (`--vm`, or
//! `--qmp` naming a monitor a running daemon manages: QEMU serves one client per monitor,
//! and the daemon would undo a change it did not plan). What a selector means to them is
//! `vm_target.rs`; `usbroute vm` is `vm_devices.rs`.

use super::output::print_json;
use super::vm_target::{attach_target, detach_target, Target};
use super::Global;
use crate::backend::qemu::{Attached, FdPassing, QemuBackend, QemuOptions};
use crate::backend::{AttachKey, AttachMode};
use crate::selector::{Pattern, Selector, Term};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// `usbroute attach SELECTOR`.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// Which device (must match exactly one).
    pub selector: String,
    /// The VM, by its name in the daemon's config: the daemon attaches it and keeps it there
    /// (a manual override) until the device is unplugged or `detach --clear`.
    #[arg(long, value_name = "NAME", conflicts_with = "qmp")]
    pub vm: Option<String>,
    /// The VM's QMP socket (talk to QEMU directly, without a daemon).
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// How QEMU finds the device: address (exact, now), port (follows the port), id (any
    /// such device). Default: with --qmp, address; with --vm, the mode of the rule that
    /// passes the device to that VM, else address.
    #[arg(long, value_enum)]
    pub by: Option<ByArg>,
    /// Hand QEMU the open device node (auto: when QEMU does not run as root; by address only;
    /// --qmp only).
    #[arg(long, value_enum, default_value = "auto")]
    pub fd_passing: FdPassing,
    /// With --qmp: talk to QEMU directly even though a running daemon manages that VM
    /// (without it the daemon does the attach; it may undo a direct one).
    #[arg(long, requires = "qmp")]
    pub force: bool,
    /// Print the attached device as JSON.
    #[arg(long)]
    pub json: bool,
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
    /// The VM's QMP socket (talk to QEMU directly, without a daemon). Without it the
    /// daemon detaches the device and keeps it on the host (a manual override).
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// Through the daemon: drop the manual override (`attach --vm` or `detach`) of the
    /// matching devices, so the rules decide again.
    #[arg(long, conflicts_with = "qmp")]
    pub clear: bool,
    /// With --qmp: talk to QEMU directly even though a running daemon manages that VM
    /// (without it the daemon does the detach; it may undo a direct one).
    #[arg(long, requires = "qmp")]
    pub force: bool,
    /// With --qmp: how long to wait for QEMU to confirm the removal (DEVICE_DELETED), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub timeout: f64,
}

pub(super) fn attach(g: &Global, a: AttachArgs) -> anyhow::Result<ExitCode> {
    let by = a.by.map(AttachMode::from);
    let socket = match (&a.vm, a.qmp.as_deref()) {
        (Some(vm), _) => return super::daemon::attach_through_daemon(g, &a.selector, vm, by),
        (None, Some(socket)) => socket,
        (None, None) => bail!(
            "`attach` needs --vm NAME (the VM's name in the daemon's config; the daemon \
             attaches the device and keeps it there) or --qmp SOCKET (QEMU directly, without \
             a daemon)"
        ),
    };
    if let Some(vm) = managing(g, socket, a.force) {
        let request = crate::daemon::Request::Attach {
            selector: a.selector.clone(),
            vm: vm.clone(),
            by,
        };
        let message = super::daemon::through_daemon(g, &request)?;
        return said_by_daemon(g, socket, &vm, &message, a.json);
    }
    let selector: Selector = a.selector.parse()?;
    let mode = by.unwrap_or(AttachMode::Address);
    let request = attach_target(&crate::inventory::scan(&g.root()), &selector, mode)
        .with_context(|| format!("cannot attach `{selector}` to VM {}", socket.display()))?;
    let options = QemuOptions {
        fd_passing: a.fd_passing,
        root: g.root(),
        ..QemuOptions::default()
    };
    let done = block_on(async {
        let vm = QemuBackend::connect(socket, options).await?;
        match request {
            Target::Device(device) => vm.attach_device(&device, mode).await,
            Target::Absent(request) => vm.attach_request(request).await,
        }
    })?;
    if a.json {
        print_json(&done.device)?;
    } else {
        print_attached(&done, socket);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn detach(g: &Global, a: DetachArgs) -> anyhow::Result<ExitCode> {
    let Some(socket) = a.qmp.as_deref() else {
        return if a.clear {
            super::daemon::clear_through_daemon(g, &a.target)
        } else {
            super::daemon::detach_through_daemon(g, &a.target)
        };
    };
    if let Some(vm) = managing(g, socket, a.force) {
        // The daemon's `detach` takes a selector: one of our device ids names its key.
        let selector = crate::backend::qemu::ids::key_of(&a.target)
            .map_or_else(|| a.target.clone(), |key| key_selector(&key));
        let request = crate::daemon::Request::Detach { selector };
        let message = super::daemon::through_daemon(g, &request)?;
        return said_by_daemon(g, socket, &vm, &message, false);
    }
    let timeout = Duration::try_from_secs_f64(a.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    let options = QemuOptions {
        unplug_timeout: timeout,
        root: g.root(),
        ..QemuOptions::default()
    };
    let id = block_on(async {
        let vm = QemuBackend::connect(socket, options).await?;
        let listed = vm.list_devices().await?;
        let id = detach_target(&listed, &a.target, || crate::inventory::scan(&g.root()))
            .map_err(|e| anyhow::anyhow!("VM {}: {e}", socket.display()))?;
        vm.detach_id(&id).await?;
        anyhow::Ok(id)
    })?;
    println!("detached `{id}` from VM {}", socket.display());
    Ok(ExitCode::SUCCESS)
}

/// The VM under which a running daemon manages the monitor `qmp`, unless `force`: a
/// `--qmp` change then goes through the daemon, which holds that monitor's one connection
/// and would undo a change it did not plan.
fn managing(g: &Global, qmp: &Path, force: bool) -> Option<String> {
    if force {
        return None;
    }
    super::daemon::daemon_managing(g, qmp)
}

/// Say that the daemon did it (it holds the VM's monitor), then the daemon's own words.
fn said_by_daemon(
    g: &Global,
    qmp: &Path,
    vm: &str,
    message: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let daemon = g
        .control_socket()
        .map(|s| s.display().to_string())
        .unwrap_or_else(|_| "its control socket".into());
    if json {
        print_json(&serde_json::json!({
            "through_daemon": daemon,
            "vm": vm,
            "message": message,
        }))?;
    } else {
        println!(
            "the usbroute daemon ({daemon}) manages VM `{vm}` at {} and did this as a manual \
             override (until unplugged or `usbroute detach SELECTOR --clear`; --force talks to \
             QEMU directly): {message}",
            qmp.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The selector naming what our device of `key` was attached for (printed by the
/// selector grammar itself).
fn key_selector(key: &AttachKey) -> String {
    let term = match key {
        AttachKey::Address { bus, address } => Term::Addr {
            bus: *bus,
            address: *address,
        },
        AttachKey::Port(port) => Term::Port(port.clone()),
        AttachKey::Id {
            vendor_id,
            product_id,
        } => Term::Id {
            vendor: Pattern::Exact(vendor_id.0),
            product: Pattern::Exact(product_id.0),
        },
    };
    term.to_string()
}

pub(super) fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded tokio runtime always builds")
        .block_on(f)
}

fn print_attached(done: &Attached, socket: &Path) {
    let vm = socket.display();
    if let Some(controller) = &done.added_controller {
        println!("VM {vm} had no USB controller that fits; added a qemu-xhci `{controller}`");
    }
    let state = if done.device.attached {
        "attached now"
    } else {
        "not attached yet: QEMU attaches it when it appears"
    };
    if done.already_there {
        println!("VM {vm} has `{}` already ({state})", done.device.id);
    } else {
        let how = if done.fd_passed {
            " (passed as an open file)"
        } else {
            ""
        };
        println!(
            "attached `{}` to VM {vm} on bus {}{how}; {state}",
            done.device.id, done.bus
        );
    }
    for note in &done.notes {
        println!("note: {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<crate::cli::Cli, clap::Error> {
        use clap::Parser;
        crate::cli::Cli::try_parse_from(std::iter::once("usbroute").chain(args.iter().copied()))
    }

    #[test]
    fn attach_with_both_vm_and_qmp_is_a_usage_error() {
        let err = parse(&["attach", "port:1-3", "--vm", "win11", "--qmp", "/tmp/q"]).unwrap_err();

        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn attach_with_neither_vm_nor_qmp_says_which_to_give() {
        let cli = parse(&["attach", "port:1-3"]).unwrap();
        let crate::cli::Command::Attach(args) = cli.command else {
            panic!("not an attach")
        };

        let err = attach(&cli.global, args).unwrap_err();

        assert!(
            err.to_string().starts_with("`attach` needs --vm NAME"),
            "{err}"
        );
        assert!(err.to_string().contains("or --qmp SOCKET"), "{err}");
    }

    #[test]
    fn attach_vm_without_by_leaves_the_mode_to_the_rule() {
        let cli = parse(&["attach", "port:1-3", "--vm", "win11"]).unwrap();

        let crate::cli::Command::Attach(args) = cli.command else {
            panic!("not an attach")
        };
        assert!(args.by.is_none());
    }

    #[test]
    fn detach_clear_with_qmp_is_a_usage_error() {
        let err = parse(&["detach", "port:1-3", "--clear", "--qmp", "/tmp/q"]).unwrap_err();

        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn a_device_id_of_ours_becomes_the_selector_the_daemon_detaches_by() {
        let selectors: Vec<String> = [
            "usbroute-addr-3-5",
            "usbroute-port-1-3.4.2",
            "usbroute-id-046d-c016",
        ]
        .map(|id| key_selector(&crate::backend::qemu::ids::key_of(id).unwrap()))
        .to_vec();

        assert_eq!(selectors, ["addr:3.5", "port:1-3.4.2", "id:046d:c016"]);
    }
}
