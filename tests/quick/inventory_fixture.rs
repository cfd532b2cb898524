//! The readers over a recording of a real guest kernel (tests/fixtures/guest-xhci-ehci,
//! see tests/fixtures/README.md), and over copies of it with faults put in.

use std::path::{Path, PathBuf};
use usbroute::inventory::{
    record, render, scan, Controller, ControllerKind, Device, IsolationSummary, PortPath, Snapshot,
    Speed,
};
use usbroute::sysfs::SysfsRoot;

const XHCI: &str = "0000:00:03.0";
const EHCI: &str = "0000:00:1d.7";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-xhci-ehci")
}

fn guest() -> Snapshot {
    scan(&SysfsRoot::new(fixture()))
}

/// The `verdict` of `controllers --json` for `controller`, read under `dir`.
fn verdict_of(dir: &Path, s: &Snapshot, controller: &Controller) -> IsolationSummary {
    usbroute::vfio::controller_entries(&SysfsRoot::new(dir), s)
        .into_iter()
        .find(|e| e.controller.pci == controller.pci)
        .expect("a controller there")
        .verdict
}

/// A writable copy of the fixture (symlinks kept as they are), for putting faults in.
fn copy_of_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(fixture().join("sys"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "cp -a of the fixture failed");
    dir
}

fn device<'a>(s: &'a Snapshot, port: &str) -> &'a Device {
    s.device_at(&port.parse::<PortPath>().unwrap())
        .unwrap_or_else(|| panic!("no device {port}"))
}

/// The host path of attribute `name` of device `port`, inside root `dir`.
fn attribute(dir: &Path, s: &Snapshot, port: &str, name: &str) -> PathBuf {
    dir.join(device(s, port).sysfs_path.trim_start_matches('/'))
        .join(name)
}

#[test]
fn guest_lists_every_device_with_port_bus_address_ids_speed_and_controller() {
    let s = guest();

    let rows: Vec<String> = s
        .devices
        .iter()
        .map(|d| {
            format!(
                "{} bus={} addr={} {}:{} {} Mb/s hub={} ctrl={}",
                d.port,
                d.bus,
                d.address.unwrap(),
                d.vendor_id.unwrap(),
                d.product_id.unwrap(),
                d.speed_mbps.unwrap(),
                d.hub,
                d.controller.unwrap()
            )
        })
        .collect();

    assert_eq!(
        rows,
        [
            "1-1 bus=1 addr=2 0627:0001 480 Mb/s hub=false ctrl=0000:00:03.0",
            "1-2 bus=1 addr=3 0409:55aa 12 Mb/s hub=true ctrl=0000:00:03.0",
            "1-2.1 bus=1 addr=5 0627:0001 12 Mb/s hub=false ctrl=0000:00:03.0",
            "1-2.2 bus=1 addr=6 0627:0001 12 Mb/s hub=false ctrl=0000:00:03.0",
            "1-2.3 bus=1 addr=7 0409:55aa 12 Mb/s hub=true ctrl=0000:00:03.0",
            "1-2.3.1 bus=1 addr=8 0627:0001 12 Mb/s hub=false ctrl=0000:00:03.0",
            "1-4 bus=1 addr=4 0627:0001 480 Mb/s hub=false ctrl=0000:00:03.0",
            "2-3 bus=2 addr=2 46f4:0001 5000 Mb/s hub=false ctrl=0000:00:03.0",
            "3-1 bus=3 addr=2 46f4:0001 480 Mb/s hub=false ctrl=0000:00:1d.7",
            "6-1 bus=6 addr=2 0627:0001 12 Mb/s hub=false ctrl=0000:00:1d.2",
        ]
    );
}

#[test]
fn hub_behind_a_hub_gives_a_parent_chain() {
    let s = guest();

    let keyboard = device(&s, "1-2.3.1");
    let inner_hub = device(&s, keyboard.parent.as_ref().unwrap().to_string().as_str());

    assert_eq!(keyboard.parent, Some("1-2.3".parse().unwrap()));
    assert!(inner_hub.hub);
    assert_eq!(inner_hub.parent, Some("1-2".parse().unwrap()));
    assert_eq!(keyboard.interfaces[0].driver.as_deref(), Some("usbhid"));
}

#[test]
fn usb3_storage_sits_on_the_superspeed_bus_of_the_xhci() {
    let s = guest();

    let storage = device(&s, "2-3");
    let bus = s.buses.iter().find(|b| b.number == storage.bus).unwrap();

    assert_eq!(storage.speed_mbps, Some(Speed(5000.0)));
    assert_eq!(bus.speed_mbps, Some(Speed(5000.0)));
    assert_eq!(bus.controller, Some(XHCI.parse().unwrap()));
    assert_eq!(storage.block_devices, ["sdb"]);
    assert_eq!(storage.interfaces[0].driver.as_deref(), Some("usb-storage"));
}

#[test]
fn xhci_provides_a_usb2_and_a_usb3_bus_in_its_own_group() {
    let s = guest();

    let xhci = s.controller(&XHCI.parse().unwrap()).unwrap();

    assert_eq!(xhci.kind, ControllerKind::Xhci);
    assert_eq!(xhci.buses, [1, 2]);
    assert_eq!(xhci.iommu_group, Some(3));
    assert!(xhci.iommu_group_members.is_empty());
    assert!(verdict_of(&fixture(), &s, xhci).alone);
}

#[test]
fn ehci_has_three_uhci_companions_sharing_its_group() {
    let s = guest();

    let ehci = s.controller(&EHCI.parse().unwrap()).unwrap();
    let kinds: Vec<_> = ehci
        .companions
        .iter()
        .map(|pci| {
            (
                pci.to_string(),
                s.controller(pci).unwrap().kind,
                s.controller(pci).unwrap().iommu_group,
            )
        })
        .collect();

    assert_eq!(ehci.kind, ControllerKind::Ehci);
    assert_eq!(ehci.iommu_group, Some(4));
    assert_eq!(
        kinds,
        [
            ("0000:00:1d.0".to_string(), ControllerKind::Uhci, Some(4)),
            ("0000:00:1d.1".to_string(), ControllerKind::Uhci, Some(4)),
            ("0000:00:1d.2".to_string(), ControllerKind::Uhci, Some(4)),
        ]
    );
    assert_eq!(verdict_of(&fixture(), &s, ehci).goes_along, ehci.companions);
}

#[test]
fn full_speed_device_on_an_ehci_port_is_on_the_companion_uhci() {
    let s = guest();

    let keyboard = device(&s, "6-1");

    assert_eq!(keyboard.controller, Some("0000:00:1d.2".parse().unwrap()));
    assert_eq!(keyboard.speed_mbps, Some(Speed(12.0)));
}

#[test]
fn device_without_serial_attribute_has_null_serial_and_no_warning() {
    let s = guest();

    assert_eq!(device(&s, "1-4").serial, None);
    assert!(
        s.warnings.iter().all(|w| !w.contains("1-4")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn only_warnings_are_the_classes_the_raw_dump_left_out() {
    let s = guest();

    assert_eq!(
        s.warnings,
        ["00.0", "01.0", "02.0", "1f.0", "1f.2", "1f.3"].map(|f| format!(
            "pci 0000:00:{f}: `class` is missing (/sys/bus/pci/devices/0000:00:{f}/class)"
        ))
    );
}

#[test]
fn missing_malformed_and_unreadable_attributes_blank_one_field_each_with_a_warning() {
    let dir = copy_of_fixture();
    let before = guest();
    std::fs::remove_file(attribute(dir.path(), &before, "1-2.1", "speed")).unwrap();
    std::fs::write(attribute(dir.path(), &before, "2-3", "idProduct"), "zz!\n").unwrap();
    let devnum = attribute(dir.path(), &before, "1-1", "devnum");
    std::fs::remove_file(&devnum).unwrap();
    std::fs::create_dir(&devnum).unwrap(); // reading a directory fails: "unreadable"

    let s = scan(&SysfsRoot::new(dir.path()));

    assert_eq!(s.devices.len(), before.devices.len());
    assert_eq!(device(&s, "1-2.1").speed_mbps, None);
    assert_eq!(device(&s, "2-3").product_id, None);
    assert_eq!(
        device(&s, "2-3").vendor_id,
        device(&before, "2-3").vendor_id
    );
    assert_eq!(device(&s, "1-1").address, None);
    let about_devices: Vec<&str> = s
        .warnings
        .iter()
        .filter(|w| w.starts_with("usb "))
        .map(|w| w.split(" (").next().unwrap())
        .collect();
    assert_eq!(
        about_devices,
        [
            "usb 1-1: cannot read `devnum`: Is a directory",
            "usb 1-2.1: `speed` is missing",
            "usb 2-3: `idProduct` is `zz!`, not a 4-digit hex id",
        ]
    );
}

#[test]
fn controller_without_iommu_group_link_has_null_group_and_cannot_go_alone() {
    let dir = copy_of_fixture();
    let before = guest();
    for c in &before.controllers {
        std::fs::remove_file(
            dir.path()
                .join(c.sysfs_path.trim_start_matches('/'))
                .join("iommu_group"),
        )
        .unwrap();
    }

    let s = scan(&SysfsRoot::new(dir.path()));

    let xhci = s.controller(&XHCI.parse().unwrap()).unwrap();
    assert_eq!(xhci.iommu_group, None);
    assert!(xhci.iommu_group_members.is_empty());
    let verdict = verdict_of(dir.path(), &s, xhci);
    assert!(!verdict.alone);
    assert!(verdict.blockers[0].reason.contains("no IOMMU group"));
    assert_eq!(s.devices, before.devices);
}

#[test]
fn recording_the_recording_replays_the_same_and_copies_only_what_is_read() {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("again");

    let summary = record::record(&SysfsRoot::new(fixture()), &dest).unwrap();

    assert_eq!(scan(&SysfsRoot::new(&dest)), guest());
    assert_eq!(summary.kernel.as_deref(), Some("6.12.117+deb12-amd64"));
    let storage_iface = dest.join("sys/devices/pci0000:00/0000:00:03.0/usb2/2-3/2-3:1.0");
    assert!(storage_iface.join("bInterfaceClass").is_file());
    assert!(!storage_iface.join("bNumEndpoints").exists());
    assert!(
        std::fs::symlink_metadata(dest.join("sys/bus/usb/devices/2-3"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn tree_of_the_guest() {
    insta::assert_snapshot!(render::tree(&guest()));
}

#[test]
fn controllers_of_the_guest() {
    let s = guest();
    let entries = usbroute::vfio::controller_entries(&SysfsRoot::new(fixture()), &s);
    let verdicts = entries.iter().map(|e| (e.controller, &e.verdict));

    insta::assert_snapshot!(render::controllers_text(verdicts));
}

#[test]
fn details_of_the_usb3_storage() {
    let s = guest();
    insta::assert_snapshot!(render::device_details(device(&s, "2-3"), &s));
}
