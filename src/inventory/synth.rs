//! Builds small sysfs-shaped trees in a directory, laid out as the kernel lays them out
//! (`/sys/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2`, `/sys/bus/usb/devices/1-1.2 ->
//! ../../../devices/...`, `iommu_group` links), for unit tests and benchmarks.
//!
//! Recordings of real kernels (`tests/fixtures/`) are what prove the readers right; these
//! trees are for shapes a recording cannot have (1,000 devices, a broken attribute).

use std::io;
use std::path::{Component, Path, PathBuf};

/// A PCI function to create.
#[derive(Debug, Clone)]
pub struct PciFunction<'a> {
    /// Address, `0000:00:14.0`.
    pub address: &'a str,
    /// Class code, `0x0c0330`.
    pub class: u32,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Bound driver, if any.
    pub driver: Option<&'a str>,
    /// IOMMU group, if there is an IOMMU.
    pub iommu_group: Option<u32>,
}

impl<'a> PciFunction<'a> {
    /// A USB host controller of class `class` (`0x0c0330` for an xHCI) at `address`, with
    /// made-up ids, no driver bound and no IOMMU.
    pub fn usb_controller(address: &'a str, class: u32) -> Self {
        PciFunction {
            address,
            class,
            vendor: 0x8086,
            device: 0x1234,
            driver: None,
            iommu_group: None,
        }
    }

    /// QEMU's `qemu-xhci` (1b36:000d) at `address`, bound to `xhci_hcd`, in IOMMU group
    /// `iommu_group`.
    pub fn qemu_xhci(address: &'a str, iommu_group: Option<u32>) -> Self {
        PciFunction {
            address,
            class: 0x0c0330,
            vendor: 0x1b36,
            device: 0x000d,
            driver: Some("xhci_hcd"),
            iommu_group,
        }
    }
}

/// A USB device to create (its hub, if any, must have been created first).
#[derive(Debug, Clone)]
pub struct UsbDevice<'a> {
    /// Kernel name, `1-3.4`.
    pub port: &'a str,
    /// Device number on the bus.
    pub devnum: u16,
    /// idVendor.
    pub vendor: u16,
    /// idProduct.
    pub product: u16,
    /// bDeviceClass (9 for a hub).
    pub class: u8,
    /// The kernel's `speed` text (`480`).
    pub speed: &'a str,
    /// `manufacturer`, if the device has the string.
    pub manufacturer: Option<&'a str>,
    /// `product`, if the device has the string.
    pub product_name: Option<&'a str>,
    /// `serial`, if the device has one.
    pub serial: Option<&'a str>,
    /// Interfaces of configuration 1: (class, bound driver).
    pub interfaces: Vec<(u8, Option<&'a str>)>,
}

/// Writes a sysfs-shaped tree under `dir` (which stands for `/`).
#[derive(Debug, Clone)]
pub struct SysfsBuilder {
    dir: PathBuf,
}

impl SysfsBuilder {
    /// A builder writing under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Create a PCI function at `/sys/devices/pci0000:00/ADDR` with its bus link, driver
    /// link and IOMMU group membership.
    pub fn pci(&self, f: &PciFunction) -> io::Result<()> {
        let dev = format!("/sys/devices/pci0000:00/{}", f.address);
        self.attr(&dev, "class", &format!("{:#08x}", f.class))?;
        self.attr(&dev, "vendor", &format!("{:#06x}", f.vendor))?;
        self.attr(&dev, "device", &format!("{:#06x}", f.device))?;
        self.link(&format!("/sys/bus/pci/devices/{}", f.address), &dev)?;
        if let Some(driver) = f.driver {
            self.link(
                &format!("{dev}/driver"),
                &format!("/sys/bus/pci/drivers/{driver}"),
            )?;
        }
        if let Some(group) = f.iommu_group {
            let group_dir = format!("/sys/kernel/iommu_groups/{group}");
            self.link(&format!("{dev}/iommu_group"), &group_dir)?;
            self.link(&format!("{group_dir}/devices/{}", f.address), &dev)?;
        }
        Ok(())
    }

    /// Create root hub `usbN` below PCI function `pci`: the bus.
    pub fn bus(
        &self,
        pci: &str,
        number: u8,
        speed: &str,
        version: &str,
        ports: u8,
    ) -> io::Result<()> {
        let dir = format!("/sys/devices/pci0000:00/{pci}/usb{number}");
        self.root_hub(&dir, number, speed, version, ports)
    }

    /// Create root hub `usbN` below platform device `platform` (`vhci_hcd.0`): a bus
    /// whose controller has no PCI parent, as USB/IP and SoC controllers have.
    pub fn platform_bus(
        &self,
        platform: &str,
        number: u8,
        speed: &str,
        version: &str,
        ports: u8,
    ) -> io::Result<()> {
        let dir = format!("/sys/devices/platform/{platform}/usb{number}");
        self.root_hub(&dir, number, speed, version, ports)
    }

    /// The root hub's attributes and links at host directory `dir`.
    fn root_hub(
        &self,
        dir: &str,
        number: u8,
        speed: &str,
        version: &str,
        ports: u8,
    ) -> io::Result<()> {
        let dir = dir.to_string();
        self.attr(&dir, "busnum", &number.to_string())?;
        self.attr(&dir, "devnum", "1")?;
        self.attr(&dir, "speed", speed)?;
        self.attr(&dir, "version", &format!(" {version}"))?;
        self.attr(&dir, "maxchild", &ports.to_string())?;
        self.attr(&dir, "bDeviceClass", "09")?;
        self.link(&format!("/sys/bus/usb/devices/usb{number}"), &dir)?;
        self.link(&format!("{dir}/driver"), "/sys/bus/usb/drivers/usb")
    }

    /// Create a device below its hub (or root hub), with its interfaces; returns its
    /// host directory.
    pub fn device(&self, d: &UsbDevice) -> io::Result<String> {
        let dir = self.device_dir(d.port)?;
        let (bus, _) = d.port.split_once('-').unwrap_or((d.port, ""));
        self.attr(&dir, "busnum", bus)?;
        self.attr(&dir, "devnum", &d.devnum.to_string())?;
        self.attr(&dir, "idVendor", &format!("{:04x}", d.vendor))?;
        self.attr(&dir, "idProduct", &format!("{:04x}", d.product))?;
        self.attr(&dir, "bDeviceClass", &format!("{:02x}", d.class))?;
        self.attr(&dir, "bDeviceSubClass", "00")?;
        self.attr(&dir, "bDeviceProtocol", "00")?;
        self.attr(&dir, "speed", d.speed)?;
        self.attr(&dir, "removable", "removable")?;
        for (name, value) in [
            ("manufacturer", d.manufacturer),
            ("product", d.product_name),
            ("serial", d.serial),
        ] {
            if let Some(value) = value {
                self.attr(&dir, name, value)?;
            }
        }
        self.link(&format!("/sys/bus/usb/devices/{}", d.port), &dir)?;
        self.link(&format!("{dir}/driver"), "/sys/bus/usb/drivers/usb")?;
        for (number, (class, driver)) in d.interfaces.iter().enumerate() {
            let name = format!("{}:1.{number}", d.port);
            let iface = format!("{dir}/{name}");
            self.attr(&iface, "bInterfaceNumber", &format!("{number:02x}"))?;
            self.attr(&iface, "bInterfaceClass", &format!("{class:02x}"))?;
            self.attr(&iface, "bInterfaceSubClass", "00")?;
            self.attr(&iface, "bInterfaceProtocol", "00")?;
            if let Some(driver) = driver {
                self.link(
                    &format!("{iface}/driver"),
                    &format!("/sys/bus/usb/drivers/{driver}"),
                )?;
            }
            self.link(&format!("/sys/bus/usb/devices/{name}"), &iface)?;
        }
        Ok(dir)
    }

    /// Unplug the device named `port` as the kernel does: it, its interfaces and every
    /// device behind it (a hub's children go with it) leave `/sys/bus/usb/devices` and
    /// their directories go. A device that is not there is no error.
    pub fn remove_device(&self, port: &str) -> io::Result<()> {
        let links = self.real("/sys/bus/usb/devices");
        let Ok(dir) = self.device_dir(port) else {
            return Ok(()); // its hub is gone, so is it
        };
        // `1-3`, `1-3:1.0`, `1-3.2` and `1-3.2:1.0` are its; `1-30` is not.
        let owned = |name: &str| {
            let device = name.split_once(':').map_or(name, |(d, _)| d);
            device == port || device.starts_with(&format!("{port}."))
        };
        for entry in std::fs::read_dir(&links)? {
            let entry = entry?;
            if owned(&entry.file_name().to_string_lossy()) {
                std::fs::remove_file(entry.path())?;
            }
        }
        match std::fs::remove_dir_all(self.real(&dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Bind interface `number` of device `port` to `driver`, or unbind it (`None`).
    pub fn interface_driver(&self, port: &str, number: u8, driver: Option<&str>) -> io::Result<()> {
        let link = format!("{}/{port}:1.{number}/driver", self.device_dir(port)?);
        match std::fs::remove_file(self.real(&link)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match driver {
            Some(driver) => self.link(&link, &format!("/sys/bus/usb/drivers/{driver}")),
            None => Ok(()),
        }
    }

    /// Give interface `number` of device `port` a host network interface `name` (the
    /// kernel's `<interface>/net/NAME`, with its `ifindex`).
    pub fn netdev(&self, port: &str, number: u8, name: &str, ifindex: u32) -> io::Result<()> {
        let dir = format!("{}/{port}:1.{number}/net/{name}", self.device_dir(port)?);
        self.attr(&dir, "ifindex", &ifindex.to_string())
    }

    /// The host directory of the device named `port`: below its hub's directory.
    fn device_dir(&self, port: &str) -> io::Result<String> {
        let parent = match port.rsplit_once('.') {
            Some((hub, _)) => hub.to_string(),
            None => format!("usb{}", port.split('-').next().unwrap_or("0")),
        };
        Ok(format!("{}/{port}", self.hub_dir(&parent)?))
    }

    /// The host directory of hub `hub` (a root hub `usb2`, or a hub device `2-1`).
    fn hub_dir(&self, hub: &str) -> io::Result<String> {
        let link = format!("/sys/bus/usb/devices/{hub}");
        let real = std::fs::canonicalize(self.real(&link))?;
        let root = std::fs::canonicalize(&self.dir)?;
        let host = real.strip_prefix(&root).map_err(io::Error::other)?;
        Ok(format!("/{}", host.display()))
    }

    /// Link port `port` of hub `hub` and port `twin_port` of hub `twin` as twins (the
    /// kernel's `peer` link, both ways), as it links an xHCI's USB 2 and USB 3 root ports
    /// and the two halves of a USB 3 hub. Hubs are named as the kernel names them: `usb1`
    /// for a root hub, `1-2` for a hub device; both must exist.
    pub fn twins(&self, hub: &str, port: u8, twin: &str, twin_port: u8) -> io::Result<()> {
        let one = self.port_dir(hub, port)?;
        let other = self.port_dir(twin, twin_port)?;
        self.link(&format!("{one}/peer"), &other)?;
        self.link(&format!("{other}/peer"), &one)
    }

    /// The host directory of port `port` of hub `hub` (`.../usb1/1-0:1.0/usb1-port3`).
    fn port_dir(&self, hub: &str, port: u8) -> io::Result<String> {
        let interface = match hub.strip_prefix("usb") {
            Some(bus) => format!("{bus}-0:1.0"),
            None => format!("{hub}:1.0"),
        };
        Ok(format!(
            "{}/{interface}/{hub}-port{port}",
            self.hub_dir(hub)?
        ))
    }

    /// Write attribute `name` of host directory `dir` (creating directories).
    pub fn attr(&self, dir: &str, name: &str, value: &str) -> io::Result<()> {
        let path = self.real(dir);
        std::fs::create_dir_all(&path)?;
        std::fs::write(path.join(name), format!("{value}\n"))
    }

    /// Make host path `link` a relative symlink to host path `target` (creating both
    /// the link's parent and the target directory, as sysfs always has them).
    pub fn link(&self, link: &str, target: &str) -> io::Result<()> {
        let link_path = self.real(link);
        if let Some(parent) = link_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::create_dir_all(self.real(target))?;
        let from = Path::new(link).parent().unwrap_or(Path::new("/"));
        std::os::unix::fs::symlink(relative(from, Path::new(target)), link_path)
    }

    fn real(&self, host: &str) -> PathBuf {
        self.dir.join(host.trim_start_matches('/'))
    }
}

/// `to` as seen from directory `from`, both absolute host paths: `../../devices/x`.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_climbs_to_the_common_ancestor() {
        let r = relative(
            Path::new("/sys/bus/usb/devices"),
            Path::new("/sys/devices/pci0000:00/0000:00:14.0/usb1"),
        );
        assert_eq!(
            r,
            PathBuf::from("../../../devices/pci0000:00/0000:00:14.0/usb1")
        );
    }
}
