//! The Xen backend's readers on what a real Xen 4.17 printed (tests/fixtures/xen/, saved
//! by the test bed's `xen-manual` scenario): `xl usb-list` with no device, with a keyboard
//! attached by hand, and after that keyboard was pulled out while attached; and the qusb
//! backend's xenstore nodes at the same moments, judged as the daemon judges them.

use std::collections::BTreeMap;
use std::path::Path;
use usbroute::backend::xen::usb_list::{parse_usb_list, HostAddr};
use usbroute::backend::xen::xenstore::{domain_ports, judge, PortValue, PortVerdict};
use usbroute::inventory::PortPath;

fn recording(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/xen")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `xenstore-ls /local/domain/0/backend/qusb` (a tree, one space of indent per level) as
/// the paths and values the daemon reads.
fn xenstore_nodes(ls: &str) -> Vec<(String, String)> {
    let mut stack: Vec<String> = Vec::new();
    let mut nodes = Vec::new();
    for line in ls.lines().filter(|l| !l.trim().is_empty()) {
        let depth = line.len() - line.trim_start().len();
        let (name, value) = line
            .trim_start()
            .split_once(" = ")
            .expect("NAME = \"VALUE\"");
        stack.truncate(depth);
        stack.push(name.to_string());
        let path = format!("/local/domain/0/backend/qusb/{}", stack.join("/"));
        nodes.push((path, value.trim_matches('"').to_string()));
    }
    nodes
}

fn busid(text: &str) -> PortPath {
    text.parse().unwrap()
}

#[test]
fn usb_list_with_nothing_attached_is_one_connected_qusb_controller_of_eight_free_ports() {
    let ctrls = parse_usb_list(&recording("none.usb-list.txt")).unwrap();

    assert_eq!(ctrls.len(), 1);
    let ctrl = &ctrls[0];
    assert_eq!((ctrl.devid, ctrl.kind.as_str(), ctrl.ports), (0, "qusb", 8));
    assert!(ctrl.is_connected());
    assert_eq!(ctrl.listed.len(), 8);
    assert!(ctrl.listed.iter().all(|p| p.device.is_none()));
}

#[test]
fn usb_list_shows_the_keyboard_attached_by_hand_on_port_1() {
    let ctrls = parse_usb_list(&recording("attached.usb-list.txt")).unwrap();

    let port1 = &ctrls[0].listed[0];
    assert_eq!(port1.port, 1);
    assert_eq!(port1.device, Some(HostAddr { bus: 1, address: 2 }));
    assert!(ctrls[0].listed[1..].iter().all(|p| p.device.is_none()));
}

#[test]
fn after_a_surprise_removal_usb_list_shows_port_1_empty_while_xenstore_still_holds_its_busid() {
    let ctrls = parse_usb_list(&recording("surprise-removed.usb-list.txt")).unwrap();
    let nodes = xenstore_nodes(&recording("surprise-removed.xenstore-ls.txt"));
    let ports = domain_ports(1, nodes.iter().map(|(p, v)| (p.as_str(), v.as_str())));

    assert!(ctrls[0].listed.iter().all(|p| p.device.is_none()));
    assert_eq!(
        ports.ports.get(&(0, 1)),
        Some(&PortValue::Busid(busid("1-1")))
    );
}

#[test]
fn the_users_port_is_not_ours_and_present_while_attached_and_stale_once_its_device_left() {
    let attached = xenstore_nodes(&recording("attached.xenstore-ls.txt"));
    let removed = xenstore_nodes(&recording("surprise-removed.xenstore-ls.txt"));
    let none = xenstore_nodes(&recording("none.xenstore-ls.txt"));
    let read = |nodes: &[(String, String)]| {
        domain_ports(1, nodes.iter().map(|(p, v)| (p.as_str(), v.as_str())))
    };
    let with_keyboard: BTreeMap<PortPath, u16> = [(busid("1-1"), 2)].into();
    let without: BTreeMap<PortPath, u16> = BTreeMap::new();

    let while_attached = judge(&read(&attached), &with_keyboard);
    let after_removal = judge(&read(&removed), &without);
    let empty = judge(&read(&none), &without);

    assert_eq!(while_attached.len(), 8);
    assert_eq!(
        while_attached[0].verdict,
        PortVerdict::NotOurs {
            value: PortValue::Busid(busid("1-1")),
            present: true
        }
    );
    assert_eq!(
        after_removal[0].verdict,
        PortVerdict::NotOurs {
            value: PortValue::Busid(busid("1-1")),
            present: false
        }
    );
    for reports in [&while_attached[1..], &after_removal[1..], &empty[..]] {
        assert!(reports
            .iter()
            .all(|r| r.verdict == PortVerdict::Free && !r.leftover_mark));
    }
}
