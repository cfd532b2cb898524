//! Inventory benchmark: `scan` and the `list` renderings over a generated sysfs tree with
//! 1,000 devices (5 xHCI controllers, 10 buses, hubs nested two deep), against a baseline
//! that does the least any reader must: list `/sys/bus/usb/devices`, resolve each link
//! and read one attribute.
//!
//! Then the daemon's per-uevent path beside the full scan it replaces, in the same
//! interleaved rounds: `inventory::patch` reading one added device into a kept picture,
//! against `scan`, on the recorded fixture `tests/fixtures/guest-xhci-ehci` and on a
//! generated tree of 512 devices.
//!
//! Run: `cargo bench --bench inventory` (optionally `-- ITERATIONS`). Under `cargo test`
//! (no `--bench` argument) it runs 3 iterations as a smoke test.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};
use usbroute::inventory::render::{self, Listing};
use usbroute::inventory::synth::{PciFunction, SysfsBuilder, UsbDevice};
use usbroute::inventory::{patch, scan, Snapshot};
use usbroute::sysfs::SysfsRoot;

const DEVICES: usize = 1_000;
/// The generated tree the per-uevent patch is timed on.
const PATCH_DEVICES: usize = 512;
const CONTROLLERS: u8 = 5;
const HUB_PORTS: u8 = 8;
/// Root ports used per bus: 6 ports × 17 devices × 10 buses just exceeds `DEVICES`.
const ROOT_PORTS: u8 = 6;

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(if smoke { 3 } else { 200 });
    let dir = tempfile::tempdir().expect("temp dir");
    let made = generate(dir.path(), DEVICES);
    let root = SysfsRoot::new(dir.path());
    let snapshot = scan(&root);
    assert_eq!(
        snapshot.devices.len(),
        made,
        "scan must see every generated device"
    );
    assert!(snapshot.warnings.is_empty(), "{:?}", snapshot.warnings);
    println!(
        "fixture: {} devices ({} hubs), {} buses, {} controllers; {iterations} iterations each",
        snapshot.devices.len(),
        snapshot.devices.iter().filter(|d| d.hub).count(),
        snapshot.buses.len(),
        snapshot.controllers.len()
    );

    // Interleaved: every round runs each case once, so a busy machine (these run on
    // shared cores) slows all cases alike and the ratios stay meaningful.
    let mut cases: Vec<Case> = vec![
        (
            "baseline: list + readlink + 1 attr",
            Box::new(|| minimal_walk(dir.path())),
        ),
        ("scan", Box::new(|| scan(&root).devices.len())),
        (
            "render list --json",
            Box::new(|| {
                serde_json::to_string_pretty(&Listing::from(&snapshot))
                    .unwrap()
                    .len()
            }),
        ),
        (
            "render list tree",
            Box::new(|| render::tree(&snapshot).len()),
        ),
        (
            "scan + list --json",
            Box::new(|| {
                let s: Snapshot = scan(&root);
                serde_json::to_string_pretty(&Listing::from(&s))
                    .unwrap()
                    .len()
            }),
        ),
    ];
    let stats = measure(iterations, &mut cases);
    let baseline = &stats[0];
    for ((name, _), s) in cases.iter().zip(&stats) {
        let with_ratio = name.starts_with("scan").then_some(baseline);
        report(name, s, with_ratio, made);
    }
    per_uevent(iterations);
}

/// One added device read into a kept picture, beside a full scan of the same tree.
fn per_uevent(iterations: usize) {
    let fixture = SysfsRoot::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-xhci-ehci"),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    assert_eq!(generate(dir.path(), PATCH_DEVICES), PATCH_DEVICES);
    let generated = SysfsRoot::new(dir.path());
    let mut fixture_added = AddOne::new(&fixture);
    let mut generated_added = AddOne::new(&generated);
    println!(
        "per uevent: guest-xhci-ehci (recorded, {} devices) and a generated tree ({} devices); the added device is {} and {}",
        fixture_added.kept.devices.len() + 1,
        generated_added.kept.devices.len() + 1,
        fixture_added.port,
        generated_added.port,
    );
    let fixture_devices = fixture_added.kept.devices.len() + 1;
    let mut cases: Vec<Case> = vec![
        ("fixture: scan", Box::new(|| scan(&fixture).devices.len())),
        (
            "fixture: patch one added device",
            Box::new(|| fixture_added.run()),
        ),
        ("512: scan", Box::new(|| scan(&generated).devices.len())),
        (
            "512: patch one added device",
            Box::new(|| generated_added.run()),
        ),
    ];
    let stats = measure(iterations, &mut cases);
    for (pair, devices) in [(0, fixture_devices), (2, PATCH_DEVICES)] {
        let (scan, patched) = (&stats[pair], &stats[pair + 1]);
        report(cases[pair].0, scan, None, devices);
        report(cases[pair + 1].0, patched, None, 1);
        println!(
            "{:<36} scan / patch: {:.1}x at p50, {:.1}x mean",
            "",
            scan.p50.as_secs_f64() / patched.p50.as_secs_f64(),
            scan.mean.as_secs_f64() / patched.mean.as_secs_f64()
        );
    }
}

/// A kept picture that lacks one leaf device of its tree, as it is between the device's
/// plug and its uevent: each run patches it in, then takes it out again (a `Vec::remove`,
/// which is all the undoing costs).
struct AddOne<'a> {
    root: &'a SysfsRoot,
    kept: Snapshot,
    port: usbroute::inventory::PortPath,
}

impl<'a> AddOne<'a> {
    fn new(root: &'a SysfsRoot) -> Self {
        // (A recording lacks what no command reads, non-USB PCI classes among it: the
        // scan warns about those; the patch reads USB devices only and must not warn.)
        let kept = scan(root);
        let port = kept
            .devices
            .iter()
            .rev()
            .find(|d| !d.hub)
            .expect("a leaf device")
            .port
            .clone();
        let mut added = AddOne { root, kept, port };
        added.take_out();
        added
    }

    fn take_out(&mut self) {
        let at = self.kept.devices.iter().position(|d| d.port == self.port);
        std::sync::Arc::make_mut(&mut self.kept.devices).remove(at.expect("the added device"));
    }

    fn run(&mut self) -> usize {
        let patched = patch(self.root, &mut self.kept, [&self.port]).expect("patch");
        assert!(patched.changed && patched.warnings.is_empty());
        self.take_out();
        self.kept.devices.len()
    }
}

/// Build the tree: per controller a USB 2 and a USB 3 bus; on each root port a hub whose
/// port 1 holds another hub; leaves fill the remaining ports until `DEVICES` exist.
fn generate(dir: &Path, devices: usize) -> usize {
    let b = SysfsBuilder::new(dir);
    let mut count = 0;
    let mut names: Vec<String> = Vec::new();
    'all: for c in 0..CONTROLLERS {
        let pci = format!("0000:00:{:02x}.0", 0x10 + c);
        b.pci(&PciFunction::qemu_xhci(&pci, Some(u32::from(c))))
            .expect("pci");
        for (bus, speed, version) in [(2 * c + 1, "480", "2.00"), (2 * c + 2, "5000", "3.00")] {
            b.bus(&pci, bus, speed, version, ROOT_PORTS).expect("bus");
            let mut devnum = 1;
            for root_port in 1..=ROOT_PORTS {
                let hub = format!("{bus}-{root_port}");
                let nested = format!("{hub}.1");
                names.clear();
                names.push(hub.clone());
                names.push(nested.clone());
                names.extend((1..=HUB_PORTS).map(|p| format!("{nested}.{p}")));
                names.extend((2..=HUB_PORTS).map(|p| format!("{hub}.{p}")));
                for name in &names {
                    if count == devices {
                        break 'all;
                    }
                    devnum += 1;
                    let is_hub = *name == hub || *name == nested;
                    let serial = format!("SN{count:05}");
                    b.device(&UsbDevice {
                        port: name,
                        devnum,
                        vendor: if is_hub { 0x0409 } else { 0x046d },
                        product: if is_hub { 0x55aa } else { 0xc016 },
                        class: if is_hub { 9 } else { 0 },
                        speed,
                        manufacturer: Some("Maker"),
                        product_name: Some(if is_hub { "Hub" } else { "Mouse" }),
                        serial: (count % 2 == 0).then_some(serial.as_str()),
                        interfaces: vec![if is_hub {
                            (9, Some("hub"))
                        } else {
                            (3, Some("usbhid"))
                        }],
                    })
                    .expect("device");
                    count += 1;
                }
            }
        }
    }
    count
}

/// The least a reader must do: one listing, one readlink and one attribute per device.
fn minimal_walk(dir: &Path) -> usize {
    let devices = dir.join("sys/bus/usb/devices");
    let mut n = 0;
    for entry in std::fs::read_dir(&devices).expect("listing") {
        let entry = entry.expect("entry");
        let target = std::fs::read_link(entry.path()).expect("link");
        if std::fs::read(devices.join(target).join("speed")).is_ok() {
            n += 1;
        }
    }
    n
}

/// A named thing to time; returns a size so the work cannot be optimised away.
type Case<'a> = (&'static str, Box<dyn FnMut() -> usize + 'a>);

struct Stats {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

/// Per case: mean, p50 and p99 over `iterations` interleaved rounds (after 10 warm-up rounds).
fn measure(iterations: usize, cases: &mut [Case]) -> Vec<Stats> {
    for _ in 0..10 {
        for (_, f) in cases.iter_mut() {
            black_box(f());
        }
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(iterations); cases.len()];
    for _ in 0..iterations {
        for ((_, f), t) in cases.iter_mut().zip(&mut times) {
            let start = Instant::now();
            black_box(f());
            t.push(start.elapsed());
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_unstable();
            let total: Duration = t.iter().sum();
            let pick = |q: f64| t[((t.len() as f64 * q) as usize).min(t.len() - 1)];
            Stats {
                mean: total / iterations as u32,
                p50: pick(0.50),
                p99: pick(0.99),
            }
        })
        .collect()
}

fn report(name: &str, s: &Stats, baseline: Option<&Stats>, devices: usize) {
    let ratio = baseline.map_or(String::new(), |b| {
        format!(
            "  ({:.1}x baseline)",
            s.mean.as_secs_f64() / b.mean.as_secs_f64()
        )
    });
    println!(
        "{name:<36} mean {:>9.3} ms  p50 {:>9.3} ms  p99 {:>9.3} ms  per device {:>7.2} µs{ratio}",
        ms(s.mean),
        ms(s.p50),
        ms(s.p99),
        s.mean.as_secs_f64() * 1e6 / devices as f64
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
