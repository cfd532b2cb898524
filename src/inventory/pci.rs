//! USB host controllers from `/sys/bus/pci/devices`: kind, ids, driver, IOMMU group.

use super::reader::{Access, Reader};
use super::{Controller, ControllerKind, GroupMember, HexId, PciAddress};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const IOMMU_GROUPS: &str = "/sys/kernel/iommu_groups";
/// PCI class of a PCI-to-PCI bridge (base 06, sub 04), without the prog-if byte.
const PCI_BRIDGE_CLASS: u32 = 0x0604;
const CLASS_CODE: &str = "a class code";

/// Every USB host controller, sorted by address, with group members and companions filled
/// in; `buses` is left empty for the caller, who knows the root hubs.
pub(super) fn read_controllers(r: &mut Reader) -> Vec<Controller> {
    let names = r.list_top(Path::new(PCI_DEVICES)).unwrap_or_default();
    // Every function's class is read once here; group members reuse it.
    let mut classes: HashMap<PciAddress, Option<u32>> = HashMap::with_capacity(names.len());
    let mut usb = Vec::new();
    for name in &names {
        let Ok(pci) = name.parse::<PciAddress>() else {
            r.warn(format!("{PCI_DEVICES}/{name}: not a PCI address, ignored"));
            continue;
        };
        let entry = Path::new(PCI_DEVICES).join(name);
        let class =
            r.attrs(&format!("pci {pci}"), &entry)
                .required("class", CLASS_CODE, parse_hex_u32);
        classes.insert(pci, class);
        if let Some(kind) = class.and_then(ControllerKind::from_pci_class) {
            usb.push((pci, kind, entry));
        }
    }

    let mut groups: HashMap<u32, Vec<GroupMember>> = HashMap::new();
    let mut controllers: Vec<Controller> = usb
        .into_iter()
        .map(|(pci, kind, entry)| read_controller(r, pci, kind, &entry, &classes, &mut groups))
        .collect();
    controllers.sort_by_key(|c| c.pci);
    link_companions(&mut controllers);
    controllers
}

fn read_controller(
    r: &mut Reader,
    pci: PciAddress,
    kind: ControllerKind,
    entry: &Path,
    classes: &HashMap<PciAddress, Option<u32>>,
    groups: &mut HashMap<u32, Vec<GroupMember>>,
) -> Controller {
    let who = format!("pci {pci}");
    let dir = r.resolve(entry);
    let mut a = r.attrs(&who, &dir);
    let vendor_id = a.required("vendor", "a hex id", parse_hex_id);
    let device_id = a.required("device", "a hex id", parse_hex_id);
    let driver = a.link("driver");
    let group_link = a.link("iommu_group");
    let vendor_name = vendor_id.and_then(pci_vendor_name);
    let device_name = match (vendor_id, device_id) {
        (Some(v), Some(d)) => super::ids::pci_device(v.0, d.0),
        _ => None,
    };
    let iommu_group = group_link.and_then(|n| {
        let parsed = n.parse::<u32>().ok();
        if parsed.is_none() {
            r.warn(format!(
                "{who}: `iommu_group` links to `{n}`, not a group number"
            ));
        }
        parsed
    });
    let members = match iommu_group {
        Some(g) => {
            let group = groups.entry(g).or_insert_with(|| read_group(r, g, classes));
            group.iter().filter(|m| m.pci != pci).cloned().collect()
        }
        None => Vec::new(),
    };
    Controller {
        pci,
        kind,
        vendor_id,
        device_id,
        vendor_name,
        device_name,
        driver,
        iommu_group,
        iommu_group_members: members,
        buses: Vec::new(),
        companions: Vec::new(),
        sysfs_path: dir.display().to_string(),
    }
}

/// Every function in IOMMU group `group`, sorted by address.
fn read_group(
    r: &mut Reader,
    group: u32,
    classes: &HashMap<PciAddress, Option<u32>>,
) -> Vec<GroupMember> {
    let devices: PathBuf = [IOMMU_GROUPS, &group.to_string(), "devices"]
        .iter()
        .collect();
    let Some(names) = r.list(&devices) else {
        r.warn(format!(
            "IOMMU group {group}: {} is missing",
            devices.display()
        ));
        return Vec::new();
    };
    let mut members = Vec::with_capacity(names.len());
    for name in names {
        let Ok(pci) = name.parse::<PciAddress>() else {
            r.warn(format!(
                "IOMMU group {group}: member `{name}` is not a PCI address"
            ));
            continue;
        };
        let entry = devices.join(&name);
        r.mark(&entry, Access::Link);
        let who = format!("pci {pci}");
        let mut a = r.attrs(&who, &entry);
        let class = match classes.get(&pci) {
            Some(class) => *class,
            None => a.required("class", CLASS_CODE, parse_hex_u32),
        };
        let driver = a.link("driver");
        members.push(GroupMember {
            pci,
            class,
            driver,
            bridge: class.is_some_and(|c| c >> 8 == PCI_BRIDGE_CLASS),
        });
    }
    members.sort_by_key(|m| m.pci);
    members
}

/// EHCI ↔ UHCI/OHCI on the same slot: the companions that carry its low/full-speed ports.
fn link_companions(controllers: &mut [Controller]) {
    let slots: Vec<(PciAddress, ControllerKind)> =
        controllers.iter().map(|c| (c.pci, c.kind)).collect();
    for c in controllers.iter_mut() {
        let wanted: &[ControllerKind] = match c.kind {
            ControllerKind::Ehci => &[ControllerKind::Uhci, ControllerKind::Ohci],
            ControllerKind::Uhci | ControllerKind::Ohci => &[ControllerKind::Ehci],
            ControllerKind::Xhci | ControllerKind::Other => &[],
        };
        c.companions = slots
            .iter()
            .filter(|(pci, kind)| pci.same_slot(&c.pci) && *pci != c.pci && wanted.contains(kind))
            .map(|(pci, _)| *pci)
            .collect();
    }
}

fn pci_vendor_name(id: HexId) -> Option<String> {
    super::ids::pci_vendor(id.0)
}

/// `0x0c0330` → 0x0c0330.
pub(crate) fn parse_hex_u32(v: &str) -> Option<u32> {
    let v = v.trim();
    let digits = v.strip_prefix("0x").unwrap_or(v);
    (!digits.is_empty() && digits.len() <= 8)
        .then(|| u32::from_str_radix(digits, 16).ok())
        .flatten()
}

/// `0x8086` or `8086` → HexId(0x8086); anything longer than 4 digits is malformed.
pub(crate) fn parse_hex_id(v: &str) -> Option<HexId> {
    let v = v.trim();
    let digits = v.strip_prefix("0x").unwrap_or(v);
    (!digits.is_empty() && digits.len() <= 4 && digits.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u16::from_str_radix(digits, 16).ok().map(HexId))
        .flatten()
}
