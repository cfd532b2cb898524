//! One row per switchable port, and which port a USB device sits on.
//!
//! A port has two faces: on an EHCI it is port P of the rate-matching hub behind root
//! port 1 (the device is `B-1.P...`); on the xHCI it is USB 2.0 root port `bit + 1`
//! (`B-P...`), and, if it has one, SuperSpeed root port `k + 1` of the SuperSpeed
//! partner on the xHCI's USB 3 bus.

use super::detect::{Detected, Registers};
use super::profile::{label_of, EhciPort, Route};
use crate::inventory::{Device, PciAddress, Snapshot};
use serde::Serialize;
use std::collections::BTreeMap;

/// One switchable USB 2.0 port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortRow {
    /// The port as `ehciN:P`.
    pub port: EhciPort,
    /// The PCI address of its EHCI, if present.
    pub ehci_pci: Option<PciAddress>,
    /// XUSB2PR bit.
    pub bit: u8,
    /// Where it is routed now.
    pub routed_to: Route,
    /// Whether XUSB2PRM lets the OS switch it.
    pub switchable: bool,
    /// Whether its SuperSpeed partner is enabled; `None` when it has none.
    pub superspeed: Option<bool>,
    /// The user's label.
    pub label: Option<String>,
    /// Devices on it now (`3-1.2 046d:c016 Logitech Optical Mouse`).
    pub devices: Vec<String>,
}

/// The XUSB2PR bit of the physical port a device hangs off (through any hubs), `None`
/// when it is not on a port of this chipset.
pub fn port_bit_of(device: &Device, snapshot: &Snapshot, detected: &Detected) -> Option<u8> {
    let chipset = detected.chipset;
    let controller = device.controller?;
    let root_port = *device.port.ports.first()?;
    if controller == detected.xhci {
        let bus = snapshot.buses.iter().find(|b| b.number == device.bus)?;
        let superspeed = bus.speed_mbps.map(|s| s.is_super()).unwrap_or(false)
            || bus.version.as_deref().is_some_and(|v| v.starts_with('3'));
        let index = root_port.checked_sub(1)?;
        return if superspeed {
            chipset.superspeed_partner(index)
        } else {
            (index < chipset.high_speed_ports()).then_some(index)
        };
    }
    let ehci = detected.ehci.iter().find(|e| e.pci == controller)?;
    // Behind the EHCI's root port 1 sits the rate-matching hub; its ports are the
    // physical ports. The hub itself (`B-1`) is on no switchable port.
    if root_port != 1 {
        return None;
    }
    let port = *device.port.ports.get(1)?;
    EhciPort {
        ehci: ehci.number,
        port,
    }
    .bit(chipset)
}

/// Every port of the chipset with its state, labels and the devices on it.
pub fn rows(
    detected: &Detected,
    regs: &Registers,
    labels: &BTreeMap<String, String>,
    snapshot: &Snapshot,
) -> Vec<PortRow> {
    let chipset = detected.chipset;
    (0..chipset.high_speed_ports())
        .map(|bit| {
            let port = EhciPort::of_bit(chipset, bit).expect("bit within the chipset");
            let devices = snapshot
                .devices
                .iter()
                .filter(|d| port_bit_of(d, snapshot, detected) == Some(bit))
                .map(|d| format!("{} {}", d.port, d.label()))
                .collect();
            PortRow {
                port,
                ehci_pci: detected.ehci_pci(port.ehci),
                bit,
                routed_to: Route::of_bit(regs.xusb2pr, bit),
                switchable: regs.xusb2prm & (1 << bit) != 0,
                superspeed: chipset
                    .superspeed_port_of(bit)
                    .map(|ss| regs.usb3_pssen & (1 << ss) != 0),
                label: label_of(labels, chipset, bit),
                devices,
            }
        })
        .collect()
}
