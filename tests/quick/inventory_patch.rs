//! A picture kept current by patching one device per uevent equals a full scan of the same
//! sysfs tree, whatever the sequence of plugs, unplugs, re-plugs, hub subtrees, interface
//! drivers and network interfaces, and however late (coalesced) the events are handled.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use usbroute::inventory::synth::{PciFunction, SysfsBuilder, UsbDevice};
use usbroute::inventory::{patch, scan, usb_object, PatchFailed, PortPath, Snapshot, UsbObject};
use usbroute::sysfs::SysfsRoot;

const PCI: &str = "0000:00:14.0";
const PORTS: u8 = 4;
/// Hubs below a root port at most (the kernel allows 5; 3 keeps the trees small).
const DEPTH: usize = 3;

/// One thing that happens to the tree (indices pick among what exists, modulo its count).
#[derive(Debug, Clone)]
enum Op {
    /// A device (a hub with devices on `children` ports, or a leaf) on a free port of a
    /// root hub or a present hub.
    Plug {
        hub: usize,
        port: u8,
        children: Option<Vec<u8>>,
    },
    /// A present device and everything behind it leaves.
    Unplug(usize),
    /// A present device leaves and a leaf comes back on the same port (new devnum).
    Replug(usize),
    /// Interface 0 of a present device gets `usbhid`, `usbfs` or no driver.
    Driver(usize, Option<&'static str>),
    /// A host network interface appears below interface 0 of a present device.
    Netdev(usize),
    /// The daemon's turn: every pending device is read again.
    Handle,
}

fn op() -> impl Strategy<Value = Op> {
    let children = proptest::option::of(proptest::collection::vec(1..=PORTS, 0..=3));
    prop_oneof![
        4 => (any::<usize>(), 1..=PORTS, children)
            .prop_map(|(hub, port, children)| Op::Plug { hub, port, children }),
        2 => any::<usize>().prop_map(Op::Unplug),
        2 => any::<usize>().prop_map(Op::Replug),
        1 => (any::<usize>(), prop_oneof![Just(None), Just(Some("usbhid")), Just(Some("usbfs"))])
            .prop_map(|(d, drv)| Op::Driver(d, drv)),
        1 => any::<usize>().prop_map(Op::Netdev),
        2 => Just(Op::Handle),
    ]
}

/// The tree and what the kernel would have said about it since the last turn.
struct World {
    b: SysfsBuilder,
    root: SysfsRoot,
    _dir: tempfile::TempDir,
    /// Present devices: name → (host directory, is a hub).
    present: BTreeMap<PortPath, (String, bool)>,
    devnum: u16,
    netdevs: u32,
    /// The devices the uevents since the last turn name, as the daemon keeps them.
    pending: BTreeSet<PortPath>,
}

impl World {
    /// An xHCI: bus 1 (USB 2) and bus 2 (USB 3), root ports twinned.
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let b = SysfsBuilder::new(dir.path());
        b.pci(&PciFunction::usb_controller(PCI, 0x0c0330)).unwrap();
        b.bus(PCI, 1, "480", "2.00", PORTS).unwrap();
        b.bus(PCI, 2, "5000", "3.00", PORTS).unwrap();
        for p in 1..=PORTS {
            b.twins("usb1", p, "usb2", p).unwrap();
        }
        World {
            root: SysfsRoot::new(dir.path()),
            b,
            _dir: dir,
            present: BTreeMap::new(),
            devnum: 1,
            netdevs: 0,
            pending: BTreeSet::new(),
        }
    }

    /// A kernel uevent for the object at host directory `dir` (`DEVPATH` is it without
    /// `/sys`), kept as the daemon keeps it: the device it belongs to.
    fn event(&mut self, dir: &str) {
        let devpath = dir.strip_prefix("/sys").unwrap();
        match usb_object(devpath) {
            Some(UsbObject::Device(port)) => {
                self.pending.insert(port);
            }
            other => panic!("{devpath}: {other:?}, not a device"),
        }
    }

    fn nth(&self, n: usize) -> Option<PortPath> {
        let len = self.present.len();
        (len > 0).then(|| self.present.keys().nth(n % len).unwrap().clone())
    }

    fn plug(&mut self, at: PortPath, hub: bool) {
        self.devnum += 1;
        let name = at.to_string();
        let serial = format!("S{}", self.devnum);
        let dir = self
            .b
            .device(&UsbDevice {
                port: &name,
                devnum: self.devnum,
                vendor: 0x046d,
                product: if hub { 0x0001 } else { 0xc016 },
                class: if hub { 9 } else { 0 },
                speed: if at.bus == 1 { "480" } else { "5000" },
                manufacturer: Some("Maker"),
                product_name: None,
                serial: (self.devnum % 2 == 0).then_some(serial.as_str()),
                interfaces: vec![if hub {
                    (9, Some("hub"))
                } else {
                    (3, Some("usbhid"))
                }],
            })
            .unwrap();
        // The kernel's order: the device, its interface, the interface's driver, the
        // device's driver (its `bind`, once usable).
        self.event(&dir);
        self.event(&format!("{dir}/{name}:1.0"));
        self.present.insert(at, (dir, hub));
    }

    fn unplug(&mut self, at: &PortPath) {
        // Deepest first, as the kernel removes them.
        let gone: Vec<PortPath> = self
            .present
            .keys()
            .filter(|p| *p == at || p.is_behind(at))
            .rev()
            .cloned()
            .collect();
        self.b.remove_device(&at.to_string()).unwrap();
        for p in gone {
            let (dir, _) = self.present.remove(&p).unwrap();
            self.event(&format!("{dir}/{p}:1.0"));
            self.event(&dir);
        }
    }

    fn apply(&mut self, op: &Op) {
        match op.clone() {
            Op::Plug {
                hub,
                port,
                children,
            } => {
                let hubs: Vec<PortPath> = [1, 2]
                    .map(|bus| PortPath { bus, ports: vec![] })
                    .into_iter()
                    .chain(
                        self.present
                            .iter()
                            .filter(|(_, (_, h))| *h)
                            .map(|(p, _)| p.clone()),
                    )
                    .collect();
                let mut at = hubs[hub % hubs.len()].clone();
                at.ports.push(port);
                if self.present.contains_key(&at) || at.ports.len() > DEPTH {
                    return;
                }
                self.plug(at.clone(), children.is_some());
                for child in children
                    .unwrap_or_default()
                    .into_iter()
                    .collect::<BTreeSet<_>>()
                {
                    let mut c = at.clone();
                    c.ports.push(child);
                    if c.ports.len() <= DEPTH {
                        self.plug(c, false);
                    }
                }
            }
            Op::Unplug(n) => {
                if let Some(at) = self.nth(n) {
                    self.unplug(&at);
                }
            }
            Op::Replug(n) => {
                if let Some(at) = self.nth(n) {
                    self.unplug(&at);
                    self.plug(at, false);
                }
            }
            Op::Driver(n, driver) => {
                if let Some(at) = self.nth(n) {
                    self.b.interface_driver(&at.to_string(), 0, driver).unwrap();
                    let dir = self.present[&at].0.clone();
                    self.event(&format!("{dir}/{at}:1.0"));
                }
            }
            Op::Netdev(n) => {
                if let Some(at) = self.nth(n) {
                    self.netdevs += 1;
                    let name = format!("usb{}", self.netdevs);
                    self.b
                        .netdev(&at.to_string(), 0, &name, self.netdevs)
                        .unwrap();
                    let dir = self.present[&at].0.clone();
                    self.event(&format!("{dir}/{at}:1.0/net/{name}"));
                }
            }
            Op::Handle => {}
        }
    }

    /// The daemon's turn: patch the kept picture with every pending device.
    fn handle(&mut self, kept: &mut Snapshot) -> Result<(), PatchFailed> {
        let pending = std::mem::take(&mut self.pending);
        patch(&self.root, kept, &pending).map(|_| ())
    }
}

/// What a scan and a patched picture must agree on (warnings are logged, not compared).
fn picture(s: &Snapshot) -> String {
    serde_json::to_string_pretty(&(&s.controllers, &s.buses, &s.devices)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_picture_patched_per_uevent_equals_a_full_scan(ops in proptest::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        let mut kept = scan(&world.root);

        for op in &ops {
            world.apply(op);
            if matches!(op, Op::Handle) {
                world.handle(&mut kept).unwrap();
                prop_assert_eq!(picture(&kept), picture(&scan(&world.root)), "after {:?}", ops);
            }
        }
        world.handle(&mut kept).unwrap();

        let full = scan(&world.root);
        prop_assert!(full.warnings.is_empty(), "{:?}", full.warnings);
        prop_assert_eq!(picture(&kept), picture(&full));
    }
}

#[test]
fn a_device_on_a_bus_the_picture_lacks_asks_for_a_full_scan() {
    let mut world = World::new();
    let mut kept = scan(&world.root);
    kept.buses.retain(|b| b.number != 2);
    world.plug("2-1".parse().unwrap(), false);
    let before = picture(&kept);

    let patched = world.handle(&mut kept);

    assert_eq!(
        patched,
        Err(PatchFailed::UnknownBus("2-1".parse().unwrap()))
    );
    assert_eq!(
        picture(&kept),
        before,
        "a failed patch leaves the picture as it was"
    );
}

#[test]
fn an_event_read_late_for_a_hub_already_gone_drops_its_whole_subtree() {
    let mut world = World::new();
    world.apply(&Op::Plug {
        hub: 0,
        port: 2,
        children: Some(vec![1, 3]),
    });
    world.handle(&mut scan(&world.root)).unwrap();
    let mut kept = scan(&world.root);
    assert_eq!(kept.devices.len(), 3);
    world.unplug(&"1-2".parse().unwrap());
    // Only the hub's own event is handled: its children go with it all the same.
    world.pending = ["1-2".parse().unwrap()].into();

    world.handle(&mut kept).unwrap();

    assert!(kept.devices.is_empty());
}
