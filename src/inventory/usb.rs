//! Buses (root hubs), devices and their interfaces from `/sys/bus/usb/devices`.

use super::pci::parse_hex_id;
use super::reader::{Access, Reader};
use super::{Bus, ClassTriple, Device, Interface, PciAddress, PortPath, Speed};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const USB_DEVICES: &str = "/sys/bus/usb/devices";

/// What one entry of `/sys/bus/usb/devices` is, from its name alone.
#[derive(Debug, PartialEq)]
enum Entry {
    /// `usb3`: a root hub, i.e. a bus.
    RootHub(u8),
    /// `1-3.4.2`: a device.
    Device(PortPath),
    /// `1-3.4.2:1.0`: an interface of the device named before the `:`, and its number.
    Interface { device: String, number: u8 },
    /// `1-0:1.0`: an interface of a root hub (not listed: root hubs are buses).
    RootHubInterface,
}

fn classify(name: &str) -> Option<Entry> {
    if let Some(n) = name.strip_prefix("usb") {
        return super::types::parse_decimal_u8(n)
            .filter(|b| *b > 0)
            .map(Entry::RootHub);
    }
    if let Some((device, iface)) = name.split_once(':') {
        // The kernel names interfaces BUS-PATH:CONFIG.IFNUM, all decimal.
        let (_config, number) = iface.split_once('.')?;
        let number = super::types::parse_decimal_u8(number)?;
        if device.ends_with("-0") {
            return Some(Entry::RootHubInterface);
        }
        device.parse::<PortPath>().ok()?;
        return Some(Entry::Interface {
            device: device.to_string(),
            number,
        });
    }
    name.parse().ok().map(Entry::Device)
}

/// Buses sorted by number and devices sorted by port path, in one pass over the listing.
pub(super) fn read_usb(r: &mut Reader) -> (Vec<Bus>, Vec<Device>) {
    let names = r.list(Path::new(USB_DEVICES)).unwrap_or_default();
    let mut buses = Vec::new();
    let mut devices = Vec::new();
    let mut interfaces: BTreeMap<String, Vec<(u8, String)>> = BTreeMap::new();
    for name in names {
        match classify(&name) {
            Some(Entry::RootHub(n)) => buses.push((n, name)),
            Some(Entry::Device(p)) => devices.push((p, name)),
            Some(Entry::Interface { device, number }) => {
                interfaces.entry(device).or_default().push((number, name));
            }
            Some(Entry::RootHubInterface) => {}
            None => r.warn(format!("{USB_DEVICES}/{name}: unrecognised name, ignored")),
        }
    }
    let mut buses: Vec<Bus> = buses
        .into_iter()
        .map(|(n, name)| read_bus(r, n, &name))
        .collect();
    buses.sort_by_key(|b| b.number);
    let mut devices: Vec<Device> = devices
        .into_iter()
        .map(|(port, name)| {
            let ifaces = interfaces.remove(&name).unwrap_or_default();
            read_device(r, port, &name, ifaces)
        })
        .collect();
    devices.sort_by(|a, b| a.port.cmp(&b.port));
    for (device, _) in interfaces {
        r.warn(format!(
            "{USB_DEVICES}: interfaces of `{device}` but no such device"
        ));
    }
    (buses, devices)
}

fn read_bus(r: &mut Reader, number: u8, name: &str) -> Bus {
    let who = format!("bus {number}");
    let dir = r.resolve(&Path::new(USB_DEVICES).join(name));
    Bus {
        number,
        controller: pci_ancestor(&dir),
        speed_mbps: r
            .parse(&who, &dir, "speed", true, "a speed in Mb/s", parse_speed)
            .flatten(),
        ports: r.parse(&who, &dir, "maxchild", false, "a port count", |v| {
            v.trim().parse().ok()
        }),
        version: r.text(&who, &dir, "version"),
    }
}

fn read_device(r: &mut Reader, port: PortPath, name: &str, ifaces: Vec<(u8, String)>) -> Device {
    let who = format!("usb {name}");
    let dir = r.resolve(&Path::new(USB_DEVICES).join(name));
    let address = r.parse(&who, &dir, "devnum", true, "a device number", |v| {
        v.trim().parse().ok()
    });
    let vendor_id = r.parse(
        &who,
        &dir,
        "idVendor",
        true,
        "a 4-digit hex id",
        parse_hex_id,
    );
    let product_id = r.parse(
        &who,
        &dir,
        "idProduct",
        true,
        "a 4-digit hex id",
        parse_hex_id,
    );
    let class = class_triple(
        r,
        &who,
        &dir,
        ["bDeviceClass", "bDeviceSubClass", "bDeviceProtocol"],
    );
    let mut netdevs = Vec::new();
    let mut block_devices = Vec::new();
    let mut interfaces: Vec<Interface> = Vec::with_capacity(ifaces.len());
    for (number, iface) in ifaces {
        let (interface, iface_dir) = read_interface(r, number, &iface);
        let (nets, blocks) = host_devices_below(r, &iface_dir);
        netdevs.extend(nets);
        block_devices.extend(blocks);
        interfaces.push(interface);
    }
    interfaces.sort_by_key(|i| i.number);
    netdevs.sort();
    block_devices.sort();
    let hub = class.is_some_and(|c| c.class == ClassTriple::HUB_CLASS)
        || interfaces
            .iter()
            .any(|i| i.class.is_some_and(|c| c.class == ClassTriple::HUB_CLASS));
    let manufacturer = r.text(&who, &dir, "manufacturer").or_else(|| {
        use usb_ids::FromId;
        vendor_id
            .and_then(|v| usb_ids::Vendor::from_id(v.0))
            .map(|v| v.name().to_string())
    });
    let product = r
        .text(&who, &dir, "product")
        .or_else(|| match (vendor_id, product_id) {
            (Some(v), Some(p)) => {
                usb_ids::Device::from_vid_pid(v.0, p.0).map(|d| d.name().to_string())
            }
            _ => None,
        });
    Device {
        bus: port.bus,
        parent: port.parent(),
        address,
        vendor_id,
        product_id,
        manufacturer,
        product,
        serial: r.text(&who, &dir, "serial"),
        class,
        speed_mbps: r
            .parse(&who, &dir, "speed", true, "a speed in Mb/s", parse_speed)
            .flatten(),
        hub,
        removable: r.text(&who, &dir, "removable"),
        controller: pci_ancestor(&dir),
        driver: r.link_name(&dir.join("driver")),
        sysfs_path: dir.display().to_string(),
        interfaces,
        netdevs,
        block_devices,
        port,
    }
}

/// One interface, and its resolved directory (netdevs and SCSI hosts live below it).
fn read_interface(r: &mut Reader, number: u8, name: &str) -> (Interface, PathBuf) {
    let who = format!("usb {name}");
    let dir = r.resolve(&Path::new(USB_DEVICES).join(name));
    let interface = Interface {
        number,
        class: class_triple(
            r,
            &who,
            &dir,
            [
                "bInterfaceClass",
                "bInterfaceSubClass",
                "bInterfaceProtocol",
            ],
        ),
        driver: r.link_name(&dir.join("driver")),
    };
    (interface, dir)
}

/// The three class bytes (hex in sysfs); unknown if any of them is.
fn class_triple(r: &mut Reader, who: &str, dir: &Path, names: [&str; 3]) -> Option<ClassTriple> {
    let [class, subclass, protocol] =
        names.map(|n| r.parse(who, dir, n, true, "a hex byte", parse_hex_u8));
    Some(ClassTriple {
        class: class?,
        subclass: subclass?,
        protocol: protocol?,
    })
}

/// The names below `dir`, each marked for the recording; none if `dir` does not exist.
fn children_of(r: &mut Reader, dir: &Path) -> Vec<String> {
    let names = r.list(dir).unwrap_or_default();
    for n in &names {
        r.mark(&dir.join(n), Access::Dir);
    }
    names
}

/// Host network interfaces (`<iface>/net/usb0`) and block devices
/// (`<iface>/host*/target*/H:C:T:L/block/sda`) below an interface: one listing of the
/// interface directory, deeper only where those entries exist.
fn host_devices_below(r: &mut Reader, iface_dir: &Path) -> (Vec<String>, Vec<String>) {
    let names = r.list(iface_dir).unwrap_or_default();
    let mut netdevs = Vec::new();
    let mut blocks = Vec::new();
    if names.iter().any(|n| n == "net") {
        netdevs = children_of(r, &iface_dir.join("net"));
    }
    for host in names.iter().filter(|n| is_numbered(n, "host")) {
        let host_dir = iface_dir.join(host);
        let targets = r.list(&host_dir).unwrap_or_default();
        for target in targets.iter().filter(|n| is_numbered(n, "target")) {
            let target_dir = host_dir.join(target);
            let luns = r.list(&target_dir).unwrap_or_default();
            for lun in luns.iter().filter(|n| n.contains(':')) {
                blocks.extend(children_of(r, &target_dir.join(lun).join("block")));
            }
        }
    }
    (netdevs, blocks)
}

/// `host3` for prefix `host`; `target0:0:0` for `target` (digits, then anything).
fn is_numbered(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.bytes().next().is_some_and(|b| b.is_ascii_digit()))
}

/// The PCI function a USB device or root hub hangs off: the nearest ancestor directory
/// named like a PCI address in its resolved sysfs path.
fn pci_ancestor(dir: &Path) -> Option<PciAddress> {
    dir.ancestors()
        .filter_map(|a| a.file_name()?.to_str()?.parse().ok())
        .next()
}

/// The kernel's `speed`: `1.5`, `12`, `480`, `5000`, ...; `unknown` is a valid answer
/// (`Some(None)`), anything else malformed (`None`).
fn parse_speed(v: &str) -> Option<Option<Speed>> {
    let v = v.trim();
    if v == "unknown" {
        return Some(None);
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Some(Speed(s)))
}

fn parse_hex_u8(v: &str) -> Option<u8> {
    let v = v.trim();
    (!v.is_empty() && v.len() <= 2)
        .then(|| u8::from_str_radix(v, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names_each_kind_of_entry() {
        assert_eq!(classify("usb3"), Some(Entry::RootHub(3)));
        assert_eq!(
            classify("1-3.4.2"),
            Some(Entry::Device("1-3.4.2".parse().unwrap()))
        );
        assert_eq!(
            classify("1-3.4:1.2"),
            Some(Entry::Interface {
                device: "1-3.4".into(),
                number: 2
            })
        );
        assert_eq!(classify("2-0:1.0"), Some(Entry::RootHubInterface));
        assert_eq!(classify("usbmon"), None);
    }

    #[test]
    fn parse_speed_accepts_low_speed_and_unknown() {
        assert_eq!(parse_speed("1.5"), Some(Some(Speed(1.5))));
        assert_eq!(parse_speed("unknown"), Some(None));
        assert_eq!(parse_speed("fast"), None);
    }

    #[test]
    fn pci_ancestor_is_the_nearest_pci_directory() {
        let dir = Path::new("/sys/devices/pci0000:00/0000:00:1c.0/0000:02:00.0/usb3/3-1/3-1.2");
        assert_eq!(pci_ancestor(dir), Some("0000:02:00.0".parse().unwrap()));
    }
}
