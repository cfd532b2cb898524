//! Which Intel chipsets have switchable USB 2.0 ports, and how their bits map to EHCI ports.
//!
//! Facts from the Intel 7/8/9-series and X99 PCH datasheets as summarised in
//! `shared/notes/intel-port-routing.md`. 100-series and later PCHs have no EHCI, so
//! there is nothing to switch on them.

use std::fmt;

/// Intel's PCI vendor id.
pub const INTEL_VENDOR: u16 = 0x8086;

/// One EHCI controller of a chipset and the XUSB2PR bits its ports own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EhciLayout {
    /// PCI device id of this EHCI.
    pub device_id: u16,
    /// Its number as users see it in `ehciN:P` (1 for 00:1d.0, 2 for 00:1a.0).
    pub number: u8,
    /// XUSB2PR bit of its port 1.
    pub first_bit: u8,
    /// How many ports sit behind its rate-matching hub.
    pub ports: u8,
}

/// A chipset whose USB 2.0 ports can move between the xHCI and its EHCIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chipset {
    /// PCI device id of the xHCI.
    pub xhci_device_id: u16,
    /// Marketing name, for messages.
    pub name: &'static str,
    /// The EHCI controllers, EHCI #1 first.
    pub ehci: &'static [EhciLayout],
    /// Number of SuperSpeed ports (bits of USB3_PSSEN).
    pub superspeed_ports: u8,
}

impl Chipset {
    /// Number of USB 2.0 ports the routing register has bits for.
    pub fn high_speed_ports(&self) -> u8 {
        self.ehci.iter().map(|e| e.ports).sum()
    }

    /// Every XUSB2PR bit that exists on this chipset (`0x3fff` for 14 ports).
    pub fn port_bits(&self) -> u16 {
        ((1u32 << self.high_speed_ports()) - 1) as u16
    }

    /// Every USB3_PSSEN bit that exists on this chipset.
    pub fn superspeed_bits(&self) -> u32 {
        (1u32 << self.superspeed_ports) - 1
    }

    /// The XUSB2PR bit of the USB 2.0 port that shares a connector with SuperSpeed
    /// port `ss` (0-based). The PCH pairs SuperSpeed port N with USB 2.0 port N.
    pub fn superspeed_partner(&self, ss: u8) -> Option<u8> {
        (ss < self.superspeed_ports && ss < self.high_speed_ports()).then_some(ss)
    }

    /// The SuperSpeed port (0-based) sharing a connector with XUSB2PR bit `bit`, if any.
    pub fn superspeed_port_of(&self, bit: u8) -> Option<u8> {
        (0..self.superspeed_ports).find(|ss| self.superspeed_partner(*ss) == Some(bit))
    }

    /// The EHCI with user-facing number `number`.
    pub fn ehci_number(&self, number: u8) -> Option<&EhciLayout> {
        self.ehci.iter().find(|e| e.number == number)
    }

    /// `(EHCI number, port)` of an XUSB2PR bit.
    pub fn ehci_port_of(&self, bit: u8) -> Option<(u8, u8)> {
        self.ehci
            .iter()
            .find(|e| bit >= e.first_bit && bit < e.first_bit + e.ports)
            .map(|e| (e.number, bit - e.first_bit + 1))
    }
}

impl fmt::Display for Chipset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (xHCI 8086:{:04x})", self.name, self.xhci_device_id)
    }
}

const fn ehci(device_id: u16, number: u8, first_bit: u8, ports: u8) -> EhciLayout {
    EhciLayout {
        device_id,
        number,
        first_bit,
        ports,
    }
}

/// Every chipset usbroute knows how to switch.
pub const CHIPSETS: &[Chipset] = &[
    Chipset {
        xhci_device_id: 0x1e31,
        name: "7-series Panther Point",
        ehci: &[ehci(0x1e26, 1, 0, 8), ehci(0x1e2d, 2, 8, 6)],
        superspeed_ports: 4,
    },
    Chipset {
        xhci_device_id: 0x8c31,
        name: "8-series Lynx Point",
        ehci: &[ehci(0x8c26, 1, 0, 8), ehci(0x8c2d, 2, 8, 6)],
        superspeed_ports: 6,
    },
    Chipset {
        xhci_device_id: 0x9c31,
        name: "8-series Lynx Point-LP",
        ehci: &[ehci(0x9c26, 1, 0, 8)],
        superspeed_ports: 4,
    },
    Chipset {
        xhci_device_id: 0x8cb1,
        name: "9-series Wildcat Point",
        ehci: &[ehci(0x8ca6, 1, 0, 8), ehci(0x8cad, 2, 8, 6)],
        superspeed_ports: 6,
    },
    Chipset {
        xhci_device_id: 0x9cb1,
        name: "9-series Wildcat Point-LP",
        ehci: &[ehci(0x9ca6, 1, 0, 8)],
        superspeed_ports: 4,
    },
    Chipset {
        xhci_device_id: 0x8d31,
        name: "X99 Wellsburg",
        ehci: &[ehci(0x8d26, 1, 0, 8), ehci(0x8d2d, 2, 8, 6)],
        superspeed_ports: 6,
    },
];

/// The chipset of an Intel xHCI with device id `device_id`, `None` if it has no
/// switchable ports (or is not known to have them).
pub fn chipset_for_xhci(device_id: u16) -> Option<&'static Chipset> {
    CHIPSETS.iter().find(|c| c.xhci_device_id == device_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lynx_point_has_fourteen_ports_on_two_ehcis() {
        let c = chipset_for_xhci(0x8c31).unwrap();
        assert_eq!(c.port_bits(), 0x3fff);
        assert_eq!(c.ehci_port_of(0), Some((1, 1)));
        assert_eq!(c.ehci_port_of(7), Some((1, 8)));
        assert_eq!(c.ehci_port_of(8), Some((2, 1)));
        assert_eq!(c.ehci_port_of(13), Some((2, 6)));
        assert_eq!(c.ehci_port_of(14), None);
    }

    #[test]
    fn lynx_point_lp_has_eight_ports_and_four_superspeed() {
        let c = chipset_for_xhci(0x9c31).unwrap();
        assert_eq!(c.port_bits(), 0x00ff);
        assert_eq!(c.superspeed_bits(), 0xf);
        assert_eq!(c.superspeed_port_of(3), Some(3));
        assert_eq!(c.superspeed_port_of(4), None);
    }

    #[test]
    fn sunrise_point_xhci_is_not_switchable() {
        assert_eq!(chipset_for_xhci(0xa12f), None);
    }
}
