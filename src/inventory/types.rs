//! Plain data of the host's USB world. No I/O here: readers fill it, everyone else reads it.

use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A PCI function address, `0000:00:14.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// The same slot (domain, bus, device): companions of an EHCI share it.
    pub fn same_slot(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.device == other.device
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// Why a PCI address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a PCI address (expected DDDD:BB:SS.F such as 0000:00:14.0, or BB:SS.F)")]
pub struct BadPciAddress(pub String);

impl FromStr for PciAddress {
    type Err = BadPciAddress;
    /// Accepts `0000:00:14.0` and the short `00:14.0` (domain 0), hex as lspci prints.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPciAddress(s.to_string());
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, s] => (*d, *b, *s),
            [b, s] => ("0", *b, *s),
            _ => return Err(bad()),
        };
        let hex = |t: &str, max: u32| {
            (!t.is_empty() && t.len() <= 4)
                .then(|| u32::from_str_radix(t, 16).ok())
                .flatten()
                .filter(|v| *v <= max)
                .ok_or_else(bad)
        };
        Ok(PciAddress {
            domain: hex(domain, 0xffff)? as u16,
            bus: hex(bus, 0xff)? as u8,
            device: hex(device, 31)? as u8,
            function: hex(function, 7)? as u8,
        })
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A 16-bit USB or PCI id, shown and serialised as 4 lowercase hex digits (`"046d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HexId(pub u16);

impl fmt::Display for HexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}", self.0)
    }
}

impl FromStr for HexId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let s = s.strip_prefix("0x").unwrap_or(s);
        u16::from_str_radix(s, 16).map(HexId)
    }
}

impl Serialize for HexId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HexId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a device sits: the bus and the chain of hub ports from the root hub,
/// named as the kernel names the device (`1-3.4.2`: bus 1, root port 3, then 4, then 2).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPath {
    /// USB bus number.
    pub bus: u8,
    /// Port numbers from the root hub down; never empty.
    pub ports: Vec<u8>,
}

impl PortPath {
    /// The port chain within the bus, as QEMU's `hostport` wants it (`3.4.2`).
    pub fn chain(&self) -> String {
        self.ports
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The port path of the hub this device hangs off, `None` for a root-hub port.
    pub fn parent(&self) -> Option<PortPath> {
        (self.ports.len() > 1).then(|| PortPath {
            bus: self.bus,
            ports: self.ports[..self.ports.len() - 1].to_vec(),
        })
    }

    /// `true` when `self` is strictly below `hub` (behind one of its ports, at any depth).
    pub fn is_behind(&self, hub: &PortPath) -> bool {
        self.bus == hub.bus
            && self.ports.len() > hub.ports.len()
            && self.ports.starts_with(&hub.ports)
    }
}

impl fmt::Display for PortPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.bus, self.chain())
    }
}

/// Why a port path did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a port path (expected BUS-PORT[.PORT]... such as 1-3.4.2)")]
pub struct BadPortPath(pub String);

impl FromStr for PortPath {
    type Err = BadPortPath;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPortPath(s.to_string());
        let (bus, chain) = s.split_once('-').ok_or_else(bad)?;
        let bus = parse_decimal_u8(bus).filter(|b| *b > 0).ok_or_else(bad)?;
        let ports = chain
            .split('.')
            .map(|p| parse_decimal_u8(p).filter(|p| *p > 0))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        // USB allows at most 7 tiers: a root port and up to 5 hubs below it.
        if ports.is_empty() || ports.len() > 7 {
            return Err(bad());
        }
        Ok(PortPath { bus, ports })
    }
}

/// Decimal, digits only (no sign, no spaces); leading zeros are decimal, never octal.
pub(crate) fn parse_decimal_u8(s: &str) -> Option<u8> {
    (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

impl Serialize for PortPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Link speed as the kernel reports it in `speed`, in Mb/s (1.5, 12, 480, 5000, ...).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Speed(pub f64);

impl Speed {
    /// Low (1.5) or full (12) speed: what UHCI/OHCI carry.
    pub fn is_low_or_full(&self) -> bool {
        self.0 <= 12.0
    }
    /// High speed (480): what an EHCI carries.
    pub fn is_high(&self) -> bool {
        self.0 == 480.0
    }
    /// SuperSpeed and above (5000+).
    pub fn is_super(&self) -> bool {
        self.0 >= 5000.0
    }
}

impl fmt::Display for Speed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Speed {
    /// Whole speeds as integers (`480`), the one fractional speed as `1.5`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.fract() == 0.0 && self.0 >= 0.0 && self.0 < 1e12 {
            s.serialize_u64(self.0 as u64)
        } else {
            s.serialize_f64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Speed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        f64::deserialize(d).map(Speed)
    }
}

/// A USB class triple (class, subclass, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClassTriple {
    /// bDeviceClass / bInterfaceClass.
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Protocol.
    pub protocol: u8,
}

impl ClassTriple {
    /// The hub class (9).
    pub const HUB_CLASS: u8 = 9;
}

/// Which kind of USB host controller a PCI function is, from its prog-if.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerKind {
    /// USB 1.1, Intel style (prog-if 0x00).
    Uhci,
    /// USB 1.1, open (prog-if 0x10).
    Ohci,
    /// USB 2.0 (prog-if 0x20).
    Ehci,
    /// USB 3.x (prog-if 0x30).
    Xhci,
    /// Anything else of class 0c03 (device mode 0xfe, unknown 0x80...).
    Other,
}

impl ControllerKind {
    /// From the PCI `class` attribute value (`0x0c0330`).
    pub fn from_pci_class(class: u32) -> Option<Self> {
        if class >> 8 != 0x0c03 {
            return None;
        }
        Some(match class & 0xff {
            0x00 => Self::Uhci,
            0x10 => Self::Ohci,
            0x20 => Self::Ehci,
            0x30 => Self::Xhci,
            _ => Self::Other,
        })
    }
}

impl fmt::Display for ControllerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uhci => "uhci",
            Self::Ohci => "ohci",
            Self::Ehci => "ehci",
            Self::Xhci => "xhci",
            Self::Other => "other",
        })
    }
}

/// One member of an IOMMU group, as seen from a controller in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMember {
    /// Its PCI address.
    pub pci: PciAddress,
    /// PCI class code (`0x0c0320`), if readable.
    pub class: Option<u32>,
    /// Bound driver, if any.
    pub driver: Option<String>,
    /// `true` for PCI bridges (class 0x0604): they stay with the host.
    pub bridge: bool,
}

/// A USB host controller on PCI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Controller {
    /// PCI address.
    pub pci: PciAddress,
    /// UHCI, OHCI, EHCI, xHCI or other.
    pub kind: ControllerKind,
    /// PCI vendor id.
    pub vendor_id: Option<HexId>,
    /// PCI device id.
    pub device_id: Option<HexId>,
    /// Vendor name from the PCI id database.
    pub vendor_name: Option<String>,
    /// Device name from the PCI id database.
    pub device_name: Option<String>,
    /// Bound driver (`xhci_hcd`, `vfio-pci`), `None` if unbound.
    pub driver: Option<String>,
    /// IOMMU group number, `None` without an IOMMU.
    pub iommu_group: Option<u32>,
    /// Every other function in the same IOMMU group.
    pub iommu_group_members: Vec<GroupMember>,
    /// USB bus numbers this controller provides (an xHCI has two: USB 2 and USB 3).
    pub buses: Vec<u8>,
    /// Companion controllers: UHCI/OHCI of an EHCI on the same slot, or the EHCI of a companion.
    pub companions: Vec<PciAddress>,
    /// Where it lives in sysfs (`/sys/devices/pci0000:00/0000:00:14.0`).
    pub sysfs_path: String,
}

/// A USB bus (a root hub).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bus {
    /// Bus number.
    pub number: u8,
    /// The controller providing it, `None` if not on PCI (dummy_hcd, platform controllers).
    pub controller: Option<PciAddress>,
    /// The controller by a name that does not depend on bus numbers: its PCI address, or
    /// its platform device (`platform:vhci_hcd.0`) when it has no PCI parent.
    #[serde(default)]
    pub controller_name: Option<super::ControllerName>,
    /// Root hub speed in Mb/s.
    pub speed_mbps: Option<Speed>,
    /// Number of root-hub ports.
    pub ports: Option<u8>,
    /// USB version of the root hub (`2.00`, `3.00`).
    pub version: Option<String>,
    /// The other root hub of the same controller whose ports are the same sockets: an
    /// xHCI's USB 2 and USB 3 root hubs, whose ports the kernel links pairwise (`peer`).
    /// `None` for a bus without twins (EHCI, UHCI, a USB 3 root hub with no USB 2 wires).
    #[serde(default)]
    pub twin: Option<u8>,
    /// Which of its ports has which twin on bus `twin` (the same socket at the other
    /// speed); a port not listed has none.
    #[serde(default)]
    pub twin_ports: Vec<PortTwin>,
}

/// One root-hub port and its twin: the same socket on the other root hub of the
/// controller (USB 2 and USB 3 wires of one connector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortTwin {
    /// The port on this bus.
    pub port: u8,
    /// The port on the twin bus.
    pub twin: u8,
}

impl Bus {
    /// `true` for a SuperSpeed (USB 3) root hub.
    pub fn is_superspeed(&self) -> bool {
        self.speed_mbps.is_some_and(|s| s.is_super())
            || self.version.as_deref().is_some_and(|v| v.starts_with('3'))
    }

    /// The twin of root port `port` (on bus [`Bus::twin`]), if it has one.
    pub fn twin_of(&self, port: u8) -> Option<u8> {
        self.twin_ports
            .iter()
            .find(|t| t.port == port)
            .map(|t| t.twin)
    }
}

/// One interface of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// bInterfaceNumber.
    pub number: u8,
    /// Class triple, `None` if unreadable.
    #[serde(flatten)]
    pub class: Option<ClassTriple>,
    /// Bound driver (`usbhid`, `usb-storage`), `None` if unbound.
    pub driver: Option<String>,
}

/// A USB device (never a root hub: those are [`Bus`]es).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Port path exactly as the kernel names the device, `1-3.4.2`.
    pub port: PortPath,
    /// The same place without the bus number: controller and port chain
    /// (`0000:00:14.0/3.4.2`); stays across reboots that renumber the buses. `None` when
    /// the bus's controller is not known.
    #[serde(default)]
    pub physical_port: Option<super::PhysicalPort>,
    /// Bus number.
    pub bus: u8,
    /// Device address on the bus (devnum), `None` if unreadable.
    pub address: Option<u16>,
    /// Vendor id.
    pub vendor_id: Option<HexId>,
    /// Product id.
    pub product_id: Option<HexId>,
    /// Manufacturer string (sysfs, else the usb-ids database).
    pub manufacturer: Option<String>,
    /// Product string (sysfs, else the usb-ids database).
    pub product: Option<String>,
    /// Serial number, `None` if the device has none.
    pub serial: Option<String>,
    /// Device class triple.
    pub class: Option<ClassTriple>,
    /// Link speed in Mb/s.
    pub speed_mbps: Option<Speed>,
    /// `true` for hubs (class 9): never passed to a VM themselves.
    pub hub: bool,
    /// The kernel's `removable` (`removable`, `fixed`, `unknown`).
    pub removable: Option<String>,
    /// The PCI controller the device hangs off, `None` if not on PCI.
    pub controller: Option<PciAddress>,
    /// The hub it is plugged into, `None` when on a root-hub port.
    pub parent: Option<PortPath>,
    /// Its directory in sysfs (`/sys/devices/.../usb1/1-3`).
    pub sysfs_path: String,
    /// Driver of the device itself (`usb`, `usbfs` while QEMU holds it), if any.
    pub driver: Option<String>,
    /// Every interface of the active configuration.
    pub interfaces: Vec<Interface>,
    /// Host network interfaces carried by this device (`usb0`, `enx...`).
    #[serde(default)]
    pub netdevs: Vec<String>,
    /// Host block devices on this device (`sda`).
    #[serde(default)]
    pub block_devices: Vec<String>,
}

impl Device {
    /// A device at `port` of which nothing else is known: the base for a device named
    /// before it is seen (an absent device attached by port) and for building test data
    /// with struct-update syntax.
    pub fn at(port: PortPath) -> Device {
        Device {
            bus: port.bus,
            parent: port.parent(),
            port,
            physical_port: None,
            address: None,
            vendor_id: None,
            product_id: None,
            manufacturer: None,
            product: None,
            serial: None,
            class: None,
            speed_mbps: None,
            hub: false,
            removable: None,
            controller: None,
            sysfs_path: String::new(),
            driver: None,
            interfaces: Vec::new(),
            netdevs: Vec::new(),
            block_devices: Vec::new(),
        }
    }

    /// Short human name: `046d:c016 Logitech Optical Mouse`.
    pub fn label(&self) -> String {
        let id = match (self.vendor_id, self.product_id) {
            (Some(v), Some(p)) => format!("{v}:{p}"),
            _ => "????:????".to_string(),
        };
        // The device chose these strings: escaped and cut, as every human output needs.
        let name = [self.manufacturer.as_deref(), self.product.as_deref()]
            .into_iter()
            .flatten()
            .map(super::text::printable)
            .collect::<Vec<_>>()
            .join(" ");
        if name.is_empty() {
            id
        } else {
            format!("{id} {name}")
        }
    }
}

/// Everything usbroute knows about the host's USB at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// USB host controllers on PCI, sorted by address.
    pub controllers: Vec<Controller>,
    /// USB buses (root hubs), sorted by number.
    pub buses: Vec<Bus>,
    /// USB devices, sorted by port path. Shared: the daemon hands the engine the same
    /// list it keeps, and a change copies it (`Arc::make_mut`) only while the engine
    /// still holds the one before.
    pub devices: Arc<Vec<Device>>,
    /// What could not be read, one line each ("1-3: speed `x` is not a number").
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// The device at a port path.
    pub fn device_at(&self, port: &PortPath) -> Option<&Device> {
        self.devices.iter().find(|d| &d.port == port)
    }

    /// The controller at a PCI address.
    pub fn controller(&self, pci: &PciAddress) -> Option<&Controller> {
        self.controllers.iter().find(|c| &c.pci == pci)
    }
}

/// Can a controller's IOMMU group go to a VM alone (`controllers`' `verdict`): USB
/// companions on the controller's own slot go along, any other member (PCI bridges aside,
/// they stay) blocks. Plain data: `crate::vfio::isolation_summary` computes it from the
/// one passthrough verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IsolationSummary {
    /// `true` when nothing blocks giving the group to a VM.
    pub alone: bool,
    /// The controller's IOMMU group, `None` without an IOMMU.
    pub iommu_group: Option<u32>,
    /// USB controllers of the same slot (companions): they leave with the controller.
    pub goes_along: Vec<PciAddress>,
    /// Why the group cannot go alone; empty when it can.
    pub blockers: Vec<Blocker>,
}

/// One reason a group cannot go to a VM alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Blocker {
    /// The group member in the way, `None` for reasons about the controller itself.
    pub pci: Option<PciAddress>,
    /// What is wrong, naming the member and what to do.
    pub reason: String,
}
