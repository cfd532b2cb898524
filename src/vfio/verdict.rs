//! The verdict: can a controller go to a VM, what goes with it, and why, in words for
//! someone who has never heard of IOMMU groups. [`verdict`] is pure over [`GroupFacts`];
//! [`assess`] gathers the facts through a [`SysfsRoot`].

use super::group::{iommu_present, read_group, CpuVendor, IommuGroup, Member};
use super::host_use::{gather_host_uses, HostUse};
use super::{VfioError, VFIO_DRIVER};
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Everything the verdict is computed from (plain data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupFacts {
    /// The controller asked about.
    pub pci: PciAddress,
    /// Its IOMMU group, `None` when it has none.
    pub group: Option<IommuGroup>,
    /// `true` when the kernel has IOMMU groups at all.
    pub iommu_enabled: bool,
    /// For the "turn the IOMMU on" hint.
    pub cpu_vendor: CpuVendor,
    /// What the host uses members for (members without a use are absent).
    pub host_uses: BTreeMap<PciAddress, Vec<HostUse>>,
}

/// The short answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerdictStatus {
    /// Alone in its group: it can go by itself.
    Alone,
    /// It can go, but other devices must go with it.
    WithGroup,
    /// Something in the group looks needed by the host: only with `--force`.
    HostNeedsIt,
    /// The IOMMU is off (or does not cover this device): it cannot go.
    NoIommu,
}

/// A member of the group as the verdict names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    /// Its address.
    pub pci: PciAddress,
    /// What it is (`USB controller (UHCI)`).
    pub kind: String,
    /// Vendor and device name, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its driver now.
    pub driver: Option<String>,
    /// Its PCI class code (shown in words as `kind`).
    #[serde(skip)]
    pub class: Option<u32>,
    /// `true` for PCI bridges, which stay with the host.
    pub bridge: bool,
    /// Why the host seems to need it (empty: nothing known).
    pub host_uses: Vec<HostUse>,
}

/// Can a controller go to a VM, and what goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughVerdict {
    /// The controller.
    pub pci: PciAddress,
    /// The short answer.
    pub status: VerdictStatus,
    /// `true` unless the IOMMU is missing.
    pub can_pass: bool,
    /// `true` when `controller bind` needs `--force`.
    pub needs_force: bool,
    /// The IOMMU group number.
    pub iommu_group: Option<u32>,
    /// `true` when every non-bridge member is already on vfio-pci.
    pub on_vfio: bool,
    /// The other devices that would leave the host with it (bridges excluded).
    pub goes_with: Vec<MemberReport>,
    /// PCI bridges in the group: they stay with the host.
    pub bridges_stay: Vec<PciAddress>,
    /// What the host uses the controller itself for.
    pub host_uses: Vec<HostUse>,
    /// Every reason, across the group, to believe the host needs it (one phrase each).
    pub host_needs: Vec<String>,
    /// One sentence.
    pub summary: String,
    /// The explanation, one line each.
    pub details: Vec<String>,
}

/// Read the facts for `pci` and give the verdict.
pub fn assess(root: &SysfsRoot, pci: &PciAddress) -> Result<PassthroughVerdict, VfioError> {
    let group = read_group(root, pci)?;
    let host_uses = group
        .as_ref()
        .map(|g| gather_host_uses(root, g))
        .unwrap_or_default();
    Ok(verdict(&GroupFacts {
        pci: *pci,
        group,
        iommu_enabled: iommu_present(root),
        cpu_vendor: CpuVendor::read(root),
        host_uses,
    }))
}

/// The verdict over plain facts.
pub fn verdict(facts: &GroupFacts) -> PassthroughVerdict {
    let pci = facts.pci;
    let Some(group) = &facts.group else {
        return no_iommu(facts);
    };
    let report = |m: &Member| MemberReport {
        pci: m.pci,
        kind: m.kind_label(),
        name: m.product_name(),
        driver: m.driver.clone(),
        class: m.class,
        bridge: m.bridge,
        host_uses: facts.host_uses.get(&m.pci).cloned().unwrap_or_default(),
    };
    let goes_with: Vec<MemberReport> = group
        .passed_members()
        .filter(|m| m.pci != pci)
        .map(report)
        .collect();
    let bridges_stay: Vec<PciAddress> = group
        .members
        .iter()
        .filter(|m| m.bridge)
        .map(|m| m.pci)
        .collect();
    let own_uses = facts.host_uses.get(&pci).cloned().unwrap_or_default();
    let on_vfio = group
        .passed_members()
        .all(|m| m.driver.as_deref() == Some(VFIO_DRIVER));
    let important: Vec<String> = facts
        .host_uses
        .iter()
        .flat_map(|(member, uses)| {
            let who = if *member == pci {
                "the controller itself".to_string()
            } else {
                format!("{member} (in the same group)")
            };
            uses.iter().map(move |u| format!("{who} {u}"))
        })
        .collect();
    let n = group.number;
    let status = if !important.is_empty() {
        VerdictStatus::HostNeedsIt
    } else if goes_with.is_empty() {
        VerdictStatus::Alone
    } else {
        VerdictStatus::WithGroup
    };

    let mut details = vec![format!(
        "IOMMU group {n}: the IOMMU is the hardware that keeps a VM's devices from reaching \
         the host's memory; it can only fence off a whole group, so a VM gets a group or nothing."
    )];
    if goes_with.is_empty() {
        details.push(format!(
            "{pci} is alone in group {n}: nothing else leaves the host with it."
        ));
    } else {
        details.push(format!(
            "These {} device(s) share group {n} and leave the host with it (the host loses them until `usbroute controller restore {pci}`):",
            goes_with.len()
        ));
        details.extend(goes_with.iter().map(|m| format!("  - {}", member_line(m))));
    }
    if !bridges_stay.is_empty() {
        let list: Vec<String> = bridges_stay.iter().map(ToString::to_string).collect();
        details.push(format!(
            "PCI bridges stay with the host: {}.",
            list.join(", ")
        ));
    }
    details.extend(
        important
            .iter()
            .map(|i| format!("The host seems to need it: {i}.")),
    );
    if on_vfio {
        details.push(format!(
            "The group is on {VFIO_DRIVER} now: it is ready for a VM."
        ));
    }

    let summary =
        match status {
            VerdictStatus::Alone => format!("can go to a VM on its own (alone in IOMMU group {n})"),
            VerdictStatus::WithGroup => {
                format!(
            "can go to a VM, but only together with {} other device(s) of IOMMU group {n}: {}",
            goes_with.len(),
            goes_with.iter().map(|m| format!("{} {}", m.pci, m.kind)).collect::<Vec<_>>().join(", ")
        )
            }
            VerdictStatus::HostNeedsIt => format!(
                "should stay with the host: {}; `controller bind --force` takes it anyway",
                important.join("; ")
            ),
            VerdictStatus::NoIommu => unreachable!("handled above"),
        };
    PassthroughVerdict {
        pci,
        status,
        can_pass: true,
        needs_force: status == VerdictStatus::HostNeedsIt,
        iommu_group: Some(n),
        on_vfio,
        goes_with,
        bridges_stay,
        host_uses: own_uses,
        host_needs: important,
        summary,
        details,
    }
}

fn member_line(m: &MemberReport) -> String {
    let name = m
        .name
        .as_deref()
        .map(|n| format!(" [{n}]"))
        .unwrap_or_default();
    let driver = m
        .driver
        .as_deref()
        .map(|d| format!(", driver {d}"))
        .unwrap_or_else(|| ", no driver".to_string());
    let uses = if m.host_uses.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = m.host_uses.iter().map(ToString::to_string).collect();
        format!(" - {}", list.join("; "))
    };
    format!("{} {}{name}{driver}{uses}", m.pci, m.kind)
}

fn no_iommu(facts: &GroupFacts) -> PassthroughVerdict {
    let pci = facts.pci;
    let hint = facts.cpu_vendor.enable_hint();
    let (summary, why) = if facts.iommu_enabled {
        (
            "cannot go to a VM: the IOMMU does not cover it (it is in no IOMMU group)".to_string(),
            format!(
                "Other devices have IOMMU groups but {pci} has none, so the kernel cannot fence it \
                 off from the host; check the firmware's IOMMU/ACS settings and `dmesg | grep -i -e DMAR -e AMD-Vi`."
            ),
        )
    } else {
        (
            "cannot go to a VM: the IOMMU is off".to_string(),
            "A VM may only be given a device the IOMMU fences off from the host's memory, \
             and this kernel has no IOMMU groups at all (/sys/kernel/iommu_groups/ is empty)."
                .to_string(),
        )
    };
    PassthroughVerdict {
        pci,
        status: VerdictStatus::NoIommu,
        can_pass: false,
        needs_force: false,
        iommu_group: None,
        on_vfio: false,
        goes_with: Vec::new(),
        bridges_stay: Vec::new(),
        host_uses: Vec::new(),
        host_needs: Vec::new(),
        summary,
        details: vec![why, format!("{hint}.")],
    }
}

impl PassthroughVerdict {
    /// The verdict as text: `PCI: summary`, then the details indented.
    pub fn to_text(&self) -> String {
        let mut out = format!("{}: {}\n", self.pci, self.summary);
        for line in &self.details {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}
