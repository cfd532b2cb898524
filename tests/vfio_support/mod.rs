//! Shared by the `vfio_*` tests: temp-dir sysfs trees shaped like the kernel's (relative
//! links, `(null)` overrides, plain `bind`/`unbind`/`drivers_probe` files), and
//! [`FixtureDriverCore`], which stands in for the kernel's PCI driver core on such a tree.
//!
//! Why a stand-in: in a temp dir, writing an address to `drivers_probe` binds nothing, so
//! bind's read-back could never succeed. The stand-in re-points the `driver` link the way
//! the kernel does and can fail the Nth write (fault injection: real sysfs cannot be made
//! to fail on demand). The real kernel runs the same code in the test bed.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use usbroute::inventory::PciAddress;
use usbroute::sysfs::SysfsRoot;
use usbroute::vfio::{LiveHost, PciHost};

/// Builds a sysfs-shaped tree in a temp dir.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

/// `0000:00:1d.7` from `00:1d.7`.
pub fn pci(s: &str) -> PciAddress {
    s.parse().expect("test PCI address")
}

impl Tree {
    pub fn new() -> Self {
        let tree = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        tree.file("sys/bus/pci/drivers_probe", "");
        tree.file("proc/self/mounts", "proc /proc proc rw 0 0\n");
        tree.file(
            "proc/net/route",
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n",
        );
        tree.file(
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: GenuineIntel\n",
        );
        std::fs::create_dir_all(tree.path("sys/kernel/iommu_groups")).expect("mkdir");
        tree
    }

    pub fn root(&self) -> SysfsRoot {
        SysfsRoot::new(self.dir.path())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn file(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    pub fn link(&self, rel: &str, target: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let _ = std::fs::remove_file(&p);
        symlink(target, p).expect("symlink");
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).expect("read")
    }

    /// The real directory of a function on bus 00.
    pub fn dev_dir(addr: &str) -> String {
        format!("sys/devices/pci0000:00/{addr}")
    }

    /// A driver directory with plain `bind`/`unbind` files.
    pub fn driver(&self, name: &str) {
        self.file(&format!("sys/bus/pci/drivers/{name}/bind"), "");
        self.file(&format!("sys/bus/pci/drivers/{name}/unbind"), "");
    }

    /// A PCI function on bus 00 with class, ids, override `(null)`, optional driver and group.
    pub fn function(&self, addr: &str, class: u32, driver: Option<&str>, group: Option<u32>) {
        let dir = Self::dev_dir(addr);
        self.file(&format!("{dir}/class"), &format!("0x{class:06x}\n"));
        // The ids QEMU's ich9 UHCI/EHCI and qemu-xhci show; unknown ones elsewhere.
        let (vendor, device) = match class {
            0x0c0300 => ("0x8086", "0x2934"),
            0x0c0320 => ("0x8086", "0x293a"),
            0x0c0330 => ("0x1b36", "0x000d"),
            _ => ("0x8086", "0xffff"),
        };
        self.file(&format!("{dir}/vendor"), &format!("{vendor}\n"));
        self.file(&format!("{dir}/device"), &format!("{device}\n"));
        self.file(&format!("{dir}/driver_override"), "(null)\n");
        self.link(
            &format!("sys/bus/pci/devices/{addr}"),
            &format!("../../../devices/pci0000:00/{addr}"),
        );
        if let Some(d) = driver {
            self.driver(d);
            self.link(
                &format!("{dir}/driver"),
                &format!("../../../bus/pci/drivers/{d}"),
            );
        }
        if let Some(g) = group {
            self.link(
                &format!("{dir}/iommu_group"),
                &format!("../../../kernel/iommu_groups/{g}"),
            );
            self.link(
                &format!("sys/kernel/iommu_groups/{g}/devices/{addr}"),
                &format!("../../../../devices/pci0000:00/{addr}"),
            );
        }
    }

    /// A USB device `name` (`1-1`) on bus `bus` of controller `addr`, with one interface
    /// of the given class triple (`("03","01","01")` is a keyboard).
    pub fn usb_device(&self, addr: &str, bus: u8, name: &str, class: (&str, &str, &str)) {
        let dev = format!("{}/usb{bus}/{name}", Self::dev_dir(addr));
        self.file(&format!("{dev}/idVendor"), "0627\n");
        let intf = format!("{dev}/{name}:1.0");
        self.file(
            &format!("{intf}/bInterfaceClass"),
            &format!("{}\n", class.0),
        );
        self.file(
            &format!("{intf}/bInterfaceSubClass"),
            &format!("{}\n", class.1),
        );
        self.file(
            &format!("{intf}/bInterfaceProtocol"),
            &format!("{}\n", class.2),
        );
        self.link(
            &format!("sys/bus/usb/devices/{name}:1.0"),
            &format!("../../../devices/pci0000:00/{addr}/usb{bus}/{name}/{name}:1.0"),
        );
    }

    /// A SATA disk `disk` with partition `part` below function `addr`.
    pub fn disk(&self, addr: &str, disk: &str, part: &str) {
        let block = format!(
            "{}/ata1/host0/target0:0:0/0:0:0:0/block/{disk}",
            Self::dev_dir(addr)
        );
        self.file(&format!("{block}/dev"), "8:0\n");
        self.file(&format!("{block}/{part}/partition"), "1\n");
        self.link(
            &format!("sys/class/block/{part}"),
            &format!("../../devices/pci0000:00/{addr}/ata1/host0/target0:0:0/0:0:0:0/block/{disk}/{part}"),
        );
    }

    /// The EHCI at 1d.7 with UHCI companions 1d.0-1d.2, all in IOMMU group 7, as QEMU's
    /// ich9-usb-ehci1/uhci1-3 look in a q35 guest with intel-iommu; and the xHCI at 01.0
    /// alone in group 3.
    pub fn q35_usb() -> Self {
        let tree = Self::new();
        for f in ["1d.0", "1d.1", "1d.2"] {
            tree.function(&format!("0000:00:{f}"), 0x0c0300, Some("uhci_hcd"), Some(7));
        }
        tree.function("0000:00:1d.7", 0x0c0320, Some("ehci-pci"), Some(7));
        tree.function("0000:00:01.0", 0x0c0330, Some("xhci_hcd"), Some(3));
        tree
    }

    /// A copy of a recording (`usbroute record-sysfs`, e.g. under tests/fixtures/) with
    /// the files bind writes added as plain files: each function's `driver_override`
    /// (`(null)`), each driver's `bind`/`unbind`, and `drivers_probe`.
    pub fn from_recording(recording: &Path) -> Self {
        let tree = Self::new();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", recording.display()))
            .arg(tree.dir.path())
            .status()
            .expect("cp");
        assert!(status.success(), "copying {}", recording.display());
        for entry in std::fs::read_dir(tree.path("sys/bus/pci/devices"))
            .expect("devices")
            .flatten()
        {
            // A recording holds only what the inventory read: functions it read nothing
            // of (not USB) are links to directories that were never created.
            let target = std::fs::read_link(entry.path()).expect("device link");
            let dir = tree.path("sys/bus/pci/devices").join(target);
            std::fs::create_dir_all(dir).expect("device dir");
            let over = entry.path().join("driver_override");
            if !over.exists() {
                std::fs::write(over, "(null)\n").expect("driver_override");
            }
            if let Ok(target) = std::fs::read_link(entry.path().join("driver")) {
                tree.driver(&target.file_name().expect("driver").to_string_lossy());
            }
        }
        tree
    }

    /// Add vfio-pci's driver directory (the module is loaded).
    pub fn with_vfio(self) -> Self {
        self.driver("vfio-pci");
        self
    }
}

/// One write the code under test made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub path: String,
    pub value: String,
}

/// `("/sys/...", "value")` → [`Write`].
pub fn w(path: &str, value: &str) -> Write {
    Write {
        path: path.to_string(),
        value: value.to_string(),
    }
}

/// Stands in for the kernel's PCI driver core on a [`Tree`] (see the module doc). Writes
/// land in the tree's plain files through [`LiveHost`]; the `driver` links then follow.
pub struct FixtureDriverCore {
    live: LiveHost,
    tree_dir: PathBuf,
    /// Every write, in order (and `modprobe` as a write of the module name to "modprobe").
    pub log: RefCell<Vec<Write>>,
    /// The driver each function gets when probed with no override (its boot driver).
    defaults: BTreeMap<PciAddress, String>,
    /// Fault injection: the Nth write (1-based) fails with EIO and changes nothing.
    fail_write: Option<usize>,
    /// Functions vfio-pci refuses to take (like a probe error).
    refuses: BTreeSet<PciAddress>,
    /// When false, `/dev/vfio/N` never appears.
    creates_dev_nodes: bool,
    /// When true, vfio-pci's `unbind` is accepted and does nothing (a device whose
    /// release never completes: the write returns, the driver stays).
    vfio_holds_on: bool,
}

impl FixtureDriverCore {
    pub fn new(tree: &Tree) -> Self {
        Self::at(tree.dir.path())
    }

    /// On a tree made elsewhere (by another process: the crash tests' child).
    pub fn at(dir: &Path) -> Self {
        let mut defaults = BTreeMap::new();
        for entry in std::fs::read_dir(dir.join("sys/bus/pci/devices"))
            .expect("devices")
            .flatten()
        {
            let addr: PciAddress = entry
                .file_name()
                .to_str()
                .expect("utf8")
                .parse()
                .expect("addr");
            let driver = std::fs::read_link(entry.path().join("driver"))
                .ok()
                .map(|t| t.file_name().expect("name").to_string_lossy().into_owned());
            // vfio-pci has no id table: it only ever takes a function by override.
            if let Some(d) = driver.filter(|d| d != "vfio-pci") {
                defaults.insert(addr, d);
            }
        }
        Self {
            live: LiveHost::new(SysfsRoot::new(dir)),
            tree_dir: dir.to_path_buf(),
            log: RefCell::new(Vec::new()),
            defaults,
            fail_write: None,
            refuses: BTreeSet::new(),
            creates_dev_nodes: true,
            vfio_holds_on: false,
        }
    }

    pub fn vfio_holds_on(mut self) -> Self {
        self.vfio_holds_on = true;
        self
    }

    pub fn failing_write(mut self, n: usize) -> Self {
        self.fail_write = Some(n);
        self
    }

    /// The driver the kernel picks for `addr` when probed without an override.
    pub fn default_driver(mut self, addr: &str, driver: &str) -> Self {
        self.defaults.insert(pci(addr), driver.to_string());
        self
    }

    pub fn vfio_refuses(mut self, addr: &str) -> Self {
        self.refuses.insert(pci(addr));
        self
    }

    pub fn without_dev_nodes(mut self) -> Self {
        self.creates_dev_nodes = false;
        self
    }

    pub fn writes(&self) -> Vec<Write> {
        self.log.borrow().clone()
    }

    fn dev(&self, pci: &PciAddress) -> PathBuf {
        self.tree_dir.join(format!("sys/bus/pci/devices/{pci}"))
    }

    fn set_driver(&self, pci: &PciAddress, driver: &str) {
        let real = std::fs::canonicalize(self.dev(pci)).expect("device dir");
        let link = real.join("driver");
        let _ = std::fs::remove_file(&link);
        symlink(format!("../../../bus/pci/drivers/{driver}"), link).expect("driver link");
        if driver == "vfio-pci" && self.creates_dev_nodes {
            let group = std::fs::read_link(real.join("iommu_group")).expect("group");
            let dev = self
                .tree_dir
                .join("dev/vfio")
                .join(group.file_name().expect("n"));
            std::fs::create_dir_all(dev.parent().expect("parent")).expect("mkdir");
            std::fs::write(dev, "").expect("dev node");
        }
    }

    fn override_of(&self, pci: &PciAddress) -> Option<String> {
        let text =
            std::fs::read_to_string(self.dev(pci).join("driver_override")).unwrap_or_default();
        let text = text.trim_end_matches('\n');
        (!text.is_empty() && text != "(null)").then(|| text.to_string())
    }

    /// What the kernel does after the bytes landed.
    fn react(&self, path: &Path, value: &str) -> io::Result<()> {
        let enodev = || Err(io::Error::from_raw_os_error(libc::ENODEV));
        let text = path.to_string_lossy();
        if text.ends_with("/driver_override") {
            // The kernel stores "" for a lone newline and shows "(null)".
            if value == "\n" {
                std::fs::write(self.live.root().path(path), "(null)\n")?;
            }
            return Ok(());
        }
        let Ok(addr) = value.parse::<PciAddress>() else {
            return enodev();
        };
        let current = self.driver_of(&addr);
        if let Some(driver) = text
            .strip_prefix("/sys/bus/pci/drivers/")
            .and_then(|r| r.strip_suffix("/unbind"))
        {
            if current.as_deref() != Some(driver) {
                return enodev();
            }
            if driver == "vfio-pci" && self.vfio_holds_on {
                return Ok(());
            }
            std::fs::remove_file(self.dev(&addr).join("driver"))?;
            return Ok(());
        }
        if let Some(driver) = text
            .strip_prefix("/sys/bus/pci/drivers/")
            .and_then(|r| r.strip_suffix("/bind"))
        {
            let blocked = self.override_of(&addr).is_some_and(|o| o != driver);
            if current.is_some() || blocked {
                return enodev();
            }
            self.set_driver(&addr, driver);
            return Ok(());
        }
        if text == "/sys/bus/pci/drivers_probe" && current.is_none() {
            let wanted = match self.override_of(&addr) {
                Some(o) => Some(o),
                None => self.defaults.get(&addr).cloned(),
            };
            let loaded = wanted.as_ref().is_some_and(|d| {
                self.tree_dir
                    .join(format!("sys/bus/pci/drivers/{d}"))
                    .is_dir()
            });
            let refused = wanted.as_deref() == Some("vfio-pci") && self.refuses.contains(&addr);
            // Like the kernel: a probe nobody accepts still returns success.
            if let (Some(d), true, false) = (wanted, loaded, refused) {
                self.set_driver(&addr, &d);
            }
        }
        Ok(())
    }
}

impl PciHost for FixtureDriverCore {
    fn write_attr(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        let value = String::from_utf8_lossy(value).into_owned();
        self.log.borrow_mut().push(Write {
            path: path.to_string_lossy().into_owned(),
            value: value.clone(),
        });
        if self.fail_write == Some(self.log.borrow().len()) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.live.write_attr(path, value.as_bytes())?;
        self.react(path, &value)
    }

    fn read_attr(&self, path: &Path) -> Option<String> {
        self.live.read_attr(path)
    }

    fn driver_of(&self, pci: &PciAddress) -> Option<String> {
        self.live.driver_of(pci)
    }

    fn exists(&self, path: &Path) -> bool {
        self.live.exists(path)
    }

    fn load_module(&self, module: &str) -> io::Result<()> {
        self.log.borrow_mut().push(w("modprobe", module));
        let dir = self.tree_dir.join(format!("sys/bus/pci/drivers/{module}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("bind"), "")?;
        std::fs::write(dir.join("unbind"), "")
    }
}

/// Each function's driver (`None` when unbound) and override file content, for comparing
/// a whole tree's state before and after.
pub fn state(tree: &Tree) -> Vec<(String, Option<String>, String)> {
    let mut out: Vec<_> = std::fs::read_dir(tree.path("sys/bus/pci/devices"))
        .expect("devices")
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let driver = std::fs::read_link(e.path().join("driver"))
                .ok()
                .map(|t| t.file_name().expect("n").to_string_lossy().into_owned());
            let over =
                std::fs::read_to_string(e.path().join("driver_override")).unwrap_or_default();
            (name, driver, over)
        })
        .collect();
    out.sort();
    out
}
