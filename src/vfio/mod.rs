//! Whole-controller passthrough: IOMMU group verdicts and vfio-pci bind/restore.

use crate::inventory::PciAddress;
use serde::{Deserialize, Serialize};

/// Config `[[controller]]`: a whole controller that belongs to a VM (stable interface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerRule {
    /// PCI address of the USB controller.
    pub pci: PciAddress,
    /// The VM (a `[[vm]]` name) it belongs to.
    pub vm: String,
}
