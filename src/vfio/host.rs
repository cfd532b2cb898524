//! The small trait bind and restore act through, and its one real implementation.

use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use std::io;
use std::path::Path;
use std::process::Command;

/// What bind and restore need from the host: write an attribute, read one back, see which
/// driver holds a function, see whether a path exists, load a kernel module. All paths
/// are host paths (`/sys/bus/pci/drivers_probe`).
///
/// [`LiveHost`] is the real thing (over any [`SysfsRoot`]); tests wrap it to inject a
/// failure at a chosen write, since real sysfs cannot be made to fail on demand.
pub trait PciHost {
    /// Write `value` to the attribute at `path`.
    fn write_attr(&self, path: &Path, value: &[u8]) -> io::Result<()>;
    /// Read an attribute, trimmed; `None` when missing.
    fn read_attr(&self, path: &Path) -> Option<String>;
    /// The driver bound to `pci` now.
    fn driver_of(&self, pci: &PciAddress) -> Option<String>;
    /// Whether `path` exists (`/dev/vfio/7`, `/sys/bus/pci/drivers/vfio-pci`).
    fn exists(&self, path: &Path) -> bool;
    /// Load a kernel module (`vfio-pci`).
    fn load_module(&self, module: &str) -> io::Result<()>;
}

/// A borrowed host is a host (so a caller can lend one to code that owns its host).
impl<H: PciHost + ?Sized> PciHost for &H {
    fn write_attr(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        (**self).write_attr(path, value)
    }

    fn read_attr(&self, path: &Path) -> Option<String> {
        (**self).read_attr(path)
    }

    fn driver_of(&self, pci: &PciAddress) -> Option<String> {
        (**self).driver_of(pci)
    }

    fn exists(&self, path: &Path) -> bool {
        (**self).exists(path)
    }

    fn load_module(&self, module: &str) -> io::Result<()> {
        (**self).load_module(module)
    }
}

/// The host under a [`SysfsRoot`]: writes go to files, modules load with `modprobe`.
#[derive(Debug, Clone)]
pub struct LiveHost {
    root: SysfsRoot,
}

impl LiveHost {
    /// The host under `root`.
    pub fn new(root: SysfsRoot) -> Self {
        Self { root }
    }

    /// The root it works under.
    pub fn root(&self) -> &SysfsRoot {
        &self.root
    }
}

impl PciHost for LiveHost {
    fn write_attr(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        self.root.write_attr(path, value)
    }

    fn read_attr(&self, path: &Path) -> Option<String> {
        self.root.read_attr(path).ok().flatten()
    }

    fn driver_of(&self, pci: &PciAddress) -> Option<String> {
        self.root
            .link_name(format!("/sys/bus/pci/devices/{pci}/driver"))
    }

    fn exists(&self, path: &Path) -> bool {
        self.root.path(path).exists()
    }

    fn load_module(&self, module: &str) -> io::Result<()> {
        if !self.root.is_live() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "cannot load {module} for a recorded root ({}); load it on that host",
                    self.root.dir().display()
                ),
            ));
        }
        // Fixed arguments, no shell: the module name is one of ours, never user input.
        let status = Command::new("modprobe").arg(module).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "`modprobe {module}` failed ({status}); is the module installed for this kernel? \
                 Under the shipped systemd unit modules cannot be loaded: load it at boot \
                 (contrib/modules-load.d/usbroute.conf in /etc/modules-load.d/)"
            )))
        }
    }
}
