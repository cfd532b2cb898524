//! Can a controller's IOMMU group go to a VM without taking anything else along?
//! A pure function over the snapshot; `crate::vfio` adds host-importance checks on top.

use super::{Controller, ControllerKind, PciAddress, Snapshot};
use serde::Serialize;

/// The answer for one controller.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupVerdict {
    /// `true` when nothing blocks giving the group to a VM.
    pub alone: bool,
    /// The controller's IOMMU group, `None` without an IOMMU.
    pub iommu_group: Option<u32>,
    /// USB controllers of the same slot (companions): they leave with the controller.
    /// PCI bridges in the group are neither here nor blockers: they stay with the host.
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

impl GroupVerdict {
    /// Add a blocker (other checks, such as host-importance in `crate::vfio`, use this).
    pub fn block(&mut self, pci: Option<PciAddress>, reason: String) {
        self.blockers.push(Blocker { pci, reason });
        self.alone = false;
    }
}

/// Judge `controller`'s IOMMU group: no IOMMU blocks; every member other than PCI
/// bridges and USB controllers on the controller's own slot is named as a blocker.
pub fn group_verdict(snapshot: &Snapshot, controller: &Controller) -> GroupVerdict {
    let mut verdict = GroupVerdict {
        alone: true,
        iommu_group: controller.iommu_group,
        goes_along: Vec::new(),
        blockers: Vec::new(),
    };
    let Some(group) = controller.iommu_group else {
        verdict.block(
            None,
            format!(
                "{} has no IOMMU group: enable VT-d/AMD-Vi in the firmware and boot with \
                 intel_iommu=on (Intel) or amd_iommu=on (AMD)",
                controller.pci
            ),
        );
        return verdict;
    };
    for member in &controller.iommu_group_members {
        let same_slot_usb = member.pci.same_slot(&controller.pci)
            && (member
                .class
                .is_some_and(|c| ControllerKind::from_pci_class(c).is_some())
                || snapshot.controller(&member.pci).is_some());
        if member.bridge {
            continue;
        }
        if same_slot_usb {
            verdict.goes_along.push(member.pci);
            continue;
        }
        let driver = member.driver.as_deref().unwrap_or("no driver");
        verdict.block(
            Some(member.pci),
            format!(
                "{} ({}, {driver}) shares IOMMU group {group}: it would have to leave the host too",
                member.pci,
                class_name(member.class)
            ),
        );
    }
    verdict
}

/// `Audio device` for 0x040300, from the PCI id database; the hex code if unknown.
fn class_name(class: Option<u32>) -> String {
    let Some(class) = class else {
        return "unknown class".to_string();
    };
    let (base, sub) = ((class >> 16) as u8, (class >> 8) as u8);
    pci_ids::Subclass::from_cid_sid(base, sub)
        .map_or_else(|| format!("class {class:#08x}"), |s| s.name().to_string())
}
