//! Ports anchored on the controller hold when the kernel numbers the buses differently
//! (another boot, a kernel update): the same hardware built twice with the bus numbers of
//! the xHCI's USB 2 root hub and of the EHCI swapped. Every `port:CONTROLLER/chain` rule
//! still means the same physical device; a bus-numbered rule does not, and `check` says so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use usbroute::config::Config;
use usbroute::inventory::synth::{PciFunction, SysfsBuilder, UsbDevice};
use usbroute::inventory::{scan, Snapshot};
use usbroute::policy::{plan, Placement, PlanInput};
use usbroute::sysfs::SysfsRoot;

const XHCI: &str = "0000:00:14.0";
const EHCI: &str = "0000:00:1d.7";

/// The bus numbers the kernel handed out on one boot.
struct Numbering {
    xhci_usb2: u8,
    xhci_usb3: u8,
    ehci: u8,
    vhci: u8,
}

const FIRST_BOOT: Numbering = Numbering {
    xhci_usb2: 1,
    xhci_usb3: 2,
    ehci: 3,
    vhci: 4,
};

/// The xHCI's USB 2 bus and the EHCI's bus swapped.
const RENUMBERED: Numbering = Numbering {
    xhci_usb2: 3,
    xhci_usb3: 2,
    ehci: 1,
    vhci: 4,
};

/// Every device has a serial, so the test can tell which physical device a rule matched.
fn device(port: &str, serial: &'static str, class: u8, speed: &'static str) -> UsbDevice<'static> {
    UsbDevice {
        port: Box::leak(port.to_string().into_boxed_str()),
        devnum: 2,
        vendor: 0x0627,
        product: 0x0001,
        class,
        speed,
        manufacturer: None,
        product_name: None,
        serial: Some(serial),
        interfaces: vec![(if class == 9 { 9 } else { 3 }, None)],
    }
}

/// An xHCI (a hub at 2 with a keyboard at 2.1, a disk at SuperSpeed port 1), an EHCI (a
/// mouse at 1) and USB/IP's vhci_hcd.0 (a tablet at 1), numbered as `n` says.
fn host(dir: &Path, n: &Numbering) -> Snapshot {
    let b = SysfsBuilder::new(dir);
    for (address, class) in [(XHCI, 0x0c0330), (EHCI, 0x0c0320)] {
        b.pci(&PciFunction::usb_controller(address, class)).unwrap();
    }
    b.bus(XHCI, n.xhci_usb2, "480", "2.00", 4).unwrap();
    b.bus(XHCI, n.xhci_usb3, "5000", "3.00", 4).unwrap();
    b.bus(EHCI, n.ehci, "480", "2.00", 6).unwrap();
    b.platform_bus("vhci_hcd.0", n.vhci, "480", "2.00", 8)
        .unwrap();
    let at = |bus: u8, chain: &str| format!("{bus}-{chain}");
    for d in [
        device(&at(n.xhci_usb2, "2"), "hub", 9, "480"),
        device(&at(n.xhci_usb2, "2.1"), "keyboard", 0, "12"),
        device(&at(n.xhci_usb3, "1"), "disk", 0, "5000"),
        device(&at(n.ehci, "1"), "mouse", 0, "480"),
        device(&at(n.vhci, "1"), "tablet", 0, "480"),
    ] {
        b.device(&d).unwrap();
    }
    scan(&SysfsRoot::new(dir))
}

/// The serials of the devices `selector` matches on `host`.
fn matched(selector: &str, host: &Snapshot) -> Vec<String> {
    let selector: usbroute::selector::Selector = selector.parse().unwrap();
    host.devices
        .iter()
        .filter(|d| selector.matches(d))
        .filter_map(|d| d.serial.clone())
        .collect()
}

const ANCHORED: &str = r#"[[vm]]
name = "a"
qmp = "/run/a.qmp"

[[vm]]
name = "b"
qmp = "/run/b.qmp"

[[rule]]
match = "port:0000:00:14.0/2.1"
vm = "a"

[[rule]]
match = "port:00:1d.7/1"
vm = "b"

[[rule]]
match = "port:0000:00:14.0/ss1"
vm = "b"

[[rule]]
match = "port:platform:vhci_hcd.0/1"
vm = "a"
"#;

/// Where the plan puts each device, by serial.
fn placements(config: &Config, host: &Snapshot) -> BTreeMap<String, Placement> {
    let vms_up: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
    let desired = plan(&PlanInput {
        rules: &config.rules,
        devices: &host.devices,
        mounted_disks: &BTreeSet::new(),
        vms_up: &vms_up,
        backends: &BTreeMap::new(),
        overrides: &BTreeMap::new(),
        follows: &BTreeMap::new(),
        controllers_owned: &BTreeMap::new(),
    });
    host.devices
        .iter()
        .map(|d| {
            let serial = d.serial.clone().unwrap();
            (serial, desired.devices[&d.port].placement.clone())
        })
        .collect()
}

#[test]
fn every_controller_anchored_rule_matches_the_same_device_after_renumbering() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let before = host(first.path(), &FIRST_BOOT);
    let after = host(second.path(), &RENUMBERED);

    for (selector, serial) in [
        ("port:0000:00:14.0/2.1", "keyboard"),
        ("port:00:14.0/2", "hub"),
        ("port:0000:00:14.0/ss1", "disk"),
        ("port:0000:00:1d.7/1", "mouse"),
        ("port:platform:vhci_hcd.0/1", "tablet"),
    ] {
        assert_eq!(matched(selector, &before), [serial], "{selector} before");
        assert_eq!(matched(selector, &after), [serial], "{selector} after");
    }
    // What a bus-numbered rule meant on the first boot is another device now.
    assert_eq!(matched("port:1-2.1", &before), ["keyboard"]);
    assert_eq!(matched("port:1-2.1", &after), Vec::<String>::new());
    assert_eq!(matched("port:3-1", &before), ["mouse"]);
    assert_eq!(matched("port:3-1", &after), Vec::<String>::new());
}

#[test]
fn the_plan_sends_every_device_to_the_same_vm_after_renumbering() {
    let config = Config::parse(ANCHORED, None).unwrap();
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let before = placements(&config, &host(first.path(), &FIRST_BOOT));
    let after = placements(&config, &host(second.path(), &RENUMBERED));

    assert_eq!(before, after);
    let vm = |serial: &str| match &before[serial] {
        Placement::Vm { vm, .. } => vm.clone(),
        Placement::Host => "host".into(),
    };
    assert_eq!(
        ["keyboard", "disk", "mouse", "tablet", "hub"].map(vm),
        ["a", "b", "b", "a", "host"]
    );
}

#[test]
fn check_flags_a_bus_numbered_rule_with_its_stable_form_on_this_host() {
    let dir = tempfile::tempdir().unwrap();
    host(dir.path(), &RENUMBERED);
    let text = format!("{ANCHORED}\n[[rule]]\nmatch = \"port:3-2.1\"\nvm = \"a\"\npriority = 1\n");

    let out = crate::cli_check::check(dir.path(), &text, &["--json"]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings: Vec<&str> = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str())
        .filter(|w| w.contains("names the port by its bus number"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(":25: `port:3-2.1`")
            && warnings[0]
                .ends_with("write `port:0000:00:14.0/2.1`, the same port named by its controller"),
        "{}",
        warnings[0]
    );
}
