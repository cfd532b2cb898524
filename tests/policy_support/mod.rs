//! Test data shared by the selector, policy and engine tests: devices built in one line.
#![allow(dead_code)]

pub mod backends;

use usbroute::inventory::{ClassTriple, Device, HexId, Interface, PciAddress, PortPath};

/// The xHCI every test device hangs off unless a test moves it.
pub const XHCI: &str = "0000:00:14.0";

/// A plain full-speed HID device at `port` (`"1-3.4.2"`) with address `address`.
pub fn device(port: &str, address: u16) -> Device {
    let port: PortPath = port.parse().expect("test port path");
    Device {
        sysfs_path: format!("/sys/bus/usb/devices/{port}"),
        address: Some(address),
        vendor_id: Some(HexId(0x046d)),
        product_id: Some(HexId(0xc016)),
        manufacturer: Some("Logitech".into()),
        product: Some("Optical Mouse".into()),
        class: Some(ClassTriple {
            class: 0,
            subclass: 0,
            protocol: 0,
        }),
        controller: Some(XHCI.parse::<PciAddress>().expect("pci")),
        driver: Some("usb".into()),
        interfaces: vec![interface(0, 0x03, 0x01, 0x02)],
        ..Device::at(port)
    }
}

/// An interface with a class triple.
pub fn interface(number: u8, class: u8, subclass: u8, protocol: u8) -> Interface {
    Interface {
        number,
        class: Some(ClassTriple {
            class,
            subclass,
            protocol,
        }),
        driver: None,
    }
}

/// A hub (class 9) at `port`.
pub fn hub(port: &str, address: u16) -> Device {
    let mut d = device(port, address);
    d.hub = true;
    d.class = Some(ClassTriple {
        class: 9,
        subclass: 0,
        protocol: 0,
    });
    d.interfaces = vec![interface(0, 9, 0, 0)];
    d
}

/// `device` with another vendor:product.
pub fn with_id(mut d: Device, vendor: u16, product: u16) -> Device {
    d.vendor_id = Some(HexId(vendor));
    d.product_id = Some(HexId(product));
    d
}

pub mod sim;

/// `d` with its controller-anchored place, `0000:00:14.0/CHAIN` (every test device's
/// controller): the place a followed device must come back to.
pub fn placed(mut d: Device) -> Device {
    let place = format!("{XHCI}/{}", d.port.chain());
    d.physical_port = Some(place.parse().expect("physical port"));
    d
}
