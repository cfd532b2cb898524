//! Reading an IOMMU group and its members through a [`SysfsRoot`].

use super::VfioError;
use crate::inventory::{ControllerKind, HexId, PciAddress};
use crate::sysfs::SysfsRoot;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One PCI function of an IOMMU group, as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its address.
    pub pci: PciAddress,
    /// PCI class code (`0x0c0320`), if readable.
    pub class: Option<u32>,
    /// PCI vendor id.
    pub vendor_id: Option<HexId>,
    /// PCI device id.
    pub device_id: Option<HexId>,
    /// Bound driver, `None` if unbound.
    pub driver: Option<String>,
    /// `driver_override` when set (the kernel shows `(null)` when it is not).
    pub driver_override: Option<String>,
    /// PCI-to-PCI bridges stay with the host: vfio accepts them bound to `pcieport`.
    pub bridge: bool,
}

impl Member {
    /// What kind of device this is, in words: `USB controller (EHCI)`, `SATA controller`.
    pub fn kind_label(&self) -> String {
        let Some(class) = self.class else {
            return "PCI device".to_string();
        };
        if let Some(kind) = ControllerKind::from_pci_class(class) {
            return match kind {
                ControllerKind::Other => "USB controller".to_string(),
                k => format!("USB controller ({})", k.to_string().to_uppercase()),
            };
        }
        let label = match class >> 8 {
            0x0100 => "SCSI controller",
            0x0101 => "IDE controller",
            0x0104 => "RAID controller",
            0x0106 => "SATA controller",
            0x0107 => "SAS controller",
            0x0108 => "NVMe controller",
            0x0200 => "Ethernet controller",
            0x0280 => "network controller",
            0x0300 => "VGA display controller",
            0x0302 => "3D display controller",
            0x0401 => "audio device",
            0x0403 => "audio device",
            0x0600 => "host bridge",
            0x0601 => "ISA bridge",
            0x0604 | 0x0609 => "PCI bridge",
            0x0c05 => "SMBus controller",
            _ => match class >> 16 {
                0x01 => "storage controller",
                0x02 => "network controller",
                0x03 => "display controller",
                0x04 => "multimedia device",
                0x06 => "bridge",
                0x0c => "serial bus controller",
                _ => "PCI device",
            },
        };
        label.to_string()
    }

    /// Vendor and device name from the PCI id database, if known.
    pub fn product_name(&self) -> Option<String> {
        let (v, d) = (self.vendor_id?, self.device_id?);
        let device = crate::inventory::ids::pci_device(v.0, d.0)?;
        let vendor = crate::inventory::ids::pci_vendor(v.0)?;
        Some(format!("{vendor} {device}"))
    }

    /// One line for people: `0000:00:1d.0 USB controller (UHCI), driver uhci_hcd`.
    pub fn describe(&self) -> String {
        let driver = match &self.driver {
            Some(d) => format!("driver {d}"),
            None => "no driver".to_string(),
        };
        format!("{} {}, {driver}", self.pci, self.kind_label())
    }
}

/// An IOMMU group: the smallest set of PCI functions the IOMMU can isolate from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuGroup {
    /// The kernel's group number (`/sys/kernel/iommu_groups/N`, `/dev/vfio/N`).
    pub number: u32,
    /// Every function in it, sorted by address, bridges included.
    pub members: Vec<Member>,
}

impl IommuGroup {
    /// The members that leave the host with the group (every non-bridge).
    pub fn passed_members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| !m.bridge)
    }

    /// `/dev/vfio/N`, which appears once vfio-pci holds a member.
    pub fn dev_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/vfio/{}", self.number))
    }
}

/// Which IOMMU the CPU maker's platforms have, to phrase the "turn it on" hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuVendor {
    /// Intel: VT-d, `intel_iommu=on`.
    Intel,
    /// AMD: AMD-Vi, `amd_iommu=on`.
    Amd,
    /// Anything else or unreadable: name both.
    Unknown,
}

impl CpuVendor {
    /// From `/proc/cpuinfo` under the root.
    pub fn read(root: &SysfsRoot) -> Self {
        let text = std::fs::read_to_string(root.path("/proc/cpuinfo")).unwrap_or_default();
        let vendor = text
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_string());
        match vendor.as_deref() {
            Some("GenuineIntel") => Self::Intel,
            Some("AuthenticAMD") => Self::Amd,
            _ => Self::Unknown,
        }
    }

    /// How to turn the IOMMU on, in one paragraph.
    pub fn enable_hint(self) -> String {
        let (firmware, param) = match self {
            Self::Intel => (
                "VT-d (\"Intel Virtualization Technology for Directed I/O\")",
                "intel_iommu=on",
            ),
            Self::Amd => (
                "AMD-Vi (often called \"IOMMU\" or \"SVM/IOMMU\")",
                "amd_iommu=on",
            ),
            Self::Unknown => (
                "VT-d (Intel) or AMD-Vi (AMD)",
                "intel_iommu=on (Intel) or amd_iommu=on (AMD)",
            ),
        };
        format!(
            "Turn the IOMMU on: enable {firmware} in the firmware setup, add {param} to the kernel \
             command line (e.g. GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub), and reboot; \
             /sys/kernel/iommu_groups/ then lists groups"
        )
    }
}

/// `true` when the kernel has any IOMMU group at all (the IOMMU is on).
pub fn iommu_present(root: &SysfsRoot) -> bool {
    std::fs::read_dir(root.path("/sys/kernel/iommu_groups"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// The host directory of a PCI function.
pub(crate) fn device_dir(pci: &PciAddress) -> PathBuf {
    PathBuf::from(format!("/sys/bus/pci/devices/{pci}"))
}

/// The IOMMU group of `pci` with every member, `Ok(None)` if the device has no group.
pub fn read_group(root: &SysfsRoot, pci: &PciAddress) -> Result<Option<IommuGroup>, VfioError> {
    let dir = device_dir(pci);
    if !root.path(&dir).exists() {
        return Err(VfioError::NoSuchDevice {
            pci: *pci,
            path: dir,
        });
    }
    let Some(number) = root
        .link_name(dir.join("iommu_group"))
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return Ok(None);
    };
    let devices = PathBuf::from(format!("/sys/kernel/iommu_groups/{number}/devices"));
    let entries = std::fs::read_dir(root.path(&devices)).map_err(|source| VfioError::Read {
        path: devices.clone(),
        source,
    })?;
    let mut addresses: Vec<PciAddress> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    if !addresses.contains(pci) {
        // A recording may hold only the link; the device itself is surely a member.
        addresses.push(*pci);
    }
    addresses.sort();
    let members = addresses
        .into_iter()
        .map(|a| read_member(root, &a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(IommuGroup { number, members }))
}

/// One member's class, ids, driver and override.
pub(crate) fn read_member(root: &SysfsRoot, pci: &PciAddress) -> Result<Member, VfioError> {
    let dir = device_dir(pci);
    let read = |name: &str| -> Result<Option<String>, VfioError> {
        let path = dir.join(name);
        root.read_attr(&path)
            .map_err(|source| VfioError::Read { path, source })
    };
    let hex = |s: Option<String>| {
        s.and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
    };
    let class = hex(read("class")?);
    let id = |s: Option<String>| hex(s).and_then(|v| u16::try_from(v).ok()).map(HexId);
    Ok(Member {
        pci: *pci,
        class,
        vendor_id: id(read("vendor")?),
        device_id: id(read("device")?),
        driver: root.link_name(dir.join("driver")),
        driver_override: parse_override(read("driver_override")?),
        bridge: class.is_some_and(|c| matches!(c >> 8, 0x0604 | 0x0609)),
    })
}

/// `(null)` and empty mean "no override".
pub(crate) fn parse_override(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty() && v != "(null)")
}

/// The real directory of a host path, symlinks resolved (sysfs device links are relative,
/// so this stays inside a recorded root).
pub(crate) fn real_dir(root: &SysfsRoot, host_path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(root.path(host_path)).ok()
}
