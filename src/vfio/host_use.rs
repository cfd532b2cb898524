//! What the host is using a PCI function for: disks it has mounted, pooled, stacked or
//! swaps to ([`HostBlocks`]), the console, network interfaces that carry a route
//! (directly or through a bridge, bond or VLAN on top), its only keyboard. Read through
//! a [`SysfsRoot`]; a guess, so the verdict asks for `--force` rather than forbidding.
//! A file that cannot be read counts as "the host may need it", never as "nothing".

use super::group::{device_dir, real_dir, IommuGroup};
use crate::hostblock::{BlockUse, HostBlocks};
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// One reason to believe the host needs a device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostUse {
    /// A block device below it holds a mounted filesystem.
    MountedFilesystem {
        /// Kernel block device name (`sda2`, `nvme0n1p1`).
        block_device: String,
        /// Where it is mounted (`/`, `/home`).
        mount_point: String,
    },
    /// A block device below it is active swap space.
    ActiveSwap {
        /// Kernel block device name (`sda3`).
        block_device: String,
    },
    /// The firmware showed the boot screen on it (`boot_vga` is 1).
    BootDisplay,
    /// A framebuffer below it (`fb0`): the text console draws there.
    ConsoleFramebuffer {
        /// The framebuffer (`fb0`).
        framebuffer: String,
    },
    /// A DRM connector below it has a display connected.
    ConnectedDisplay {
        /// The connector (`card0-HDMI-A-1`).
        connector: String,
    },
    /// A network interface below it carries a host route.
    RoutedNetwork {
        /// The interface (`enp3s0`).
        interface: String,
    },
    /// A block device below it is a disk of an imported ZFS pool.
    ZfsPoolMember {
        /// Kernel block device name (`sdb1`).
        block_device: String,
        /// The pool.
        pool: String,
    },
    /// Another block device (LVM, dm-crypt, md, bcache) is built on a block device below it.
    StackedBlockDevice {
        /// Kernel block device name (`sda3`).
        block_device: String,
        /// The device on top (`dm-0`, `md127`).
        holder: String,
    },
    /// A network interface below it is enslaved to a bridge, bond or VLAN that carries a
    /// host route.
    EnslavedNetwork {
        /// The interface (`enp3s0`).
        interface: String,
        /// The interface on top with the route (`br0`).
        master: String,
    },
    /// What the host uses could not be read, and a device of this kind is below it.
    Unknown {
        /// What could not be read, and why.
        what: String,
    },
    /// The only keyboards of the host are on it.
    OnlyKeyboard {
        /// The USB devices with a keyboard interface (`1-3`).
        keyboards: Vec<String>,
    },
}

impl fmt::Display for HostUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MountedFilesystem {
                block_device,
                mount_point,
            } => write!(
                f,
                "holds the host's mounted filesystem {mount_point} ({block_device})"
            ),
            Self::ActiveSwap { block_device } => {
                write!(f, "holds the host's active swap ({block_device})")
            }
            Self::BootDisplay => f.write_str("is the host's boot display (boot_vga)"),
            Self::ConsoleFramebuffer { framebuffer } => {
                write!(f, "draws the host's text console ({framebuffer})")
            }
            Self::ConnectedDisplay { connector } => {
                write!(f, "drives a connected display ({connector})")
            }
            Self::RoutedNetwork { interface } => {
                write!(f, "carries a host network route ({interface})")
            }
            Self::ZfsPoolMember { block_device, pool } => {
                write!(
                    f,
                    "holds a disk of the host's ZFS pool {pool} ({block_device})"
                )
            }
            Self::StackedBlockDevice {
                block_device,
                holder,
            } => write!(
                f,
                "holds {block_device}, which the host's {holder} is built on (LVM, dm-crypt or md)"
            ),
            Self::EnslavedNetwork { interface, master } => write!(
                f,
                "carries a host network route through {master} ({interface} is part of it)"
            ),
            Self::Unknown { what } => write!(f, "may be in use by the host: cannot read {what}"),
            Self::OnlyKeyboard { keyboards } => write!(
                f,
                "has the host's only keyboard (USB {}); the host would be left without one",
                keyboards.join(", ")
            ),
        }
    }
}

/// What a walk below one device found.
#[derive(Debug, Default)]
struct Below {
    block_devices: BTreeSet<String>,
    interfaces: BTreeSet<String>,
    framebuffers: BTreeSet<String>,
    connected: BTreeSet<String>,
    keyboards: BTreeSet<String>,
}

/// Host uses of each non-bridge member of `group`, keyed by address (members with none
/// are absent).
pub fn gather_host_uses(
    root: &SysfsRoot,
    group: &IommuGroup,
) -> BTreeMap<PciAddress, Vec<HostUse>> {
    let blocks = HostBlocks::read(root);
    let routed = routed_interfaces(root);
    let walks: Vec<(PciAddress, Below)> = group
        .passed_members()
        .map(|m| {
            let mut below = Below::default();
            if let Some(dir) = real_dir(root, &device_dir(&m.pci)) {
                walk(&dir, 0, &mut below);
            }
            (m.pci, below)
        })
        .collect();
    let group_keyboards: BTreeSet<String> = walks
        .iter()
        .flat_map(|(_, b)| b.keyboards.iter().cloned())
        .collect();
    let keyboards_elsewhere =
        !group_keyboards.is_empty() && keyboards_outside(root, group, &group_keyboards);

    let mut uses = BTreeMap::new();
    for (pci, below) in walks {
        let mut found: Vec<HostUse> = below
            .block_devices
            .iter()
            .flat_map(|b| block_uses(&blocks, b))
            .collect();
        if !below.block_devices.is_empty() && !blocks.unreadable.is_empty() {
            found.push(HostUse::Unknown {
                what: format!(
                    "{}, so its disks may be in use",
                    blocks.unreadable.join("; ")
                ),
            });
        }
        if root
            .read_attr(device_dir(&pci).join("boot_vga"))
            .ok()
            .flatten()
            .as_deref()
            == Some("1")
        {
            found.push(HostUse::BootDisplay);
        }
        found.extend(
            below
                .framebuffers
                .iter()
                .map(|fb| HostUse::ConsoleFramebuffer {
                    framebuffer: fb.clone(),
                }),
        );
        found.extend(below.connected.iter().map(|c| HostUse::ConnectedDisplay {
            connector: c.clone(),
        }));
        found.extend(
            below
                .interfaces
                .iter()
                .filter_map(|i| network_use(root, &routed, i)),
        );
        if !below.keyboards.is_empty() && !keyboards_elsewhere {
            found.push(HostUse::OnlyKeyboard {
                keyboards: below.keyboards.iter().cloned().collect(),
            });
        }
        found.sort();
        found.dedup();
        if !found.is_empty() {
            uses.insert(pci, found);
        }
    }
    uses
}

/// Walk real directories below a device (never following links: sysfs links point
/// sideways and up) and note block devices, network interfaces, framebuffers, connected
/// DRM connectors and USB keyboard interfaces.
fn walk(dir: &Path, depth: usize, below: &mut Below) {
    // USB trees are the deepest: usb1/1-1/1-1.2/.../1-1.2.3.4.5:1.0/0003:.../input/inputN.
    if depth > 24 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let parent = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_dir() {
            continue;
        }
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        match class_of(&path, parent).as_deref() {
            Some("block") => {
                below.block_devices.insert(name);
                // Partitions are block devices inside the disk's directory.
                walk(&path, depth + 1, below);
            }
            Some("net") => {
                below.interfaces.insert(name);
            }
            Some("graphics") if name.starts_with("fb") => {
                below.framebuffers.insert(name);
            }
            Some("drm") if is_drm_card(&name) => connected_connectors(&path, &name, below),
            Some("graphics" | "drm") => {}
            _ => {
                if name.contains(':') && is_keyboard_interface(&path) {
                    if let Some((device, _)) = name.split_once(':') {
                        below.keyboards.insert(device.to_string());
                    }
                }
                walk(&path, depth + 1, below);
            }
        }
    }
}

/// The device class of a sysfs directory: its `subsystem` link (`.../class/block`), else
/// the glue directory it sits in (`block/sda`, `net/eth0`), else `block` for a partition.
/// NVMe disks have no `block` glue directory (`nvme/nvme0/nvme0n1`), hence the link.
fn class_of(dir: &Path, parent: &str) -> Option<String> {
    if let Ok(target) = std::fs::read_link(dir.join("subsystem")) {
        return target.file_name().map(|n| n.to_string_lossy().into_owned());
    }
    match parent {
        "block" | "net" | "graphics" | "drm" => Some(parent.to_string()),
        _ if dir.join("partition").is_file() => Some("block".to_string()),
        _ => None,
    }
}

fn is_drm_card(name: &str) -> bool {
    name.strip_prefix("card")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn connected_connectors(card: &Path, card_name: &str, below: &mut Below) {
    let Ok(entries) = std::fs::read_dir(card) else {
        return;
    };
    let prefix = format!("{card_name}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if name.starts_with(&prefix) && status.trim() == "connected" {
            below.connected.insert(name);
        }
    }
}

/// A HID boot keyboard interface: class 03, subclass 01, protocol 01.
fn is_keyboard_interface(dir: &Path) -> bool {
    let attr = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    attr("bInterfaceClass").trim() == "03"
        && attr("bInterfaceSubClass").trim() == "01"
        && attr("bInterfaceProtocol").trim() == "01"
}

/// Is there a keyboard on the host that is not below a member of `group`: a USB keyboard
/// interface elsewhere, or a PS/2 keyboard bound to atkbd (laptops' built-in ones)?
fn keyboards_outside(root: &SysfsRoot, group: &IommuGroup, in_group: &BTreeSet<String>) -> bool {
    let member_dirs: Vec<PathBuf> = group
        .passed_members()
        .filter_map(|m| real_dir(root, &device_dir(&m.pci)))
        .collect();
    let usb = root.path("/sys/bus/usb/devices");
    let usb_elsewhere = std::fs::read_dir(usb)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((device, _)) = name.split_once(':') else {
                return false;
            };
            let Ok(real) = std::fs::canonicalize(e.path()) else {
                return false;
            };
            is_keyboard_interface(&real)
                && !in_group.contains(device)
                && !member_dirs.iter().any(|d| real.starts_with(d))
        });
    let ps2 = std::fs::read_dir(root.path("/sys/bus/serio/drivers/atkbd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("serio"));
    usb_elsewhere || ps2
}

/// What the host uses one block device below a member for.
fn block_uses(blocks: &HostBlocks, block: &str) -> Vec<HostUse> {
    blocks
        .uses_of(block)
        .map(|u| {
            let block_device = block.to_string();
            match u {
                BlockUse::Mounted { point } => HostUse::MountedFilesystem {
                    block_device,
                    mount_point: point.clone(),
                },
                BlockUse::Swap => HostUse::ActiveSwap { block_device },
                BlockUse::Held { holder } => HostUse::StackedBlockDevice {
                    block_device,
                    holder: holder.clone(),
                },
                BlockUse::ZfsPool { pool } => HostUse::ZfsPoolMember {
                    block_device,
                    pool: pool.clone(),
                },
            }
        })
        .collect()
}

/// The network interfaces that carry a host route (loopback aside), or why they are
/// unknown.
type Routed = Result<BTreeSet<String>, String>;

/// Interfaces named in the IPv4 or IPv6 routing table (loopback aside). A missing table
/// is empty in a recording and for IPv6 (it may be off); otherwise unreadable is an error.
fn routed_interfaces(root: &SysfsRoot) -> Routed {
    let read = |p: &str, optional: bool| match std::fs::read_to_string(root.path(p)) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && (optional || !root.is_live()) => {
            Ok(String::new())
        }
        Err(e) => Err(format!("{p} ({e})")),
    };
    let v4 = read("/proc/net/route", false)?;
    let v6 = read("/proc/net/ipv6_route", true)?;
    let ipv4 = v4
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next());
    let ipv6 = v6.lines().filter_map(|l| l.split_whitespace().last());
    Ok(ipv4
        .chain(ipv6)
        .filter(|i| *i != "lo")
        .map(str::to_string)
        .collect())
}

/// Why the host needs `interface`: it carries a route, or an interface stacked on it
/// (its `master` bridge or bond, an `upper_*` VLAN, and so on up) does.
fn network_use(root: &SysfsRoot, routed: &Routed, interface: &str) -> Option<HostUse> {
    let routed = match routed {
        Ok(routed) => routed,
        Err(what) => {
            return Some(HostUse::Unknown {
                what: format!("{what}, so {interface} may carry a route"),
            })
        }
    };
    if routed.contains(interface) {
        return Some(HostUse::RoutedNetwork {
            interface: interface.to_string(),
        });
    }
    // Bridges in bonds in VLANs are a few levels at most; the bound only stops a cycle.
    let mut pending = vec![(interface.to_string(), 0)];
    let mut seen = BTreeSet::new();
    while let Some((name, depth)) = pending.pop() {
        if depth > 8 || !seen.insert(name.clone()) {
            continue;
        }
        if name != interface && routed.contains(&name) {
            return Some(HostUse::EnslavedNetwork {
                interface: interface.to_string(),
                master: name,
            });
        }
        pending.extend(
            upper_interfaces(root, &name)
                .into_iter()
                .map(|u| (u, depth + 1)),
        );
    }
    None
}

/// The interfaces directly on top of `interface`: its `master` and its `upper_*` links.
fn upper_interfaces(root: &SysfsRoot, interface: &str) -> BTreeSet<String> {
    let dir = format!("/sys/class/net/{interface}");
    let mut uppers: BTreeSet<String> = root
        .link_name(format!("{dir}/master"))
        .into_iter()
        .collect();
    uppers.extend(
        std::fs::read_dir(root.path(&dir))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("upper_")
                    .map(str::to_string)
            }),
    );
    uppers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_drm_card_accepts_cards_not_connectors() {
        assert_eq!(
            [
                is_drm_card("card0"),
                is_drm_card("card0-HDMI-A-1"),
                is_drm_card("renderD128")
            ],
            [true, false, false]
        );
    }
}
