//! One socket, two speeds: the kernel links each USB 2 port of an xHCI root hub (and of a
//! USB 3 hub) to its USB 3 twin (`.../usbN-portM/peer`). A socket is named by its USB 2
//! side at every hop, so a USB 3 and a USB 2 device in the same socket get the same
//! `physical_port` and one `port:CONTROLLER/chain` (or `hub:`) selector means either.
//!
//! The host, laid out as sysfs lays it out (`inventory::synth`), with twins numbered
//! differently on purpose (as on Intel boards, where USB 3 port 1 is often USB 2 port 3):
//! xHCI 0000:00:14.0, bus 1 (USB 2, 4 ports) and bus 2 (USB 3, 4 ports); USB 3 port 1 is
//! the twin of USB 2 port 3, USB 3 port 2 of USB 2 port 4; USB 3 ports 3 and 4 have none.
//! In socket 4 a USB 3 hub (USB 2 half 1-4, USB 3 half 2-2; its USB 3 port 1 is the twin
//! of its USB 2 port 2); an EHCI 0000:00:1d.7 (bus 3) has no twins.

use assert_cmd::Command;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use usbroute::backend::AttachMode;
use usbroute::inventory::synth::{PciFunction, SysfsBuilder, UsbDevice};
use usbroute::inventory::{record, render, scan, PhysicalPort, PortTwin, Snapshot};
use usbroute::policy::{plan, Placement, PlanInput, Reason, Rule};
use usbroute::selector::Selector;
use usbroute::sysfs::SysfsRoot;

const XHCI: &str = "0000:00:14.0";
const EHCI: &str = "0000:00:1d.7";

fn device<'a>(port: &'a str, devnum: u16, class: u8, speed: &'a str) -> UsbDevice<'a> {
    let (vendor, product, interface) = match class {
        9 => (0x0409, 0x55aa, (9, Some("hub"))),
        8 => (0x46f4, 0x0001, (8, Some("usb-storage"))),
        _ => (0x0627, 0x0001, (3, Some("usbhid"))),
    };
    UsbDevice {
        port,
        devnum,
        vendor,
        product,
        class: if class == 9 { 9 } else { 0 },
        speed,
        manufacturer: Some("QEMU"),
        product_name: None,
        serial: Some(port),
        interfaces: vec![interface],
    }
}

/// The controllers and root hubs, with the root ports' twins; no devices yet.
fn controllers() -> (tempfile::TempDir, SysfsBuilder) {
    let dir = tempfile::tempdir().unwrap();
    let b = SysfsBuilder::new(dir.path());
    for (address, class) in [(XHCI, 0x0c0330), (EHCI, 0x0c0320)] {
        b.pci(&PciFunction::usb_controller(address, class)).unwrap();
    }
    b.bus(XHCI, 1, "480", "2.00", 4).unwrap();
    b.bus(XHCI, 2, "5000", "3.00", 4).unwrap();
    b.bus(EHCI, 3, "480", "2.00", 4).unwrap();
    b.twins("usb1", 3, "usb2", 1).unwrap();
    b.twins("usb1", 4, "usb2", 2).unwrap();
    (dir, b)
}

/// [`controllers`] with storage at USB 3 port 1 (socket 3), the USB 3 hub in socket 4
/// with storage on its USB 3 side and a keyboard on its USB 2 side, and storage at USB 3
/// port 3 (no twin).
fn host() -> (tempfile::TempDir, SysfsBuilder) {
    let (dir, b) = controllers();
    b.device(&device("2-1", 2, 8, "5000")).unwrap();
    b.device(&device("1-4", 2, 9, "480")).unwrap();
    b.device(&device("2-2", 3, 9, "5000")).unwrap();
    b.twins("1-4", 2, "2-2", 1).unwrap();
    b.device(&device("2-2.1", 4, 8, "5000")).unwrap();
    b.device(&device("1-4.3", 3, 3, "12")).unwrap();
    b.device(&device("2-3", 5, 8, "5000")).unwrap();
    (dir, b)
}

fn scan_of(dir: &tempfile::TempDir) -> Snapshot {
    scan(&SysfsRoot::new(dir.path()))
}

fn physical(s: &Snapshot, port: &str) -> String {
    let device = s.device_at(&port.parse().unwrap()).expect(port);
    device.physical_port.as_ref().expect(port).to_string()
}

fn matching(s: &Snapshot, selector: &str) -> Vec<String> {
    let selector: Selector = selector.parse().unwrap();
    s.devices
        .iter()
        .filter(|d| selector.matches(d))
        .map(|d| d.port.to_string())
        .collect()
}

#[test]
fn a_usb3_device_is_named_by_its_sockets_usb2_port() {
    let (dir, _b) = host();

    let s = scan_of(&dir);

    assert_eq!(physical(&s, "2-1"), "0000:00:14.0/3");
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn a_usb2_and_a_usb3_device_in_one_socket_match_one_port_selector() {
    let (usb3_dir, _b) = host();
    let (usb2_dir, b) = controllers();
    b.device(&device("1-3", 2, 3, "480")).unwrap();

    let usb3 = scan_of(&usb3_dir);
    let usb2 = scan_of(&usb2_dir);

    assert_eq!(physical(&usb2, "1-3"), physical(&usb3, "2-1"));
    assert_eq!(matching(&usb3, "port:0000:00:14.0/3"), ["2-1"]);
    assert_eq!(matching(&usb2, "port:00:14.0/3"), ["1-3"]);
}

#[test]
fn the_bus_numbered_port_form_stays_literal_to_one_bus() {
    let (dir, _b) = host();

    let s = scan_of(&dir);

    assert_eq!(matching(&s, "port:2-1"), ["2-1"]);
    assert!(matching(&s, "port:1-3").is_empty());
}

#[test]
fn behind_a_usb3_hub_both_speeds_are_named_by_the_hubs_usb2_half() {
    let (dir, _b) = host();

    let s = scan_of(&dir);

    let names: Vec<(String, String)> = ["1-4", "2-2", "2-2.1", "1-4.3"]
        .iter()
        .map(|p| (p.to_string(), physical(&s, p)))
        .collect();
    assert_eq!(
        names,
        [
            ("1-4".into(), "0000:00:14.0/4".into()),
            ("2-2".into(), "0000:00:14.0/4".into()),
            ("2-2.1".into(), "0000:00:14.0/4.2".into()),
            ("1-4.3".into(), "0000:00:14.0/4.3".into()),
        ]
    );
}

#[test]
fn a_usb3_port_without_a_twin_keeps_the_ss_marker() {
    let (dir, _b) = host();

    let s = scan_of(&dir);

    assert_eq!(physical(&s, "2-3"), "0000:00:14.0/ss3");
    assert_eq!(matching(&s, "port:0000:00:14.0/ss3"), ["2-3"]);
    assert!(matching(&s, "port:0000:00:14.0/ss1").is_empty());
}

#[test]
fn the_anchored_hub_form_matches_both_speeds_behind_the_hub_and_no_hub() {
    let (dir, _b) = host();

    let s = scan_of(&dir);

    assert_eq!(matching(&s, "hub:0000:00:14.0/4"), ["1-4.3", "2-2.1"]);
    assert!(matching(&s, "hub:0000:00:14.0/3").is_empty());
    assert!(matching(&s, "hub:0000:00:1d.7/4").is_empty());
}

#[test]
fn buses_list_their_twin_and_which_port_is_which() {
    let (dir, _b) = host();

    let s = scan_of(&dir);

    let twins: Vec<(u8, Option<u8>, Vec<PortTwin>)> = s
        .buses
        .iter()
        .map(|b| (b.number, b.twin, b.twin_ports.clone()))
        .collect();
    let pair = |port, twin| PortTwin { port, twin };
    assert_eq!(
        twins,
        [
            (1, Some(2), vec![pair(3, 1), pair(4, 2)]),
            (2, Some(1), vec![pair(1, 3), pair(2, 4)]),
            (3, None, vec![]),
        ]
    );
}

#[test]
fn an_empty_usb3_port_and_a_socket_map_to_and_from_bus_numbered_ports() {
    let (dir, _b) = controllers();
    let s = scan_of(&dir);
    let socket: PhysicalPort = "0000:00:14.0/3".parse().unwrap();
    let usb3_only: PhysicalPort = "0000:00:14.0/ss3".parse().unwrap();

    assert_eq!(
        s.physical_port_of(&"2-1".parse().unwrap()),
        Some(socket.clone())
    );
    assert_eq!(
        s.physical_port_of(&"2-3".parse().unwrap()),
        Some(usb3_only.clone())
    );
    assert_eq!(s.bus_port_of(&socket), "1-3".parse().ok());
    assert_eq!(s.bus_port_of(&usb3_only), "2-3".parse().ok());
}

#[test]
fn a_peer_link_to_another_controller_is_ignored_with_a_warning() {
    let (dir, b) = controllers();
    b.twins("usb2", 3, "usb3", 1).unwrap();
    b.device(&device("2-3", 2, 8, "5000")).unwrap();

    let s = scan_of(&dir);

    assert_eq!(physical(&s, "2-3"), "0000:00:14.0/ss3");
    assert_eq!(s.buses[2].twin, None);
    assert!(
        s.warnings.iter().any(|w| w.contains("`peer`")),
        "{:?}",
        s.warnings
    );
}

#[test]
fn a_recording_keeps_the_twins() {
    let (dir, _b) = host();
    let dest = tempfile::tempdir().unwrap();
    let into = dest.path().join("rec");

    record::record(&SysfsRoot::new(dir.path()), &into).unwrap();

    let replayed = scan(&SysfsRoot::new(&into));
    assert_eq!(replayed, scan_of(&dir));
    assert_eq!(physical(&replayed, "2-2.1"), "0000:00:14.0/4.2");
}

#[test]
fn list_shows_twin_buses_as_one_set_of_sockets() {
    let (dir, _b) = host();

    let tree = render::tree(&scan_of(&dir));

    let xhci: Vec<&str> = tree.lines().skip(1).take(7).collect();
    assert_eq!(
        xhci,
        [
            "└── bus 1  USB 2.00  480 Mb/s  4 ports + bus 2  USB 3.00  5000 Mb/s  4 ports  (twins: one socket, two speeds)",
            "    ├── 2-1  0000:00:14.0/3  dev 2  46f4:0001 QEMU  5000 Mb/s  usb-storage  serial 2-1",
            "    ├── 1-4  0000:00:14.0/4  dev 2  0409:55aa QEMU Hub  480 Mb/s  hub  serial 1-4",
            "    │   └── 1-4.3  0000:00:14.0/4.3  dev 3  0627:0001 QEMU QEMU Tablet  12 Mb/s  usbhid  serial 1-4.3",
            "    ├── 2-2  0000:00:14.0/4  dev 3  0409:55aa QEMU Hub  5000 Mb/s  hub  serial 2-2",
            "    │   └── 2-2.1  0000:00:14.0/4.2  dev 4  46f4:0001 QEMU  5000 Mb/s  usb-storage  serial 2-2.1",
            "    └── 2-3  0000:00:14.0/ss3  dev 5  46f4:0001 QEMU  5000 Mb/s  usb-storage  serial 2-3",
        ],
        "{tree}"
    );
}

/// `usbroute emit SELECTOR --for qemu --by port --json` on the host in `dir`: what
/// `attach --by port` would attach (the same target resolution).
fn emitted_by_port(dir: &tempfile::TempDir, selector: &str) -> Value {
    let out = Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--sysfs-root")
        .arg(dir.path())
        .args(["emit", selector, "--for", "qemu", "--by", "port", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn attaching_a_socket_by_port_takes_the_bus_of_the_speed_plugged() {
    let (dir, _b) = host();

    let emitted = emitted_by_port(&dir, "port:0000:00:14.0/3");

    assert_eq!(emitted["id"], "usbroute-port-2-1");
    assert_eq!(emitted["present"], true);
}

#[test]
fn attaching_an_empty_socket_by_port_waits_on_its_usb2_bus() {
    let (dir, _b) = controllers();

    let socket = emitted_by_port(&dir, "port:0000:00:14.0/3");
    let usb3_only = emitted_by_port(&dir, "port:0000:00:14.0/ss3");

    assert_eq!(
        (&socket["id"], &socket["present"]),
        (&"usbroute-port-1-3".into(), &false.into())
    );
    assert_eq!(usb3_only["id"], "usbroute-port-2-3");
}

/// `usbroute check --json`'s warnings on `rules` (after a VM `a`) on the host in `dir`.
fn check_warnings(dir: &tempfile::TempDir, rules: &str) -> Vec<String> {
    let text = format!("[[vm]]\nname = \"a\"\nqmp = \"/run/a.qmp\"\n\n{rules}");
    let out = crate::cli_check::check(dir.path(), &text, &["--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect()
}

#[test]
fn check_gives_bus_numbered_usb3_ports_and_hubs_their_sockets_name() {
    let (dir, _b) = host();

    let warnings = check_warnings(
        &dir,
        "[[rule]]\nmatch = \"port:2-1\"\nvm = \"a\"\n\n\
         [[rule]]\nmatch = \"hub:2-2\"\nvm = \"a\"\n\n\
         [[rule]]\nmatch = \"port:2-4\"\nvm = \"a\"\n",
    );

    let advice: Vec<&str> = warnings
        .iter()
        .filter_map(|w| w.split("; write ").nth(1))
        .collect();
    assert_eq!(
        advice,
        [
            "`port:0000:00:14.0/3`, the same port named by its controller",
            "`hub:0000:00:14.0/4`, the same port named by its controller",
            "`port:0000:00:14.0/ss4`, the same port named by its controller",
        ],
        "{warnings:?}"
    );
}

#[test]
fn check_says_a_usb3_side_name_of_a_twinned_socket_matches_nothing() {
    let (dir, _b) = host();

    let warnings = check_warnings(
        &dir,
        "[[rule]]\nmatch = \"port:0000:00:14.0/ss1\"\nvm = \"a\"\n\n\
         [[rule]]\nmatch = \"port:0000:00:14.0/ss3\"\nvm = \"a\"\n",
    );

    let usb3_side: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("USB 3 side"))
        .collect();
    assert_eq!(usb3_side.len(), 1, "{warnings:?}");
    assert!(
        usb3_side[0].contains(":5: `port:0000:00:14.0/ss1`")
            && usb3_side[0].ends_with("matches nothing: write `port:0000:00:14.0/3`"),
        "{}",
        usb3_side[0]
    );
}

#[test]
fn a_hub_rule_by_socket_gives_both_halves_devices_and_no_hub_naming_the_hub_each_is_behind() {
    let (dir, _b) = host();
    let s = scan_of(&dir);
    let rules = [Rule::pass(
        0,
        "hub:0000:00:14.0/4".parse().unwrap(),
        "a",
        AttachMode::Port,
    )];

    let desired = plan(&PlanInput {
        rules: &rules,
        devices: &s.devices,
        mounted_disks: &BTreeSet::new(),
        vms_up: &BTreeSet::from(["a".to_string()]),
        backends: &BTreeMap::new(),
        overrides: &BTreeMap::new(),
        follows: &BTreeMap::new(),
        controllers_owned: &BTreeMap::new(),
    });

    let decided = |port: &str| desired.devices[&port.parse().unwrap()].clone();
    for (device, hub) in [("2-2.1", "2-2"), ("1-4.3", "1-4")] {
        let decision = decided(device);
        assert!(
            matches!(decision.placement, Placement::Vm { .. }),
            "{device}"
        );
        let Reason::Rule { behind_hub, .. } = decision.reason else {
            panic!("{device}: {:?}", decision.reason)
        };
        assert_eq!(behind_hub, hub.parse().ok(), "{device}");
    }
    for hub in ["1-4", "2-2"] {
        let decision = decided(hub);
        assert_eq!(decision.placement, Placement::Host, "{hub}");
        let Reason::Hub {
            subtree: Some(subtree),
        } = decision.reason
        else {
            panic!("{hub}: {:?}", decision.reason)
        };
        assert_eq!(subtree.vm, "a", "{hub}");
    }
}
