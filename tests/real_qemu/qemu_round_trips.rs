//! What one attach costs in QMP, on a real `qemu-system-x86_64`: the commands QEMU
//! received (its own trace, `handle_qmp_command`) and the writes usbroute made for them
//! (`Qmp::sent`: each write waits for its replies, so writes are round trips). And the
//! backend's known buses following a controller added behind its back.
//!
//! This host has no USB devices, so an attach by address ends in QEMU's refusal; what
//! it sends up to that refusal is the whole of a successful attach (a refusal alone adds
//! the check whether the VM had the device already).

use crate::qemu_support;

use qemu_support::{host_device, root_with_node, QemuGuard};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use usbroute::backend::qemu::controllers::VmUsbBus;
use usbroute::backend::qemu::qmp::{Qmp, Sent};
use usbroute::backend::qemu::{FdPassing, QemuBackend, QemuOptions};
use usbroute::backend::{AttachMode, VmBackend};

/// Generous for a loaded machine; every wait below ends as soon as its condition holds.
const DEADLINE: Duration = Duration::from_secs(20);

/// A q35 with a qemu-xhci whose QMP commands QEMU traces into a file.
struct Traced {
    qemu: QemuGuard,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Traced {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("qmp.trace");
        let log_arg = log.display().to_string();
        let mut args = vec!["-trace", "handle_qmp_command", "-D", &log_arg];
        args.extend_from_slice(extra);
        Traced {
            qemu: QemuGuard::q35(&args),
            log,
            _dir: dir,
        }
    }

    /// The commands QEMU has received so far, by name, once it has received `last`.
    fn commands_through(&self, last: usize) -> Vec<String> {
        let started = Instant::now();
        loop {
            let names = received(&self.log);
            if names.len() >= last || started.elapsed() > DEADLINE {
                return names;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `execute` of every request in QEMU's `handle_qmp_command` trace at `log`.
fn received(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split_once("req: "))
        .filter_map(|(_, request)| serde_json::from_str::<Value>(request).ok())
        .filter_map(|request| request["execute"].as_str().map(str::to_string))
        .collect()
}

/// `commands` commands in `writes` writes.
fn sent(commands: u64, writes: u64) -> Sent {
    Sent { commands, writes }
}

async fn connected(qemu: &QemuGuard, options: QemuOptions) -> QemuBackend {
    let vm = QemuBackend::connect(qemu.socket(), options)
        .await
        .expect("connect");
    vm.learn_buses().await.expect("buses listed");
    vm
}

#[tokio::test]
async fn attach_by_address_with_a_passed_file_is_one_write_of_add_fd_device_add_remove_fd() {
    let bed = Traced::start(&["-device", "qemu-xhci,id=xhci"]);
    let (_dir, root) = root_with_node();
    let options = QemuOptions {
        root,
        fd_passing: FdPassing::Always,
        ..QemuOptions::default()
    };
    let vm = connected(&bed.qemu, options).await;
    let before_names = bed.commands_through(0).len();
    let before = vm.qmp().sent();
    let device = host_device("1-1", 2, 0x046d, 0xc016, 12.0);

    let err = vm
        .attach_device(&device, AttachMode::Address)
        .await
        .unwrap_err();

    let cost = vm.qmp().sent() - before;
    let names = bed.commands_through(before_names + 4)[before_names..].to_vec();
    assert!(
        err.to_string().contains("could not use the passed file"),
        "{err}"
    );
    // The attach: one write of three commands. QEMU's refusal then costs one more: was
    // the device there already?
    assert_eq!(names, ["add-fd", "device_add", "remove-fd", "qom-list"]);
    assert_eq!(cost, sent(4, 2));
}

#[tokio::test]
async fn attach_by_port_is_one_write_of_device_add_and_the_read_of_attached() {
    let bed = Traced::start(&["-device", "qemu-xhci,id=xhci"]);
    let vm = connected(&bed.qemu, QemuOptions::default()).await;
    let before_names = bed.commands_through(0).len();
    let before = vm.qmp().sent();
    let stick = host_device("2-4.1", 9, 0x0781, 0x5581, 480.0);

    let attached = vm
        .attach_device(&stick, AttachMode::Port)
        .await
        .expect("attach");

    let cost = vm.qmp().sent() - before;
    let names = bed.commands_through(before_names + 2)[before_names..].to_vec();
    assert_eq!(attached.bus, "xhci.0");
    assert!(!attached.device.attached, "no such device on this host");
    assert_eq!(names, ["device_add", "qom-get"]);
    assert_eq!(cost, sent(2, 1));
}

#[tokio::test]
async fn the_engines_attach_by_port_is_device_add_alone() {
    // The engine needs QEMU to hold the place; whether it attached the device now is for
    // the next list (the CLI above reads it for its message).
    let bed = Traced::start(&["-device", "qemu-xhci,id=xhci"]);
    let vm = connected(&bed.qemu, QemuOptions::default()).await;
    let before_names = bed.commands_through(0).len();
    let before = vm.qmp().sent();
    let stick = host_device("2-4.1", 9, 0x0781, 0x5581, 480.0);

    let device = VmBackend::attach(&vm, &stick, AttachMode::Port)
        .await
        .expect("attach");

    let cost = vm.qmp().sent() - before;
    let names = bed.commands_through(before_names + 1)[before_names..].to_vec();
    assert_eq!(device.id, "usbroute-port-2-4.1");
    assert!(!device.attached, "not read, so not claimed");
    assert_eq!(names, ["device_add"]);
    assert_eq!(cost, sent(1, 1));
}

#[tokio::test]
async fn a_list_is_two_writes_however_many_devices_the_vm_has() {
    // Three usb-host devices by port (two with an id, one without): both containers in
    // one write, then six properties of each in one more.
    let bed = Traced::start(&[
        "-device",
        "qemu-xhci,id=xhci",
        "-device",
        "usb-host,id=usbroute-port-1-3,hostbus=1,hostport=3",
        "-device",
        "usb-host,id=mine,hostbus=1,hostport=4",
        "-device",
        "usb-host,hostbus=2,hostport=1",
    ]);
    let vm = connected(&bed.qemu, QemuOptions::default()).await;
    let before_names = bed.commands_through(0).len();
    let before = vm.qmp().sent();

    let listed = vm.list_devices().await.expect("list");

    let cost = vm.qmp().sent() - before;
    let names = bed.commands_through(before_names + 20)[before_names..].to_vec();
    let ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(&ids[..2], ["mine", "usbroute-port-1-3"]);
    assert!(ids[2].starts_with("/machine/peripheral-anon/"), "{ids:?}");
    assert!(listed[1].key.is_some() && listed[0].key.is_none());
    assert_eq!(names[..2], ["qom-list", "qom-list"]);
    assert!(names[2..].iter().all(|n| n == "qom-get"), "{names:?}");
    assert_eq!(cost, sent(20, 2));
}

#[tokio::test]
async fn a_batch_is_answered_in_order_and_a_failure_stops_nothing_after_it() {
    let qemu = QemuGuard::machine_none();
    let qmp = Qmp::connect(qemu.socket()).await.expect("connect");
    let before = qmp.sent();

    let results = qmp
        .execute_batch(
            vec![
                ("query-status", None),
                ("no-such-command", None),
                ("query-name", None),
            ],
            None,
        )
        .await;

    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().expect("status")["status"], "prelaunch");
    assert!(results[1].is_err(), "{:?}", results[1]);
    assert_eq!(results[2].as_ref().expect("name"), &json!({}));
    assert_eq!(qmp.sent() - before, sent(3, 1));
}

#[tokio::test]
async fn known_buses_find_a_controller_added_through_another_monitor_when_needed() {
    let bed = TwoMonitors::start(&["-device", "ich9-usb-ehci1,id=ehci"]).await;
    let vm = connected(&bed.qemu, QemuOptions::default()).await;
    let at_connect = bus_names(vm.known_buses());
    // Another client adds a qemu-xhci: QEMU tells no monitor of a device added.
    bed.add_x2().await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);

    // A full-speed device fits no EHCI without companions: the backend lists again and
    // finds the new xHCI instead of adding one of its own.
    let attached = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");
    let before = vm.qmp().sent();
    let stick = host_device("2-4.1", 9, 0x0781, 0x5581, 480.0);
    let second = vm
        .attach_device(&stick, AttachMode::Port)
        .await
        .expect("attach");

    assert_eq!(at_connect, ["ehci.0"]);
    assert_eq!(attached.bus, "x2.0");
    assert_eq!(attached.added_controller, None);
    assert_eq!(bus_names(vm.known_buses()), ["ehci.0", "x2.0"]);
    // Known now: the next attach asks nothing about buses.
    assert_eq!(second.bus, "x2.0");
    assert_eq!(vm.qmp().sent() - before, sent(2, 1));
}

#[tokio::test]
async fn an_attach_to_a_controller_gone_before_its_event_lists_again_and_goes_elsewhere() {
    // Native PCIe hotplug instead of q35's ACPI one: a device hot-added to a root port of a
    // paused VM sits in a powered-off slot, and device_del takes it out of QOM at once;
    // QEMU 10.0 sends its DEVICE_DELETED only when it is finalized, which here is late.
    let bed = TwoMonitors::start(&[
        "-global",
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        "-device",
        "qemu-xhci,id=xhci",
    ])
    .await;
    let vm = connected(&bed.qemu, QemuOptions::default()).await;
    bed.add_x2().await;
    // As a reconnect would: now the backend knows x2.0, and prefers it (by name).
    vm.learn_buses().await.expect("listed again");
    let listed = bus_names(vm.known_buses());
    bed.admin
        .execute("device_del", Some(json!({"id": "x2"})))
        .await
        .expect("device_del");
    let started = Instant::now();
    while qemu_support::peripheral_ids(&bed.admin)
        .await
        .contains(&"x2".to_string())
    {
        assert!(started.elapsed() < DEADLINE, "x2 never left QOM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);

    let attached = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");

    assert_eq!(listed, ["x2.0", "xhci.0"]);
    assert_eq!(attached.bus, "xhci.0");
    assert_eq!(attached.added_controller, None);
    assert_eq!(bus_names(vm.known_buses()), ["xhci.0"]);
}

#[tokio::test]
async fn known_buses_take_in_the_qemu_xhci_the_backend_adds() {
    let qemu = QemuGuard::q35(&["-device", "pcie-root-port,id=rp1,chassis=1"]);
    let vm = connected(&qemu, QemuOptions::default()).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);
    let at_connect = vm.known_buses().expect("listed");

    let attached = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");

    assert!(at_connect.is_empty(), "{at_connect:?}");
    assert_eq!(attached.added_controller.as_deref(), Some("usbroute-xhci"));
    let known: Vec<String> = vm
        .known_buses()
        .expect("listed")
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(known, ["usbroute-xhci.0"]);
}

/// A q35 with a root port `rp1`, `extra`, and a second QMP monitor held by another
/// client (`admin`), as a management tool beside usbroute would.
struct TwoMonitors {
    qemu: QemuGuard,
    admin: Qmp,
    _dir: tempfile::TempDir,
}

impl TwoMonitors {
    async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let other = dir.path().join("other.qmp");
        let other_arg = format!("unix:{},server=on,wait=off", other.display());
        let mut args = vec![
            "-device",
            "pcie-root-port,id=rp1,chassis=1",
            "-qmp",
            &other_arg,
        ];
        args.extend_from_slice(extra);
        let qemu = QemuGuard::q35(&args);
        let admin = connect_when_ready(&other).await;
        TwoMonitors {
            qemu,
            admin,
            _dir: dir,
        }
    }

    /// The other client adds a `qemu-xhci` `x2` (bus `x2.0`) on `rp1`.
    async fn add_x2(&self) {
        self.admin
            .execute(
                "device_add",
                Some(json!({"driver": "qemu-xhci", "id": "x2", "bus": "rp1"})),
            )
            .await
            .expect("qemu-xhci added");
    }
}

/// The names of `buses`, sorted (none when not listed).
fn bus_names(buses: Option<Vec<VmUsbBus>>) -> Vec<String> {
    let mut names: Vec<String> = buses
        .unwrap_or_default()
        .into_iter()
        .map(|b| b.name)
        .collect();
    names.sort();
    names
}

/// A QMP connection to `socket` once QEMU serves it.
async fn connect_when_ready(socket: &Path) -> Qmp {
    let started = Instant::now();
    loop {
        match Qmp::connect(socket).await {
            Ok(qmp) => return qmp,
            Err(e) if started.elapsed() > DEADLINE => panic!("{}: {e}", socket.display()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
