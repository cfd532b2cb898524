//! Snippets for people who start VMs themselves: QEMU arguments, libvirt `<hostdev>` XML
//! and the xl `pci=[...]` line for every non-bridge member of a group.

use super::group::IommuGroup;
use super::layout::{guest_layout, GuestSlot};
use crate::inventory::PciAddress;
use serde::Serialize;
use std::fmt::Write as _;

/// The same group, three ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Emitted {
    /// The controller asked for.
    pub controller: PciAddress,
    /// The IOMMU group.
    pub group: u32,
    /// The functions that go to the VM, in order.
    pub members: Vec<PciAddress>,
    /// QEMU arguments, as separate argv words (`-device`, `vfio-pci,host=...`).
    pub qemu_args: Vec<String>,
    /// libvirt `<hostdev>` elements.
    pub libvirt_xml: String,
    /// An xl config line.
    pub xl: String,
}

/// Chassis numbers of the root ports usbroute suggests start here, well above the
/// small numbers people and libvirt give their own ports (each port needs its own).
const FIRST_CHASSIS: usize = 200;

/// `vfio-pci,host=...,id=...,bus=...,addr=0.F[,multifunction=on]`.
pub(crate) fn device_arg(f: &GuestSlot, bus: &str) -> String {
    let multi = if f.multifunction {
        ",multifunction=on"
    } else {
        ""
    };
    format!(
        "vfio-pci,host={},id={},bus={bus},addr=0.{}{multi}",
        f.host,
        qemu_id(&f.host),
        f.guest_function
    )
}

/// The QEMU device id usbroute gives a passed function (letters, digits, `-` and `.`).
pub fn qemu_id(pci: &PciAddress) -> String {
    format!("vfio-{}", pci.to_string().replace(':', "-"))
}

/// Snippets for every non-bridge member of `group`, the group of `controller`.
pub fn emit(controller: &PciAddress, group: &IommuGroup) -> Emitted {
    let members: Vec<PciAddress> = group.passed_members().map(|m| m.pci).collect();
    let mut qemu_args = Vec::new();
    for (index, port) in guest_layout(&members).iter().enumerate() {
        let bus = format!("usbroute-rp{index}");
        qemu_args.push("-device".to_string());
        qemu_args.push(format!(
            "pcie-root-port,id={bus},chassis={}",
            FIRST_CHASSIS + index
        ));
        for f in port {
            qemu_args.push("-device".to_string());
            qemu_args.push(device_arg(f, &bus));
        }
    }
    let mut libvirt_xml = String::new();
    for pci in &members {
        let _ = write!(
            libvirt_xml,
            "<hostdev mode='subsystem' type='pci' managed='no'>\n  <source>\n    \
             <address domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/>\n  \
             </source>\n</hostdev>\n",
            pci.domain, pci.bus, pci.device, pci.function
        );
    }
    let quoted: Vec<String> = members.iter().map(|p| format!("'{p}'")).collect();
    Emitted {
        controller: *controller,
        group: group.number,
        members,
        qemu_args,
        libvirt_xml,
        xl: format!("pci=[{}]", quoted.join(", ")),
    }
}

impl Emitted {
    /// All three snippets with a line saying what each is for.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "# IOMMU group {}: these {} function(s) go to one VM together; bind them first with\n\
             # `usbroute controller bind {}` (managed='no': libvirt will not rebind them).\n\n",
            self.group,
            self.members.len(),
            self.controller
        );
        out.push_str(
            "# QEMU, q35 machine: one root port per host slot keeps an EHCI and its companions\n\
             # one multi-function device in the guest (on the i440fx `pc` machine, drop the\n\
             # pcie-root-port lines and the bus=/addr= parts)\n",
        );
        let words: Vec<String> = self
            .qemu_args
            .chunks(2)
            .map(|pair| pair.join(" "))
            .collect();
        out.push_str(&words.join(" \\\n"));
        out.push_str("\n\n# libvirt (inside <devices>)\n");
        out.push_str(&self.libvirt_xml);
        out.push_str(
            "\n# xl (domain config). Xen takes devices through pciback, not vfio-pci: skip\n\
             # `usbroute controller bind` and run `xl pci-assignable-add` for each instead.\n",
        );
        out.push_str(&self.xl);
        out.push('\n');
        out
    }
}
