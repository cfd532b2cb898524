//! Builds PCI config-space fixtures that look like Intel 8- and 9-series PCHs: a temp
//! dir standing for `/`, with `sys/bus/pci/devices/ADDR/config` (256 bytes, right ids,
//! class codes and routing registers; every other byte a non-zero pattern so a stray
//! write shows up in a whole-file comparison) and the xHCI's `power/control`.
#![allow(dead_code)]

pub mod toggle_bed;

use std::path::{Path, PathBuf};
use usbroute::inventory::PciAddress;
use usbroute::sysfs::SysfsRoot;

pub const XHCI: &str = "0000:00:14.0";
pub const EHCI1: &str = "0000:00:1d.0";
pub const EHCI2: &str = "0000:00:1a.0";

/// Register values of one fixture.
#[derive(Debug, Clone, Copy)]
pub struct Regs {
    pub xusb2pr: u16,
    pub xusb2prm: u32,
    pub usb3_pssen: u32,
    pub usb3prm: u32,
}

impl Regs {
    /// What a Lynx Point desktop board's firmware leaves: all 14 ports switchable and
    /// on xHCI, all 6 SuperSpeed lanes enabled.
    pub const LYNX_DEFAULT: Regs = Regs {
        xusb2pr: 0x3fff,
        xusb2prm: 0x3fff,
        usb3_pssen: 0x3f,
        usb3prm: 0x3f,
    };
}

pub struct Pch {
    pub dir: tempfile::TempDir,
}

/// A 256-byte config space: ids, class, the routing registers when `regs` is given, and
/// a non-zero pattern everywhere else.
pub fn config_bytes(vendor: u16, device: u16, class: u32, regs: Option<Regs>) -> Vec<u8> {
    let mut b: Vec<u8> = (0..256u32).map(|i| (i as u8) ^ 0xa5).collect();
    b[0..2].copy_from_slice(&vendor.to_le_bytes());
    b[2..4].copy_from_slice(&device.to_le_bytes());
    b[8] = 0x04; // revision
    b[9] = class as u8;
    b[10] = (class >> 8) as u8;
    b[11] = (class >> 16) as u8;
    if let Some(r) = regs {
        b[0xd0..0xd2].copy_from_slice(&r.xusb2pr.to_le_bytes());
        // The upper half of the 32-bit XUSB2PR register: reserved, left as the pattern.
        b[0xd4..0xd8].copy_from_slice(&r.xusb2prm.to_le_bytes());
        b[0xd8..0xdc].copy_from_slice(&r.usb3_pssen.to_le_bytes());
        b[0xdc..0xe0].copy_from_slice(&r.usb3prm.to_le_bytes());
    }
    b
}

impl Pch {
    pub fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// 8-series Lynx Point: xHCI 8c31, EHCI #1 8c26 at 1d.0, EHCI #2 8c2d at 1a.0.
    pub fn lynx_point(regs: Regs) -> Self {
        let pch = Self::empty();
        pch.function(XHCI, 0x8086, 0x8c31, 0x0c0330, Some(regs));
        pch.function(EHCI1, 0x8086, 0x8c26, 0x0c0320, None);
        pch.function(EHCI2, 0x8086, 0x8c2d, 0x0c0320, None);
        pch.function("0000:00:1f.0", 0x8086, 0x8c44, 0x060100, None);
        pch.power_control("auto");
        pch
    }

    /// 9-series Wildcat Point: xHCI 8cb1, EHCIs 8ca6 / 8cad.
    pub fn wildcat_point(regs: Regs) -> Self {
        let pch = Self::empty();
        pch.function(XHCI, 0x8086, 0x8cb1, 0x0c0330, Some(regs));
        pch.function(EHCI1, 0x8086, 0x8ca6, 0x0c0320, None);
        pch.function(EHCI2, 0x8086, 0x8cad, 0x0c0320, None);
        pch.power_control("auto");
        pch
    }

    /// 9-series Wildcat Point-LP: xHCI 9cb1, one EHCI 9ca6 with 8 ports, 4 SuperSpeed.
    pub fn wildcat_point_lp(regs: Regs) -> Self {
        let pch = Self::empty();
        pch.function(XHCI, 0x8086, 0x9cb1, 0x0c0330, Some(regs));
        pch.function(EHCI1, 0x8086, 0x9ca6, 0x0c0320, None);
        pch.power_control("auto");
        pch
    }

    pub fn function(&self, addr: &str, vendor: u16, device: u16, class: u32, regs: Option<Regs>) {
        let dir = self.dev_dir(addr);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config"),
            config_bytes(vendor, device, class, regs),
        )
        .unwrap();
    }

    pub fn dev_dir(&self, addr: &str) -> PathBuf {
        self.dir.path().join("sys/bus/pci/devices").join(addr)
    }

    pub fn config_path(&self, addr: &str) -> PathBuf {
        self.dev_dir(addr).join("config")
    }

    pub fn config(&self, addr: &str) -> Vec<u8> {
        std::fs::read(self.config_path(addr)).unwrap()
    }

    pub fn power_control(&self, value: &str) {
        let dir = self.dev_dir(XHCI).join("power");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("control"), value).unwrap();
    }

    pub fn read_power_control(&self) -> String {
        std::fs::read_to_string(self.dev_dir(XHCI).join("power/control")).unwrap()
    }

    pub fn root(&self) -> SysfsRoot {
        SysfsRoot::new(self.dir.path())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// XUSB2PR as the file holds it.
    pub fn xusb2pr(&self) -> u16 {
        let c = self.config(XHCI);
        u16::from_le_bytes([c[0xd0], c[0xd1]])
    }

    /// USB3_PSSEN as the file holds it.
    pub fn usb3_pssen(&self) -> u32 {
        let c = self.config(XHCI);
        u32::from_le_bytes([c[0xd8], c[0xd9], c[0xda], c[0xdb]])
    }

    /// What the kernel does on resume: XUSB2PRM into XUSB2PR, USB3PRM into USB3_PSSEN.
    pub fn kernel_resume_rewrite(&self) {
        let mut c = self.config(XHCI);
        let (prm0, prm1) = (c[0xd4], c[0xd5]);
        c[0xd0] = prm0;
        c[0xd1] = prm1;
        let usb3prm: [u8; 4] = c[0xdc..0xe0].try_into().unwrap();
        c[0xd8..0xdc].copy_from_slice(&usb3prm);
        std::fs::write(self.config_path(XHCI), c).unwrap();
    }
}

pub fn pci(addr: &str) -> PciAddress {
    addr.parse().unwrap()
}

/// Offsets at which two byte strings differ.
pub fn changed_offsets(before: &[u8], after: &[u8]) -> Vec<usize> {
    assert_eq!(before.len(), after.len(), "file length changed");
    (0..before.len())
        .filter(|i| before[*i] != after[*i])
        .collect()
}

/// Profiles `host` (0x3fff, all on xHCI), `guest` (0x3ffc) and `desk` (0x3f0f), with
/// `toggle` flipping host and guest: what the toggle tests switch between.
pub fn host_guest_desk_profiles() -> usbroute::routing::RoutingConfig {
    use usbroute::routing::{ProfileConfig, RoutingConfig};
    let mut c = RoutingConfig {
        toggle: vec!["host".into(), "guest".into()],
        ..RoutingConfig::default()
    };
    let profile = |mask: &str| ProfileConfig {
        mask: Some(mask.into()),
        ..ProfileConfig::default()
    };
    c.profile.insert("host".into(), profile("0x3fff"));
    c.profile.insert("guest".into(), profile("0x3ffc"));
    c.profile.insert("desk".into(), profile("0x3f0f"));
    c
}

/// The TCP toggle listener's secret in [`toggle_daemon_config`].
pub const TOGGLE_SECRET: &str = "s3cret";

/// A daemon config with profiles `host`, `guest` (ehci1:1 and ehci1:2 to EHCI) and `desk`
/// (0x3f0f), `toggle` flipping host and guest, and the TCP listener on `port`.
pub fn toggle_daemon_config(port: u16) -> String {
    format!(
        r#"[routing]
toggle = ["host", "guest"]

[routing.profile.host]
mask = "0x3fff"

[routing.profile.guest]
ehci = ["ehci1:1", "ehci1:2"]

[routing.profile.desk]
mask = "0x3f0f"

[toggle]
listen = "127.0.0.1:{port}"
secret = "{TOGGLE_SECRET}"
"#
    )
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One line to the TCP toggle listener on `port` after `auth` with [`TOGGLE_SECRET`];
/// its reply line.
pub fn tcp_toggle(port: u16, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    (&stream)
        .write_all(format!("auth {TOGGLE_SECRET}\n{line}\n").as_bytes())
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let mut auth = String::new();
    reader.read_line(&mut auth).unwrap();
    assert_eq!(auth, "ok auth\n");
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}
