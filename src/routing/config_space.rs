//! Positioned reads and writes of a PCI function's configuration space.
//!
//! The kernel exposes config space as the sysfs file `config`; reading or writing at an
//! offset touches exactly those bytes, so a 2-byte write at 0xD0 changes XUSB2PR and
//! nothing else. No `setpci`, no shell.

use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Offset of XUSB2PR (USB2HCSEL): bit per USB 2.0 port, 1 = xHCI, 0 = EHCI.
pub const XUSB2PR: u64 = 0xD0;
/// Offset of XUSB2PRM: firmware's mask of the XUSB2PR bits the OS may switch.
pub const XUSB2PRM: u64 = 0xD4;
/// Offset of USB3_PSSEN: bit per SuperSpeed port, 1 = SuperSpeed enabled.
pub const USB3_PSSEN: u64 = 0xD8;
/// Offset of USB3PRM: firmware's mask of the USB3_PSSEN bits the OS may enable.
pub const USB3PRM: u64 = 0xDC;

/// Read and write a PCI function's config space. A trait so tests and the test bed can
/// point it at a file anywhere; only [`SysfsConfigSpace`] exists in production.
pub trait ConfigSpace: Send {
    /// Read `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `bytes` at `offset`, touching no other byte.
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;

    /// Little-endian 16-bit read.
    fn read_u16(&self, offset: u64) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.read_at(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Little-endian 32-bit read.
    fn read_u32(&self, offset: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read_at(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Little-endian 16-bit write.
    fn write_u16(&mut self, offset: u64, value: u16) -> io::Result<()> {
        self.write_at(offset, &value.to_le_bytes())
    }

    /// Little-endian 32-bit write.
    fn write_u32(&mut self, offset: u64, value: u32) -> io::Result<()> {
        self.write_at(offset, &value.to_le_bytes())
    }
}

/// The `config` file of a PCI function under a [`SysfsRoot`].
#[derive(Debug, Clone)]
pub struct SysfsConfigSpace {
    path: PathBuf,
}

impl SysfsConfigSpace {
    /// `/sys/bus/pci/devices/ADDR/config` under `root`.
    pub fn new(root: &SysfsRoot, pci: PciAddress) -> Self {
        Self {
            path: root.path(format!("/sys/bus/pci/devices/{pci}/config")),
        }
    }

    /// The file this reads and writes.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn open(&self, write: bool) -> io::Result<File> {
        // Never create or truncate: the file is the device's, not ours.
        OpenOptions::new().read(true).write(write).open(&self.path)
    }
}

impl ConfigSpace for SysfsConfigSpace {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.open(false)?.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.open(true)?.write_all_at(bytes, offset)
    }
}
