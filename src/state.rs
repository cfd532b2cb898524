//! State that must outlive the process that wrote it: vfio bind records and the active
//! port routing. It lives in [`STATE_DIR`] (systemd's `StateDirectory=usbroute`), not in
//! `/run/usbroute`, which systemd empties whenever the daemon stops
//! (`RuntimeDirectoryPreserve=no`): a record lost there leaves a group half on vfio-pci
//! or a routing pinned with nobody knowing. Paths are host paths under a
//! [`SysfsRoot`], so tests and recordings keep theirs in their own tree.
//!
//! Each record says which boot wrote it ([`boot_id`]): PCI bindings, routing registers
//! and runtime PM settings do not survive a reboot, so a record from an earlier boot
//! describes nothing and is ignored.

use crate::sysfs::SysfsRoot;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Where state that must survive a daemon restart lives (a host path, under the root).
pub const STATE_DIR: &str = "/var/lib/usbroute";

/// Where earlier versions kept it; read once so an upgrade does not lose a record.
pub const LEGACY_STATE_DIR: &str = "/run/usbroute";

/// Replace `path` with `bytes` so that a crash at any moment leaves either the old file
/// or the new one, complete: write a temp file beside it, fsync it, rename it over,
/// fsync the directory (the rename itself is only durable then). Creates the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a path with no directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}.tmp", name.unwrap_or_default()));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); `None` where there is none (a
/// recording, a test tree).
pub fn boot_id(root: &SysfsRoot) -> Option<String> {
    root.read_attr("/proc/sys/kernel/random/boot_id")
        .ok()
        .flatten()
        .filter(|id| !id.is_empty())
}

/// `true` when a record written in boot `written` belongs to this boot (unknown on
/// either side counts as this boot: better a stale record than a lost one).
pub fn same_boot(root: &SysfsRoot, written: Option<&str>) -> bool {
    match (written, boot_id(root)) {
        (Some(then), Some(now)) => then == now,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/vfio/7.json");

        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();

        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_record_from_another_boot_is_not_this_boots() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("proc/sys/kernel/random/boot_id");
        std::fs::create_dir_all(id.parent().unwrap()).unwrap();
        std::fs::write(&id, "b0\n").unwrap();
        let root = SysfsRoot::new(dir.path());

        assert_eq!(
            [
                same_boot(&root, Some("b0")),
                same_boot(&root, Some("a9")),
                same_boot(&root, None)
            ],
            [true, false, true]
        );
    }
}
