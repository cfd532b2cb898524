//! The VM's USB controllers and buses, found over QOM, and which bus a device of a given
//! speed may go on. The backend lists them once per connection and keeps the list
//! current ([`super::known_buses`]).
//!
//! Why name the bus at all: left to choose, QEMU 10.0 put a full-speed device on an EHCI
//! bus, failed every port with "speed mismatch" and refused the device.

use super::qom;
use crate::backend::qemu::qmp::{Qmp, QmpError};
use crate::inventory::Speed;
use futures_util::future::try_join_all;
use serde_json::json;

/// The QOM containers where devices live: `-device ... id=X`, `-device` without id, and
/// what the machine made itself (`-usb`).
const CONTAINERS: [&str; 3] = [
    "/machine/peripheral",
    "/machine/peripheral-anon",
    "/machine/unattached",
];

/// The kind of a VM's USB host controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmControllerKind {
    /// Takes every speed.
    Xhci,
    /// High speed only, plus low/full speed when UHCI/OHCI companions hang on it.
    Ehci,
    /// Low and full speed only.
    Uhci,
    /// Low and full speed only.
    Ohci,
}

impl VmControllerKind {
    /// From a QOM type name (`qemu-xhci`, `nec-usb-xhci`, `ich9-usb-ehci1`, `piix3-usb-uhci`,
    /// `pci-ohci`, ...); `None` for anything else.
    pub fn from_type_name(type_name: &str) -> Option<Self> {
        let t = type_name.to_ascii_lowercase();
        [
            ("xhci", Self::Xhci),
            ("ehci", Self::Ehci),
            ("uhci", Self::Uhci),
            ("ohci", Self::Ohci),
        ]
        .into_iter()
        .find_map(|(needle, kind)| t.contains(needle).then_some(kind))
    }
}

/// One USB bus of the VM (what `device_add ... bus=` names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUsbBus {
    /// The bus name (`xhci.0`, `usb-bus.0`).
    pub name: String,
    /// The controller providing it.
    pub kind: VmControllerKind,
    /// The controller's QOM type name.
    pub controller_type: String,
    /// `true` for an EHCI bus with UHCI/OHCI companions (so it takes low/full speed too).
    pub has_companions: bool,
}

impl VmUsbBus {
    /// May a device of `speed` (unknown: `None`) go on this bus?
    pub fn fits(&self, speed: Option<Speed>) -> bool {
        match (self.kind, speed) {
            (VmControllerKind::Xhci, _) => true,
            (_, None) => false,
            (VmControllerKind::Ehci, Some(s)) => {
                s.is_high() || (s.is_low_or_full() && self.has_companions)
            }
            (VmControllerKind::Uhci | VmControllerKind::Ohci, Some(s)) => s.is_low_or_full(),
        }
    }
}

/// The bus for a device of `speed`: an xHCI first (it takes everything, and it is what a
/// guest drives best), then a controller of the device's own speed; by name among equals,
/// so the choice is the same on every run. `None` if no bus fits.
pub fn choose_bus(buses: &[VmUsbBus], speed: Option<Speed>) -> Option<&VmUsbBus> {
    buses
        .iter()
        .filter(|b| b.fits(speed))
        .min_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)))
}

/// One USB host controller of the VM, as listed: what [`buses_of`] turns into buses, kept
/// by controller so that a `DEVICE_DELETED` naming it takes its buses away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmController {
    /// Its QOM path (`/machine/peripheral/xhci`, `/machine/peripheral-anon/device[2]`), what
    /// `DEVICE_DELETED` names it by.
    pub path: String,
    /// Its QOM type name (`qemu-xhci`).
    pub type_name: String,
    /// Its kind.
    pub kind: VmControllerKind,
    /// The buses it provides (`xhci.0`).
    pub buses: Vec<String>,
    /// For a UHCI/OHCI companion, the EHCI bus it serves (`masterbus`).
    pub masterbus: Option<String>,
}

/// Every USB bus of the VM.
pub async fn discover(qmp: &Qmp) -> Result<Vec<VmUsbBus>, QmpError> {
    Ok(buses_of(&list_controllers(qmp).await?))
}

/// Every USB host controller of the VM, in two round trips: the containers, then each
/// controller's properties (and a companion's `masterbus`) asked for all at once.
pub async fn list_controllers(qmp: &Qmp) -> Result<Vec<VmController>, QmpError> {
    let containers = try_join_all(CONTAINERS.map(|c| qom::children(qmp, c))).await?;
    let found: Vec<_> = containers
        .into_iter()
        .flatten()
        .filter_map(|child| {
            VmControllerKind::from_type_name(&child.type_name).map(|kind| (child, kind))
        })
        .collect();
    let read = found.into_iter().map(|(child, kind)| async move {
        let properties = qom::list(qmp, &child.path).await?;
        let masterbus = match properties.iter().any(|p| p.name == "masterbus") {
            true => Some(qom::get_string(qmp, &child.path, "masterbus").await?),
            false => None,
        };
        Ok::<_, QmpError>(VmController {
            // Copied out, not collected in place: that would keep the whole property
            // list's allocation (kilobytes) for a bus name or two, for as long as the
            // VM's buses are known.
            buses: properties
                .iter()
                .filter(|p| p.type_name == "child<usb-bus>")
                .map(|p| p.name.clone())
                .collect(),
            masterbus: masterbus.filter(|m| !m.is_empty()),
            path: child.path,
            type_name: child.type_name,
            kind,
        })
    });
    try_join_all(read).await
}

/// The buses of `controllers`, an EHCI bus marked as having companions when a UHCI/OHCI
/// names it as its `masterbus`.
pub fn buses_of(controllers: &[VmController]) -> Vec<VmUsbBus> {
    let companion_of: Vec<&str> = controllers
        .iter()
        .filter_map(|c| c.masterbus.as_deref())
        .collect();
    controllers
        .iter()
        .flat_map(|c| {
            c.buses.iter().map(|name| VmUsbBus {
                name: name.clone(),
                kind: c.kind,
                controller_type: c.type_name.clone(),
                has_companions: companion_of.contains(&name.as_str()),
            })
        })
        .collect()
}

/// The id usbroute gives a `qemu-xhci` it adds.
pub const ADDED_CONTROLLER_ID: &str = "usbroute-xhci";

/// Add a `qemu-xhci` (as Proxmox does for a VM without a USB controller) and return it. Where: wherever QEMU puts it (a PC's root bus takes hotplug), else the first
/// free hotpluggable PCI(e) slot (a q35's root bus does not take hotplug; its root ports
/// and bridges do).
pub async fn add_xhci(qmp: &Qmp) -> Result<VmController, AddControllerError> {
    let args = |bus: Option<&str>| {
        let mut a = json!({"driver": "qemu-xhci", "id": ADDED_CONTROLLER_ID});
        if let Some(bus) = bus {
            a["bus"] = json!(bus);
        }
        Some(a)
    };
    let first = match qmp.execute("device_add", args(None)).await {
        Ok(_) => return Ok(added_xhci()),
        Err(QmpError::Command { desc, .. }) => desc,
        Err(e) => return Err(AddControllerError::Qmp(e)),
    };
    let mut tried = vec![format!("(QEMU's choice: {first})")];
    for bus in pci_buses(qmp).await.map_err(AddControllerError::Qmp)? {
        match qmp.execute("device_add", args(Some(&bus))).await {
            Ok(_) => return Ok(added_xhci()),
            Err(QmpError::Command { desc, .. }) => tried.push(format!("{bus}: {desc}")),
            Err(e) => return Err(AddControllerError::Qmp(e)),
        }
    }
    Err(AddControllerError::NoSlot { tried })
}

/// The `qemu-xhci` [`add_xhci`] adds, as a listing would show it.
fn added_xhci() -> VmController {
    VmController {
        path: format!("/machine/peripheral/{ADDED_CONTROLLER_ID}"),
        type_name: "qemu-xhci".to_string(),
        kind: VmControllerKind::Xhci,
        buses: vec![format!("{ADDED_CONTROLLER_ID}.0")],
        masterbus: None,
    }
}

/// Why no `qemu-xhci` could be added.
#[derive(Debug)]
pub enum AddControllerError {
    /// Every place was refused; what each said.
    NoSlot {
        /// One line per place tried.
        tried: Vec<String>,
    },
    /// QMP itself failed.
    Qmp(QmpError),
}

/// The PCI and PCIe buses below bridges and root ports (where hotplug works on q35).
async fn pci_buses(qmp: &Qmp) -> Result<Vec<String>, QmpError> {
    let mut buses = Vec::new();
    for container in &CONTAINERS[..2] {
        for child in qom::children(qmp, container).await? {
            let t = &child.type_name;
            if !(t.contains("root-port") || t.contains("bridge") || t.contains("downstream")) {
                continue;
            }
            for p in qom::list(qmp, &child.path).await? {
                if p.type_name == "child<PCIE>" || p.type_name == "child<PCI>" {
                    buses.push(p.name);
                }
            }
        }
    }
    buses.sort();
    Ok(buses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(name: &str, kind: VmControllerKind, has_companions: bool) -> VmUsbBus {
        VmUsbBus {
            name: name.into(),
            kind,
            controller_type: String::new(),
            has_companions,
        }
    }

    #[test]
    fn choose_bus_puts_full_speed_on_xhci_not_ehci() {
        let buses = [
            bus("ehci.0", VmControllerKind::Ehci, false),
            bus("xhci.0", VmControllerKind::Xhci, false),
        ];

        let chosen = choose_bus(&buses, Some(Speed(12.0)));

        assert_eq!(chosen.map(|b| b.name.as_str()), Some("xhci.0"));
    }

    #[test]
    fn choose_bus_full_speed_without_xhci_goes_to_uhci() {
        let buses = [
            bus("ehci.0", VmControllerKind::Ehci, false),
            bus("usb-bus.0", VmControllerKind::Uhci, false),
        ];

        let chosen = choose_bus(&buses, Some(Speed(12.0)));

        assert_eq!(chosen.map(|b| b.name.as_str()), Some("usb-bus.0"));
    }

    #[test]
    fn choose_bus_full_speed_on_ehci_only_with_companions() {
        let lone = [bus("ehci.0", VmControllerKind::Ehci, false)];
        let paired = [bus("ehci.0", VmControllerKind::Ehci, true)];

        assert_eq!(choose_bus(&lone, Some(Speed(1.5))), None);
        assert!(choose_bus(&paired, Some(Speed(1.5))).is_some());
    }

    #[test]
    fn choose_bus_super_speed_or_unknown_needs_xhci() {
        let buses = [
            bus("ehci.0", VmControllerKind::Ehci, true),
            bus("usb-bus.0", VmControllerKind::Uhci, false),
        ];

        assert_eq!(choose_bus(&buses, Some(Speed(5000.0))), None);
        assert_eq!(choose_bus(&buses, None), None);
    }

    #[test]
    fn choose_bus_high_speed_prefers_xhci_then_ehci() {
        let with_xhci = [
            bus("ehci.0", VmControllerKind::Ehci, false),
            bus("b.0", VmControllerKind::Xhci, false),
            bus("a.0", VmControllerKind::Xhci, false),
        ];
        let without = [bus("ehci.0", VmControllerKind::Ehci, false)];

        assert_eq!(
            choose_bus(&with_xhci, Some(Speed(480.0))).map(|b| b.name.as_str()),
            Some("a.0")
        );
        assert_eq!(
            choose_bus(&without, Some(Speed(480.0))).map(|b| b.name.as_str()),
            Some("ehci.0")
        );
    }

    #[test]
    fn buses_of_marks_an_ehci_bus_that_a_companion_serves() {
        let controller = |path: &str, bus: &str, kind, masterbus: Option<&str>| VmController {
            path: path.into(),
            type_name: path.into(),
            kind,
            buses: vec![bus.into()],
            masterbus: masterbus.map(Into::into),
        };
        let listed = [
            controller("ehci", "ehci.0", VmControllerKind::Ehci, None),
            controller("uhci", "uhci.0", VmControllerKind::Uhci, Some("ehci.0")),
            controller("lone", "lone.0", VmControllerKind::Ehci, None),
        ];

        let buses = buses_of(&listed);

        let companions: Vec<(&str, bool)> = buses
            .iter()
            .map(|b| (b.name.as_str(), b.has_companions))
            .collect();
        assert_eq!(
            companions,
            [("ehci.0", true), ("uhci.0", false), ("lone.0", false)]
        );
    }

    #[test]
    fn controller_kind_from_qemu_type_names() {
        let kinds: Vec<_> = [
            "qemu-xhci",
            "nec-usb-xhci",
            "ich9-usb-ehci1",
            "usb-ehci",
            "piix3-usb-uhci",
            "ich9-usb-uhci3",
            "pci-ohci",
            "usb-host",
        ]
        .iter()
        .map(|t| VmControllerKind::from_type_name(t))
        .collect();

        use VmControllerKind::*;
        assert_eq!(
            kinds,
            [
                Some(Xhci),
                Some(Xhci),
                Some(Ehci),
                Some(Ehci),
                Some(Uhci),
                Some(Uhci),
                Some(Ohci),
                None
            ]
        );
    }
}
