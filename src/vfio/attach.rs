//! Handing a bound group to a running QEMU: which machine, which root ports are free,
//! and the `device_add` arguments, decided purely from what QMP reported. The QMP
//! conversation itself is QEMU's: `crate::backend::qemu::vfio_attach`.

use super::emit::qemu_id;
use super::layout::guest_layout;
use crate::inventory::PciAddress;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The machine type, as far as hot-plugging PCI goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// q35: PCIe; hot-plug only into an empty `pcie-root-port`.
    Q35,
    /// i440fx (`pc`): conventional PCI with ACPI hot-plug into the root bus.
    I440fx,
    /// Anything else (`microvm`, other architectures): not supported.
    Other(String),
}

impl Machine {
    /// From `qom-get /machine type` (`pc-q35-10.0-machine`, `pc-i440fx-9.2-machine`).
    pub fn from_qom_type(type_name: &str) -> Self {
        if type_name.contains("q35") {
            Self::Q35
        } else if type_name.contains("i440fx") || type_name == "pc-machine" {
            Self::I440fx
        } else {
            Self::Other(type_name.to_string())
        }
    }
}

/// A `pcie-root-port` of the VM and the bus behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootPort {
    /// The bus name `device_add bus=` takes (the port's id for named ports).
    pub bus: String,
    /// The bus's QOM path (what a device's `parent_bus` says).
    pub bus_path: String,
}

/// One `device_add` to issue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceAdd {
    /// The host function.
    pub pci: PciAddress,
    /// The QEMU device id.
    pub id: String,
    /// The full `device_add` arguments.
    pub arguments: Value,
}

/// Why a group cannot be hot-added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// q35 without enough empty root ports.
    #[error(
        "The VM has {free} free pcie-root-port(s) but this group needs {needed} (one per host slot): \
         on q35 a PCI device can only be hot-added into an empty root port. Start QEMU with spare \
         ones, e.g. {example}"
    )]
    NoFreeRootPort {
        /// How many the group needs.
        needed: usize,
        /// How many are free.
        free: usize,
        /// QEMU arguments that add enough.
        example: String,
    },
    /// A machine type we do not hot-plug PCI into.
    #[error("The VM's machine type is {0}; usbroute hot-adds PCI devices only to q35 and i440fx (pc) machines. Start the VM with the arguments of `usbroute controller emit` instead")]
    UnsupportedMachine(String),
}

/// Empty root ports: those whose bus no device names as its `parent_bus`.
pub fn free_root_ports(ports: &[RootPort], occupied_buses: &BTreeSet<String>) -> Vec<RootPort> {
    ports
        .iter()
        .filter(|p| !occupied_buses.contains(&p.bus_path))
        .cloned()
        .collect()
}

/// The `device_add` calls that put `members` into the VM, in order. On q35 each host
/// slot takes one free root port (functions of a slot stay together, function 0 last);
/// on i440fx each function is added to the root bus on its own.
pub fn plan_attach(
    members: &[PciAddress],
    machine: &Machine,
    free_ports: &[RootPort],
) -> Result<Vec<DeviceAdd>, AttachError> {
    match machine {
        Machine::Other(name) => Err(AttachError::UnsupportedMachine(name.clone())),
        Machine::I440fx => Ok(members
            .iter()
            .map(|pci| DeviceAdd {
                pci: *pci,
                id: qemu_id(pci),
                arguments: json!({ "driver": "vfio-pci", "host": pci.to_string(), "id": qemu_id(pci) }),
            })
            .collect()),
        Machine::Q35 => {
            let layout = guest_layout(members);
            if layout.len() > free_ports.len() {
                let example = (1..=layout.len())
                    .map(|n| format!("-device pcie-root-port,id=rp{n},chassis={n}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                return Err(AttachError::NoFreeRootPort {
                    needed: layout.len(),
                    free: free_ports.len(),
                    example,
                });
            }
            Ok(layout
                .iter()
                .zip(free_ports)
                .flat_map(|(port, root)| {
                    port.iter().map(|f| {
                        let mut arguments = json!({
                            "driver": "vfio-pci",
                            "host": f.host.to_string(),
                            "id": qemu_id(&f.host),
                            "bus": root.bus,
                            "addr": format!("0.{}", f.guest_function),
                        });
                        if f.multifunction {
                            arguments["multifunction"] = json!(true);
                        }
                        DeviceAdd {
                            pci: f.host,
                            id: qemu_id(&f.host),
                            arguments,
                        }
                    })
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pci(s: &str) -> PciAddress {
        s.parse().expect("address")
    }

    fn port(bus: &str) -> RootPort {
        RootPort {
            bus: bus.to_string(),
            bus_path: format!("/machine/peripheral/{bus}/{bus}"),
        }
    }

    #[test]
    fn machine_from_qom_type_tells_q35_from_i440fx() {
        assert_eq!(
            [
                Machine::from_qom_type("pc-q35-10.0-machine"),
                Machine::from_qom_type("pc-i440fx-9.2-machine"),
                Machine::from_qom_type("microvm-machine"),
            ],
            [
                Machine::Q35,
                Machine::I440fx,
                Machine::Other("microvm-machine".into())
            ]
        );
    }

    #[test]
    fn free_root_ports_skips_ports_a_device_sits_behind() {
        let occupied = BTreeSet::from(["/machine/peripheral/rp2/rp2".to_string()]);

        let free = free_root_ports(&[port("rp1"), port("rp2"), port("rp3")], &occupied);

        assert_eq!(free, vec![port("rp1"), port("rp3")]);
    }

    #[test]
    fn plan_attach_on_q35_puts_ehci_and_companions_behind_one_port_function_0_last() {
        let members = [pci("00:1d.0"), pci("00:1d.1"), pci("00:1d.7")];

        let adds = plan_attach(&members, &Machine::Q35, &[port("rp1")]).expect("plan");

        assert_eq!(
            adds.iter().map(|a| a.arguments.clone()).collect::<Vec<_>>(),
            vec![
                json!({"driver": "vfio-pci", "host": "0000:00:1d.7", "id": "vfio-0000-00-1d.7", "bus": "rp1", "addr": "0.7"}),
                json!({"driver": "vfio-pci", "host": "0000:00:1d.1", "id": "vfio-0000-00-1d.1", "bus": "rp1", "addr": "0.1"}),
                json!({"driver": "vfio-pci", "host": "0000:00:1d.0", "id": "vfio-0000-00-1d.0", "bus": "rp1", "addr": "0.0", "multifunction": true}),
            ]
        );
    }

    #[test]
    fn plan_attach_on_q35_without_enough_free_ports_says_how_to_start_qemu() {
        let err = plan_attach(
            &[pci("00:01.0"), pci("00:02.0")],
            &Machine::Q35,
            &[port("rp1")],
        )
        .expect_err("too few ports");

        assert_eq!(
            err.to_string(),
            "The VM has 1 free pcie-root-port(s) but this group needs 2 (one per host slot): on q35 \
             a PCI device can only be hot-added into an empty root port. Start QEMU with spare ones, \
             e.g. -device pcie-root-port,id=rp1,chassis=1 -device pcie-root-port,id=rp2,chassis=2"
        );
    }

    #[test]
    fn plan_attach_on_i440fx_adds_each_function_to_the_root_bus() {
        let adds = plan_attach(&[pci("00:01.0")], &Machine::I440fx, &[]).expect("plan");

        assert_eq!(
            adds[0].arguments,
            json!({"driver": "vfio-pci", "host": "0000:00:01.0", "id": "vfio-0000-00-01.0"})
        );
    }
}
