//! The QEMU backend against a real `qemu-system-x86_64`. This host has no USB devices, so
//! "absent device" is what every attach here meets; attaching present devices is proven
//! in the test bed's guest.

use crate::qemu_support;

use nix::sys::signal::Signal;
use qemu_support::{host_device, peripheral_ids, root_with_node, QemuGuard};
use serde_json::json;
use std::time::Duration;
use usbroute::backend::qemu::qmp::Qmp;
use usbroute::backend::qemu::{FdPassing, QemuBackend, QemuOptions};
use usbroute::backend::{AttachKey, AttachMode, BackendError, HostMatch, VmBackend};
use usbroute::inventory::HexId;

const XHCI: &str = "qemu-xhci,id=xhci";

async fn backend(qemu: &QemuGuard) -> QemuBackend {
    backend_with(qemu, QemuOptions::default()).await
}

async fn backend_with(qemu: &QemuGuard, options: QemuOptions) -> QemuBackend {
    QemuBackend::connect(qemu.socket(), options)
        .await
        .expect("connect")
}

async fn parent_bus(qmp: &Qmp, id: &str) -> String {
    usbroute::backend::qemu::qom::get_string(
        qmp,
        &format!("/machine/peripheral/{id}"),
        "parent_bus",
    )
    .await
    .expect("parent_bus")
}

#[tokio::test]
async fn attach_by_id_of_absent_device_is_accepted_but_not_attached() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);

    let attached = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");

    assert_eq!(attached.device.id, "usbroute-id-046d-c016");
    assert!(!attached.device.attached);
    let kind = AttachKey::Id {
        vendor_id: HexId(0x046d),
        product_id: HexId(0xc016),
    };
    assert_eq!(attached.device.key, Some(kind));
    assert_eq!(
        attached.device.matcher,
        HostMatch::Id {
            vendor_id: HexId(0x046d),
            product_id: HexId(0xc016)
        }
    );
    assert_eq!(attached.bus, "xhci.0");
    assert_eq!(vm.list().await.expect("list"), vec![attached.device]);
}

#[tokio::test]
async fn attach_by_port_of_absent_device_is_accepted_but_not_attached() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    let stick = host_device("2-4.1", 9, 0x0781, 0x5581, 480.0);

    let attached = vm
        .attach_device(&stick, AttachMode::Port)
        .await
        .expect("attach");
    let port = usbroute::backend::qemu::qom::get_string(
        vm.qmp(),
        "/machine/peripheral/usbroute-port-2-4.1",
        "hostport",
    )
    .await
    .expect("hostport");

    assert_eq!(attached.device.id, "usbroute-port-2-4.1");
    assert!(!attached.device.attached);
    assert_eq!(
        attached.device.matcher,
        HostMatch::Port {
            bus: 2,
            port: "4.1".into()
        }
    );
    assert_eq!(port, "4.1");
}

#[tokio::test]
async fn attach_by_port_stays_pending_while_the_vm_runs_and_rescans() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    vm.qmp().execute("cont", None).await.expect("cont");
    let stick = host_device("1-2", 3, 0x0781, 0x5581, 480.0);

    vm.attach_device(&stick, AttachMode::Port)
        .await
        .expect("attach");
    // Longer than QEMU's 2 s rescan: the absent device must neither attach nor vanish.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let listed = vm.list().await.expect("list");

    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "usbroute-port-1-2");
    assert!(!listed[0].attached);
}

#[tokio::test]
async fn attach_by_address_of_absent_device_fails_and_leaves_nothing_behind() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    let gone = host_device("1-1", 2, 0x046d, 0xc016, 12.0);

    let err = vm
        .attach_device(&gone, AttachMode::Address)
        .await
        .unwrap_err();

    let text = err.to_string();
    assert!(matches!(err, BackendError::Refused { .. }), "{err:?}");
    assert!(text.contains("device 1-1 (bus 1 addr 2)"), "{text}");
    assert!(text.contains("is not on this host"), "{text}");
    assert!(
        text.contains("use --by port or --by id to attach it when it appears"),
        "{text}"
    );
    assert!(
        text.contains(&qemu.socket().display().to_string()),
        "{text}"
    );
    assert_eq!(peripheral_ids(vm.qmp()).await, ["xhci"]);
}

#[tokio::test]
async fn attach_by_address_that_qemu_cannot_find_fails_and_leaves_nothing_behind() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let (_dir, root) = root_with_node();
    let options = QemuOptions {
        root,
        fd_passing: FdPassing::Never,
        ..QemuOptions::default()
    };
    let vm = backend_with(&qemu, options).await;
    let gone = host_device("1-1", 2, 0x046d, 0xc016, 12.0);

    let err = vm
        .attach_device(&gone, AttachMode::Address)
        .await
        .unwrap_err();

    let text = err.to_string();
    assert!(
        text.contains("QEMU said \"failed to find host usb device 1:2\""),
        "{text}"
    );
    assert!(
        text.contains("the device is not on this host; use --by port or --by id"),
        "{text}"
    );
    assert_eq!(peripheral_ids(vm.qmp()).await, ["xhci"]);
}

#[tokio::test]
async fn fd_passing_hands_the_node_to_qemu_and_leaves_no_fdset_behind() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let (_dir, root) = root_with_node();
    let options = QemuOptions {
        root,
        fd_passing: FdPassing::Always,
        ..QemuOptions::default()
    };
    let vm = backend_with(&qemu, options).await;
    let device = host_device("1-1", 2, 0x046d, 0xc016, 12.0);

    // A plain file is no USB device: QEMU got it (it names the fdset), then refused it.
    let err = vm
        .attach_device(&device, AttachMode::Address)
        .await
        .unwrap_err();
    let fdsets = vm
        .qmp()
        .execute("query-fdsets", None)
        .await
        .expect("fdsets");

    let text = err.to_string();
    assert!(text.contains("/dev/fdset/"), "{text}");
    assert!(text.contains("could not use the passed file"), "{text}");
    // The set's own fd is gone; QEMU 10.0 keeps the empty set while it holds the duplicate
    // its failed open did not close.
    let leftover: Vec<&serde_json::Value> = fdsets
        .as_array()
        .expect("array")
        .iter()
        .filter(|set| set["fds"] != json!([]))
        .collect();
    assert!(leftover.is_empty(), "{fdsets}");
    assert_eq!(peripheral_ids(vm.qmp()).await, ["xhci"]);
}

#[tokio::test]
async fn vm_without_usb_controller_gets_a_qemu_xhci() {
    let qemu = QemuGuard::q35(&["-device", "pcie-root-port,id=rp1,chassis=1"]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);

    let attached = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");

    assert_eq!(attached.added_controller.as_deref(), Some("usbroute-xhci"));
    assert_eq!(attached.bus, "usbroute-xhci.0");
    assert_eq!(
        peripheral_ids(vm.qmp()).await,
        ["rp1", "usbroute-id-046d-c016", "usbroute-xhci"]
    );
    assert_eq!(
        parent_bus(vm.qmp(), "usbroute-xhci").await,
        "/machine/peripheral/rp1/rp1"
    );
}

#[tokio::test]
async fn pc_without_usb_controller_gets_a_qemu_xhci_on_its_root_bus() {
    let qemu = QemuGuard::start(&["-machine", "pc", "-m", "64"]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);

    let attached = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");

    assert_eq!(attached.added_controller.as_deref(), Some("usbroute-xhci"));
    assert_eq!(
        parent_bus(vm.qmp(), "usbroute-id-046d-c016").await,
        "/machine/peripheral/usbroute-xhci/usbroute-xhci.0"
    );
}

#[tokio::test]
async fn vm_without_controller_or_free_slot_is_refused_with_the_fix() {
    let qemu = QemuGuard::q35(&[]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);

    let err = vm.attach_device(&mouse, AttachMode::Id).await.unwrap_err();

    let text = err.to_string();
    assert!(text.contains("the VM has no USB controller"), "{text}");
    assert!(text.contains("-device qemu-xhci,id=xhci"), "{text}");
    assert!(peripheral_ids(vm.qmp()).await.is_empty());
}

#[tokio::test]
async fn absent_address_is_refused_before_a_controller_is_added() {
    let qemu = QemuGuard::q35(&["-device", "pcie-root-port,id=rp1,chassis=1"]);
    let vm = backend(&qemu).await;
    let gone = host_device("1-1", 2, 0x046d, 0xc016, 12.0);

    let result = vm.attach_device(&gone, AttachMode::Address).await;

    assert!(result.is_err());
    assert_eq!(peripheral_ids(vm.qmp()).await, ["rp1"]);
}

#[tokio::test]
async fn full_speed_device_goes_to_xhci_not_to_a_lone_ehci() {
    let qemu = QemuGuard::q35(&["-device", "usb-ehci,id=ehci", "-device", XHCI]);
    let vm = backend(&qemu).await;
    let keyboard = host_device("1-5", 4, 0x04d9, 0x1603, 12.0);

    vm.attach_device(&keyboard, AttachMode::Id)
        .await
        .expect("attach");

    assert_eq!(
        parent_bus(vm.qmp(), "usbroute-id-04d9-1603").await,
        "/machine/peripheral/xhci/xhci.0"
    );
}

#[tokio::test]
async fn full_speed_device_goes_to_ehci_with_uhci_companions() {
    let qemu = QemuGuard::q35(&[
        "-device",
        "ich9-usb-ehci1,id=ehci,addr=1d.7,multifunction=on",
        "-device",
        "ich9-usb-uhci1,masterbus=ehci.0,firstport=0,addr=1d.0,multifunction=on",
    ]);
    let vm = backend(&qemu).await;
    let keyboard = host_device("1-5", 4, 0x04d9, 0x1603, 12.0);

    let attached = vm
        .attach_device(&keyboard, AttachMode::Id)
        .await
        .expect("attach");

    assert_eq!(attached.added_controller, None);
    assert_eq!(
        parent_bus(vm.qmp(), "usbroute-id-04d9-1603").await,
        "/machine/peripheral/ehci/ehci.0"
    );
}

#[tokio::test]
async fn attaching_the_same_device_twice_changes_nothing() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);
    let first = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");

    let second = vm
        .attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach again");

    assert!(second.already_there);
    assert_eq!(second.device, first.device);
    assert_eq!(
        peripheral_ids(vm.qmp()).await,
        ["usbroute-id-046d-c016", "xhci"]
    );
}

#[tokio::test]
async fn hub_is_refused_saying_why_and_what_instead() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    let mut hub = host_device("1-3", 2, 0x05e3, 0x0610, 480.0);
    hub.hub = true;

    let err = vm.attach_device(&hub, AttachMode::Port).await.unwrap_err();

    let text = err.to_string();
    assert!(text.contains("is a hub: QEMU cannot pass a hub"), "{text}");
    assert!(text.contains("hub:1-3"), "{text}");
    assert_eq!(peripheral_ids(vm.qmp()).await, ["xhci"]);
}

#[tokio::test]
async fn detach_returns_after_device_deleted() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);
    vm.attach_device(&mouse, AttachMode::Id)
        .await
        .expect("attach");
    let mut events = vm.qmp().events();
    let kind = AttachKey::Id {
        vendor_id: HexId(0x046d),
        product_id: HexId(0xc016),
    };

    vm.detach(&kind).await.expect("detach");
    let seen = events
        .try_recv()
        .expect("an event had arrived before detach returned");

    assert_eq!(seen.name, "DEVICE_DELETED");
    assert_eq!(seen.data["device"], "usbroute-id-046d-c016");
    assert_eq!(peripheral_ids(vm.qmp()).await, ["xhci"]);
}

#[tokio::test]
async fn detach_of_unknown_id_names_it_and_the_listing_command() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;

    let err = vm.detach_id("usbroute-id-dead-beef").await.unwrap_err();

    let text = err.to_string();
    assert!(
        text.contains("has no device `usbroute-id-dead-beef`"),
        "{text}"
    );
    assert!(text.contains("usbroute vm devices"), "{text}");
}

#[tokio::test]
async fn listing_tells_ours_from_usb_host_devices_added_by_hand() {
    let qemu = QemuGuard::q35(&[
        "-device",
        XHCI,
        "-device",
        "usb-host,id=hostdev0,bus=xhci.0,vendorid=0x1234,productid=0x5678",
        "-device",
        "usb-host,bus=xhci.0,hostbus=3,hostport=1.2",
    ]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);
    vm.attach_device(&mouse, AttachMode::Port)
        .await
        .expect("attach");

    let listed = serde_json::to_value(vm.list().await.expect("list")).expect("json");

    assert_eq!(
        listed,
        json!([
            {"id": "hostdev0", "attached": false, "ours": false,
             "vendor_id": "1234", "product_id": "5678"},
            {"id": "usbroute-port-1-3", "attached": false, "ours": true,
             "bus": 1, "port": "3"},
            {"id": "/machine/peripheral-anon/device[0]", "attached": false, "ours": false,
             "bus": 3, "port": "1.2"},
        ])
    );
}

#[tokio::test]
async fn qemu_killed_mid_attach_gives_a_clear_error() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let vm = backend(&qemu).await;
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);
    qemu.signal(Signal::SIGSTOP);

    let attach = tokio::spawn(async move { vm.attach_device(&mouse, AttachMode::Id).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    qemu.signal(Signal::SIGKILL);
    let err = attach.await.expect("join").unwrap_err();

    let text = usbroute::error_chain::one_line(&err);
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err:?}");
    assert!(
        text.contains(&qemu.socket().display().to_string()),
        "{text}"
    );
    assert!(
        text.contains("QEMU closed the QMP socket while `qom-list` was waiting"),
        "{text}"
    );
}

#[tokio::test]
async fn detach_times_out_when_qemu_never_confirms_the_removal() {
    // A PCIe device on a root port of a paused q35 is only released with the guest's help,
    // so QEMU never sends DEVICE_DELETED for it: a real unconfirmed removal.
    let qemu = QemuGuard::q35(&[
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
        "-device",
        "qemu-xhci,id=slow,bus=rp1",
    ]);
    let options = QemuOptions {
        unplug_timeout: Duration::from_millis(500),
        ..QemuOptions::default()
    };
    let vm = backend_with(&qemu, options).await;

    let err = vm.detach_id("slow").await.unwrap_err();

    assert!(matches!(err, BackendError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("removal of device `slow` (DEVICE_DELETED)"),
        "{err}"
    );
}

#[tokio::test]
async fn fd_passing_auto_hands_the_node_to_an_unprivileged_qemu() {
    let qemu = QemuGuard::start_as(
        Some(65534),
        &["-machine", "q35", "-m", "64", "-device", XHCI],
    );
    let (_dir, root) = root_with_node();
    let options = QemuOptions {
        root,
        fd_passing: FdPassing::Auto,
        ..QemuOptions::default()
    };
    let vm = backend_with(&qemu, options).await;
    let device = host_device("1-1", 2, 0x046d, 0xc016, 12.0);

    let err = vm
        .attach_device(&device, AttachMode::Address)
        .await
        .unwrap_err();

    // QEMU (uid 65534, seen through SO_PEERCRED) was handed the node: it names the fdset.
    assert_eq!(vm.qmp().peer().map(|p| p.uid), Some(65534));
    assert!(err.to_string().contains("/dev/fdset/"), "{err}");
}

/// A root QEMU could open the node itself, but by bus and address it asks libusb, which
/// may not know a device the kernel has just bound: the file passed needs no lookup.
#[tokio::test]
async fn fd_passing_auto_passes_the_node_to_a_root_qemu_too_when_it_opens() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let (_dir, root) = root_with_node();
    let options = QemuOptions {
        root,
        fd_passing: FdPassing::Auto,
        ..QemuOptions::default()
    };
    let vm = backend_with(&qemu, options).await;
    let device = host_device("1-1", 2, 0x046d, 0xc016, 12.0);

    let err = vm
        .attach_device(&device, AttachMode::Address)
        .await
        .unwrap_err();

    assert_eq!(vm.qmp().peer().map(|p| p.uid), Some(0));
    assert!(err.to_string().contains("/dev/fdset/"), "{err}");
}

#[tokio::test]
async fn attach_by_port_wants_a_bus_for_every_speed() {
    // EHCI with a UHCI companion takes this full-speed device, but not a SuperSpeed one
    // plugged into the same port later: by port, only an xHCI will do.
    let qemu = QemuGuard::q35(&[
        "-device",
        "ich9-usb-ehci1,id=ehci,addr=1d.7,multifunction=on",
        "-device",
        "ich9-usb-uhci1,masterbus=ehci.0,firstport=0,addr=1d.0,multifunction=on",
        "-device",
        "pcie-root-port,id=rp1,chassis=1",
    ]);
    let vm = backend(&qemu).await;
    let keyboard = host_device("1-5", 4, 0x04d9, 0x1603, 12.0);

    let attached = vm
        .attach_device(&keyboard, AttachMode::Port)
        .await
        .expect("attach");

    assert_eq!(attached.added_controller.as_deref(), Some("usbroute-xhci"));
    assert_eq!(attached.bus, "usbroute-xhci.0");
}
