//! Names that do not depend on bus numbers: a host controller by its PCI address (or its
//! platform device when it has no PCI parent), and a port as that controller plus the
//! chain of ports below its root hub (`0000:00:14.0/3.4.2`). The kernel numbers buses in
//! probe order, so `1-3.4.2` can become `3-3.4.2` after a reboot or a kernel update; these
//! names stay.

use super::{Bus, PciAddress, PortPath, Snapshot};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// USB allows at most 7 tiers: a root port and up to 6 hubs' ports below it.
const MAX_CHAIN: usize = 7;

/// The prefix of a platform controller's name (`platform:vhci_hcd.0`).
const PLATFORM: &str = "platform:";

/// The marker of a chain named by a SuperSpeed root hub's numbering (`0000:00:14.0/ss3`).
/// A socket is named by its USB 2 side wherever the kernel links the USB 3 port to a USB 2
/// twin (`peer`); a USB 3 port without one (no USB 2 wires, or a link the kernel did not
/// make) keeps the USB 3 numbering, and since an xHCI numbers its USB 2 and USB 3 root
/// ports separately, each from 1, the marker keeps two different sockets apart.
const SUPERSPEED: &str = "ss";

/// A USB host controller, named by the device its root hubs hang off.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ControllerName {
    /// A PCI function: `0000:00:14.0`.
    Pci(PciAddress),
    /// A controller with no PCI parent (USB/IP's `vhci_hcd.0`, an SoC's `xhci-hcd.0.auto`),
    /// by its platform device's name: `platform:vhci_hcd.0`.
    Platform(String),
}

impl ControllerName {
    /// The controller of a root hub whose sysfs directory's parent is named `parent`: a
    /// PCI function when the name is a PCI address, else a platform device. `None` for a
    /// name the grammar cannot carry (empty, or holding `/`, `,`, quotes or spaces).
    pub fn from_parent_dir(parent: &str) -> Option<ControllerName> {
        if let Ok(pci) = parent.parse() {
            return Some(ControllerName::Pci(pci));
        }
        valid_platform_name(parent).then(|| ControllerName::Platform(parent.to_string()))
    }
}

/// Letters, digits, `.`, `_`, `-`, `:`: what kernel device names use, and nothing that
/// means something in a selector.
fn valid_platform_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

impl fmt::Display for ControllerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControllerName::Pci(pci) => write!(f, "{pci}"),
            ControllerName::Platform(name) => write!(f, "{PLATFORM}{name}"),
        }
    }
}

/// Why a controller name did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a controller name (a PCI address such as 0000:00:14.0, or platform:NAME such as platform:vhci_hcd.0)")]
pub struct BadControllerName(pub String);

impl FromStr for ControllerName {
    type Err = BadControllerName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix(PLATFORM) {
            Some(name) if valid_platform_name(name) => Ok(ControllerName::Platform(name.into())),
            Some(_) => Err(BadControllerName(s.to_string())),
            None => s
                .parse()
                .map(ControllerName::Pci)
                .map_err(|_| BadControllerName(s.to_string())),
        }
    }
}

/// A physical port: the controller, and the chain of ports below its root hub.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysicalPort {
    /// The host controller.
    pub controller: ControllerName,
    /// `true` on a controller's SuperSpeed root hub (written with the `ss` marker).
    pub superspeed: bool,
    /// Port numbers from the root hub down; never empty.
    pub ports: Vec<u8>,
}

impl PhysicalPort {
    /// Where `port` is on `bus` (the bus numbered `port.bus`), `None` when the bus's
    /// controller has no name. A root port of a USB 3 root hub with a USB 2 twin is named
    /// by the twin; any other port of a USB 3 root hub gets the `ss` marker. (Deeper ports
    /// of a USB 3 bus are named by their hub port's `peer`, which the inventory reads.)
    pub fn on_bus(bus: &Bus, port: &PortPath) -> Option<PhysicalPort> {
        let controller = bus.controller_name.clone()?;
        let superspeed = bus.is_superspeed();
        if let ([root], true) = (port.ports.as_slice(), superspeed) {
            if let Some(twin) = bus.twin_of(*root) {
                return Some(PhysicalPort {
                    controller,
                    superspeed: false,
                    ports: vec![twin],
                });
            }
        }
        Some(PhysicalPort {
            controller,
            superspeed,
            ports: port.ports.clone(),
        })
    }

    /// `true` when `self` is strictly below `hub` (behind one of its ports, at any depth).
    pub fn is_behind(&self, hub: &PhysicalPort) -> bool {
        self.controller == hub.controller
            && self.superspeed == hub.superspeed
            && self.ports.len() > hub.ports.len()
            && self.ports.starts_with(&hub.ports)
    }
}

impl Snapshot {
    /// The controller-anchored name of a bus-numbered port on this host: the name of the
    /// device there if one is, else what [`PhysicalPort::on_bus`] says; `None` when no such
    /// bus is here (or its controller has no name).
    pub fn physical_port_of(&self, port: &PortPath) -> Option<PhysicalPort> {
        if let Some(named) = self.device_at(port).and_then(|d| d.physical_port.clone()) {
            return Some(named);
        }
        let bus = self.buses.iter().find(|b| b.number == port.bus)?;
        PhysicalPort::on_bus(bus, port)
    }

    /// The bus-numbered port where a device in socket `physical` shows up when it talks
    /// USB 2 (or, for an `ss` name, USB 3): on the controller's bus of that speed. `None`
    /// when no bus of that controller and speed is here.
    pub fn bus_port_of(&self, physical: &PhysicalPort) -> Option<PortPath> {
        let bus = self.buses.iter().find(|b| {
            b.controller_name.as_ref() == Some(&physical.controller)
                && b.is_superspeed() == physical.superspeed
        })?;
        Some(PortPath {
            bus: bus.number,
            ports: physical.ports.clone(),
        })
    }
}

impl fmt::Display for PhysicalPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let marker = if self.superspeed { SUPERSPEED } else { "" };
        let chain: Vec<String> = self.ports.iter().map(u8::to_string).collect();
        write!(f, "{}/{marker}{}", self.controller, chain.join("."))
    }
}

/// Why a physical port did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a physical port (expected CONTROLLER/PORT[.PORT]... such as 0000:00:14.0/3.4.2, 00:14.0/3, ss3 on a SuperSpeed root hub, or platform:vhci_hcd.0/1)")]
pub struct BadPhysicalPort(pub String);

impl FromStr for PhysicalPort {
    type Err = BadPhysicalPort;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPhysicalPort(s.to_string());
        let (controller, chain) = s.rsplit_once('/').ok_or_else(bad)?;
        let controller = controller.parse().map_err(|_| bad())?;
        let (superspeed, chain) = match chain.strip_prefix(SUPERSPEED) {
            Some(rest) => (true, rest),
            None => (false, chain),
        };
        let ports = chain
            .split('.')
            .map(|p| super::types::parse_decimal_u8(p).filter(|p| *p > 0))
            .collect::<Option<Vec<u8>>>()
            .filter(|ports| (1..=MAX_CHAIN).contains(&ports.len()))
            .ok_or_else(bad)?;
        Ok(PhysicalPort {
            controller,
            superspeed,
            ports,
        })
    }
}

impl Serialize for PhysicalPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PhysicalPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ControllerName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ControllerName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_pci_form_means_domain_0000() {
        let long: PhysicalPort = "0000:00:14.0/3.4.2".parse().unwrap();
        let short: PhysicalPort = "00:14.0/3.4.2".parse().unwrap();

        assert_eq!(long, short);
        assert_eq!(short.to_string(), "0000:00:14.0/3.4.2");
    }

    #[test]
    fn a_platform_controller_and_a_superspeed_chain_print_as_they_parse() {
        for text in [
            "platform:vhci_hcd.0/1",
            "0000:00:14.0/ss2.1",
            "platform:xhci-hcd.0.auto/ss1",
        ] {
            let port: PhysicalPort = text.parse().unwrap();
            assert_eq!(port.to_string(), text);
        }
    }

    #[test]
    fn malformed_physical_ports_are_refused() {
        for text in [
            "0000:00:14.0",
            "0000:00:14.0/",
            "0000:00:14.0/0",
            "0000:00:14.0/3..4",
            "0000:00:14.0/1.2.3.4.5.6.7.8",
            "platform:/1",
            "platform:a b/1",
            "1-3/1",
            "0000:00:14.0/ss",
        ] {
            assert!(text.parse::<PhysicalPort>().is_err(), "{text} parsed");
        }
    }

    #[test]
    fn a_root_hub_under_a_pci_function_or_a_platform_device_names_its_controller() {
        assert_eq!(
            ControllerName::from_parent_dir("0000:00:14.0"),
            Some(ControllerName::Pci("0000:00:14.0".parse().unwrap()))
        );
        assert_eq!(
            ControllerName::from_parent_dir("vhci_hcd.0"),
            Some(ControllerName::Platform("vhci_hcd.0".into()))
        );
        assert_eq!(ControllerName::from_parent_dir("a,b"), None);
    }
}
