//! Which whole disks the host is using: the policy keeps such USB disks on the host unless
//! a rule says `force = true`.
//!
//! What counts as "using" is [`HostBlocks`]: mounted filesystems (btrfs and ZFS, whose
//! mounts have no device number, included), pool and stack members, swap. Each block
//! device is resolved to its whole disk through `/sys/class/block` (a partition's disk is
//! its parent directory). Every read is under the [`SysfsRoot`], so a recording replays.

use crate::hostblock::HostBlocks;
use crate::sysfs::SysfsRoot;
use std::collections::BTreeSet;

/// `major:minor` of every mount with a real device number in a mountinfo text (`0:N`
/// mounts, btrfs and ZFS among them, have none: [`mounted_disks`] finds their disks by
/// other means). Pure.
pub fn mounted_devices(mountinfo: &str) -> BTreeSet<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter(|dev| !dev.starts_with("0:"))
        .map(str::to_string)
        .collect()
}

/// Whole-disk names (`sda`) the host is using, directly or through partitions,
/// device-mapper, md, btrfs or ZFS. When what is in use cannot be read (an unreadable
/// mount table, a ZFS pool whose disks are unknown) every disk counts as in use: a USB
/// disk stays on the host until the picture is whole again.
pub fn mounted_disks(root: &SysfsRoot) -> BTreeSet<String> {
    let blocks = HostBlocks::read(root);
    if !blocks.unreadable.is_empty() {
        tracing::warn!(
            "cannot tell which disks the host uses ({}): every USB disk stays on the host",
            blocks.unreadable.join("; ")
        );
        let every = std::fs::read_dir(root.path("/sys/block"))
            .into_iter()
            .flatten();
        return every
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
    }
    blocks
        .uses
        .keys()
        .filter_map(|device| whole_disk(root, device))
        .collect()
}

/// The whole disk of a block device: itself, or for a partition its parent directory;
/// `None` for a stacked device (dm, md), whose disks are in the list in their own right.
fn whole_disk(root: &SysfsRoot, device: &str) -> Option<String> {
    let Ok(real) = std::fs::canonicalize(root.path(format!("/sys/class/block/{device}"))) else {
        // Not in sysfs (a name from a mount source only): take it as it is.
        return Some(device.to_string());
    };
    if std::fs::read_dir(real.join("slaves")).is_ok_and(|mut s| s.next().is_some()) {
        return None;
    }
    let disk = if real.join("partition").exists() {
        real.parent()?.file_name()?
    } else {
        real.file_name()?
    };
    Some(disk.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MOUNTINFO: &str = "22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 8:18 / /media/usb rw,relatime - vfat /dev/sdb2 rw
41 27 254:0 / /srv rw,relatime - ext4 /dev/mapper/vg-srv rw
";

    #[test]
    fn mounted_devices_skips_anonymous_mounts() {
        let devs = mounted_devices(MOUNTINFO);

        assert_eq!(
            devs.into_iter().collect::<Vec<_>>(),
            ["254:0", "8:1", "8:18"]
        );
    }

    /// A sysfs tree: sda with sda1, sdb with sdb2, dm-0 on sdc1.
    fn fixture(dir: &Path) {
        let mk = |p: &str| std::fs::create_dir_all(dir.join(p)).unwrap();
        let link = |link: &str, target: &str| {
            let l = dir.join(link);
            std::fs::create_dir_all(l.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(dir.join(target), l).unwrap();
        };
        for (disk, part) in [("sda", "sda1"), ("sdb", "sdb2"), ("sdc", "sdc1")] {
            mk(&format!("sys/block/{disk}/{part}"));
            std::fs::write(
                dir.join(format!("sys/block/{disk}/{part}/partition")),
                "1\n",
            )
            .unwrap();
            link(
                &format!("sys/class/block/{part}"),
                &format!("sys/block/{disk}/{part}"),
            );
        }
        mk("sys/block/dm-0/slaves");
        link("sys/block/dm-0/slaves/sdc1", "sys/block/sdc/sdc1");
        link("sys/class/block/dm-0", "sys/block/dm-0");
        link("sys/dev/block/8:1", "sys/block/sda/sda1");
        link("sys/dev/block/8:18", "sys/block/sdb/sdb2");
        link("sys/dev/block/254:0", "sys/block/dm-0");
        mk("proc/self");
        std::fs::write(dir.join("proc/self/mountinfo"), MOUNTINFO).unwrap();
    }

    #[test]
    fn mounted_disks_resolves_partitions_and_device_mapper() {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());

        let disks = mounted_disks(&SysfsRoot::new(dir.path()));

        assert_eq!(disks.into_iter().collect::<Vec<_>>(), ["sda", "sdb", "sdc"]);
    }

    #[test]
    fn mounted_disks_of_a_root_without_proc_is_empty() {
        let dir = tempfile::tempdir().unwrap();

        assert!(mounted_disks(&SysfsRoot::new(dir.path())).is_empty());
    }

    /// A tree with whole disks `sdb`..`sdf`, each with partition 1, and the given
    /// mountinfo; `extra` adds the host state under test.
    fn disks_tree(mountinfo: &str, extra: impl FnOnce(&Path)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (minor, disk) in [
            (16, "sdb"),
            (32, "sdc"),
            (48, "sdd"),
            (64, "sde"),
            (80, "sdf"),
        ] {
            let part = format!("{disk}1");
            std::fs::create_dir_all(root.join(format!("sys/block/{disk}/{part}"))).unwrap();
            std::fs::write(
                root.join(format!("sys/block/{disk}/{part}/partition")),
                "1\n",
            )
            .unwrap();
            let link = |l: String, target: String| {
                let l = root.join(l);
                std::fs::create_dir_all(l.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(root.join(target), l).unwrap();
            };
            link(
                format!("sys/class/block/{disk}"),
                format!("sys/block/{disk}"),
            );
            link(
                format!("sys/class/block/{part}"),
                format!("sys/block/{disk}/{part}"),
            );
            link(
                format!("sys/dev/block/8:{minor}"),
                format!("sys/block/{disk}"),
            );
            link(
                format!("sys/dev/block/8:{}", minor + 1),
                format!("sys/block/{disk}/{part}"),
            );
        }
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::write(root.join("proc/self/mountinfo"), mountinfo).unwrap();
        extra(root);
        dir
    }

    fn put(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn disks_of(dir: &tempfile::TempDir) -> Vec<String> {
        mounted_disks(&SysfsRoot::new(dir.path()))
            .into_iter()
            .collect()
    }

    #[test]
    fn mounted_disks_finds_every_member_of_a_btrfs_mounted_with_an_anonymous_device_number() {
        let dir = disks_tree(
            "50 1 0:45 / /srv rw,relatime shared:1 - btrfs /dev/sdb1 rw,space_cache=v2\n",
            |root| {
                for member in ["sdb/sdb1", "sdc/sdc1"] {
                    let name = member.split('/').nth(1).unwrap();
                    let link = root.join(format!("sys/fs/btrfs/5e1f/devices/{name}"));
                    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
                    std::os::unix::fs::symlink(root.join(format!("sys/block/{member}")), link)
                        .unwrap();
                }
            },
        );

        assert_eq!(disks_of(&dir), ["sdb", "sdc"]);
    }

    #[test]
    fn mounted_disks_finds_the_disks_of_a_mounted_zfs_pool_by_their_udev_label() {
        let dir = disks_tree(
            "60 1 0:50 / / rw,relatime shared:1 - zfs rpool/ROOT/debian rw,xattr,posixacl\n",
            |root| {
                for devnum in ["8:33", "8:65"] {
                    put(
                        root,
                        &format!("run/udev/data/b{devnum}"),
                        "E:ID_FS_TYPE=zfs_member\nE:ID_FS_LABEL=rpool\nE:ID_FS_USAGE=filesystem\n",
                    );
                }
                put(
                    root,
                    "run/udev/data/b8:81",
                    "E:ID_FS_TYPE=zfs_member\nE:ID_FS_LABEL=tank\n",
                );
            },
        );

        assert_eq!(disks_of(&dir), ["sdc", "sde"]);
    }

    #[test]
    fn mounted_disks_keeps_disks_of_an_imported_zfs_pool_lvm_physical_volumes_and_swap() {
        let dir = disks_tree("", |root| {
            put(root, "proc/spl/kstat/zfs/tank/state", "ONLINE\n");
            put(
                root,
                "run/udev/data/b8:17",
                "E:ID_FS_TYPE=zfs_member\nE:ID_FS_LABEL=tank\n",
            );
            put(root, "sys/block/sdc/sdc1/holders/dm-3/.keep", "");
            put(
                root,
                "proc/swaps",
                "Filename\tType\tSize\tUsed\tPriority\n/dev/sdd1 partition 1048572 0 -2\n",
            );
        });

        assert_eq!(disks_of(&dir), ["sdb", "sdc", "sdd"]);
    }

    #[test]
    fn mounted_disks_of_an_unreadable_mount_table_keeps_every_disk() {
        let dir = disks_tree("", |root| {
            std::fs::remove_file(root.join("proc/self/mountinfo")).unwrap();
            // A directory where the file should be: reading it fails (EISDIR), even as root.
            std::fs::create_dir_all(root.join("proc/self/mountinfo")).unwrap();
        });

        assert_eq!(disks_of(&dir), ["sdb", "sdc", "sdd", "sde", "sdf"]);
    }
}
