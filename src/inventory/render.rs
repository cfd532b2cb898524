//! How a snapshot looks to people (the `list` tree, `show` and `controllers` blocks) and
//! to programs (the `list --json` object). Pure: snapshot in, text out.

use super::text::{capped, escaped_lines, printable, MAX_SHOWN};
use super::{Bus, Controller, Device, IsolationSummary, PortPath, Snapshot, Speed};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// The `list --json` object: `{"controllers": [...], "buses": [...], "devices": [...]}`.
#[derive(Debug, Serialize)]
pub struct Listing<'a> {
    /// USB host controllers, by PCI address.
    pub controllers: &'a [Controller],
    /// Buses (root hubs), by number.
    pub buses: &'a [Bus],
    /// Devices (never root hubs), by port path.
    pub devices: &'a [Device],
}

impl<'a> From<&'a Snapshot> for Listing<'a> {
    fn from(s: &'a Snapshot) -> Self {
        Self {
            controllers: &s.controllers,
            buses: &s.buses,
            devices: &s.devices,
        }
    }
}

/// `true` when there is nothing USB to show at all.
pub fn is_empty(snapshot: &Snapshot) -> bool {
    snapshot.controllers.is_empty() && snapshot.buses.is_empty() && snapshot.devices.is_empty()
}

/// The `list` tree: controller → bus → hubs and devices, every device exactly once.
pub fn tree(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let mut shown_buses = BTreeSet::new();
    for c in &snapshot.controllers {
        out.push_str(&controller_line(c));
        out.push('\n');
        let buses = &c.buses;
        if buses.is_empty() {
            let why = c
                .driver
                .as_deref()
                .map_or("unbound".to_string(), |d| format!("driver {d}"));
            let _ = writeln!(out, "└── no buses ({why})");
        }
        shown_buses.extend(buses.iter().copied());
        let groups = twin_groups(snapshot, buses);
        for (i, group) in groups.iter().enumerate() {
            bus_subtree(&mut out, snapshot, group, "", i + 1 == groups.len());
        }
    }
    // Buses of non-PCI controllers, and devices whose root hub could not be read.
    let rest: BTreeSet<u8> = snapshot
        .buses
        .iter()
        .map(|b| b.number)
        .chain(snapshot.devices.iter().map(|d| d.bus))
        .filter(|n| !shown_buses.contains(n))
        .collect();
    if !rest.is_empty() {
        out.push_str("not on PCI\n");
        let rest: Vec<u8> = rest.into_iter().collect();
        let groups = twin_groups(snapshot, &rest);
        for (i, group) in groups.iter().enumerate() {
            bus_subtree(&mut out, snapshot, group, "", i + 1 == groups.len());
        }
    }
    escaped_lines(&out)
}

fn controller_line(c: &Controller) -> String {
    let mut line = format!("{} {}", c.kind, c.pci);
    let name = [c.vendor_name.as_deref(), c.device_name.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    if !name.is_empty() {
        let _ = write!(line, "  {name}");
    }
    let _ = write!(
        line,
        "  [{}:{}]",
        hex_or_unknown(c.vendor_id),
        hex_or_unknown(c.device_id)
    );
    let _ = write!(line, "  driver {}", c.driver.as_deref().unwrap_or("none"));
    match c.iommu_group {
        Some(g) => {
            let _ = write!(line, "  IOMMU group {g}");
        }
        None => line.push_str("  no IOMMU"),
    }
    if !c.companions.is_empty() {
        let _ = write!(line, "  companions {}", join(&c.companions));
    }
    line
}

/// `numbers` in groups shown as one subtree: a bus alone, or twin root hubs (an xHCI's
/// USB 2 and USB 3 halves, whose ports are the same sockets) together, USB 2 first.
fn twin_groups(snapshot: &Snapshot, numbers: &[u8]) -> Vec<Vec<u8>> {
    let bus = |n: u8| snapshot.buses.iter().find(|b| b.number == n);
    let mut groups: Vec<Vec<u8>> = Vec::new();
    for &number in numbers {
        if groups.iter().any(|g| g.contains(&number)) {
            continue;
        }
        let twin = bus(number)
            .and_then(|b| b.twin)
            .filter(|t| *t != number && numbers.contains(t));
        let mut group: Vec<u8> = std::iter::once(number).chain(twin).collect();
        group.sort_by_key(|n| (bus(*n).is_some_and(Bus::is_superspeed), *n));
        groups.push(group);
    }
    groups
}

/// One bus, or twin buses as one set of sockets: their devices together, in socket order.
fn bus_subtree(out: &mut String, snapshot: &Snapshot, numbers: &[u8], indent: &str, last: bool) {
    let (branch, child_indent) = branch(indent, last);
    let lines: Vec<String> = numbers.iter().map(|n| bus_line(snapshot, *n)).collect();
    out.push_str(&branch);
    out.push_str(&lines.join(" + "));
    if numbers.len() > 1 {
        out.push_str("  (twins: one socket, two speeds)");
    }
    out.push('\n');

    // Children by parent port; a device whose hub is missing hangs off the bus itself.
    let on_bus: Vec<&Device> = snapshot
        .devices
        .iter()
        .filter(|d| numbers.contains(&d.bus))
        .collect();
    let present: BTreeSet<&PortPath> = on_bus.iter().map(|d| &d.port).collect();
    let mut children: BTreeMap<Option<&PortPath>, Vec<&Device>> = BTreeMap::new();
    for d in &on_bus {
        let parent = d.parent.as_ref().filter(|p| present.contains(p));
        children.entry(parent).or_default().push(d);
    }
    if numbers.len() > 1 {
        // Twins: the USB 2 and USB 3 devices of one socket side by side.
        for kids in children.values_mut() {
            kids.sort_by(|a, b| (&a.physical_port, &a.port).cmp(&(&b.physical_port, &b.port)));
        }
    }
    device_children(out, &children, None, &child_indent);
}

/// `bus 1  USB 2.00  480 Mb/s  8 ports`.
fn bus_line(snapshot: &Snapshot, number: u8) -> String {
    let bus = snapshot.buses.iter().find(|b| b.number == number);
    let mut line = format!("bus {number}");
    match bus {
        Some(b) => {
            if let Some(v) = &b.version {
                let _ = write!(line, "  USB {v}");
            }
            let _ = write!(line, "  {}", speed(b.speed_mbps));
            if let Some(p) = b.ports {
                let _ = write!(line, "  {p} ports");
            }
        }
        None => line.push_str("  (root hub not readable)"),
    }
    line
}

fn device_children(
    out: &mut String,
    children: &BTreeMap<Option<&PortPath>, Vec<&Device>>,
    parent: Option<&PortPath>,
    indent: &str,
) {
    let Some(kids) = children.get(&parent) else {
        return;
    };
    for (i, d) in kids.iter().enumerate() {
        let (branch, child_indent) = branch(indent, i + 1 == kids.len());
        let _ = writeln!(out, "{branch}{}", device_line(d));
        device_children(out, children, Some(&d.port), &child_indent);
    }
}

/// `1-1.3  0000:00:14.0/1.3  dev 5  0627:0001 QEMU USB Mouse  12 Mb/s  usbhid`: the
/// kernel's name, then the controller-anchored one (when the controller is known).
pub fn device_line(d: &Device) -> String {
    let physical = d
        .physical_port
        .as_ref()
        .map_or(String::new(), |p| format!("  {p}"));
    let mut line = format!(
        "{}{physical}  dev {}  {}  {}",
        d.port,
        opt(d.address),
        d.label(),
        speed(d.speed_mbps)
    );
    let drivers = interface_drivers(d);
    if d.hub {
        line.push_str("  hub");
    } else if drivers.is_empty() {
        line.push_str("  (no driver)");
    } else {
        let _ = write!(line, "  {drivers}");
    }
    if !d.netdevs.is_empty() {
        let _ = write!(line, "  net {}", printable(&d.netdevs.join(",")));
    }
    if !d.block_devices.is_empty() {
        let _ = write!(line, "  disk {}", printable(&d.block_devices.join(",")));
    }
    if let Some(s) = &d.serial {
        let _ = write!(line, "  serial {}", printable(s));
    }
    line
}

/// Every field of a device, for `show`.
pub fn device_details(d: &Device, snapshot: &Snapshot) -> String {
    let mut out = format!("{}  {}\n", d.port, d.label());
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<14} {value}");
    };
    field("port", format!("{}  (port:{})", d.port, d.port));
    field(
        "physical port",
        d.physical_port.as_ref().map_or_else(
            || "unknown (the bus's controller is not known)".into(),
            |p| format!("{p}  (port:{p}, stays when buses are renumbered)"),
        ),
    );
    field(
        "bus.address",
        match d.address {
            Some(a) => format!("{}.{a}  (addr:{}.{a})", d.bus, d.bus),
            None => format!("{}.?", d.bus),
        },
    );
    field(
        "vendor:product",
        format!(
            "{}:{}",
            hex_or_unknown(d.vendor_id),
            hex_or_unknown(d.product_id)
        ),
    );
    field("manufacturer", opt_text(&d.manufacturer));
    field("product", opt_text(&d.product));
    field("serial", opt_text(&d.serial));
    field(
        "class",
        d.class.map_or("unknown".into(), |c| {
            format!("{:02x}:{:02x}:{:02x}", c.class, c.subclass, c.protocol)
        }),
    );
    field("speed", speed(d.speed_mbps));
    field("hub", if d.hub { "yes" } else { "no" }.into());
    field("removable", opt_str(&d.removable));
    field(
        "controller",
        match d.controller {
            Some(pci) => match snapshot.controller(&pci) {
                Some(c) => format!("{pci} ({})", c.kind),
                None => pci.to_string(),
            },
            None => "not on PCI".into(),
        },
    );
    field(
        "parent hub",
        d.parent
            .as_ref()
            .map_or("root hub".into(), ToString::to_string),
    );
    field("driver", opt_str(&d.driver));
    for i in &d.interfaces {
        let class = i.class.map_or("??:??:??".into(), |c| {
            format!("{:02x}:{:02x}:{:02x}", c.class, c.subclass, c.protocol)
        });
        field(
            &format!("interface {}", i.number),
            format!("{class}  {}", opt_str(&i.driver)),
        );
    }
    field("network", list_or_none(&d.netdevs));
    field("block devices", list_or_none(&d.block_devices));
    field("sysfs", d.sysfs_path.clone());
    escaped_lines(&out)
}

/// One block per controller with its group members and verdict, for `controllers`
/// (the verdicts from `crate::vfio::controller_entries`).
pub fn controllers_text<'a>(
    controllers: impl IntoIterator<Item = (&'a Controller, &'a IsolationSummary)>,
) -> String {
    let mut out = String::new();
    for (c, v) in controllers {
        let _ = writeln!(out, "{}", controller_line(c));
        let buses: Vec<String> = c.buses.iter().map(u8::to_string).collect();
        let _ = writeln!(
            out,
            "  buses        {}",
            if buses.is_empty() {
                "none".into()
            } else {
                buses.join(", ")
            }
        );
        match c.iommu_group {
            Some(g) => {
                let _ = writeln!(out, "  IOMMU group  {g}");
                for m in &c.iommu_group_members {
                    let role = if m.bridge {
                        "bridge, stays with the host"
                    } else if v.goes_along.contains(&m.pci) {
                        "USB controller on the same slot, goes along"
                    } else {
                        "other device"
                    };
                    let _ = writeln!(
                        out,
                        "    {}  {}  {}  ({role})",
                        m.pci,
                        m.class
                            .map_or("class ?".into(), |c| format!("class {c:#08x}")),
                        m.driver.as_deref().unwrap_or("no driver")
                    );
                }
            }
            None => {
                let _ = writeln!(out, "  IOMMU group  none");
            }
        }
        if v.alone {
            if v.goes_along.is_empty() {
                let _ = writeln!(out, "  verdict      can go to a VM alone");
            } else {
                let _ = writeln!(
                    out,
                    "  verdict      can go to a VM, together with {}",
                    join(&v.goes_along)
                );
            }
        } else {
            let _ = writeln!(out, "  verdict      cannot go to a VM alone:");
            for b in &v.blockers {
                let _ = writeln!(out, "    - {}", b.reason);
            }
        }
    }
    escaped_lines(&out)
}

fn branch(indent: &str, last: bool) -> (String, String) {
    if last {
        (format!("{indent}└── "), format!("{indent}    "))
    } else {
        (format!("{indent}├── "), format!("{indent}│   "))
    }
}

fn interface_drivers(d: &Device) -> String {
    let mut seen = Vec::new();
    for driver in d.interfaces.iter().filter_map(|i| i.driver.as_deref()) {
        if !seen.contains(&driver) {
            seen.push(driver);
        }
    }
    seen.join(",")
}

fn speed(s: Option<Speed>) -> String {
    s.map_or("? Mb/s".into(), |s| format!("{s} Mb/s"))
}

fn hex_or_unknown(id: Option<super::HexId>) -> String {
    id.map_or("????".into(), |i| i.to_string())
}

fn opt(v: Option<u16>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

fn opt_str(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "none".into())
}

/// A string the device chose, cut to what a human output shows (escaped by the caller).
fn opt_text(v: &Option<String>) -> String {
    v.as_deref()
        .map_or("none".into(), |s| capped(s, MAX_SHOWN).into_owned())
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
