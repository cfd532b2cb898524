//! Whole-controller passthrough: IOMMU group verdicts and vfio-pci bind/restore.
