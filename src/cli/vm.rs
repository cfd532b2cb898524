//! `attach`, `detach`, `vm devices`, `vm qmp`: directly over QMP (`--qmp`), or through the daemon (`--vm`).

use super::output::print_json;
use super::Global;
use crate::backend::qemu::ids::{self, usbroute_device_id};
use crate::backend::qemu::{AttachRequest, Attached, FdPassing, QemuBackend, QemuOptions};
use crate::backend::{AttachKey, AttachMode, HostMatch, VmUsbDevice};
use crate::inventory::{Device, HexId, Snapshot};
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
    /// With --qmp: go ahead even though a running daemon manages that VM (it may undo this).
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
    /// With --qmp: go ahead even though a running daemon manages that VM (it may undo this).
    #[arg(long, requires = "qmp")]
    pub force: bool,
    /// With --qmp: how long to wait for QEMU to confirm the removal (DEVICE_DELETED), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub timeout: f64,
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
    refuse_if_managed(g, socket, a.force, &format!("attach {} --vm", a.selector))?;
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
    refuse_if_managed(g, socket, a.force, &format!("detach {}", a.target))?;
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

pub(super) fn vm(_g: &Global, a: VmArgs) -> anyhow::Result<ExitCode> {
    let (qmp, json) = match a.command {
        VmCommand::Devices { qmp, json } => (qmp, json),
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
            let reply = block_on(super::vm_qmp::run_command(
                &qmp, &command, arguments, deadline, wait,
            ))?;
            println!("{reply}");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let devices = block_on(async {
        let vm = QemuBackend::connect(&qmp, QemuOptions::default()).await?;
        vm.list_devices().await
    })?;
    if json {
        print_json(&devices)?;
    } else {
        print_devices(&devices);
    }
    Ok(ExitCode::SUCCESS)
}

/// A `--qmp` command on a VM that a running daemon manages would fight the daemon (its
/// reconcile loop undoes what it did not plan): refuse, naming the daemon, the VM and the
/// daemon command that does the same, unless `--force`. `instead` is that command without
/// the VM name, e.g. `attach port:1-3 --vm`.
fn refuse_if_managed(g: &Global, qmp: &Path, force: bool, instead: &str) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    let Some(vm) = super::daemon::daemon_managing(g, qmp) else {
        return Ok(());
    };
    let daemon = g
        .control_socket()
        .map(|s| s.display().to_string())
        .unwrap_or_else(|_| "its control socket".into());
    let instead = if instead.ends_with("--vm") {
        format!("{instead} {vm}")
    } else {
        instead.to_string()
    };
    bail!(
        "the usbroute daemon ({daemon}) manages VM `{vm}` at {}; a direct change would be \
         undone by it. Use `usbroute {instead}` to go through the daemon, or add --force to \
         talk to QEMU anyway",
        qmp.display()
    )
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded tokio runtime always builds")
        .block_on(f)
}

/// What an attach goes for.
#[derive(Debug)]
pub(super) enum Target {
    /// A device on this host.
    Device(Box<Device>),
    /// Nothing on the host now, but the selector pins a port or ids for QEMU to wait for.
    Absent(AttachRequest),
}

/// The one device `selector` names, or (by port or id) what to wait for when it is absent.
pub(super) fn attach_target(
    snapshot: &Snapshot,
    selector: &Selector,
    mode: AttachMode,
) -> anyhow::Result<Target> {
    let found: Vec<&Device> = snapshot
        .devices
        .iter()
        .filter(|d| selector.matches(d))
        .collect();
    match found.as_slice() {
        [one] => Ok(Target::Device(Box::new((*one).clone()))),
        [] => match pinned_key(selector, mode) {
            Some(key) => Ok(Target::Absent(AttachRequest {
                key,
                speed: None,
                what: format!(
                    "`{selector}` (not on this host now; QEMU attaches it when it appears)"
                ),
            })),
            None if mode == AttachMode::Address => bail!(
                "{} is not on this host; use --by port (with port:BUS-PORT) or --by id (with \
                 id:VVVV:PPPP) to attach it when it appears, or `usbroute list` to see what is here",
                absent_name(selector)
            ),
            None => bail!(
                "no device on this host matches `{selector}`; to attach one that is not plugged \
                 in yet, name it exactly: --by port needs port:BUS-PORT, --by id needs \
                 id:VVVV:PPPP (no wildcards)"
            ),
        },
        many => bail!(
            "`{selector}` matches {} devices; attach one at a time, for example by port:\n{}",
            many.len(),
            candidates(many)
        ),
    }
}

/// How an error names what a selector meant: `device at bus 1 addr 2`, else the selector.
fn absent_name(selector: &Selector) -> String {
    match selector.terms.as_slice() {
        [Term::Addr { bus, address }] => format!("device at bus {bus} addr {address}"),
        [Term::Port(port)] => format!("device at port {port}"),
        _ => format!("a device matching `{selector}`"),
    }
}

/// The key an absent device would get: the selector's exact port (by port) or exact ids
/// (by id).
fn pinned_key(selector: &Selector, mode: AttachMode) -> Option<AttachKey> {
    selector.terms.iter().find_map(|term| match (mode, term) {
        (AttachMode::Port, Term::Port(port)) => Some(AttachKey::Port(port.clone())),
        (
            AttachMode::Id,
            Term::Id {
                vendor: Pattern::Exact(v),
                product: Pattern::Exact(p),
            },
        ) => Some(AttachKey::Id {
            vendor_id: HexId(*v),
            product_id: HexId(*p),
        }),
        _ => None,
    })
}

fn candidates(devices: &[&Device]) -> String {
    devices
        .iter()
        .map(|d| format!("  port:{}  {}", d.port, QemuBackend::describe(d)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The VM device id `target` means: an id the VM has, else the usbroute device of the
/// host device(s) a selector names.
fn detach_target(
    listed: &[VmUsbDevice],
    target: &str,
    scan: impl FnOnce() -> Snapshot,
) -> Result<String, String> {
    if listed.iter().any(|d| d.id == target) {
        return Ok(target.to_string());
    }
    let selector: Selector = target.parse().map_err(|e| {
        format!("`{target}` is neither a device id of this VM nor a selector ({e}); `usbroute vm devices --qmp SOCKET` lists the ids")
    })?;
    let snapshot = scan();
    let mut wanted: Vec<String> = Vec::new();
    for device in snapshot.devices.iter().filter(|d| selector.matches(d)) {
        for mode in [AttachMode::Address, AttachMode::Port, AttachMode::Id] {
            wanted.extend(usbroute_device_id(mode, device));
        }
    }
    for mode in [AttachMode::Port, AttachMode::Id] {
        wanted.extend(pinned_key(&selector, mode).map(|k| ids::device_id(&k)));
    }
    let hits: Vec<&VmUsbDevice> = listed.iter().filter(|d| wanted.contains(&d.id)).collect();
    match hits.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(format!(
            "has no device usbroute attached for `{selector}`; `usbroute vm devices --qmp SOCKET` lists what it has (detach by id)"
        )),
        many => Err(format!(
            "`{selector}` means {} of its devices; detach one by id: {}",
            many.len(),
            many.iter().map(|d| d.id.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
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

fn print_devices(devices: &[VmUsbDevice]) {
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
            if d.is_ours() { "yes" } else { "no" },
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
    use super::*;
    use crate::inventory::{PortPath, Speed};

    fn device(port: &str, address: u16, vendor: u16, product: u16) -> Device {
        let port: PortPath = port.parse().unwrap();
        Device {
            address: Some(address),
            vendor_id: Some(HexId(vendor)),
            product_id: Some(HexId(product)),
            speed_mbps: Some(Speed(12.0)),
            ..Device::at(port)
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            devices: vec![
                device("1-3", 5, 0x046d, 0xc016),
                device("1-4", 6, 0x046d, 0xc016),
                device("2-1", 2, 0x0781, 0x5581),
            ],
            ..Snapshot::default()
        }
    }

    fn vm_device(id: &str) -> VmUsbDevice {
        VmUsbDevice {
            id: id.into(),
            attached: true,
            key: ids::key_of(id),
            matcher: HostMatch::Other {},
        }
    }

    #[test]
    fn attach_target_with_two_matches_lists_both_candidates() {
        let selector: Selector = "id:046d:c016".parse().unwrap();

        let err = attach_target(&snapshot(), &selector, AttachMode::Id).unwrap_err();

        let text = err.to_string();
        assert!(text.contains("matches 2 devices"), "{text}");
        assert!(text.contains("port:1-3 "), "{text}");
        assert!(text.contains("port:1-4 "), "{text}");
    }

    #[test]
    fn attach_target_absent_address_says_use_port_or_id() {
        let selector: Selector = "addr:1.2".parse().unwrap();

        let err = attach_target(&snapshot(), &selector, AttachMode::Address).unwrap_err();

        assert!(
            err.to_string()
                .starts_with("device at bus 1 addr 2 is not on this host; use --by port"),
            "{err}"
        );
    }

    #[test]
    fn attach_target_absent_exact_port_waits_for_it() {
        let selector: Selector = "port:3-2.1".parse().unwrap();

        let target = attach_target(&snapshot(), &selector, AttachMode::Port).unwrap();

        let Target::Absent(request) = target else {
            panic!("expected an absent target")
        };
        assert_eq!(request.key, AttachKey::Port("3-2.1".parse().unwrap()));
        assert_eq!(request.speed, None);
    }

    #[test]
    fn attach_target_absent_wildcard_id_is_refused() {
        let selector: Selector = "id:1234:*".parse().unwrap();

        let err = attach_target(&snapshot(), &selector, AttachMode::Id).unwrap_err();

        assert!(err.to_string().contains("no wildcards"), "{err}");
    }

    #[test]
    fn detach_target_by_selector_finds_our_device_of_any_mode() {
        let listed = [vm_device("hostdev0"), vm_device("usbroute-port-2-1")];

        let id = detach_target(&listed, "id:0781:5581", snapshot);

        assert_eq!(id.as_deref(), Ok("usbroute-port-2-1"));
    }

    #[test]
    fn detach_target_ambiguous_selector_lists_the_ids() {
        let listed = [
            vm_device("usbroute-addr-1-5"),
            vm_device("usbroute-addr-1-6"),
        ];

        let err = detach_target(&listed, "id:046d:c016", snapshot).unwrap_err();

        assert!(
            err.contains("usbroute-addr-1-5, usbroute-addr-1-6"),
            "{err}"
        );
    }

    #[test]
    fn detach_target_exact_id_wins_over_selector_reading() {
        let listed = [vm_device("usbroute-id-046d-c016")];

        let id = detach_target(&listed, "usbroute-id-046d-c016", Snapshot::default);

        assert_eq!(id.as_deref(), Ok("usbroute-id-046d-c016"));
    }

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
}
