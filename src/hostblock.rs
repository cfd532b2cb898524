//! Which block devices the host is using, and for what: mounted filesystems (by device
//! number and by mount source, so btrfs and ZFS, whose mounts show an anonymous `0:N`,
//! are found too), every member of a mounted btrfs (`/sys/fs/btrfs/*/devices`), every
//! member of an imported ZFS pool (udev's `zfs_member` label, pools from
//! `/proc/spl/kstat/zfs`), devices something is stacked on (`holders/`: LVM, dm-crypt,
//! md, bcache) and active swap.
//!
//! Both guards read it: the policy keeps such USB disks on the host
//! ([`crate::daemon::mounts`]), and the whole-controller verdict names them
//! ([`crate::vfio::HostUse`]). Every read goes through the [`SysfsRoot`], so a recording
//! replays; a file that exists but cannot be read is reported in
//! [`HostBlocks::unreadable`], never taken for "nothing in use".

use crate::sysfs::SysfsRoot;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

/// Bigger than any real `/proc` mount table or udev record; a bound, not a limit.
const MAX_TEXT: u64 = 16 << 20;

/// Stacks of dm on md on partitions are shallow; the bound only stops a cycle.
const MAX_STACK: usize = 8;

/// One mounted filesystem, from `/proc/self/mountinfo` or `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mount (mountinfo only); `0:N` for btrfs, ZFS, tmpfs...
    pub devnum: Option<String>,
    /// Where it is mounted, unescaped.
    pub point: String,
    /// The filesystem type (`ext4`, `btrfs`, `zfs`).
    pub fstype: String,
    /// The mount source, unescaped (`/dev/sda2`, `rpool/ROOT/debian`).
    pub source: String,
}

/// Why the host uses a block device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BlockUse {
    /// It (or a device stacked on it) holds the filesystem mounted at this point.
    Mounted {
        /// The mount point.
        point: String,
    },
    /// It (or a device stacked on it) is active swap.
    Swap,
    /// Another block device is built on it (LVM, dm-crypt, md, bcache).
    Held {
        /// The device on top (`dm-0`, `md127`).
        holder: String,
    },
    /// It is a member of an imported ZFS pool.
    ZfsPool {
        /// The pool's name.
        pool: String,
    },
}

/// What the host uses its block devices for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostBlocks {
    /// Kernel block device name (`sda2`, `dm-0`, `nvme0n1`) → its uses.
    pub uses: BTreeMap<String, BTreeSet<BlockUse>>,
    /// What could not be read or resolved (one phrase each): any block device may then be
    /// in use, and a guard must treat every one as such.
    pub unreadable: Vec<String>,
}

impl HostBlocks {
    /// Read everything under `root`. A root without `/proc` (a recording) has no mounts;
    /// the live host without it is unreadable.
    pub fn read(root: &SysfsRoot) -> Self {
        let mut blocks = Self::default();
        let mounts = match read_text(root, "/proc/self/mountinfo") {
            Ok(Some(text)) => Some(parse_mountinfo(&text)),
            Ok(None) => match read_text(root, "/proc/self/mounts") {
                Ok(Some(text)) => Some(parse_mounts(&text)),
                Ok(None) if !root.is_live() => Some(Vec::new()),
                Ok(None) => None,
                Err(e) => blocks.unreadable_file("/proc/self/mounts", &e),
            },
            Err(e) => blocks.unreadable_file("/proc/self/mountinfo", &e),
        };
        let mounts = mounts.unwrap_or_else(|| {
            if blocks.unreadable.is_empty() {
                blocks
                    .unreadable
                    .push("the mount table (no /proc/self/mountinfo)".into());
            }
            Vec::new()
        });
        let btrfs = btrfs_filesystems(root);
        let zfs = ZfsMembers::read(root);
        for mount in &mounts {
            blocks.add_mount(root, mount, &btrfs, &zfs);
        }
        // A btrfs in /sys/fs/btrfs is mounted (the kernel adds it at mount time), even
        // when its mount did not name a member (a bind mount of a subvolume).
        for devices in btrfs.values() {
            for device in devices {
                if !blocks.uses.contains_key(device) {
                    blocks.add(
                        root,
                        device,
                        BlockUse::Mounted {
                            point: "(btrfs)".into(),
                        },
                    );
                }
            }
        }
        for pool in zfs.imported.iter() {
            for device in zfs.members.get(pool).into_iter().flatten() {
                blocks.add(root, device, BlockUse::ZfsPool { pool: pool.clone() });
            }
        }
        blocks.add_swaps(root);
        blocks.add_holders(root);
        blocks
    }

    /// The uses of one block device (empty when the host does not use it).
    pub fn uses_of(&self, device: &str) -> impl Iterator<Item = &BlockUse> {
        self.uses.get(device).into_iter().flatten()
    }

    fn unreadable_file<T>(&mut self, file: &str, e: &std::io::Error) -> Option<T> {
        self.unreadable.push(format!("{file} ({e})"));
        None
    }

    /// `device` and everything below it (`slaves/`) get `why`.
    fn add(&mut self, root: &SysfsRoot, device: &str, why: BlockUse) {
        for below in with_slaves(root, device) {
            self.uses.entry(below).or_default().insert(why.clone());
        }
    }

    fn add_mount(
        &mut self,
        root: &SysfsRoot,
        mount: &Mount,
        btrfs: &BTreeMap<String, Vec<String>>,
        zfs: &ZfsMembers,
    ) {
        let mut devices = BTreeSet::new();
        if let Some(name) = mount
            .devnum
            .as_deref()
            .filter(|d| !d.starts_with("0:"))
            .and_then(|d| name_of_devnum(root, d))
        {
            devices.insert(name);
        }
        // bcachefs names several members: `/dev/sda:/dev/sdb`.
        let sources: Vec<&str> = if mount.source.split(':').all(|s| s.starts_with("/dev/")) {
            mount.source.split(':').collect()
        } else {
            vec![mount.source.as_str()]
        };
        for source in sources.into_iter().filter(|s| s.starts_with("/dev/")) {
            match name_of_dev_path(root, source) {
                Some(name) => {
                    devices.insert(name);
                }
                // A block-backed mount we cannot place: say so rather than guess "none".
                None if devices.is_empty() && mount.devnum.is_none() => self
                    .unreadable
                    .push(format!("the device of {} ({source})", mount.point)),
                None => {}
            }
        }
        if mount.fstype == "btrfs" {
            let named: BTreeSet<String> =
                devices.iter().flat_map(|d| with_slaves(root, d)).collect();
            for members in btrfs.values() {
                if named.is_empty() || members.iter().any(|m| named.contains(m)) {
                    devices.extend(members.iter().cloned());
                }
            }
        }
        if mount.fstype == "zfs" {
            let pool = mount.source.split('/').next().unwrap_or_default();
            match zfs.members.get(pool) {
                Some(members) => devices.extend(members.iter().cloned()),
                None => self.unreadable.push(format!(
                    "the disks of ZFS pool {pool} (mounted at {}; udev has no zfs_member labelled {pool})",
                    mount.point
                )),
            }
        }
        for device in devices {
            self.add(
                root,
                &device,
                BlockUse::Mounted {
                    point: mount.point.clone(),
                },
            );
        }
    }

    fn add_swaps(&mut self, root: &SysfsRoot) {
        let text = match read_text(root, "/proc/swaps") {
            Ok(text) => text.unwrap_or_default(),
            Err(e) => {
                self.unreadable_file::<()>("/proc/swaps", &e);
                return;
            }
        };
        for source in text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
        {
            let source = unescape_mount_field(source);
            // A swap file lives on a mounted filesystem, which is already in the list.
            if source.starts_with("/dev/") {
                match name_of_dev_path(root, &source) {
                    Some(name) => self.add(root, &name, BlockUse::Swap),
                    None => self.unreadable.push(format!("the device of swap {source}")),
                }
            }
        }
    }

    fn add_holders(&mut self, root: &SysfsRoot) {
        for device in dir_names(&root.path("/sys/class/block")) {
            let holders = dir_names(&root.path(format!("/sys/class/block/{device}/holders")));
            if let Some(holder) = holders.into_iter().next() {
                self.add(root, &device, BlockUse::Held { holder });
            }
        }
    }
}

/// `device` and, for device-mapper and md, every device below it (`slaves/`).
fn with_slaves(root: &SysfsRoot, device: &str) -> Vec<String> {
    let mut pending = vec![(device.to_string(), 0)];
    let mut found = Vec::new();
    while let Some((name, depth)) = pending.pop() {
        if depth > MAX_STACK || found.contains(&name) {
            continue;
        }
        let slaves = root.path(format!("/sys/class/block/{name}/slaves"));
        pending.extend(dir_names(&slaves).into_iter().map(|s| (s, depth + 1)));
        found.push(name);
    }
    found
}

/// The kernel name of the block device `major:minor` (`/sys/dev/block/8:2` → `sda2`).
fn name_of_devnum(root: &SysfsRoot, devnum: &str) -> Option<String> {
    let real = std::fs::canonicalize(root.path(format!("/sys/dev/block/{devnum}"))).ok()?;
    real.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The kernel name behind a `/dev/...` path: the link's target (`/dev/mapper/x`,
/// `/dev/disk/by-uuid/...`), else a device-mapper device of that name, else the node's
/// own name. `None` for a `/dev/mapper` name no dm device has.
fn name_of_dev_path(root: &SysfsRoot, source: &str) -> Option<String> {
    if let Some(name) = root.link_name(source) {
        return Some(name);
    }
    let base = source.rsplit('/').next().unwrap_or(source);
    if let Some(mapped) = source.strip_prefix("/dev/mapper/") {
        return dir_names(&root.path("/sys/class/block"))
            .into_iter()
            .find(|dev| {
                root.read_attr(format!("/sys/class/block/{dev}/dm/name"))
                    .ok()
                    .flatten()
                    .as_deref()
                    == Some(mapped)
            });
    }
    (!base.is_empty()).then(|| base.to_string())
}

/// Every mounted btrfs (`/sys/fs/btrfs/<fsid>`) with its member devices.
fn btrfs_filesystems(root: &SysfsRoot) -> BTreeMap<String, Vec<String>> {
    dir_names(&root.path("/sys/fs/btrfs"))
        .into_iter()
        .filter_map(|fsid| {
            let devices = dir_names(&root.path(format!("/sys/fs/btrfs/{fsid}/devices")));
            (!devices.is_empty()).then_some((fsid, devices))
        })
        .collect()
}

/// ZFS pools and their disks as the host sees them. The kernel has no holders links for
/// ZFS; blkid (through udev) labels each member `zfs_member` with the pool's name.
#[derive(Debug, Default)]
struct ZfsMembers {
    /// Pool name → member block devices.
    members: BTreeMap<String, Vec<String>>,
    /// Pools imported now (`/proc/spl/kstat/zfs/<pool>/`).
    imported: BTreeSet<String>,
}

impl ZfsMembers {
    fn read(root: &SysfsRoot) -> Self {
        let imported = std::fs::read_dir(root.path("/proc/spl/kstat/zfs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in dir_names(&root.path("/run/udev/data")) {
            let Some(devnum) = entry.strip_prefix('b') else {
                continue;
            };
            let Ok(Some(text)) = read_text(root, &format!("/run/udev/data/{entry}")) else {
                continue;
            };
            let property = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix("E:")?.strip_prefix(key)?.strip_prefix('='))
            };
            if property("ID_FS_TYPE") != Some("zfs_member") {
                continue;
            }
            let (Some(pool), Some(name)) = (property("ID_FS_LABEL"), name_of_devnum(root, devnum))
            else {
                continue;
            };
            members.entry(pool.to_string()).or_default().push(name);
        }
        Self { members, imported }
    }
}

/// The names in a directory (empty when it is missing or unreadable).
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A text file under the root, at most [`MAX_TEXT`] bytes; `Ok(None)` when missing.
fn read_text(root: &SysfsRoot, host_path: &str) -> std::io::Result<Option<String>> {
    let file = match std::fs::File::open(root.path(host_path)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(MAX_TEXT).read_to_end(&mut bytes)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The mounts of a `/proc/self/mountinfo` text: `ID PARENT MAJ:MIN ROOT POINT OPTS
/// [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`. Lines that do not parse are skipped. Pure.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let head: Vec<&str> = head.split_whitespace().collect();
            let mut tail = tail.split_whitespace();
            Some(Mount {
                devnum: Some(head.get(2)?.to_string()),
                point: unescape_mount_field(head.get(4)?),
                fstype: unescape_mount_field(tail.next()?),
                source: unescape_mount_field(tail.next()?),
            })
        })
        .collect()
}

/// The mounts of a `/proc/self/mounts` text: `SOURCE POINT FSTYPE OPTS 0 0`. Pure.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some(Mount {
                source: unescape_mount_field(fields.next()?),
                point: unescape_mount_field(fields.next()?),
                fstype: unescape_mount_field(fields.next()?),
                devnum: None,
            })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mount fields as three octal
/// digits (`\040`). Only escapes of a byte (`\000`..`\377`) are decoded; anything else
/// (`\777`, which a crafted file can hold) stays as written.
pub fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u16, |n, b| n * 8 + u16::from(b - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        match (bytes[i], byte) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[path = "hostblock_tests.rs"]
mod tests;
