//! Buses (root hubs), devices and their interfaces from `/sys/bus/usb/devices`.

use super::pci::parse_hex_id;
use super::reader::{Access, Attrs, Reader};
use super::{
    Bus, ClassTriple, ControllerName, Device, HexId, Interface, PciAddress, PhysicalPort, PortPath,
    PortTwin, Speed,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(super) const USB_DEVICES: &str = "/sys/bus/usb/devices";
const SPEED: &str = "a speed in Mb/s";
const HEX_ID: &str = "a 4-digit hex id";

/// What one entry of `/sys/bus/usb/devices` is, from its name alone.
#[derive(Debug, PartialEq)]
pub(super) enum Entry {
    /// `usb3`: a root hub, i.e. a bus.
    RootHub(u8),
    /// `1-3.4.2`: a device.
    Device(PortPath),
    /// `1-3.4.2:1.0`: an interface of the device named before the `:`, and its number.
    Interface { device: String, number: u8 },
    /// `1-0:1.0`: an interface of a root hub (not listed: root hubs are buses).
    RootHubInterface,
}

pub(super) fn classify(name: &str) -> Option<Entry> {
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
    let names = r.list_top(Path::new(USB_DEVICES)).unwrap_or_default();
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
    check_twins(r, &mut buses);
    for device in &mut devices {
        device.physical_port = physical_port(r, &buses, device);
    }
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
    let mut a = r.attrs(&who, &dir);
    let speed_mbps = a.required("speed", SPEED, parse_speed).flatten();
    let ports: Option<u8> = a.optional("maxchild", "a port count", parse_decimal);
    let version = a.text("version");
    // Each root port's twin, if the kernel linked one; all of them on one other bus.
    let peers: Vec<(u8, PortPath)> = (1..=ports.unwrap_or(0))
        .filter_map(|p| read_peer(r, &port_dir(&dir, number, &[], p)).map(|peer| (p, peer)))
        .filter(|(_, peer)| peer.bus != number && peer.ports.len() == 1)
        .collect();
    let twin = peers.first().map(|(_, peer)| peer.bus);
    let twin_ports = peers
        .iter()
        .filter(|(_, peer)| Some(peer.bus) == twin)
        .map(|(port, peer)| PortTwin {
            port: *port,
            twin: peer.ports[0],
        })
        .collect();
    Bus {
        number,
        controller: pci_ancestor(&dir),
        controller_name: controller_name(&dir),
        speed_mbps,
        ports,
        version,
        twin,
        twin_ports,
    }
}

/// A twin is another root hub of the same controller: a link elsewhere (a crafted
/// recording, a kernel bug) is dropped with a warning, so no socket is named after
/// another controller's port.
fn check_twins(r: &mut Reader, buses: &mut [Bus]) {
    let names: BTreeMap<u8, Option<ControllerName>> = buses
        .iter()
        .map(|b| (b.number, b.controller_name.clone()))
        .collect();
    for bus in buses.iter_mut() {
        let Some(twin) = bus.twin else { continue };
        let same = names
            .get(&twin)
            .is_some_and(|name| *name == bus.controller_name);
        if !same || bus.controller_name.is_none() {
            r.warn(format!(
                "bus {}: its ports' `peer` links point to bus {twin}, which is not another \
                 root hub of its controller; twins ignored",
                bus.number
            ));
            bus.twin = None;
            bus.twin_ports.clear();
        }
    }
}

/// The socket a device is in, named by its controller. A device on a USB 3 bus takes the
/// name of its port's USB 2 twin when the kernel linked one (`peer`), so a USB 3 and a
/// USB 2 device in the same socket get the same name; without one, the `ss` marker.
pub(super) fn physical_port(
    r: &mut Reader,
    buses: &[Bus],
    device: &Device,
) -> Option<PhysicalPort> {
    let bus = buses.iter().find(|b| b.number == device.bus)?;
    let ports = &device.port.ports;
    if !bus.is_superspeed() || ports.len() < 2 {
        // Root ports: the bus read their twins already.
        return PhysicalPort::on_bus(bus, &device.port);
    }
    // Behind a USB 3 hub: its port's twin is a port of the hub's USB 2 half.
    let (last, hub) = ports.split_last()?;
    let hub_dir = Path::new(&device.sysfs_path).parent()?;
    let twin = read_peer(r, &port_dir(hub_dir, device.bus, hub, *last)).filter(|peer| {
        buses
            .iter()
            .find(|b| b.number == peer.bus)
            .is_some_and(|b| !b.is_superspeed() && b.controller_name == bus.controller_name)
    });
    match (twin, &bus.controller_name) {
        (Some(twin), Some(controller)) => Some(PhysicalPort {
            controller: controller.clone(),
            superspeed: false,
            ports: twin.ports,
        }),
        _ => PhysicalPort::on_bus(bus, &device.port),
    }
}

/// The directory of port `port` of a hub whose resolved directory is `hub_dir`: the root
/// hub of bus `bus` when `chain` is empty (`usb2/2-0:1.0/usb2-port3`), else the hub at
/// `bus-chain` (`2-1/2-1:1.0/2-1-port3`; hubs have one configuration, numbered 1).
fn port_dir(hub_dir: &Path, bus: u8, chain: &[u8], port: u8) -> PathBuf {
    let (hub, interface) = if chain.is_empty() {
        (format!("usb{bus}"), format!("{bus}-0:1.0"))
    } else {
        let name = PortPath {
            bus,
            ports: chain.to_vec(),
        }
        .to_string();
        (name.clone(), format!("{name}:1.0"))
    };
    hub_dir.join(interface).join(format!("{hub}-port{port}"))
}

/// The twin a hub port's `peer` link names (the same socket at the other speed), as the
/// port path a device plugged there gets; `None` without a link, or (with a warning) when
/// the link does not name a port.
fn read_peer(r: &mut Reader, port_dir: &Path) -> Option<PortPath> {
    let link = port_dir.join("peer");
    let target = r.follow(&link)?;
    let peer = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_port_dir_name);
    if peer.is_none() {
        r.warn(format!(
            "{}: does not point to a hub port, ignored",
            link.display()
        ));
    }
    peer
}

/// `usb1-port3` (root port 3 of bus 1) → `1-3`; `1-5-port3` (port 3 of hub 1-5) → `1-5.3`.
fn parse_port_dir_name(name: &str) -> Option<PortPath> {
    let (hub, port) = name.rsplit_once("-port")?;
    let port = super::types::parse_decimal_u8(port).filter(|p| *p > 0)?;
    let mut path = match hub.strip_prefix("usb") {
        Some(bus) => PortPath {
            bus: super::types::parse_decimal_u8(bus).filter(|b| *b > 0)?,
            ports: Vec::new(),
        },
        None => hub.parse().ok()?,
    };
    path.ports.push(port);
    format!("{path}").parse().ok()
}

pub(super) fn read_device(
    r: &mut Reader,
    port: PortPath,
    name: &str,
    ifaces: Vec<(u8, String)>,
) -> Device {
    let who = format!("usb {name}");
    let dir = r.resolve(&Path::new(USB_DEVICES).join(name));
    let mut a = r.attrs(&who, &dir);
    let address = a.required("devnum", "a device number", parse_decimal);
    let vendor_id = a.required("idVendor", HEX_ID, parse_hex_id);
    let product_id = a.required("idProduct", HEX_ID, parse_hex_id);
    let class = class_triple(
        &mut a,
        ["bDeviceClass", "bDeviceSubClass", "bDeviceProtocol"],
    );
    let speed_mbps = a.required("speed", SPEED, parse_speed).flatten();
    let manufacturer = a.text("manufacturer");
    let product = a.text("product");
    let serial = a.text("serial");
    let removable = a.text("removable");
    let driver = a.link("driver");

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
    let is_hub_class =
        |c: Option<ClassTriple>| c.is_some_and(|c| c.class == ClassTriple::HUB_CLASS);

    Device {
        bus: port.bus,
        parent: port.parent(),
        address,
        vendor_id,
        product_id,
        manufacturer: manufacturer.or_else(|| usb_vendor_name(vendor_id?)),
        product: product.or_else(|| usb_product_name(vendor_id?, product_id?)),
        serial,
        class,
        speed_mbps,
        hub: is_hub_class(class) || interfaces.iter().any(|i| is_hub_class(i.class)),
        removable,
        controller: pci_ancestor(&dir),
        driver,
        sysfs_path: dir.display().to_string(),
        interfaces,
        netdevs,
        block_devices,
        physical_port: None,
        port,
    }
}

/// One interface, and its resolved directory (netdevs and SCSI hosts live below it).
fn read_interface(r: &mut Reader, number: u8, name: &str) -> (Interface, PathBuf) {
    let who = format!("usb {name}");
    let dir = r.resolve(&Path::new(USB_DEVICES).join(name));
    let mut a = r.attrs(&who, &dir);
    let interface = Interface {
        number,
        class: class_triple(
            &mut a,
            [
                "bInterfaceClass",
                "bInterfaceSubClass",
                "bInterfaceProtocol",
            ],
        ),
        driver: a.link("driver"),
    };
    (interface, dir)
}

/// The three class bytes (hex in sysfs); unknown if any of them is.
fn class_triple(a: &mut Attrs, names: [&str; 3]) -> Option<ClassTriple> {
    let [class, subclass, protocol] = names.map(|n| a.required(n, "a hex byte", parse_hex_u8));
    Some(ClassTriple {
        class: class?,
        subclass: subclass?,
        protocol: protocol?,
    })
}

/// Name fallbacks from the usb-ids database, for devices without the strings.
fn usb_vendor_name(vendor: HexId) -> Option<String> {
    super::ids::usb_vendor(vendor.0)
}

fn usb_product_name(vendor: HexId, product: HexId) -> Option<String> {
    super::ids::usb_product(vendor.0, product.0)
}

/// The class devices below `dir` (`net/usb0`, `block/sda`), none if `dir` does not exist.
///
/// Each one's `anchor` attribute (`ifindex`, `dev`) is read as well: it is what keeps the
/// directory in a recording, since git stores no empty directories and a recording that
/// lost `block/sda` would silently lose the host-disk protection on replay.
fn children_of(r: &mut Reader, dir: &Path, anchor: &str) -> Vec<String> {
    let names = r.list(dir).unwrap_or_default();
    for n in &names {
        r.mark(&dir.join(n), Access::Dir);
        let _ = r.raw(&dir.join(n).join(anchor));
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
        netdevs = children_of(r, &iface_dir.join("net"), "ifindex");
    }
    for host in names.iter().filter(|n| is_numbered(n, "host")) {
        let host_dir = iface_dir.join(host);
        let targets = r.list(&host_dir).unwrap_or_default();
        for target in targets.iter().filter(|n| is_numbered(n, "target")) {
            let target_dir = host_dir.join(target);
            let luns = r.list(&target_dir).unwrap_or_default();
            for lun in luns.iter().filter(|n| n.contains(':')) {
                blocks.extend(children_of(r, &target_dir.join(lun).join("block"), "dev"));
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

/// The controller of a root hub: the device its resolved sysfs directory hangs off (a PCI
/// function, or a platform device such as `vhci_hcd.0` when there is no PCI parent).
fn controller_name(root_hub_dir: &Path) -> Option<ControllerName> {
    let parent = root_hub_dir.parent()?.file_name()?.to_str()?;
    ControllerName::from_parent_dir(parent)
}

/// The kernel's `speed`: `1.5`, `12`, `480`, `5000`, ...; `unknown` is a valid answer
/// (`Some(None)`), anything else malformed (`None`).
pub(crate) fn parse_speed(v: &str) -> Option<Option<Speed>> {
    let v = v.trim();
    if v == "unknown" {
        return Some(None);
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Some(Speed(s)))
}

pub(crate) fn parse_decimal<T: std::str::FromStr>(v: &str) -> Option<T> {
    v.trim().parse().ok()
}

pub(crate) fn parse_hex_u8(v: &str) -> Option<u8> {
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
    fn a_peer_link_names_a_root_port_or_a_hub_port() {
        assert_eq!(parse_port_dir_name("usb1-port3"), "1-3".parse().ok());
        assert_eq!(parse_port_dir_name("1-5-port3"), "1-5.3".parse().ok());
        assert_eq!(parse_port_dir_name("1-1.2.3.4.5.6.7-port1"), None);
        for bad in ["usb1", "usb0-port1", "usb1-port0", "x-port1", "1-5-portx"] {
            assert_eq!(parse_port_dir_name(bad), None, "{bad}");
        }
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

    #[test]
    fn a_root_hub_without_a_pci_parent_is_named_by_its_platform_device() {
        let pci = Path::new("/sys/devices/pci0000:00/0000:00:1c.0/0000:02:00.0/usb3");
        let vhci = Path::new("/sys/devices/platform/vhci_hcd.0/usb3");

        assert_eq!(
            controller_name(pci),
            Some(ControllerName::Pci("0000:02:00.0".parse().unwrap()))
        );
        assert_eq!(
            controller_name(vhci),
            Some(ControllerName::Platform("vhci_hcd.0".into()))
        );
        assert_eq!(pci_ancestor(vhci), None);
    }
}
