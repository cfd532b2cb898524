//! Emulated USB devices the outer QEMU plugs, and where the guest kernel must see them.

use serde_json::{json, Value};

/// The outer machine's USB host controllers (see [`crate::machine`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctrl {
    /// `qemu-xhci` at 00:03.0, 8 USB 2 + 8 USB 3 ports.
    Xhci,
    /// `ich9-usb-ehci1` at 00:1d.7, 6 ports; full-speed devices on it are handed to
    /// its UHCI companions (00:1d.0 ports 1-2, 00:1d.1 ports 3-4, 00:1d.2 ports 5-6).
    Ehci,
}

impl Ctrl {
    /// The QEMU USB bus name.
    pub fn qemu_bus(self) -> &'static str {
        match self {
            Ctrl::Xhci => "xhci.0",
            Ctrl::Ehci => "ehci.0",
        }
    }
}

/// PCI address of the xHCI in the guest.
pub const XHCI_PCI: &str = "0000:00:03.0";
/// PCI address of the EHCI in the guest.
pub const EHCI_PCI: &str = "0000:00:1d.7";
/// PCI addresses of the EHCI's UHCI companions (each owns two EHCI ports).
pub const UHCI_PCI: [&str; 3] = ["0000:00:1d.0", "0000:00:1d.1", "0000:00:1d.2"];

/// Kinds of emulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `usb-kbd` (0627:0001).
    Kbd,
    /// `usb-mouse` (0627:0001).
    Mouse,
    /// `usb-tablet` (0627:0001).
    Tablet,
    /// `usb-storage` (46f4:0001) on a fresh null-co block node.
    Storage,
    /// `usb-hub` (0409:55aa), full speed, 8 ports.
    Hub,
    /// `usb-wacom-tablet` (056a:0000, "Wacom PenPartner"), full speed: the one emulated
    /// HID device with other ids than QEMU's 0627:0001, for a device that comes back on
    /// the same port as another product (a re-enumeration).
    Wacom,
}

impl Kind {
    /// QEMU driver name.
    pub fn driver(self) -> &'static str {
        match self {
            Kind::Kbd => "usb-kbd",
            Kind::Mouse => "usb-mouse",
            Kind::Tablet => "usb-tablet",
            Kind::Storage => "usb-storage",
            Kind::Hub => "usb-hub",
            Kind::Wacom => "usb-wacom-tablet",
        }
    }

    /// (vendor, product) as the guest reads them.
    pub fn ids(self) -> (&'static str, &'static str) {
        match self {
            Kind::Kbd | Kind::Mouse | Kind::Tablet => ("0627", "0001"),
            Kind::Storage => ("46f4", "0001"),
            Kind::Hub => ("0409", "55aa"),
            Kind::Wacom => ("056a", "0000"),
        }
    }
}

/// One emulated device to plug: what, where, and its QEMU id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDevice {
    /// QEMU device id (unique per bed).
    pub id: String,
    /// What it is.
    pub kind: Kind,
    /// Which controller's bus.
    pub ctrl: Ctrl,
    /// QEMU port: `3`, or `2.3.1` behind hubs.
    pub port: String,
    /// `usb_version=1`: a full-speed-only HID device (lands on a UHCI when on the EHCI).
    pub full_speed_only: bool,
    /// `serial=""`: the guest sees no serial attribute at all.
    pub no_serial: bool,
}

impl UsbDevice {
    /// A device of `kind` with QEMU id `id` at `port` of `ctrl`.
    pub fn new(kind: Kind, id: &str, ctrl: Ctrl, port: &str) -> UsbDevice {
        UsbDevice {
            id: id.to_string(),
            kind,
            ctrl,
            port: port.to_string(),
            full_speed_only: false,
            no_serial: false,
        }
    }

    /// Only full speed (HID devices: `usb_version=1`).
    pub fn full_speed_only(mut self) -> Self {
        self.full_speed_only = true;
        self
    }

    /// Without a serial number string.
    pub fn no_serial(mut self) -> Self {
        self.no_serial = true;
        self
    }

    /// `device_add` arguments; `drive` is the block node of a storage device.
    pub fn device_add_args(&self, drive: Option<&str>) -> Value {
        let mut args = json!({
            "driver": self.kind.driver(),
            "id": self.id,
            "bus": self.ctrl.qemu_bus(),
            "port": self.port,
        });
        if let Some(drive) = drive {
            args["drive"] = json!(drive);
        }
        if self.full_speed_only {
            args["usb_version"] = json!(1);
        }
        if self.no_serial {
            args["serial"] = json!("");
        }
        args
    }

    /// Root port and the hub ports below it.
    fn port_chain(&self) -> Vec<u8> {
        self.port
            .split('.')
            .map(|p| p.parse().expect("device ports are numbers"))
            .collect()
    }

    /// Where and how the guest kernel must see this device.
    pub fn expected(&self) -> Expected {
        let chain = self.port_chain();
        let behind_hub = chain.len() > 1;
        let own_max: u32 = match self.kind {
            Kind::Hub | Kind::Wacom => 12,
            Kind::Storage => 5000,
            _ if self.full_speed_only => 12,
            _ => 480,
        };
        // QEMU's hub is full speed: everything behind it runs at 12 Mb/s.
        let speed = if behind_hub {
            12
        } else {
            match self.ctrl {
                Ctrl::Xhci => own_max,
                Ctrl::Ehci => own_max.min(480),
            }
        };
        let (controller, root_hub, ports) = match self.ctrl {
            Ctrl::Xhci if speed >= 5000 => (XHCI_PCI, RootHub::Usb3, chain),
            Ctrl::Xhci => (XHCI_PCI, RootHub::Usb2, chain),
            // Behind a hub means a (full-speed) QEMU hub sits on the EHCI port.
            Ctrl::Ehci if behind_hub || self.root_speed() <= 12 => {
                // The EHCI hands full-speed devices on its port p to companion (p-1)/2,
                // whose own port is (p-1)%2 + 1.
                let p = usize::from(chain[0]) - 1;
                let mut ports = chain.clone();
                ports[0] = (p % 2 + 1) as u8;
                (UHCI_PCI[p / 2], RootHub::Usb1, ports)
            }
            Ctrl::Ehci => (EHCI_PCI, RootHub::Usb2, chain),
        };
        let (vendor, product) = self.kind.ids();
        Expected {
            controller,
            root_hub,
            ports,
            vendor,
            product,
            speed,
            hub: self.kind == Kind::Hub,
            serial: !self.no_serial,
        }
    }

    /// Speed of the device at the root port (what decides EHCI vs companion).
    fn root_speed(&self) -> u32 {
        match self.kind {
            Kind::Hub | Kind::Wacom => 12,
            _ if self.full_speed_only => 12,
            _ => 480,
        }
    }
}

/// Which root hub of a controller a device lands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootHub {
    /// A UHCI's 12 Mb/s root hub.
    Usb1,
    /// The 480 Mb/s root hub (EHCI, or the xHCI's USB 2 half).
    Usb2,
    /// The xHCI's 5000 Mb/s root hub.
    Usb3,
}

impl RootHub {
    /// The root hub's `speed` in Mb/s.
    pub fn speed(self) -> u32 {
        match self {
            RootHub::Usb1 => 12,
            RootHub::Usb2 => 480,
            RootHub::Usb3 => 5000,
        }
    }
}

/// Where and how the guest must see a plugged device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// PCI address of the controller it hangs off.
    pub controller: &'static str,
    /// Which of the controller's root hubs.
    pub root_hub: RootHub,
    /// Root port, then hub ports.
    pub ports: Vec<u8>,
    /// idVendor.
    pub vendor: &'static str,
    /// idProduct.
    pub product: &'static str,
    /// Link speed in Mb/s.
    pub speed: u32,
    /// A hub.
    pub hub: bool,
    /// Has a serial attribute.
    pub serial: bool,
}

impl Expected {
    /// The port chain as the kernel writes it after `BUS-` (`2.3.1`).
    pub fn chain(&self) -> String {
        self.ports
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// The rich topology: every kind, nested hubs, all three controller types, USB 3
/// storage, a device without a serial. Hubs come before the devices behind them.
pub fn rich_topology() -> Vec<UsbDevice> {
    use Ctrl::*;
    use Kind::*;
    vec![
        UsbDevice::new(Kbd, "kbd1", Xhci, "1"),
        UsbDevice::new(Hub, "hub1", Xhci, "2"),
        UsbDevice::new(Mouse, "mouse1", Xhci, "2.1"),
        UsbDevice::new(Tablet, "tablet1", Xhci, "2.2"),
        UsbDevice::new(Hub, "hub2", Xhci, "2.3"),
        UsbDevice::new(Kbd, "kbd2", Xhci, "2.3.1"),
        UsbDevice::new(Storage, "stor1", Xhci, "3"),
        UsbDevice::new(Tablet, "tablet2", Xhci, "4").no_serial(),
        UsbDevice::new(Storage, "stor2", Ehci, "1"),
        UsbDevice::new(Kbd, "kbd3", Ehci, "5").full_speed_only(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_on_xhci_root_port_lands_on_usb3_at_5000() {
        let dev = UsbDevice::new(Kind::Storage, "s", Ctrl::Xhci, "3");

        let e = dev.expected();

        assert_eq!(
            (e.controller, e.root_hub, e.speed, e.chain()),
            (XHCI_PCI, RootHub::Usb3, 5000, "3".to_string())
        );
    }

    #[test]
    fn full_speed_kbd_on_ehci_port_5_lands_on_third_uhci_port_1() {
        let dev = UsbDevice::new(Kind::Kbd, "k", Ctrl::Ehci, "5").full_speed_only();

        let e = dev.expected();

        assert_eq!(
            (e.controller, e.root_hub, e.speed, e.chain()),
            (UHCI_PCI[2], RootHub::Usb1, 12, "1".to_string())
        );
    }

    #[test]
    fn tablet_behind_a_hub_on_ehci_port_4_lands_on_second_uhci_port_2() {
        let dev = UsbDevice::new(Kind::Tablet, "t", Ctrl::Ehci, "4.1");

        let e = dev.expected();

        assert_eq!(
            (e.controller, e.root_hub, e.speed, e.chain()),
            (UHCI_PCI[1], RootHub::Usb1, 12, "2.1".to_string())
        );
    }

    #[test]
    fn device_behind_a_hub_runs_at_full_speed() {
        let dev = UsbDevice::new(Kind::Storage, "s", Ctrl::Xhci, "2.3.1");

        let e = dev.expected();

        assert_eq!((e.root_hub, e.speed), (RootHub::Usb2, 12));
    }
}
