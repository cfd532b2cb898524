//! Cost of the pure core at daemon scale: plan over 512 devices, 200 rules, 64 VMs, and
//! the diff against 64 VMs' holdings, side by side with a baseline: matching every rule's
//! selector against every device, the least any rule engine must do.
//!
//! `cargo bench --bench policy` (release); under `cargo test` it runs once as a smoke test.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::{Duration, Instant};
use usbroute::backend::{AttachKey, AttachMode, HostMatch, VmUsbDevice};
use usbroute::engine::{reconcile, Actual, VmView};
use usbroute::inventory::{ClassTriple, Device, HexId, Interface, PortPath};
use usbroute::policy::{plan, Placement, PlanInput, Rule};

const DEVICES: usize = 512;
const RULES: usize = 200;
const VMS: usize = 64;

fn device(n: usize) -> Device {
    let bus = (n / 100 + 1) as u8;
    let port = PortPath {
        bus,
        ports: vec![(n % 10 + 1) as u8, (n / 10 % 10 + 1) as u8],
    };
    Device {
        bus,
        address: Some((n % 100 + 2) as u16),
        vendor_id: Some(HexId(0x1000 + (n % 50) as u16)),
        product_id: Some(HexId(n as u16)),
        serial: Some(format!("S{n}")),
        class: Some(ClassTriple {
            class: 0,
            subclass: 0,
            protocol: 0,
        }),
        interfaces: vec![Interface {
            number: 0,
            class: Some(ClassTriple {
                class: (n % 12) as u8,
                subclass: 1,
                protocol: 1,
            }),
            driver: None,
        }],
        ..Device::at(port)
    }
}

fn rules() -> Vec<Rule> {
    (0..RULES)
        .map(|i| {
            let text = match i % 4 {
                0 => format!("port:{}", device(i * 2).port),
                1 => format!("id:{:04x}:*", 0x1000 + i % 50),
                2 => format!("serial:S{}", i * 2 + 1),
                _ => format!("class:{:02x},hub:{}-{}", i % 12, i % 5 + 1, i % 10 + 1),
            };
            let mut r = Rule::pass(
                i,
                text.parse().expect("selector"),
                &format!("vm{}", i % VMS),
                AttachMode::Port,
            );
            r.priority = i as i64; // distinct: the highest matching priority decides
            r
        })
        .collect()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time(iterations: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..iterations)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let iterations = if smoke { 1 } else { 51 };
    let devices: Vec<Device> = (0..DEVICES).map(device).collect();
    let rules = rules();
    let up: BTreeSet<String> = (0..VMS).map(|i| format!("vm{i}")).collect();
    let (mounted, overrides, owned) = (BTreeSet::new(), BTreeMap::new(), BTreeMap::new());
    let input = PlanInput {
        rules: &rules,
        devices: &devices,
        mounted_disks: &mounted,
        vms_up: &up,
        backends: &Default::default(),
        overrides: &overrides,
        follows: &Default::default(),
        controllers_owned: &owned,
    };

    let baseline = time(iterations, || {
        let hits = devices
            .iter()
            .map(|d| rules.iter().filter(|r| r.selector.matches(d)).count())
            .sum::<usize>();
        black_box(hits);
    });
    let plan_time = time(iterations, || {
        black_box(plan(black_box(&input)));
    });

    // Every VM already holds what the plan wants: the diff must find nothing to do.
    let desired = plan(&input);
    let mut actual: Actual = up
        .iter()
        .map(|vm| {
            (
                vm.clone(),
                VmView {
                    devices: vec![],
                    reachable: true,
                },
            )
        })
        .collect();
    for (port, decision) in &desired.devices {
        if let Placement::Vm { vm, mode } = &decision.placement {
            let d = devices.iter().find(|d| &d.port == port).expect("device");
            let key = AttachKey::of(*mode, d).expect("key");
            let entry = VmUsbDevice {
                id: usbroute::backend::qemu::ids::device_id(&key),
                attached: true,
                key: Some(key),
                matcher: HostMatch::Other {},
            };
            actual.get_mut(vm).expect("vm").devices.push(entry);
        }
    }
    let diff_time = time(iterations, || {
        let actions = reconcile(black_box(&desired), black_box(&actual), &devices);
        assert!(actions.is_empty());
    });

    let placed = desired
        .devices
        .values()
        .filter(|d| d.placement != Placement::Host)
        .count();
    println!("policy bench: {DEVICES} devices, {RULES} rules, {VMS} VMs ({placed} devices placed on VMs), median of {iterations}");
    println!("  baseline: match every rule against every device  {baseline:>12.3?}");
    println!(
        "  plan (decisions + reasons)                       {plan_time:>12.3?}  ({:.2}x baseline)",
        ratio(plan_time, baseline)
    );
    println!(
        "  reconcile, everything already right              {diff_time:>12.3?}  ({:.2}x baseline)",
        ratio(diff_time, baseline)
    );
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}
