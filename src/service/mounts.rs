//! Which whole disks carry a mounted host filesystem: the policy keeps such USB disks on the
//! host unless a rule says `force = true`.
//!
//! Read from `/proc/self/mountinfo` (the kernel's `major:minor` of each mount, never a
//! name that could be a symlink or a label) and resolved through `/sys/dev/block`: a
//! partition's disk is its parent directory, a device-mapper or md device's disks are
//! found through `slaves/`. Both files are read under the [`SysfsRoot`], so a recording
//! replays.

use crate::sysfs::SysfsRoot;
use std::collections::BTreeSet;
use std::path::Path;

/// `major:minor` of every mounted block device in a mountinfo text. Pure.
pub fn mounted_devices(mountinfo: &str) -> BTreeSet<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        // 0:N are anonymous (proc, tmpfs, overlay...): no block device behind them.
        .filter(|dev| !dev.starts_with("0:"))
        .map(str::to_string)
        .collect()
}

/// Whole-disk names (`sda`) with a host filesystem mounted on them or their partitions,
/// directly or through device-mapper / md. Unreadable parts are skipped (logged).
pub fn mounted_disks(root: &SysfsRoot) -> BTreeSet<String> {
    let mountinfo = match std::fs::read_to_string(root.path("/proc/self/mountinfo")) {
        Ok(text) => text,
        Err(e) => {
            // A recording without /proc is normal; the live host without it is not.
            if root.is_live() {
                tracing::warn!("cannot read /proc/self/mountinfo ({e}): mounted USB disks are not protected from being passed");
            }
            return BTreeSet::new();
        }
    };
    let mut disks = BTreeSet::new();
    for dev in mounted_devices(&mountinfo) {
        let dir = root.path(format!("/sys/dev/block/{dev}"));
        whole_disks(root, &dir, 0, &mut disks);
    }
    disks
}

/// Add the whole disks behind the block device whose sysfs directory is `dir`.
fn whole_disks(root: &SysfsRoot, dir: &Path, depth: u8, out: &mut BTreeSet<String>) {
    // Stacks of dm on md on partitions are shallow; the bound only stops a cycle.
    if depth > 8 {
        return;
    }
    let Ok(real) = std::fs::canonicalize(dir) else {
        return;
    };
    let slaves: Vec<String> = std::fs::read_dir(real.join("slaves"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !slaves.is_empty() {
        for slave in slaves {
            let dir = root.path(format!("/sys/class/block/{slave}"));
            whole_disks(root, &dir, depth + 1, out);
        }
        return;
    }
    let disk = if real.join("partition").exists() {
        real.parent().and_then(|p| p.file_name())
    } else {
        real.file_name()
    };
    if let Some(name) = disk {
        out.insert(name.to_string_lossy().into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
