//! Keeping a [`Snapshot`] current one device at a time: a uevent names one USB object,
//! and only that device (and its hubs, when they are new to the picture) is read again,
//! instead of all of `/sys/bus/usb/devices`.
//!
//! The rule that keeps a patched picture equal to a full [`super::scan`] of the same tree:
//! a device is read as sysfs has it *now*, whatever the event said. Present: read and
//! put in its place (replacing the old entry). Absent: dropped with everything behind it
//! (a hub's children cannot outlive it). Every change to a device is followed by an event
//! for it, so the last event of each device reads its last state, however late the event
//! is handled and in whatever order a batch of them is. Buses (root hubs) and PCI
//! controllers are not patched: a root hub's event asks for a full scan.

use super::reader::{Reader, ScanFailed};
use super::usb::{self, Entry, USB_DEVICES};
use super::{Device, PortPath, Snapshot};
use crate::sysfs::SysfsRoot;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

/// The USB object a uevent's `DEVPATH` belongs to, as the inventory keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbObject {
    /// A device, or something of it (an interface, a network interface or a disk below
    /// one of its interfaces): that device is read again.
    Device(PortPath),
    /// A root hub itself: a bus came or went, which only a full scan reads.
    Bus(u8),
}

/// The USB object `devpath` (the kernel's `DEVPATH`, `/devices/.../usb1/1-3/1-3:1.0`)
/// belongs to: the deepest device in the chain of USB names that starts at a root hub
/// (`usb1/1-3/1-3.2`), looked at no further than the first name that is not a device or
/// an interface (`net`, `host6`), so a network interface called `usb1` below a device is
/// not a bus. By names alone, a path ending in `usbN` is a root hub: the caller knows from
/// the event's subsystem whether it is one. `None` for paths outside USB and for a root
/// hub's own interface and ports.
pub fn usb_object(devpath: &str) -> Option<UsbObject> {
    let mut names = devpath.split('/').filter(|n| !n.is_empty());
    let bus = names.find_map(|n| match usb::classify(n) {
        Some(Entry::RootHub(bus)) => Some(bus),
        _ => None,
    })?;
    let mut device = None;
    let mut rest = names.peekable();
    if rest.peek().is_none() {
        return Some(UsbObject::Bus(bus));
    }
    for name in rest {
        match usb::classify(name) {
            Some(Entry::Device(port)) if port.bus == bus => device = Some(port),
            Some(Entry::Interface { .. }) if device.is_some() => {}
            _ => break,
        }
    }
    device.map(UsbObject::Device)
}

/// What [`patch`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patched {
    /// `true` when the device list changed.
    pub changed: bool,
    /// What could not be read, as [`Snapshot::warnings`] words it.
    pub warnings: Vec<String>,
}

/// Why a patch was not applied; the caller scans in full instead. The snapshot is left
/// as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchFailed {
    /// A read failed in a way that makes what was read untrustworthy.
    #[error(transparent)]
    Read(#[from] ScanFailed),
    /// A device on a bus the snapshot does not have: the bus is new, and only a full scan
    /// reads buses.
    #[error("device {0} is on bus {bus}, which the picture does not have yet; a full scan reads it", bus = .0.bus)]
    UnknownBus(PortPath),
}

/// Make `snapshot` agree with sysfs under `root` about each device in `devices` (and
/// whatever is behind them, when they are gone): read the ones present, with any hub
/// above them that the snapshot lacks; drop the absent ones with their subtrees.
///
/// All reads happen before any change: on `Err` the snapshot is untouched.
pub fn patch<'p>(
    root: &SysfsRoot,
    snapshot: &mut Snapshot,
    devices: impl IntoIterator<Item = &'p PortPath>,
) -> Result<Patched, PatchFailed> {
    let mut reader = Reader::new(root);
    let mut read: Vec<(PortPath, Option<Device>)> = Vec::new();
    let mut seen: BTreeSet<PortPath> = BTreeSet::new();
    for port in devices {
        // Hubs above first (top down), each only when neither the snapshot nor this
        // patch has it: a device read before its hub would be a device without a parent.
        let mut chain: Vec<PortPath> = std::iter::successors(port.parent(), PortPath::parent)
            .filter(|hub| !listed(&snapshot.devices, hub))
            .collect();
        chain.reverse();
        chain.push(port.clone());
        for path in chain {
            if !seen.insert(path.clone()) {
                continue;
            }
            if !snapshot.buses.iter().any(|b| b.number == path.bus) {
                return Err(PatchFailed::UnknownBus(path));
            }
            let device = read_one(&mut reader, snapshot, &path);
            read.push((path, device));
        }
    }
    if let Some(failed) = reader.failure() {
        return Err(failed.clone().into());
    }
    let (warnings, _) = reader.finish();
    let mut changed = false;
    for (port, device) in read {
        changed |= match device {
            Some(device) => put(&mut snapshot.devices, device),
            None => drop_subtree(&mut snapshot.devices, &port),
        };
    }
    Ok(Patched { changed, warnings })
}

/// Device `port` as sysfs has it now, `None` when it is not there (no link in
/// `/sys/bus/usb/devices`, as a full scan would not list it).
fn read_one(r: &mut Reader, snapshot: &Snapshot, port: &PortPath) -> Option<Device> {
    let name = port.to_string();
    let dir = r.follow(&Path::new(USB_DEVICES).join(&name))?;
    // Its interfaces are directories of its own named `NAME:C.I`; a full scan knows them
    // by their links in `/sys/bus/usb/devices`, so only the linked ones count.
    let interfaces = r
        .list(&dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| match usb::classify(&entry) {
            Some(Entry::Interface { device, number }) if device == name => Some((number, entry)),
            _ => None,
        })
        .filter(|(_, entry)| r.follow(&Path::new(USB_DEVICES).join(entry)).is_some())
        .collect();
    let mut device = usb::read_device(r, port.clone(), &name, interfaces);
    device.physical_port = usb::physical_port(r, &snapshot.buses, &device);
    Some(device)
}

/// Whether the sorted list has a device at `port`.
fn listed(devices: &[Device], port: &PortPath) -> bool {
    devices.binary_search_by(|d| d.port.cmp(port)).is_ok()
}

/// Put `device` in its place in the sorted list; `true` if the list changed. The list
/// is copied (the engine may hold the one before) only when it changes.
fn put(devices: &mut Arc<Vec<Device>>, device: Device) -> bool {
    match devices.binary_search_by(|d| d.port.cmp(&device.port)) {
        Ok(at) if devices[at] == device => false,
        Ok(at) => {
            Arc::make_mut(devices)[at] = device;
            true
        }
        Err(at) => {
            Arc::make_mut(devices).insert(at, device);
            true
        }
    }
}

/// Drop the device at `port` and every device behind it; `true` if any was there.
fn drop_subtree(devices: &mut Arc<Vec<Device>>, port: &PortPath) -> bool {
    let gone = |d: &Device| d.port == *port || d.port.is_behind(port);
    if !devices.iter().any(gone) {
        return false;
    }
    Arc::make_mut(devices).retain(|d| !gone(d));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(s: &str) -> Option<UsbObject> {
        Some(UsbObject::Device(s.parse().unwrap()))
    }

    #[test]
    fn a_device_its_interfaces_and_what_hangs_below_them_belong_to_the_device() {
        let base = "/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3.2";

        assert_eq!(usb_object(base), device("1-3.2"));
        assert_eq!(usb_object(&format!("{base}/1-3.2:1.0")), device("1-3.2"));
        assert_eq!(
            usb_object(&format!("{base}/1-3.2:1.0/net/usb1")),
            device("1-3.2")
        );
        assert_eq!(
            usb_object(&format!(
                "{base}/1-3.2:1.0/host6/target6:0:0/6:0:0:0/block/sdb"
            )),
            device("1-3.2")
        );
        assert_eq!(
            usb_object("/devices/platform/vhci_hcd.0/usb3/3-1"),
            device("3-1")
        );
    }

    #[test]
    fn a_root_hub_itself_is_its_bus_and_its_own_interface_and_ports_are_nothing() {
        let hub = "/devices/pci0000:00/0000:00:14.0/usb2";

        assert_eq!(usb_object(hub), Some(UsbObject::Bus(2)));
        assert_eq!(usb_object(&format!("{hub}/2-0:1.0")), None);
        assert_eq!(usb_object(&format!("{hub}/2-0:1.0/usb2-port1")), None);
        assert_eq!(usb_object("/devices/virtual/mem/null"), None);
    }

    #[test]
    fn put_keeps_the_list_sorted_and_says_whether_it_changed() {
        let at = |s: &str| Device::at(s.parse().unwrap());
        let mut list = Arc::new(vec![at("1-1"), at("1-3")]);
        let engines = list.clone();

        assert!(!put(&mut list, at("1-3")));
        assert!(Arc::ptr_eq(&list, &engines), "no change, no copy");
        assert!(put(&mut list, at("1-2")));
        assert!(!put(&mut list, at("1-2")));
        let ports: Vec<String> = list.iter().map(|d| d.port.to_string()).collect();
        assert_eq!(ports, ["1-1", "1-2", "1-3"]);
        assert_eq!(engines.len(), 2, "the list another holds is not changed");
    }

    #[test]
    fn dropping_a_hub_drops_what_is_behind_it_and_nothing_else() {
        let at = |s: &str| Device::at(s.parse().unwrap());
        let mut list = Arc::new(vec![
            at("1-1"),
            at("1-1.2"),
            at("1-1.2.3"),
            at("1-10"),
            at("2-1"),
        ]);

        assert!(!drop_subtree(&mut list, &"1-2".parse().unwrap()));
        assert!(drop_subtree(&mut list, &"1-1".parse().unwrap()));
        let ports: Vec<String> = list.iter().map(|d| d.port.to_string()).collect();
        assert_eq!(ports, ["1-10", "2-1"]);
    }
}
