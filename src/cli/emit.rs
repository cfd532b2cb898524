//! `usbroute emit SELECTOR --for qemu`: the static form of an attach, for people who
//! start VMs themselves. Prints the arguments that give a VM at start-up exactly the
//! device `usbroute attach` and the daemon would attach (same id, same match properties),
//! so either finds it there as its own. `usbroute controller emit` is the same for whole
//! controllers.
//!
//! QEMU serves one client per QMP monitor, so it also names the monitor usbroute should
//! have to itself (`-qmp` may be repeated): with `--vm NAME`, the socket the config gives
//! that VM (else `/run/usbroute/NAME.qmp`) as an argument; without, as a comment.

use super::output::print_json;
use super::vm::ByArg;
use super::vm_target::{attach_target, Target};
use super::Global;
use crate::backend::qemu::controllers::ADDED_CONTROLLER_ID;
use crate::backend::qemu::usb_host;
use crate::backend::AttachMode;
use crate::inventory::Snapshot;
use crate::selector::Selector;
use anyhow::{anyhow, Context};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `usbroute emit SELECTOR --for HYPERVISOR`.
#[derive(Debug, clap::Args)]
pub struct EmitArgs {
    /// Which device (must match exactly one; by port or id it may be absent, named exactly).
    pub selector: String,
    /// Whose configuration to print.
    #[arg(long = "for", value_enum, value_name = "HYPERVISOR")]
    pub hypervisor: Hypervisor,
    /// How the VM finds the device: address (exactly this plug), port (whatever is plugged
    /// there, across re-plug), id (any such device). As for `attach`.
    #[arg(long, value_enum, default_value = "address")]
    pub by: ByArg,
    /// The VM's name: also print the `-qmp` monitor usbroute uses for it (the config's
    /// `qmp`, else /run/usbroute/NAME.qmp), beside the user's own monitor.
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The hypervisors `emit` writes for; Xen (`xl`) and libvirt add theirs beside QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// `qemu-system-*` command-line arguments (`-device usb-host,...`).
    Qemu,
    /// A libvirt `<hostdev>` element (`virsh attach-device --config`); by address or id.
    Libvirt,
    /// xl.cfg lines for a Xen domain (`usbctrl=`, `usbdev=`; `emit_xl.rs`).
    Xl,
}

/// What `emit --for qemu` prints (`--json`: field names are stable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmittedUsbHost {
    /// `qemu`.
    #[serde(rename = "for")]
    pub hypervisor: Hypervisor,
    /// The attach mode: `address`, `port` or `id`.
    pub by: AttachMode,
    /// The device id; the one `attach` and the daemon give it.
    pub id: String,
    /// The device as messages name it.
    pub what: String,
    /// `false` when the device is not on this host now (by port or id, named exactly).
    pub present: bool,
    /// The VM bus the device goes on: that of the `qemu-xhci` the arguments add.
    pub bus: String,
    /// The arguments, as separate argv words: `-device qemu-xhci,...`, `-device usb-host,...`.
    pub qemu_args: Vec<String>,
    /// With `--vm`: usbroute's own QMP monitor for that VM, as argv words (`-qmp`,
    /// `unix:SOCKET,server=on,wait=off`); empty without `--vm`.
    pub monitor_args: Vec<String>,
}

/// Where usbroute talks to a VM it is not told of: the socket `emit` suggests.
fn suggested_socket(vm: &str) -> PathBuf {
    PathBuf::from(format!("/run/usbroute/{vm}.qmp"))
}

/// `-qmp` and its value for a monitor at `socket`.
fn monitor_args(socket: &Path) -> Vec<String> {
    vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", socket.display()),
    ]
}

/// The QMP socket usbroute uses for VM `vm`: the config's `qmp` for it, else the
/// suggested one.
fn vm_socket(g: &Global, vm: &str) -> anyhow::Result<PathBuf> {
    let config = g.config_file()?;
    let Some(path) = config.path() else {
        return Ok(suggested_socket(vm));
    };
    let config = crate::config::Config::load(path)?;
    Ok(config
        .vm(vm)
        .and_then(|v| v.qmp())
        .map_or_else(|| suggested_socket(vm), Path::to_path_buf))
}

pub(super) fn emit(g: &Global, a: EmitArgs) -> anyhow::Result<ExitCode> {
    let selector: Selector = a.selector.parse()?;
    let snapshot = crate::inventory::scan(&g.root());
    let no_monitor = match a.hypervisor {
        Hypervisor::Qemu => None,
        Hypervisor::Libvirt => Some(("libvirt", "libvirt keeps its domains' monitors to itself")),
        Hypervisor::Xl => Some(("xl", "xl has none")),
    };
    if let (Some((name, why)), Some(_)) = (no_monitor, &a.vm) {
        anyhow::bail!(
            "--vm names usbroute's own QMP monitor of a QEMU VM; {why}, so drop --vm with --for {name}"
        );
    }
    // One arm per hypervisor.
    let mut emitted = match a.hypervisor {
        Hypervisor::Qemu => emit_qemu(&snapshot, &selector, a.by.into())
            .with_context(|| format!("cannot emit `{selector}` for QEMU"))?,
        Hypervisor::Libvirt => {
            super::emit_libvirt::emit(&snapshot, &selector, a.by.into(), a.json)
                .with_context(|| format!("cannot emit `{selector}` for libvirt"))?;
            return Ok(ExitCode::SUCCESS);
        }
        Hypervisor::Xl => {
            super::emit_xl::emit_xl(&snapshot, &selector, a.by.into())
                .with_context(|| format!("cannot emit `{selector}` for xl"))?
                .print(a.json)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    if let Some(vm) = &a.vm {
        emitted.monitor_args = monitor_args(&vm_socket(g, vm)?);
    }
    if a.json {
        print_json(&emitted)?;
    } else {
        print!("{}", emitted.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The QEMU arguments for the one device `selector` names, attached by `mode`. Finds it
/// as `attach` does (same errors for none or several) and keys it as the QEMU backend
/// does ([`usb_host`]); the bus is a `qemu-xhci`'s, the bus the daemon chooses first
/// because it takes every speed.
fn emit_qemu(
    snapshot: &Snapshot,
    selector: &Selector,
    mode: AttachMode,
) -> anyhow::Result<EmittedUsbHost> {
    let (request, present) = match attach_target(snapshot, selector, mode)? {
        Target::Device(device) => (
            usb_host::request_for(&device, mode).map_err(|e| anyhow!(e))?,
            true,
        ),
        Target::Absent(request) => (request, false),
    };
    let bus = format!("{ADDED_CONTROLLER_ID}.0");
    let key = request.key;
    Ok(EmittedUsbHost {
        hypervisor: Hypervisor::Qemu,
        by: mode,
        id: crate::backend::qemu::ids::device_id(&key),
        what: request.what,
        present,
        qemu_args: vec![
            "-device".into(),
            format!("qemu-xhci,id={ADDED_CONTROLLER_ID}"),
            "-device".into(),
            usb_host::device_option(&key, &bus),
        ],
        monitor_args: Vec::new(),
        bus,
    })
}

impl EmittedUsbHost {
    /// The arguments with comment lines saying what they do and what to change.
    pub fn to_text(&self) -> String {
        let how = match self.by {
            AttachMode::Address => {
                "By address: exactly this plug (re-plugged, it gets an address QEMU does not follow)."
            }
            AttachMode::Port => "By port: whatever is plugged in there, also after a re-plug.",
            AttachMode::Id => "By id: any device of this kind QEMU finds on the host.",
        };
        let mut out = format!(
            "# QEMU: {}\n\
             # {how}\n\
             # Id `{}`, as `usbroute attach` and the daemon give it: both find it there as\n\
             # theirs. QEMU opens the device node itself, so its user needs read-write access\n\
             # to /dev/bus/usb. On a qemu-xhci bus (it takes every speed): add that controller\n\
             # once per VM, or drop its line and set bus= to the VM's own xHCI bus.\n",
            self.what, self.id
        );
        out.push_str(
            "# QEMU serves one client per QMP monitor: give usbroute (the daemon, attach --qmp)\n\
             # a monitor of its own beside yours (-qmp may be repeated)",
        );
        if self.monitor_args.is_empty() {
            out.push_str(&format!(
                ":\n#   {}\n",
                monitor_args(&suggested_socket("NAME")).join(" ")
            ));
        } else {
            out.push_str(", as the last line does.\n");
        }
        let words = self.qemu_args.iter().chain(&self.monitor_args);
        let words: Vec<&String> = words.collect();
        let lines: Vec<String> = words
            .chunks(2)
            .map(|p| p.iter().map(|w| w.as_str()).collect::<Vec<_>>().join(" "))
            .collect();
        out.push_str(&lines.join(" \\\n"));
        out.push('\n');
        out
    }
}

/// The recorded test-bed guest (tests/fixtures/README.md) every `emit --for` is tested
/// on: 1-2.1 is a mouse at address 5, 0627:0001 (as are five more devices); 1-2 a hub.
#[cfg(test)]
pub(super) fn recorded_guest() -> Snapshot {
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/guest-xhci-ehci"
    );
    crate::inventory::scan(&crate::sysfs::SysfsRoot::new(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> Snapshot {
        recorded_guest()
    }

    fn emitted(selector: &str, mode: AttachMode) -> anyhow::Result<EmittedUsbHost> {
        emit_qemu(&guest(), &selector.parse().unwrap(), mode)
    }

    fn device_arg(e: &EmittedUsbHost) -> &str {
        &e.qemu_args[3]
    }

    #[test]
    fn emit_by_address_keys_on_bus_and_address() {
        let e = emitted("port:1-2.1", AttachMode::Address).unwrap();

        assert_eq!(
            device_arg(&e),
            "usb-host,id=usbroute-addr-1-5,bus=usbroute-xhci.0,hostbus=1,hostaddr=5"
        );
    }

    #[test]
    fn emit_by_port_keys_on_bus_and_port_chain() {
        let e = emitted("port:1-2.1", AttachMode::Port).unwrap();

        assert_eq!(
            device_arg(&e),
            "usb-host,id=usbroute-port-1-2.1,bus=usbroute-xhci.0,hostbus=1,hostport=2.1"
        );
    }

    #[test]
    fn emit_by_id_keys_on_hex_vendor_and_product() {
        let e = emitted("port:1-2.1", AttachMode::Id).unwrap();

        assert_eq!(
            device_arg(&e),
            "usb-host,id=usbroute-id-0627-0001,bus=usbroute-xhci.0,vendorid=0x0627,productid=0x0001"
        );
    }

    #[test]
    fn emit_id_is_the_one_attach_gives_the_device() {
        let snapshot = guest();
        let mouse = snapshot
            .devices
            .iter()
            .find(|d| d.port.to_string() == "1-2.1")
            .unwrap();

        let ids: Vec<String> = [AttachMode::Address, AttachMode::Port, AttachMode::Id]
            .map(|mode| emitted("port:1-2.1", mode).unwrap().id)
            .to_vec();

        let attach_ids: Vec<String> = [AttachMode::Address, AttachMode::Port, AttachMode::Id]
            .map(|mode| crate::backend::qemu::ids::usbroute_device_id(mode, mouse).unwrap())
            .to_vec();
        assert_eq!(ids, attach_ids);
    }

    #[test]
    fn emit_adds_the_xhci_whose_bus_the_device_names() {
        let e = emitted("port:1-2.1", AttachMode::Port).unwrap();

        assert_eq!(
            &e.qemu_args[..3],
            ["-device", "qemu-xhci,id=usbroute-xhci", "-device"]
        );
        assert_eq!(e.bus, "usbroute-xhci.0");
    }

    #[test]
    fn emit_for_several_devices_lists_them_as_attach_does() {
        let err = emitted("id:0627:0001", AttachMode::Id).unwrap_err();

        assert!(err.to_string().contains("matches 6 devices"), "{err}");
        assert!(err.to_string().contains("port:1-2.1 "), "{err}");
    }

    #[test]
    fn emit_for_an_absent_address_says_use_port_or_id() {
        let err = emitted("addr:1.99", AttachMode::Address).unwrap_err();

        assert!(
            err.to_string()
                .contains("is not on this host; use --by port"),
            "{err}"
        );
    }

    #[test]
    fn emit_for_an_absent_exact_port_is_the_wait_for_it_form() {
        let e = emitted("port:3-4", AttachMode::Port).unwrap();

        assert_eq!((e.present, e.id.as_str()), (false, "usbroute-port-3-4"));
    }

    #[test]
    fn emit_for_a_hub_refuses_as_attach_does() {
        let err = emitted("port:1-2", AttachMode::Port).unwrap_err();

        assert!(err.to_string().contains("is a hub"), "{err}");
    }

    #[test]
    fn emit_without_a_vm_names_usbroutes_own_monitor_in_a_comment() {
        let text = emitted("port:1-2.1", AttachMode::Port).unwrap().to_text();

        assert!(
            text.contains(
                "# a monitor of its own beside yours (-qmp may be repeated):\n\
                 #   -qmp unix:/run/usbroute/NAME.qmp,server=on,wait=off\n-device qemu-xhci"
            ),
            "{text}"
        );
    }

    #[test]
    fn emit_for_a_vm_ends_with_its_monitor_argument() {
        let mut e = emitted("port:1-2.1", AttachMode::Port).unwrap();
        e.monitor_args = monitor_args(Path::new("/run/qemu/win11.qmp"));

        let text = e.to_text();

        assert!(
            text.ends_with(
                "hostbus=1,hostport=2.1 \\\n-qmp unix:/run/qemu/win11.qmp,server=on,wait=off\n"
            ),
            "{text}"
        );
    }
}
