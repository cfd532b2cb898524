//! `usbroute controllers`: each controller with its IOMMU group's verdict. One verdict
//! ([`PassthroughVerdict`], from [`assess`]) is computed per controller; JSON shows it as
//! `passthrough` and, in the older shape, as `verdict` ([`IsolationSummary`], derived from
//! it); text shows a section of plain sentences.

use super::verdict::{assess, MemberReport, PassthroughVerdict, VerdictStatus};
use crate::inventory::{
    Blocker, Controller, ControllerKind, IsolationSummary, PciAddress, Snapshot,
};
use crate::sysfs::SysfsRoot;
use serde::Serialize;
use std::fmt::Write as _;

/// One `controllers --json` entry: every controller field, then its verdict twice shaped.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerEntry<'a> {
    /// Every controller field.
    #[serde(flatten)]
    pub controller: &'a Controller,
    /// Whether its IOMMU group can go to a VM alone (its companions go along).
    pub verdict: IsolationSummary,
    /// Can it go to a VM, what goes with it, and what the host seems to need
    /// (`None` when its group could not be read; `verdict` then says why).
    pub passthrough: Option<PassthroughVerdict>,
}

/// The summary of `verdict`; `is_usb_controller` says which functions the inventory
/// knows as USB controllers (a companion whose class could not be read).
pub fn isolation_summary(
    verdict: &PassthroughVerdict,
    is_usb_controller: impl Fn(&PciAddress) -> bool,
) -> IsolationSummary {
    let pci = verdict.pci;
    let Some(group) = verdict.iommu_group else {
        return blocked(
            None,
            format!(
                "{pci} has no IOMMU group: enable VT-d/AMD-Vi in the firmware and boot with \
                     intel_iommu=on (Intel) or amd_iommu=on (AMD)"
            ),
        );
    };
    let companion = |m: &MemberReport| {
        m.pci.same_slot(&pci)
            && (m
                .class
                .is_some_and(|c| ControllerKind::from_pci_class(c).is_some())
                || is_usb_controller(&m.pci))
    };
    let (along, others): (Vec<&MemberReport>, Vec<&MemberReport>) =
        verdict.goes_with.iter().partition(|m| companion(m));
    let blockers: Vec<Blocker> = others
        .into_iter()
        .map(|m| Blocker {
            pci: Some(m.pci),
            reason: format!(
                "{} ({}, {}) shares IOMMU group {group}: it would have to leave the host too",
                m.pci,
                class_name(m.class),
                m.driver.as_deref().unwrap_or("no driver")
            ),
        })
        .collect();
    IsolationSummary {
        alone: blockers.is_empty(),
        iommu_group: Some(group),
        goes_along: along.into_iter().map(|m| m.pci).collect(),
        blockers,
    }
}

fn blocked(iommu_group: Option<u32>, reason: String) -> IsolationSummary {
    IsolationSummary {
        alone: false,
        iommu_group,
        goes_along: Vec::new(),
        blockers: vec![Blocker { pci: None, reason }],
    }
}

/// Every controller of `snapshot` with its verdict (read through `root`).
pub fn controller_entries<'a>(
    root: &SysfsRoot,
    snapshot: &'a Snapshot,
) -> Vec<ControllerEntry<'a>> {
    let is_usb_controller = |pci: &PciAddress| snapshot.controller(pci).is_some();
    snapshot
        .controllers
        .iter()
        .map(|controller| match assess(root, &controller.pci) {
            Ok(v) => ControllerEntry {
                controller,
                verdict: isolation_summary(&v, is_usb_controller),
                passthrough: Some(v),
            },
            Err(e) => ControllerEntry {
                controller,
                verdict: blocked(
                    controller.iommu_group,
                    format!("cannot tell: {}", crate::error_chain::one_line(&e)),
                ),
                passthrough: None,
            },
        })
        .collect()
}

/// `Audio device` for 0x040300, from the PCI id database; the hex code if unknown.
fn class_name(class: Option<u32>) -> String {
    let Some(class) = class else {
        return "unknown class".to_string();
    };
    let (base, sub) = ((class >> 16) as u8, (class >> 8) as u8);
    crate::inventory::ids::pci_subclass(base, sub).unwrap_or_else(|| format!("class {class:#08x}"))
}

/// The text section: what an IOMMU group is (once), then per controller its one-line
/// answer and anything in its group the host seems to need.
pub fn passthrough_text(entries: &[ControllerEntry<'_>]) -> String {
    let mut out = String::from(
        "\nCan each go to a VM? A VM gets a whole IOMMU group (the devices the IOMMU can fence \
         off from the host together) or nothing; PCI bridges stay with the host.\n\
         (`usbroute controller check PCI` explains one, `usbroute controller bind PCI --dry-run` shows the steps.)\n",
    );
    for entry in entries {
        let pci = entry.controller.pci;
        match &entry.passthrough {
            Some(v) => {
                let _ = writeln!(out, "{pci}: {}", v.summary);
                if v.status == VerdictStatus::NoIommu {
                    let _ = writeln!(out, "    {}", v.details.join(" "));
                }
            }
            // Its summary's one blocker says why the group could not be read.
            None => {
                for b in &entry.verdict.blockers {
                    let _ = writeln!(out, "{pci}: {}", b.reason);
                }
            }
        }
    }
    out
}
