//! Find the xHCI whose ports can be switched, and the EHCIs beside it.
//!
//! Ids and class come from each function's `config` file (the first 12 bytes are
//! readable by anyone), so a fixture needs nothing but those files.

use super::chipset::{chipset_for_xhci, Chipset, EhciLayout, INTEL_VENDOR};
use super::config_space::{ConfigSpace, SysfsConfigSpace, USB3PRM, USB3_PSSEN, XUSB2PR, XUSB2PRM};
use super::RoutingError;
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::Serialize;

const CLASS_XHCI: u32 = 0x0c0330;
const CLASS_EHCI: u32 = 0x0c0320;

/// Vendor, device and class of one PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code, `0x0c0330`.
    pub class: u32,
}

impl PciIdentity {
    /// Read from the first 12 bytes of config space.
    pub fn read(space: &dyn ConfigSpace) -> std::io::Result<Self> {
        let mut b = [0u8; 12];
        space.read_at(0, &mut b)?;
        Ok(Self {
            vendor: u16::from_le_bytes([b[0], b[1]]),
            device: u16::from_le_bytes([b[2], b[3]]),
            class: u32::from_le_bytes([b[9], b[10], b[11], 0]),
        })
    }
}

/// An EHCI of the chipset that is present on the PCI bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EhciController {
    /// Its PCI address.
    pub pci: PciAddress,
    /// Its number (`ehci1`, `ehci2`).
    pub number: u8,
}

/// A switchable xHCI and what sits beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// The xHCI owning XUSB2PR.
    pub xhci: PciAddress,
    /// Its chipset.
    pub chipset: &'static Chipset,
    /// The chipset's EHCIs found on the same bus.
    pub ehci: Vec<EhciController>,
}

impl Detected {
    /// The PCI address of EHCI number `number`, if present.
    pub fn ehci_pci(&self, number: u8) -> Option<PciAddress> {
        self.ehci.iter().find(|e| e.number == number).map(|e| e.pci)
    }
}

/// The four routing registers, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Registers {
    /// XUSB2PR (0xD0): bit set = port on xHCI.
    pub xusb2pr: u16,
    /// XUSB2PRM (0xD4): bits the OS may switch.
    pub xusb2prm: u16,
    /// USB3_PSSEN (0xD8): SuperSpeed enabled per port.
    pub usb3_pssen: u32,
    /// USB3PRM (0xDC): SuperSpeed bits the OS may enable.
    pub usb3prm: u32,
}

impl Registers {
    /// Read all four. A short read means an unprivileged user (sysfs shows 64 bytes).
    pub fn read(space: &dyn ConfigSpace, path: &std::path::Path) -> Result<Self, RoutingError> {
        let io = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                RoutingError::NotRoot {
                    path: path.to_path_buf(),
                }
            } else {
                RoutingError::io("read", path, e)
            }
        };
        Ok(Self {
            xusb2pr: space.read_u16(XUSB2PR).map_err(io)?,
            // The masks are 32-bit registers with 16 (or fewer) meaningful bits.
            xusb2prm: space.read_u32(XUSB2PRM).map_err(io)? as u16,
            usb3_pssen: space.read_u32(USB3_PSSEN).map_err(io)?,
            usb3prm: space.read_u32(USB3PRM).map_err(io)?,
        })
    }

    /// `true` when routing is what the kernel itself sets at boot and resume.
    pub fn is_kernel_default(&self, chipset: &Chipset) -> bool {
        let ports = chipset.port_bits();
        let ss = chipset.superspeed_bits();
        self.xusb2pr & ports == self.xusb2prm & ports && self.usb3_pssen & ss == self.usb3prm & ss
    }
}

/// Every PCI function under `root` with its identity; unreadable ones are skipped.
fn pci_functions(root: &SysfsRoot) -> Result<Vec<(PciAddress, PciIdentity)>, RoutingError> {
    let dir = root.path("/sys/bus/pci/devices");
    let entries = std::fs::read_dir(&dir).map_err(|e| RoutingError::io("read", &dir, e))?;
    let mut found: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<PciAddress>().ok())
        .filter_map(|pci| {
            let id = PciIdentity::read(&SysfsConfigSpace::new(root, pci)).ok()?;
            Some((pci, id))
        })
        .collect();
    found.sort_by_key(|(pci, _)| *pci);
    Ok(found)
}

/// Every xHCI (class 0c0330) under `root`, switchable or not, with its identity.
pub fn xhci_functions(root: &SysfsRoot) -> Result<Vec<(PciAddress, PciIdentity)>, RoutingError> {
    Ok(pci_functions(root)?
        .into_iter()
        .filter(|(_, id)| id.class == CLASS_XHCI)
        .collect())
}

/// Why one xHCI cannot be routed, or its chipset.
fn classify(pci: PciAddress, id: PciIdentity) -> Result<&'static Chipset, RoutingError> {
    if id.vendor != INTEL_VENDOR || id.class != CLASS_XHCI {
        return Err(RoutingError::NotIntelXhci {
            pci,
            vendor: id.vendor,
            device: id.device,
            class: id.class,
        });
    }
    chipset_for_xhci(id.device).ok_or(RoutingError::UnknownChipset {
        pci,
        device: id.device,
    })
}

fn ehcis_beside(
    xhci: PciAddress,
    chipset: &Chipset,
    functions: &[(PciAddress, PciIdentity)],
) -> Vec<EhciController> {
    functions
        .iter()
        .filter(|(pci, id)| {
            pci.domain == xhci.domain
                && pci.bus == xhci.bus
                && id.vendor == INTEL_VENDOR
                && id.class == CLASS_EHCI
        })
        .filter_map(|(pci, id)| {
            let layout: &EhciLayout = chipset.ehci.iter().find(|e| e.device_id == id.device)?;
            Some(EhciController {
                pci: *pci,
                number: layout.number,
            })
        })
        .collect()
}

/// Find the switchable xHCI: the one `wanted` names, or the only one there is.
///
/// An Intel xHCI needs an Intel EHCI of its chipset beside it (as Linux's own quirk
/// does): without one there is nowhere to route ports to.
pub fn detect(root: &SysfsRoot, wanted: Option<PciAddress>) -> Result<Detected, RoutingError> {
    let functions = pci_functions(root)?;
    let check = |pci: PciAddress, id: PciIdentity| -> Result<Detected, RoutingError> {
        let chipset = classify(pci, id)?;
        let ehci = ehcis_beside(pci, chipset, &functions);
        if ehci.is_empty() {
            return Err(RoutingError::NoController(format!(
                "{pci} is a {chipset} but no Intel EHCI of that chipset is on its bus (disabled in the firmware setup?)"
            )));
        }
        Ok(Detected {
            xhci: pci,
            chipset,
            ehci,
        })
    };
    if let Some(pci) = wanted {
        let (_, id) = functions.iter().find(|(p, _)| *p == pci).ok_or_else(|| {
            RoutingError::NoController(format!(
                "`controller = \"{pci}\"` in [routing], but there is no PCI function {pci}"
            ))
        })?;
        return check(pci, *id);
    }
    let xhcis: Vec<_> = functions
        .iter()
        .filter(|(_, id)| id.class == CLASS_XHCI)
        .collect();
    let mut usable = Vec::new();
    let mut reasons = Vec::new();
    for (pci, id) in &xhcis {
        match check(*pci, *id) {
            Ok(d) => usable.push(d),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    match usable.len() {
        1 => Ok(usable.remove(0)),
        0 if xhcis.is_empty() => Err(RoutingError::NoController(
            "there is no xHCI (PCI class 0c0330) on this machine".into(),
        )),
        0 => Err(RoutingError::NoController(reasons.join("; "))),
        _ => Err(RoutingError::Ambiguous(
            usable
                .iter()
                .map(|d| d.xhci.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}
