//! Which port a device sits on, the rows of `usbroute ports`, and what the `ports map`
//! wizard sees light up, on hand-built inventory snapshots of a Lynx Point machine.

use std::collections::BTreeMap;
use usbroute::inventory::{Bus, Device, HexId, PciAddress, Snapshot, Speed};
use usbroute::routing::chipset::chipset_for_xhci;
use usbroute::routing::detect::{Detected, EhciController, Registers};
use usbroute::routing::labels::arrivals;
use usbroute::routing::ports::{port_bit_of, rows};
use usbroute::routing::profile::Route;

// Bus 1: EHCI #2 (00:1a.0), bus 2: EHCI #1 (00:1d.0), bus 3: xHCI USB 2, bus 4: xHCI USB 3.
fn pci(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn lynx() -> Detected {
    Detected {
        xhci: pci("0000:00:14.0"),
        chipset: chipset_for_xhci(0x8c31).unwrap(),
        ehci: vec![
            EhciController {
                pci: pci("0000:00:1d.0"),
                number: 1,
            },
            EhciController {
                pci: pci("0000:00:1a.0"),
                number: 2,
            },
        ],
    }
}

fn bus(number: u8, controller: &str, speed: f64) -> Bus {
    Bus {
        number,
        controller: Some(pci(controller)),
        controller_name: None,
        speed_mbps: Some(Speed(speed)),
        ports: None,
        version: None,
        twin: None,
        twin_ports: Vec::new(),
    }
}

fn device(port: &str, address: u16, controller: &str, hub: bool) -> Device {
    let port: usbroute::inventory::PortPath = port.parse().unwrap();
    Device {
        address: Some(address),
        vendor_id: Some(HexId(0x0781)),
        product_id: Some(HexId(0x5567)),
        manufacturer: Some("Acme".into()),
        product: Some("Stick".into()),
        hub,
        controller: Some(pci(controller)),
        ..Device::at(port)
    }
}

fn snapshot(devices: Vec<Device>) -> Snapshot {
    Snapshot {
        controllers: vec![],
        buses: vec![
            bus(1, "0000:00:1a.0", 480.0),
            bus(2, "0000:00:1d.0", 480.0),
            bus(3, "0000:00:14.0", 480.0),
            bus(4, "0000:00:14.0", 5000.0),
        ],
        devices: devices.into(),
        warnings: vec![],
    }
}

fn rate_matching_hubs() -> Vec<Device> {
    vec![
        device("1-1", 2, "0000:00:1a.0", true),
        device("2-1", 2, "0000:00:1d.0", true),
    ]
}

#[test]
fn a_device_behind_the_ehci_rate_matching_hub_is_on_that_ehci_port() {
    let snap = snapshot(vec![device("1-1.3", 5, "0000:00:1a.0", false)]);

    assert_eq!(port_bit_of(&snap.devices[0], &snap, &lynx()), Some(10));
}

#[test]
fn the_rate_matching_hub_itself_is_on_no_port() {
    let snap = snapshot(rate_matching_hubs());

    assert_eq!(port_bit_of(&snap.devices[0], &snap, &lynx()), None);
}

#[test]
fn a_device_behind_a_user_hub_counts_for_the_physical_port() {
    let snap = snapshot(vec![device("2-1.4.2", 9, "0000:00:1d.0", false)]);

    assert_eq!(port_bit_of(&snap.devices[0], &snap, &lynx()), Some(3));
}

#[test]
fn a_device_on_the_xhci_usb2_bus_maps_root_port_to_bit() {
    let snap = snapshot(vec![device("3-11", 4, "0000:00:14.0", false)]);

    assert_eq!(port_bit_of(&snap.devices[0], &snap, &lynx()), Some(10));
}

#[test]
fn a_superspeed_device_maps_to_its_usb2_partner() {
    let snap = snapshot(vec![
        device("4-2", 2, "0000:00:14.0", false),
        device("4-7", 3, "0000:00:14.0", false),
    ]);

    let bits: Vec<_> = snap
        .devices
        .iter()
        .map(|d| port_bit_of(d, &snap, &lynx()))
        .collect();

    assert_eq!(bits, vec![Some(1), None]);
}

#[test]
fn rows_show_route_switchability_superspeed_label_and_devices() {
    let snap = snapshot(vec![device("1-1.3", 5, "0000:00:1a.0", false)]);
    let regs = Registers {
        xusb2pr: 0x3bfc,
        xusb2prm: 0x1fff,
        usb3_pssen: 0x3c,
        usb3prm: 0x3f,
    };
    let labels = BTreeMap::from([("front-left".to_string(), "ehci2:3".to_string())]);

    let table = rows(&lynx(), &regs, &labels, &snap);

    assert_eq!(table.len(), 14);
    assert_eq!(
        (
            table[0].routed_to,
            table[0].superspeed,
            table[13].switchable
        ),
        (Route::Ehci, Some(false), false)
    );
    assert_eq!(table[10].label.as_deref(), Some("front-left"));
    assert_eq!(
        table[10].devices,
        vec!["1-1.3 0781:5567 Acme Stick".to_string()]
    );
    assert_eq!(table[10].ehci_pci, Some(pci("0000:00:1a.0")));
}

#[test]
fn the_wizard_sees_a_plugged_device_light_up_its_port() {
    let before = snapshot(rate_matching_hubs());
    let mut devices = rate_matching_hubs();
    devices.push(device("2-1.5", 7, "0000:00:1d.0", false));
    let after = snapshot(devices);

    let hits = arrivals(&before, &after, &lynx());

    assert_eq!(hits.len(), 1);
    assert_eq!(
        (hits[0].port.to_string(), hits[0].bit),
        ("ehci1:5".to_string(), 4)
    );
    assert_eq!(hits[0].device, "2-1.5 0781:5567 Acme Stick");
}

#[test]
fn the_wizard_counts_a_replug_into_the_same_port() {
    let before = snapshot(vec![device("3-5", 7, "0000:00:14.0", false)]);
    let after = snapshot(vec![device("3-5", 8, "0000:00:14.0", false)]);

    let hits = arrivals(&before, &after, &lynx());

    assert_eq!(hits.iter().map(|h| h.bit).collect::<Vec<_>>(), vec![4]);
}

#[test]
fn the_wizard_reports_a_hub_and_its_children_as_one_port() {
    let before = snapshot(vec![]);
    let after = snapshot(vec![
        device("3-2", 3, "0000:00:14.0", true),
        device("3-2.1", 4, "0000:00:14.0", false),
        device("4-2", 2, "0000:00:14.0", true),
    ]);

    let hits = arrivals(&before, &after, &lynx());

    assert_eq!(hits.iter().map(|h| h.bit).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn the_wizard_ignores_devices_that_were_already_there_and_other_controllers() {
    let stick = device("2-1.5", 7, "0000:00:1d.0", false);
    let before = snapshot(vec![stick.clone()]);
    let after = snapshot(vec![stick, device("5-1", 2, "0000:03:00.0", false)]);

    assert!(arrivals(&before, &after, &lynx()).is_empty());
}
