//! The passthrough verdict next to what `usbroute controllers` already shows: an
//! additive `passthrough` field in JSON and a section of plain sentences in text.

use super::verdict::{assess, PassthroughVerdict, VerdictStatus};
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::Serialize;
use std::fmt::Write as _;

/// Any controller report with the passthrough verdict added beside its fields.
#[derive(Debug, Clone, Serialize)]
pub struct WithPassthrough<T> {
    /// The report as it was.
    #[serde(flatten)]
    pub report: T,
    /// Can it go to a VM, what goes with it, and what the host seems to need
    /// (`None` when its group could not be read; the warning says why).
    pub passthrough: Option<PassthroughVerdict>,
}

/// Add the verdict to each report; `pci` says which controller a report is about.
pub fn with_passthrough<T>(
    root: &SysfsRoot,
    reports: Vec<T>,
    pci: impl Fn(&T) -> PciAddress,
) -> Vec<WithPassthrough<T>> {
    reports
        .into_iter()
        .map(|report| {
            let passthrough = assess(root, &pci(&report)).ok();
            WithPassthrough {
                report,
                passthrough,
            }
        })
        .collect()
}

/// The text section: what an IOMMU group is (once), then per controller its one-line
/// answer and anything in its group the host seems to need.
pub fn passthrough_text(root: &SysfsRoot, controllers: &[PciAddress]) -> String {
    let mut out = String::from(
        "\nCan each go to a VM? A VM gets a whole IOMMU group (the devices the IOMMU can fence \
         off from the host together) or nothing; PCI bridges stay with the host.\n\
         (`usbroute controller check PCI` explains one, `usbroute controller bind PCI --dry-run` shows the steps.)\n",
    );
    for pci in controllers {
        match assess(root, pci) {
            Ok(v) => {
                let _ = writeln!(out, "{pci}: {}", v.summary);
                if v.status == VerdictStatus::NoIommu {
                    let _ = writeln!(out, "    {}", v.details.join(" "));
                }
            }
            Err(e) => {
                let _ = writeln!(out, "{pci}: cannot tell: {e}");
            }
        }
    }
    out
}
