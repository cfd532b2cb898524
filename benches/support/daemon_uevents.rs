//! A recorded host the bench can unplug and re-plug a device on: a copy of a fixture's
//! sysfs, the device's directory and its `/sys/bus/usb/devices` links taken away and put
//! back, and the uevents the kernel sends for each, in the kernel's format, sent to the
//! daemon's uevent socket (`serve --uevent-socket`).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One USB device of a copied recording, with its interfaces.
pub struct RecordedDevice {
    /// The copy's root (what `--sysfs-root` is given).
    root: PathBuf,
    /// Kernel name (`1-2.1`).
    name: String,
    /// Its path under /sys (`/devices/pci0000:00/.../1-2.1`), as uevents name it.
    devpath: String,
    /// Its interfaces' kernel names (`1-2.1:1.0`).
    interfaces: Vec<String>,
    /// `BUSNUM=`, `DEVNUM=`, `PRODUCT=`: what the kernel's uevent carries for it.
    env: Vec<String>,
    /// Where its directory waits while it is unplugged.
    parked: PathBuf,
}

impl RecordedDevice {
    /// Copy `fixture` (a recording with a `sys/` tree) to `dir/sysfs` and pick the device
    /// named `name` in it.
    pub fn copy(fixture: &Path, dir: &Path, name: &str) -> RecordedDevice {
        let root = dir.join("sysfs");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(fixture)
            .arg(&root)
            .status()
            .unwrap();
        assert!(copied.success(), "cp -a {}", fixture.display());
        let sys = root.join("sys");
        let link = sys.join("bus/usb/devices").join(name);
        let real = std::fs::canonicalize(&link).unwrap();
        let devpath = format!(
            "/{}",
            real.strip_prefix(std::fs::canonicalize(&sys).unwrap())
                .unwrap()
                .display()
        );
        let read = |attr: &str| {
            std::fs::read_to_string(real.join(attr))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let hex = |attr: &str| u32::from_str_radix(&read(attr), 16).unwrap_or(0);
        let bus: u32 = name.split('-').next().unwrap().parse().unwrap();
        let env = vec![
            format!("BUSNUM={bus:03}"),
            format!("DEVNUM={:03}", read("devnum").parse::<u32>().unwrap()),
            format!(
                "PRODUCT={:x}/{:x}/{:x}",
                hex("idVendor"),
                hex("idProduct"),
                hex("bcdDevice")
            ),
        ];
        let interfaces = std::fs::read_dir(&real)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("{name}:")))
            .collect();
        RecordedDevice {
            parked: dir.join(format!("parked-{name}")),
            root,
            name: name.to_string(),
            devpath,
            interfaces,
            env,
        }
    }

    /// The copy's root, for `--sysfs-root`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self) -> PathBuf {
        self.root.join("sys").join(&self.devpath[1..])
    }

    /// Its `/sys/bus/usb/devices` links (the device's and its interfaces'), each with
    /// the target the kernel gives it.
    fn links(&self) -> Vec<(PathBuf, String)> {
        let listing = self.root.join("sys/bus/usb/devices");
        let mut links = vec![(
            listing.join(&self.name),
            format!("../../..{}", self.devpath),
        )];
        for iface in &self.interfaces {
            links.push((
                listing.join(iface),
                format!("../../..{}/{iface}", self.devpath),
            ));
        }
        links
    }

    /// Take the device out of the copy, then send what the kernel says as it goes:
    /// its interfaces unbound and removed, then the device unbound and removed.
    pub fn unplug(&self, feed: &UeventFeed) {
        for (link, _) in self.links() {
            std::fs::remove_file(link).unwrap();
        }
        std::fs::rename(self.dir(), &self.parked).unwrap();
        for iface in &self.interfaces {
            feed.send(&self.event("unbind", Some(iface)));
            feed.send(&self.event("remove", Some(iface)));
        }
        feed.send(&self.event("unbind", None));
        feed.send(&self.event("remove", None));
    }

    /// Put the device's files back in the copy (what the kernel has done before its first
    /// uevent).
    pub fn put_back(&self) {
        std::fs::rename(&self.parked, self.dir()).unwrap();
        for (link, target) in self.links() {
            std::os::unix::fs::symlink(target, link).unwrap();
        }
    }

    /// Send the kernel's uevents for a plug of the device put back: added, its interfaces
    /// added and bound, the device bound (ready).
    pub fn announce(&self, feed: &UeventFeed) {
        feed.send(&self.event("add", None));
        for iface in &self.interfaces {
            feed.send(&self.event("add", Some(iface)));
            feed.send(&self.event("bind", Some(iface)));
        }
        feed.send(&self.event("bind", None));
    }

    /// One uevent datagram for the device (`interface` `None`) or one of its interfaces.
    fn event(&self, action: &str, interface: Option<&str>) -> Vec<u8> {
        let devpath = match interface {
            Some(i) => format!("{}/{i}", self.devpath),
            None => self.devpath.clone(),
        };
        let mut fields = vec![
            format!("{action}@{devpath}"),
            format!("ACTION={action}"),
            format!("DEVPATH={devpath}"),
            "SUBSYSTEM=usb".to_string(),
        ];
        match interface {
            Some(_) => fields.push("DEVTYPE=usb_interface".to_string()),
            None => {
                fields.push("DEVTYPE=usb_device".to_string());
                fields.extend(self.env.iter().cloned());
            }
        }
        let mut bytes = fields.join("\0").into_bytes();
        bytes.push(0);
        bytes
    }
}

/// The daemon's uevent socket, from the bench's side.
pub struct UeventFeed {
    socket: UnixDatagram,
    path: PathBuf,
}

impl UeventFeed {
    pub fn to(path: &Path) -> UeventFeed {
        UeventFeed {
            socket: UnixDatagram::unbound().unwrap(),
            path: path.to_path_buf(),
        }
    }

    pub fn send(&self, datagram: &[u8]) {
        self.socket.send_to(datagram, &self.path).unwrap();
    }
}
