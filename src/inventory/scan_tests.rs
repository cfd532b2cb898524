//! The readers over small hand-built trees laid out like real sysfs. Recordings of real
//! kernels are tested in `tests/inventory_*.rs`; these cover shapes and faults.

use super::synth::{PciFunction, SysfsBuilder, UsbDevice};
use super::*;

const XHCI: &str = "0000:00:14.0";
const EHCI: &str = "0000:00:1d.7";
const UHCI: &str = "0000:00:1d.0";

fn device<'a>(port: &'a str, devnum: u16, class: u8, speed: &'a str) -> UsbDevice<'a> {
    UsbDevice {
        port,
        devnum,
        vendor: 0x0627,
        product: 0x0001,
        class,
        speed,
        manufacturer: Some("QEMU"),
        product_name: Some("QEMU USB Mouse"),
        serial: Some("42"),
        interfaces: vec![(
            if class == 9 { 9 } else { 3 },
            Some(if class == 9 { "hub" } else { "usbhid" }),
        )],
    }
}

/// xHCI (group 3, with a signal-processing function beside it) with buses 1 and 2,
/// a hub 1-1 holding 1-1.2 and hub 1-1.4 holding 1-1.4.1; storage 2-1 on the
/// SuperSpeed bus; EHCI + UHCI companion in group 5 with a bridge; bus 4 on the UHCI.
fn host() -> (tempfile::TempDir, SysfsBuilder) {
    let dir = tempfile::tempdir().unwrap();
    let b = SysfsBuilder::new(dir.path());
    let pci = |address, class, device, driver, iommu_group| PciFunction {
        address,
        class,
        vendor: 0x8086,
        device,
        driver,
        iommu_group,
    };
    b.pci(&pci(XHCI, 0x0c0330, 0xa36d, Some("xhci_hcd"), Some(3)))
        .unwrap();
    b.pci(&pci("0000:00:14.2", 0x118000, 0xa36f, None, Some(3)))
        .unwrap();
    b.pci(&pci(EHCI, 0x0c0320, 0x293a, Some("ehci-pci"), Some(5)))
        .unwrap();
    b.pci(&pci(UHCI, 0x0c0300, 0x2934, Some("uhci_hcd"), Some(5)))
        .unwrap();
    b.pci(&pci(
        "0000:00:1c.0",
        0x060400,
        0xa338,
        Some("pcieport"),
        Some(5),
    ))
    .unwrap();
    b.bus(XHCI, 1, "480", "2.00", 8).unwrap();
    b.bus(XHCI, 2, "5000", "3.00", 8).unwrap();
    b.bus(EHCI, 3, "480", "2.00", 6).unwrap();
    b.bus(UHCI, 4, "12", "1.10", 2).unwrap();
    b.device(&device("1-1", 2, 9, "480")).unwrap();
    b.device(&UsbDevice {
        serial: None,
        ..device("1-1.2", 3, 0, "12")
    })
    .unwrap();
    b.device(&device("1-1.4", 4, 9, "480")).unwrap();
    b.device(&device("1-1.4.1", 5, 0, "1.5")).unwrap();
    let storage = b
        .device(&UsbDevice {
            vendor: 0x46f4,
            product: 0x0001,
            interfaces: vec![(8, Some("usb-storage"))],
            ..device("2-1", 2, 0, "5000")
        })
        .unwrap();
    b.attr(
        &format!("{storage}/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda"),
        "dev",
        "8:0",
    )
    .unwrap();
    b.device(&device("4-1", 2, 0, "12")).unwrap();
    (dir, b)
}

fn scan_of(dir: &tempfile::TempDir) -> Snapshot {
    scan(&SysfsRoot::new(dir.path()))
}

/// The `verdict` of `controllers --json` for the controller at `pci`.
fn verdict_of(dir: &tempfile::TempDir, s: &Snapshot, pci: &str) -> IsolationSummary {
    let root = SysfsRoot::new(dir.path());
    let pci: PciAddress = pci.parse().unwrap();
    crate::vfio::controller_entries(&root, s)
        .into_iter()
        .find(|e| e.controller.pci == pci)
        .expect("a controller there")
        .verdict
}

fn port(s: &str) -> PortPath {
    s.parse().unwrap()
}

#[test]
fn scan_finds_controllers_with_kind_group_and_buses() {
    let (dir, _) = host();

    let s = scan_of(&dir);

    let summary: Vec<_> = s
        .controllers
        .iter()
        .map(|c| (c.pci.to_string(), c.kind, c.iommu_group, c.buses.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (XHCI.to_string(), ControllerKind::Xhci, Some(3), vec![1, 2]),
            (UHCI.to_string(), ControllerKind::Uhci, Some(5), vec![4]),
            (EHCI.to_string(), ControllerKind::Ehci, Some(5), vec![3]),
        ]
    );
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn ehci_and_uhci_on_one_slot_are_companions() {
    let (dir, _) = host();

    let s = scan_of(&dir);

    let ehci = s.controller(&EHCI.parse().unwrap()).unwrap();
    let uhci = s.controller(&UHCI.parse().unwrap()).unwrap();
    assert_eq!(ehci.companions, vec![UHCI.parse().unwrap()]);
    assert_eq!(uhci.companions, vec![EHCI.parse().unwrap()]);
}

#[test]
fn group_members_exclude_the_controller_and_mark_bridges() {
    let (dir, _) = host();

    let s = scan_of(&dir);

    let ehci = s.controller(&EHCI.parse().unwrap()).unwrap();
    let members: Vec<_> = ehci
        .iommu_group_members
        .iter()
        .map(|m| (m.pci.to_string(), m.bridge, m.driver.clone()))
        .collect();
    assert_eq!(
        members,
        vec![
            (
                "0000:00:1c.0".to_string(),
                true,
                Some("pcieport".to_string())
            ),
            (UHCI.to_string(), false, Some("uhci_hcd".to_string())),
        ]
    );
}

#[test]
fn nested_hub_devices_know_parent_and_controller() {
    let (dir, _) = host();

    let s = scan_of(&dir);

    let d = s.device_at(&port("1-1.4.1")).unwrap();
    assert_eq!(d.parent, Some(port("1-1.4")));
    assert_eq!(d.controller, Some(XHCI.parse().unwrap()));
    assert_eq!(d.speed_mbps, Some(Speed(1.5)));
    assert_eq!(d.address, Some(5));
    assert!(s.device_at(&port("1-1.4")).unwrap().hub);
}

#[test]
fn storage_on_superspeed_bus_lists_its_block_device() {
    let (dir, _) = host();

    let s = scan_of(&dir);

    let d = s.device_at(&port("2-1")).unwrap();
    assert_eq!(d.speed_mbps, Some(Speed(5000.0)));
    assert_eq!(d.block_devices, vec!["sda".to_string()]);
    assert_eq!(d.interfaces[0].driver.as_deref(), Some("usb-storage"));
}

#[test]
fn device_without_serial_has_none_and_no_warning() {
    let (dir, _) = host();

    let s = scan_of(&dir);

    assert_eq!(s.device_at(&port("1-1.2")).unwrap().serial, None);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn malformed_speed_is_unknown_with_a_warning_naming_device_and_attribute() {
    let (dir, b) = host();
    let d = scan_of(&dir)
        .device_at(&port("1-1.2"))
        .unwrap()
        .sysfs_path
        .clone();
    b.attr(&d, "speed", "fast").unwrap();

    let s = scan_of(&dir);

    assert_eq!(s.device_at(&port("1-1.2")).unwrap().speed_mbps, None);
    assert_eq!(s.warnings.len(), 1);
    assert!(
        s.warnings[0].starts_with("usb 1-1.2: `speed` is `fast`"),
        "{}",
        s.warnings[0]
    );
}

#[test]
fn missing_vendor_id_keeps_the_device_listed() {
    let (dir, _) = host();
    let d = scan_of(&dir)
        .device_at(&port("4-1"))
        .unwrap()
        .sysfs_path
        .clone();
    std::fs::remove_file(dir.path().join(d.trim_start_matches('/')).join("idVendor")).unwrap();

    let s = scan_of(&dir);

    let dev = s.device_at(&port("4-1")).unwrap();
    assert_eq!(dev.vendor_id, None);
    assert_eq!(dev.product_id, Some(HexId(0x0001)));
    assert!(s.warnings[0].starts_with("usb 4-1: `idVendor` is missing"));
}

#[test]
fn controller_without_iommu_has_no_group_and_a_blocking_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let b = SysfsBuilder::new(dir.path());
    b.pci(&PciFunction::qemu_xhci(XHCI, None)).unwrap();

    let s = scan_of(&dir);

    let c = &s.controllers[0];
    assert_eq!(c.iommu_group, None);
    assert!(!verdict_of(&dir, &s, XHCI).alone);
}

#[test]
fn verdict_names_a_foreign_group_member_and_lets_companions_go_along() {
    let (dir, _) = host();
    let s = scan_of(&dir);

    let xhci = verdict_of(&dir, &s, XHCI);
    let ehci = verdict_of(&dir, &s, EHCI);

    assert!(!xhci.alone);
    assert_eq!(xhci.blockers[0].pci, Some("0000:00:14.2".parse().unwrap()));
    assert!(ehci.alone);
    assert_eq!(ehci.goes_along, vec![UHCI.parse().unwrap()]);
}

#[test]
fn recording_replays_as_the_same_snapshot() {
    let (dir, _) = host();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("rec");

    let summary = record::record(&SysfsRoot::new(dir.path()), &dest).unwrap();

    assert_eq!(scan(&SysfsRoot::new(&dest)), scan_of(&dir));
    assert!(summary.skipped.is_empty());
}

#[test]
fn recording_refuses_a_non_empty_directory_and_leaves_it_alone() {
    let (dir, _) = host();
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("keep"), "data").unwrap();

    let err = record::record(&SysfsRoot::new(dir.path()), out.path()).unwrap_err();

    assert!(matches!(err, record::RecordError::NotEmpty(_)));
    assert_eq!(
        std::fs::read_to_string(out.path().join("keep")).unwrap(),
        "data"
    );
}

#[test]
fn bus_of_a_platform_controller_is_listed_under_not_on_pci() {
    let dir = tempfile::tempdir().unwrap();
    let b = SysfsBuilder::new(dir.path());
    let usb7 = "/sys/devices/platform/dummy_hcd.0/usb7";
    b.attr(usb7, "speed", "480").unwrap();
    b.link("/sys/bus/usb/devices/usb7", usb7).unwrap();
    b.device(&device("7-1", 2, 0, "480")).unwrap();

    let s = scan_of(&dir);

    assert_eq!(s.buses[0].controller, None);
    assert_eq!(s.devices[0].controller, None);
    assert!(render::tree(&s).starts_with(
        "not on PCI\n└── bus 7  480 Mb/s\n    └── 7-1  platform:dummy_hcd.0/1  dev 2"
    ));
}

#[test]
fn try_scan_of_an_unreadable_usb_device_listing_fails_naming_it() {
    let (dir, _) = host();
    let listing = dir.path().join("sys/bus/usb/devices");
    std::fs::remove_dir_all(&listing).unwrap();
    // Root reads any mode: a file where the directory should be fails the read as EIO
    // or EMFILE would, with ENOTDIR.
    std::fs::write(&listing, "").unwrap();

    let err = try_scan(&SysfsRoot::new(dir.path())).unwrap_err();

    assert_eq!(err.path, std::path::Path::new("/sys/bus/usb/devices"));
}

#[test]
fn try_scan_of_an_empty_usb_device_listing_is_a_valid_empty_picture() {
    let (dir, _) = host();
    let listing = dir.path().join("sys/bus/usb/devices");
    std::fs::remove_dir_all(&listing).unwrap();
    std::fs::create_dir(&listing).unwrap();

    let s = try_scan(&SysfsRoot::new(dir.path())).unwrap();

    assert_eq!((s.buses.len(), s.devices.len()), (0, 0));
}

#[test]
fn try_scan_without_usb_at_all_is_a_valid_empty_picture() {
    let (dir, _) = host();
    std::fs::remove_dir_all(dir.path().join("sys/bus/usb")).unwrap();

    let s = try_scan(&SysfsRoot::new(dir.path())).unwrap();

    assert_eq!((s.buses.len(), s.devices.len()), (0, 0));
}

#[test]
fn try_scan_of_a_healthy_tree_equals_scan() {
    let (dir, _) = host();

    let checked = try_scan(&SysfsRoot::new(dir.path())).unwrap();

    assert_eq!(checked, scan_of(&dir));
}

/// A device whose product string clears the screen, rings the bell and overprints its
/// line; its serial reverses the text after it.
fn hostile_host() -> (tempfile::TempDir, SysfsBuilder) {
    let (dir, b) = host();
    b.device(&UsbDevice {
        product_name: Some("Mouse\u{1b}[2J\u{7}\rEvil"),
        serial: Some("\u{202e}gpj.exe"),
        ..device("4-2", 3, 0, "12")
    })
    .unwrap();
    (dir, b)
}

/// Control characters a terminal acts on, other than the line ends a listing is made of.
fn terminal_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{202e}')
        .collect()
}

#[test]
fn list_and_show_escape_what_a_device_claims() {
    let (dir, _) = hostile_host();
    let s = scan_of(&dir);
    let d = s.device_at(&port("4-2")).unwrap();

    let (tree, details) = (render::tree(&s), render::device_details(d, &s));

    assert_eq!(terminal_controls(&tree), Vec::<char>::new());
    assert_eq!(terminal_controls(&details), Vec::<char>::new());
    assert!(tree.contains("Mouse\\u{1b}[2J\\u{7}\\u{d}Evil"), "{tree}");
    assert!(
        details.contains("serial         \\u{202e}gpj.exe"),
        "{details}"
    );
}

#[test]
fn json_keeps_the_device_string_as_claimed() {
    let (dir, _) = hostile_host();
    let s = scan_of(&dir);

    let json = serde_json::to_string(&render::Listing::from(&s)).unwrap();

    assert!(
        json.contains(r#""product":"Mouse\u001b[2J\u0007\rEvil""#),
        "{json}"
    );
}

#[test]
fn an_overlong_device_string_is_cut_when_read_and_when_shown() {
    let (dir, b) = host();
    let long = "x".repeat(100_000);
    b.device(&UsbDevice {
        product_name: Some(&long),
        ..device("4-2", 3, 0, "12")
    })
    .unwrap();

    let s = scan_of(&dir);
    let d = s.device_at(&port("4-2")).unwrap();

    assert_eq!(
        d.product.as_deref().map(|p| p.chars().count()),
        Some(text::MAX_KEPT)
    );
    assert_eq!(
        d.label(),
        format!("0627:0001 QEMU {}…", "x".repeat(text::MAX_SHOWN - 1))
    );
}

/// Everything under `dir`, for checking that a refused recording wrote nothing.
fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    found.sort();
    found
}

#[test]
fn recording_into_a_symlink_to_elsewhere_is_refused_and_writes_nothing_there() {
    let (dir, _) = host();
    let outside = tempfile::tempdir().unwrap();
    let place = tempfile::tempdir().unwrap();
    let target = place.path().join("rec");
    std::os::unix::fs::symlink(outside.path(), &target).unwrap();

    let err = record::record(&SysfsRoot::new(dir.path()), &target).unwrap_err();

    assert!(err.to_string().contains("is a symlink"), "{err}");
    assert_eq!(entries(outside.path()), Vec::<std::path::PathBuf>::new());
}

#[test]
fn recording_into_a_directory_another_user_owns_is_refused() {
    let (dir, _) = host();
    let made = tempfile::tempdir().unwrap();
    // Root gives an empty directory to nobody; any other user (the quick tier runs as
    // anyone) meets root's `/`. Either way its owner could plant a symlink mid-run.
    let (target, owner) = if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(made.path(), Some(65534), Some(65534)).unwrap();
        (made.path(), 65534)
    } else {
        (std::path::Path::new("/"), 0)
    };
    let before = entries(target);

    let err = record::record(&SysfsRoot::new(dir.path()), target).unwrap_err();

    assert!(
        err.to_string().contains(&format!("owned by uid {owner}")),
        "{err}"
    );
    assert_eq!(entries(target), before);
}

#[test]
fn recording_below_a_directory_anyone_may_rename_in_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _) = host();
    let shared = tempfile::tempdir().unwrap();
    // World-writable without the sticky bit: anyone could move `rec` away and put a
    // symlink in its place.
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777)).unwrap();

    let err = record::record(&SysfsRoot::new(dir.path()), &shared.path().join("rec")).unwrap_err();

    assert!(
        err.to_string().contains("writable by others (mode 777)"),
        "{err}"
    );
}

#[test]
fn a_bus_without_a_pci_parent_is_named_by_its_platform_device() {
    let dir = tempfile::tempdir().unwrap();
    let b = SysfsBuilder::new(dir.path());
    b.platform_bus("vhci_hcd.0", 3, "480", "2.00", 8).unwrap();
    b.device(&device("3-1", 2, 0, "480")).unwrap();

    let s = scan(&crate::sysfs::SysfsRoot::new(dir.path()));

    assert_eq!(s.buses[0].controller, None);
    assert_eq!(
        s.buses[0].controller_name,
        Some(ControllerName::Platform("vhci_hcd.0".into()))
    );
    assert_eq!(s.devices[0].controller, None);
    let physical = s.devices[0].physical_port.as_ref().map(ToString::to_string);
    assert_eq!(physical.as_deref(), Some("platform:vhci_hcd.0/1"));
}

#[test]
fn devices_on_a_superspeed_root_hub_carry_the_ss_marker() {
    let (dir, _b) = host();

    let s = scan(&crate::sysfs::SysfsRoot::new(dir.path()));

    let physical = |port: &str| {
        s.device_at(&port.parse().unwrap())
            .and_then(|d| d.physical_port.as_ref())
            .map(ToString::to_string)
    };
    assert_eq!(physical("2-1").as_deref(), Some("0000:00:14.0/ss1"));
    assert_eq!(physical("1-1.4.1").as_deref(), Some("0000:00:14.0/1.4.1"));
}
