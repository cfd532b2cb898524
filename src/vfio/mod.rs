//! Whole-controller passthrough: IOMMU group verdicts and vfio-pci bind/restore.
//!
//! A VM can only be given a PCI device together with everything the IOMMU cannot keep
//! apart from it: its whole IOMMU group (PCI bridges excepted, they stay with the host).
//! This module answers "can this controller go, and what goes with it" ([`assess`]),
//! moves a group to vfio-pci and back ([`bind`], [`restore`]) with a record of each
//! member's previous driver and a roll-back when a step fails half-way, applies the
//! `[[controller]]` config rules ([`apply_controller_rules`]) and prints the QEMU,
//! libvirt and xl snippets for people who start VMs themselves ([`emit`]).
//!
//! Reads go through [`SysfsRoot`](crate::sysfs::SysfsRoot); every write, the module load
//! and the driver read-back of bind/restore go through the small [`PciHost`] trait so a
//! test can inject a failure at any write.

mod attach;
mod bind;
mod config;
mod emit;
pub(crate) mod group;
mod host;
mod host_use;
mod layout;
mod plan;
mod record;
mod report;
mod rules;
mod verdict;

pub use attach::{free_root_ports, plan_attach, AttachError, DeviceAdd, Machine, RootPort};
pub use bind::{
    bind, execute_bind, plan_bind, plan_restore, restore, BindOptions, BindOutcome, BindPlan,
    MemberChange, RestoreOutcome,
};
pub use config::check_controller_rules;
pub use emit::{emit, qemu_id, Emitted};
pub use group::{iommu_present, read_group, CpuVendor, IommuGroup, Member};
pub use host::{LiveHost, PciHost};
pub use host_use::{gather_host_uses, HostUse};
pub use layout::{guest_layout, GuestSlot, PortLayout};
pub use plan::{bind_plan, restore_plan, restore_plan_without_record, Step};
pub use record::{BindRecord, MemberState, RECORD_DIR};
pub use report::{controller_entries, isolation_summary, passthrough_text, ControllerEntry};
pub use rules::{
    apply_controller_rules, held_by_rules, restore_controller_rules, RuleOutcome, RulesReport,
};
pub use verdict::{assess, verdict, GroupFacts, MemberReport, PassthroughVerdict, VerdictStatus};

use crate::inventory::PciAddress;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Config `[[controller]]`: a whole controller that belongs to a VM (stable interface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerRule {
    /// PCI address of the USB controller.
    pub pci: PciAddress,
    /// The VM (a `[[vm]]` name) it belongs to.
    pub vm: String,
}

/// The driver every member of a passed group is bound to.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// What can go wrong while assessing, binding or restoring a controller.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The address names no PCI function.
    #[error("There is no PCI device {pci} (no {path}); `usbroute controllers` lists the USB controllers")]
    NoSuchDevice {
        /// The address asked for.
        pci: PciAddress,
        /// The directory that is missing.
        path: PathBuf,
    },
    /// No IOMMU group: the device cannot be isolated from the host.
    #[error("{pci} is in no IOMMU group, so it cannot be given to a VM safely. {hint}")]
    NoIommuGroup {
        /// The device.
        pci: PciAddress,
        /// How to turn the IOMMU on.
        hint: String,
    },
    /// The group holds only PCI bridges, which never leave the host.
    #[error("IOMMU group {group} of {pci} holds only PCI bridges, which stay with the host: there is nothing to give a VM; name a device behind the bridge instead")]
    OnlyBridges {
        /// The address asked for.
        pci: PciAddress,
        /// The group.
        group: u32,
    },
    /// The target is not a USB controller, and no `--force`.
    #[error("{pci} is a {kind}, not a USB controller: usbroute passes USB controllers (with their IOMMU group). If you mean to give the VM this device, pass --force")]
    NotUsbController {
        /// The address asked for.
        pci: PciAddress,
        /// What it is (`SATA controller`).
        kind: String,
    },
    /// Members the host seems to need, and no `--force`.
    #[error("Refusing to take IOMMU group {group} from the host: {reasons}. If you are sure, pass --force (`usbroute controller restore` gives it back)")]
    HostNeedsGroup {
        /// The group number.
        group: u32,
        /// One phrase per important member, joined.
        reasons: String,
    },
    /// A sysfs or procfs read failed for a reason other than "missing".
    #[error("Cannot read {path}")]
    Read {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bind record could not be written or read.
    #[error("Cannot use the bind record {path}")]
    Record {
        /// The record's host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bind failed half-way; what was done has been rolled back (or says why not).
    #[error("Binding IOMMU group {group} to vfio-pci failed at \"{step}\": {cause}. {report}")]
    BindFailed {
        /// The group.
        group: u32,
        /// The step that failed, as `--dry-run` prints it.
        step: String,
        /// Why it failed.
        cause: String,
        /// The roll-back and each member's state now.
        report: String,
    },
    /// A restore left members where they should not be.
    #[error("Restoring IOMMU group {group} is incomplete: {problems}. Each member now: {report}; run `usbroute controller restore` again once the cause is fixed")]
    RestoreFailed {
        /// The group.
        group: u32,
        /// What failed.
        problems: String,
        /// Each member's state now.
        report: String,
    },
    /// The bind record is not valid JSON of the expected shape.
    #[error("The bind record {path} is damaged; delete it and restore by hand")]
    BadRecord {
        /// The record's host path.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
}
