//! Properties of the plan over random devices, rules and VM states.

use crate::policy_support;

use policy_support::{device, hub, with_id};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use usbroute::backend::{AttachMode, Capabilities};
use usbroute::inventory::Device;
use usbroute::policy::{plan, Placement, PlanInput, Reason, Rule, RuleAction};

const PORTS: [&str; 6] = ["1-1", "1-2", "1-3", "1-3.1", "1-3.2", "2-1"];
const SELECTORS: [&str; 7] = [
    "port:1-1",
    "hub:1-3",
    "id:046d:*",
    "id:0781:5567",
    "class:03",
    "port:1-3",
    "1-3.1",
];
const MODES: [AttachMode; 3] = [AttachMode::Address, AttachMode::Port, AttachMode::Id];

fn devices() -> impl Strategy<Value = Vec<Device>> {
    prop::collection::btree_map(
        0..PORTS.len(),
        (0..3u8, any::<bool>(), any::<bool>()),
        0..=PORTS.len(),
    )
    .prop_map(|m| {
        m.into_iter()
            .enumerate()
            .map(|(n, (port, (kind, nic, disk)))| {
                let address = n as u16 + 2;
                let mut d = match kind {
                    0 => device(PORTS[port], address),
                    1 => with_id(device(PORTS[port], address), 0x0781, 0x5567),
                    _ => hub(PORTS[port], address),
                };
                d.netdevs = if nic { vec!["usb0".into()] } else { vec![] };
                d.block_devices = if disk { vec![format!("sd{n}")] } else { vec![] };
                d
            })
            .collect()
    })
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    prop::collection::vec(
        (
            0..SELECTORS.len(),
            prop::option::weighted(0.8, 0..2usize),
            0..3usize,
            0..3i64,
            any::<bool>(),
        ),
        0..6,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (sel, vm, mode, priority, force))| {
                let selector = SELECTORS[sel].parse().expect("selector");
                let mut r = match vm {
                    Some(v) => Rule::pass(i, selector, ["a", "b"][v], MODES[mode]),
                    None => Rule::forbid(i, selector),
                };
                r.priority = priority;
                r.force = force;
                r
            })
            .collect()
    })
}

#[derive(Debug)]
struct World {
    devices: Vec<Device>,
    rules: Vec<Rule>,
    up: BTreeSet<String>,
    mounted: BTreeSet<String>,
}

fn world() -> impl Strategy<Value = World> {
    (
        devices(),
        rules(),
        any::<(bool, bool)>(),
        prop::collection::btree_set(0..6usize, 0..3),
    )
        .prop_map(|(devices, rules, (a, b), mounted)| World {
            devices,
            rules,
            up: [("a", a), ("b", b)]
                .into_iter()
                .filter(|(_, u)| *u)
                .map(|(n, _)| n.to_string())
                .collect(),
            mounted: mounted.into_iter().map(|n| format!("sd{n}")).collect(),
        })
}

fn run(w: &World, devices: &[Device]) -> usbroute::policy::Desired {
    run_with(w, devices, &BTreeMap::new())
}

/// VM `b`'s backend attaches by address only (as Xen's does).
fn b_by_address_only() -> BTreeMap<String, Capabilities> {
    let caps = Capabilities {
        backend: "xen".into(),
        modes: [AttachMode::Address].into(),
        follows_by_address: false,
    };
    [("b".to_string(), caps)].into()
}

/// VM `b`'s backend attaches by address only and follows ports and kinds itself (Xen's).
fn b_following_by_address() -> BTreeMap<String, Capabilities> {
    let mut backends = b_by_address_only();
    backends
        .values_mut()
        .for_each(|c| c.follows_by_address = true);
    backends
}

fn run_with(
    w: &World,
    devices: &[Device],
    backends: &BTreeMap<String, Capabilities>,
) -> usbroute::policy::Desired {
    plan(&PlanInput {
        rules: &w.rules,
        devices,
        mounted_disks: &w.mounted,
        vms_up: &w.up,
        backends,
        overrides: &BTreeMap::new(),
        follows: &BTreeMap::new(),
        controllers_owned: &BTreeMap::new(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn plan_does_not_depend_on_device_order(w in world()) {
        let reversed: Vec<Device> = w.devices.iter().rev().cloned().collect();
        prop_assert_eq!(run(&w, &w.devices), run(&w, &reversed));
    }

    #[test]
    fn plan_respects_hubs_forbids_protections_and_running_vms(w in world()) {
        let desired = run(&w, &w.devices);
        for d in &w.devices {
            let Placement::Vm { vm, mode } = &desired.devices[&d.port].placement else { continue };
            let matching: Vec<&Rule> = w.rules.iter().filter(|r| r.selector.matches(d)).collect();
            let decider = matching.iter().filter(|r| matches!(&r.action, RuleAction::Pass { vm: v, mode: m } if v == vm && m == mode)).map(|r| r.priority).max();
            let top = matching.iter().filter(|r| r.action != RuleAction::Forbid).map(|r| r.priority).max();
            let forced = matching.iter().any(|r| r.force && matches!(&r.action, RuleAction::Pass { vm: v, .. } if v == vm));
            let mounted = d.block_devices.iter().any(|b| w.mounted.contains(b));
            prop_assert!(!d.hub, "hub {} placed on {vm}", d.port);
            prop_assert!(w.up.contains(vm), "{} placed on stopped VM {vm}", d.port);
            prop_assert!(!matching.iter().any(|r| r.action == RuleAction::Forbid), "forbidden {} placed", d.port);
            prop_assert!(forced || (d.netdevs.is_empty() && !mounted), "protected {} placed without force", d.port);
            prop_assert_eq!(decider, top, "{} not placed by a top-priority rule", d.port);
        }
    }

    #[test]
    fn plan_places_each_kind_by_id_on_at_most_one_device(w in world()) {
        let desired = run(&w, &w.devices);
        let mut by_kind: BTreeMap<(Option<u16>, Option<u16>), Vec<&Placement>> = BTreeMap::new();
        for d in &w.devices {
            by_kind.entry((d.vendor_id.map(|v| v.0), d.product_id.map(|p| p.0))).or_default().push(&desired.devices[&d.port].placement);
        }
        for placements in by_kind.values() {
            let by_id = placements.iter().filter(|p| matches!(p, Placement::Vm { mode: AttachMode::Id, .. })).count();
            let on_vm = placements.iter().filter(|p| matches!(p, Placement::Vm { .. })).count();
            prop_assert!(by_id == 0 || on_vm == 1, "a kind attached by id shares with {on_vm} placed devices");
        }
    }

    #[test]
    fn a_backend_that_follows_by_address_gets_what_it_would_get_by_any_mode_but_by_address(w in world()) {
        let unlimited = run(&w, &w.devices);
        let following = run_with(&w, &w.devices, &b_following_by_address());
        for d in &w.devices {
            let was = &unlimited.devices[&d.port].placement;
            let now = &following.devices[&d.port].placement;
            match was {
                // Unless another VM's by-id device now claims the kind first (by port):
                // b's device, placed by address, claims none of its own.
                Placement::Vm { vm, .. } if vm == "b" => {
                    let claimed = matches!(&following.devices[&d.port].reason, Reason::KindClaimed { vm, .. } if vm != "b");
                    prop_assert!(claimed || now == &Placement::Vm { vm: "b".into(), mode: AttachMode::Address }, "{}: {:?}", d.port, now);
                }
                // By id, QEMU lets one device claim a kind; by address every plug goes, so
                // b's devices claim no kind and another VM's by-id device may go now.
                _ if matches!(unlimited.devices[&d.port].reason, Reason::KindClaimed { .. }) => {
                    prop_assert!(matches!(following.devices[&d.port].reason, Reason::Rule { .. } | Reason::Followed { .. } | Reason::KindClaimed { .. }), "{}", d.port);
                }
                other => prop_assert_eq!(now, other, "{}", d.port),
            }
        }
    }

    #[test]
    fn a_backend_limited_to_address_gets_only_address_and_the_rest_stays_home_with_the_reason(w in world()) {
        let unlimited = run(&w, &w.devices);
        let limited = run_with(&w, &w.devices, &b_by_address_only());
        for d in &w.devices {
            let was = &unlimited.devices[&d.port].placement;
            let now = &limited.devices[&d.port];
            let is_b_by_other = |p: &Placement| matches!(p, Placement::Vm { vm, mode } if vm == "b" && *mode != AttachMode::Address);
            prop_assert!(!is_b_by_other(&now.placement), "{} placed on b by a mode b lacks", d.port);
            if is_b_by_other(was) {
                let unsupported = matches!(&now.reason, Reason::ModeUnsupported { vm, .. } if vm == "b");
                prop_assert!(now.placement == Placement::Host && unsupported, "{} went elsewhere: {:?}", d.port, now);
            }
            if matches!(was, Placement::Vm { vm, .. } if vm == "b") && !is_b_by_other(was) {
                prop_assert_eq!(&now.placement, was, "{} by address to b changed", d.port);
            }
        }
    }
}
