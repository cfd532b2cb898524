//! The one root every host path is read (and written) under.
//!
//! `SysfsRoot::new("/")` is the live host; a recorded fixture or a test's temp dir is
//! just another root. No module opens `/sys/...` directly: it asks the root.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The most of an attribute that is read: sysfs serves at most a page, and a recording
/// or a crafted root must not make a read allocate without bound.
pub const MAX_ATTRIBUTE: usize = 4096;

/// A directory that stands for `/` when reading sysfs, procfs and `/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsRoot {
    root: PathBuf,
}

impl Default for SysfsRoot {
    fn default() -> Self {
        Self::new("/")
    }
}

impl SysfsRoot {
    /// A root at `dir` (`/` for the live host).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { root: dir.into() }
    }

    /// The directory standing for `/`.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// `true` when this root is the live host's `/`.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// The real path of an absolute host path such as `/sys/bus/usb/devices`.
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let p = host_path.as_ref();
        let relative = p.strip_prefix("/").unwrap_or(p);
        self.root.join(relative)
    }

    /// The host path (as the kernel would name it) of a real path under this root.
    pub fn host_path(&self, real: &Path) -> PathBuf {
        match real.strip_prefix(&self.root) {
            Ok(rel) => Path::new("/").join(rel),
            Err(_) => real.to_path_buf(),
        }
    }

    /// Read a sysfs attribute, trimmed of its trailing newline. `Ok(None)` if it does not
    /// exist. At most [`MAX_ATTRIBUTE`] bytes are read; the rest is ignored.
    pub fn read_attr(&self, host_path: impl AsRef<Path>) -> io::Result<Option<String>> {
        let file = match std::fs::File::open(self.path(host_path)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.take(MAX_ATTRIBUTE as u64).read_to_end(&mut bytes)?;
        Ok(Some(
            String::from_utf8_lossy(&bytes)
                .trim_end_matches(['\n', '\0'])
                .to_string(),
        ))
    }

    /// The last path component of the target of a sysfs link (`driver`, `iommu_group`),
    /// `None` if there is no such link.
    pub fn link_name(&self, host_path: impl AsRef<Path>) -> Option<String> {
        let target = std::fs::read_link(self.path(host_path)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Write a sysfs attribute (the only write primitive: vfio and routing go through it).
    pub fn write_attr(&self, host_path: impl AsRef<Path>, value: &[u8]) -> io::Result<()> {
        std::fs::write(self.path(host_path), value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_attr_reads_at_most_one_page() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![b'x'; 1 << 20]).unwrap();

        let value = SysfsRoot::new(dir.path())
            .read_attr("/big")
            .unwrap()
            .unwrap();

        assert_eq!(value.len(), MAX_ATTRIBUTE);
    }

    #[test]
    fn path_joins_absolute_host_paths_under_the_root() {
        let root = SysfsRoot::new("/tmp/fixture");
        assert_eq!(
            root.path("/sys/bus/usb"),
            PathBuf::from("/tmp/fixture/sys/bus/usb")
        );
        assert_eq!(
            root.host_path(Path::new("/tmp/fixture/sys/x")),
            PathBuf::from("/sys/x")
        );
    }
}
