//! A rule's `follow`: the plan with follow bindings (the followed rule counts as matching
//! that plug at its own rank), its properties, and the engine's bookkeeping of departures
//! and bindings ([`Follows`]) on an explicit clock.

use crate::policy_support;

use policy_support::{device, placed, with_id};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};
use usbroute::backend::{AttachMode, Capabilities};
use usbroute::engine::{DeviceChange, Follows, Moment};
use usbroute::inventory::{Device, PciAddress, PortPath};
use usbroute::policy::{
    plan, why, Departed, Desired, Follow, Override, Placement, PlanInput, Reason, Rule, RuleMatch,
};

const WINDOW: Duration = Duration::from_secs(10);

fn p(s: &str) -> PortPath {
    s.parse().expect("port")
}

/// Pass `sel` to `vm` by address, following for [`WINDOW`].
fn following(index: usize, sel: &str, vm: &str) -> Rule {
    let mut r = Rule::pass(
        index,
        sel.parse().expect("selector"),
        vm,
        AttachMode::Address,
    );
    r.follow = Some(WINDOW);
    r
}

/// The mouse (046d:c016) at `port`, placed on the xHCI.
fn mouse(port: &str, address: u16) -> Device {
    placed(device(port, address))
}

/// A bootloader (0483:df11, a DFU device) at `port`.
fn bootloader(port: &str, address: u16) -> Device {
    placed(with_id(device(port, address), 0x0483, 0xdf11))
}

/// The mouse at `1-3` left, and the rule `rule` to `vm` follows the plug at `port` (with
/// `address`) for it.
fn binding(port: &str, address: u16, rule: usize, vm: &str) -> (PortPath, Follow) {
    let gone = mouse("1-3", 4);
    let follow = Follow {
        address: Some(address),
        rule,
        vm: vm.into(),
        previous: Departed {
            port: gone.port,
            physical_port: gone.physical_port.expect("placed"),
            vendor_id: gone.vendor_id,
            product_id: gone.product_id,
            left_at: "2026-12-01T19:55:04Z".into(),
        },
        after_ms: 1250,
    };
    (p(port), follow)
}

fn plan_with(rules: &[Rule], devices: &[Device], follows: &BTreeMap<PortPath, Follow>) -> Desired {
    let up: BTreeSet<String> = ["a", "b"].map(String::from).into();
    plan(&input(rules, devices, follows, &up))
}

fn input<'a>(
    rules: &'a [Rule],
    devices: &'a [Device],
    follows: &'a BTreeMap<PortPath, Follow>,
    up: &'a BTreeSet<String>,
) -> PlanInput<'a> {
    static MOUNTED: BTreeSet<String> = BTreeSet::new();
    static BACKENDS: BTreeMap<String, Capabilities> = BTreeMap::new();
    static OVERRIDES: BTreeMap<PortPath, Override> = BTreeMap::new();
    static OWNED: BTreeMap<PciAddress, String> = BTreeMap::new();
    PlanInput {
        rules,
        devices,
        mounted_disks: &MOUNTED,
        vms_up: up,
        backends: &BACKENDS,
        overrides: &OVERRIDES,
        follows,
        controllers_owned: &OWNED,
    }
}

fn on(vm: &str) -> Placement {
    Placement::Vm {
        vm: vm.into(),
        mode: AttachMode::Address,
    }
}

#[test]
fn a_device_with_other_ids_on_the_followed_port_goes_to_the_followed_rules_vm() {
    let rules = [following(0, "id:046d:c016", "a")];
    let devices = [bootloader("1-3", 7)];
    let follows = BTreeMap::from([binding("1-3", 7, 0, "a")]);

    let d = &plan_with(&rules, &devices, &follows).devices[&p("1-3")];

    assert_eq!(d.placement, on("a"));
    let Reason::Followed {
        rule,
        previous,
        after_ms,
    } = &d.reason
    else {
        panic!("not followed: {:?}", d.reason);
    };
    assert_eq!(
        (rule.index, previous.port.to_string(), *after_ms),
        (0, "1-3".into(), 1250)
    );
}

#[test]
fn without_a_binding_the_bootloader_stays_home() {
    let rules = [following(0, "id:046d:c016", "a")];
    let devices = [bootloader("1-3", 7)];

    let d = &plan_with(&rules, &devices, &BTreeMap::new()).devices[&p("1-3")];

    assert_eq!(
        (&d.placement, &d.reason),
        (&Placement::Host, &Reason::NoRule)
    );
}

#[test]
fn a_forbid_rule_beats_a_follow() {
    let rules = [
        following(0, "id:046d:c016", "a"),
        Rule::forbid(1, "id:0483:*".parse().expect("selector")),
    ];
    let devices = [bootloader("1-3", 7)];
    let follows = BTreeMap::from([binding("1-3", 7, 0, "a")]);

    let d = &plan_with(&rules, &devices, &follows).devices[&p("1-3")];

    assert_eq!(d.placement, Placement::Host);
    assert!(matches!(&d.reason, Reason::Forbidden { rule } if rule.index == 1));
}

#[test]
fn a_rule_ranked_above_the_followed_one_decides() {
    let mut dfu = Rule::pass(
        1,
        "id:0483:df11".parse().expect("selector"),
        "b",
        AttachMode::Address,
    );
    dfu.priority = 5;
    let rules = [following(0, "id:046d:c016", "a"), dfu];
    let devices = [bootloader("1-3", 7)];
    let follows = BTreeMap::from([binding("1-3", 7, 0, "a")]);

    let d = &plan_with(&rules, &devices, &follows).devices[&p("1-3")];

    assert_eq!(d.placement, on("b"));
    assert!(matches!(&d.reason, Reason::Rule { rule, .. } if rule.index == 1));
}

#[test]
fn the_followed_rule_outranks_a_lower_rule_that_matches_the_new_ids() {
    let mut dfu = Rule::pass(
        1,
        "id:0483:df11".parse().expect("selector"),
        "b",
        AttachMode::Address,
    );
    dfu.priority = -1;
    let rules = [following(0, "id:046d:c016", "a"), dfu];
    let devices = [bootloader("1-3", 7)];
    let follows = BTreeMap::from([binding("1-3", 7, 0, "a")]);

    let d = &plan_with(&rules, &devices, &follows).devices[&p("1-3")];

    assert_eq!(d.placement, on("a"));
}

#[test]
fn a_binding_holds_only_for_its_plug_and_its_physical_port() {
    let rules = [following(0, "id:046d:c016", "a")];
    let mut elsewhere = bootloader("1-3", 7);
    elsewhere.physical_port = Some("0000:00:1d.0/3".parse().expect("physical port"));
    let follows = BTreeMap::from([binding("1-3", 7, 0, "a")]);

    let replugged = plan_with(&rules, &[bootloader("1-3", 8)], &follows);
    let moved = plan_with(&rules, &[elsewhere], &follows);

    assert_eq!(replugged.devices[&p("1-3")].placement, Placement::Host);
    assert_eq!(moved.devices[&p("1-3")].placement, Placement::Host);
}

#[test]
fn a_binding_to_a_rule_that_lost_follow_or_changed_vm_is_ignored() {
    let no_follow = [Rule::pass(
        0,
        "id:046d:c016".parse().expect("selector"),
        "a",
        AttachMode::Address,
    )];
    let other_vm = [following(0, "id:046d:c016", "b")];
    let devices = [bootloader("1-3", 7)];
    let follows = BTreeMap::from([binding("1-3", 7, 0, "a")]);

    let without = plan_with(&no_follow, &devices, &follows);
    let moved = plan_with(&other_vm, &devices, &follows);

    assert_eq!(without.devices[&p("1-3")].placement, Placement::Host);
    assert_eq!(moved.devices[&p("1-3")].placement, Placement::Host);
}

#[test]
fn why_marks_the_followed_rule_as_deciding_and_names_what_it_followed() {
    let rules = [following(0, "id:046d:c016", "a")];
    let devices = [bootloader("1-3", 7)];
    let follows = BTreeMap::from([binding("1-3", 7, 0, "a")]);
    let up: BTreeSet<String> = ["a"].map(String::from).into();

    let w = why(&input(&rules, &devices, &follows, &up), &devices[0]);

    assert_eq!(w.rules[0].1, RuleMatch::Decided);
    let text = w.decision.reason.to_string();
    assert!(
        text.contains("followed the device it gave the VM, which left 0000:00:14.0/3 (port 1-3, 046d:c016) at 2026-12-01T19:55:04Z")
            && text.contains("1.250 s later")
            && text.contains("follow = \"10s\""),
        "{text}"
    );
}

// The engine's half: departures and bindings on an explicit clock.

fn at(secs: f64) -> Moment {
    Moment {
        now: Duration::from_secs_f64(secs),
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_618_904),
    }
}

/// The plan for `devices` under `rules` (what the engine published before the change).
fn decided(rules: &[Rule], devices: &[Device], follows: &Follows) -> Desired {
    plan_with(rules, devices, follows.bindings())
}

/// Tell `follows` the devices went from `before` to `after` at `when`.
fn change(follows: &mut Follows, rules: &[Rule], before: &[Device], after: &[Device], when: f64) {
    let decided = decided(rules, before, follows);
    let change = DeviceChange {
        before,
        after,
        decided: &decided,
        rules,
    };
    follows.devices_changed(&change, at(when));
}

#[test]
fn a_device_appearing_within_the_window_is_bound_until_its_plug_leaves() {
    let rules = [following(0, "id:046d:c016", "a")];
    let mut follows = Follows::default();
    let (old, new) = ([mouse("1-3", 4)], [bootloader("1-3", 7)]);

    change(&mut follows, &rules, &[], &old, 0.0);
    change(&mut follows, &rules, &old, &[], 1.0);
    change(&mut follows, &rules, &[], &new, 10.9);
    let bound = follows.bindings().get(&p("1-3")).cloned();
    change(&mut follows, &rules, &new, &new, 60.0);
    let still = follows.bindings().contains_key(&p("1-3"));
    change(&mut follows, &rules, &new, &[], 61.0);

    let bound = bound.expect("bound");
    assert_eq!(
        (bound.address, bound.rule, bound.vm.as_str(), bound.after_ms),
        (Some(7), 0, "a", 9900)
    );
    assert_eq!(bound.previous.left_at, "2025-12-01T19:55:04Z");
    assert!(still, "a binding ended before its plug left");
    assert!(follows.bindings().is_empty(), "a binding outlived its plug");
}

#[test]
fn a_device_appearing_after_the_window_is_not_bound() {
    let rules = [following(0, "id:046d:c016", "a")];
    let mut follows = Follows::default();
    let (old, new) = ([mouse("1-3", 4)], [bootloader("1-3", 7)]);

    change(&mut follows, &rules, &[], &old, 0.0);
    change(&mut follows, &rules, &old, &[], 1.0);
    change(&mut follows, &rules, &[], &new, 11.1);

    assert!(follows.bindings().is_empty());
}

#[test]
fn a_re_enumeration_seen_in_one_rescan_is_followed() {
    let rules = [following(0, "id:046d:c016", "a")];
    let mut follows = Follows::default();

    change(&mut follows, &rules, &[], &[mouse("1-3", 4)], 0.0);
    change(
        &mut follows,
        &rules,
        &[mouse("1-3", 4)],
        &[bootloader("1-3", 5)],
        0.5,
    );

    assert_eq!(follows.bindings()[&p("1-3")].address, Some(5));
}

#[test]
fn no_departure_is_remembered_without_follow_or_for_a_device_left_on_the_host() {
    let plain = [Rule::pass(
        0,
        "id:046d:c016".parse().expect("selector"),
        "a",
        AttachMode::Address,
    )];
    let elsewhere = [following(0, "id:046d:c016", "c")]; // VM c is not running
    let mut a = Follows::default();
    let mut b = Follows::default();
    let (old, new) = ([mouse("1-3", 4)], [bootloader("1-3", 7)]);

    for (follows, rules) in [(&mut a, &plain[..]), (&mut b, &elsewhere[..])] {
        change(follows, rules, &[], &old, 0.0);
        change(follows, rules, &old, &[], 1.0);
        change(follows, rules, &[], &new, 2.0);
    }

    assert!(a.bindings().is_empty() && b.bindings().is_empty());
}

#[test]
fn a_followed_device_that_leaves_is_followed_again() {
    let rules = [following(0, "id:046d:c016", "a")];
    let mut follows = Follows::default();
    let (app, dfu, back) = (
        [mouse("1-3", 4)],
        [bootloader("1-3", 5)],
        [placed(with_id(device("1-3", 6), 0x1209, 0x0001))],
    );

    change(&mut follows, &rules, &[], &app, 0.0);
    change(&mut follows, &rules, &app, &dfu, 1.0);
    change(&mut follows, &rules, &dfu, &back, 5.0);

    let bound = &follows.bindings()[&p("1-3")];
    assert_eq!(
        (bound.address, bound.previous.product_id.map(|h| h.0)),
        (Some(6), Some(0xdf11))
    );
}

#[test]
fn a_device_on_another_physical_port_is_not_bound() {
    let rules = [following(0, "id:046d:c016", "a")];
    let mut follows = Follows::default();
    let old = [mouse("1-3", 4)];

    change(&mut follows, &rules, &[], &old, 0.0);
    change(&mut follows, &rules, &old, &[bootloader("1-4", 5)], 1.0);

    assert!(follows.bindings().is_empty());
}

// Properties over random rules, devices and bindings.

const PORTS: [&str; 4] = ["1-1", "1-2", "1-3", "1-3.1"];
const SELECTORS: [&str; 5] = [
    "port:1-1",
    "id:046d:*",
    "id:0483:df11",
    "class:03",
    "hub:1-3",
];

fn rules(with_follow: bool) -> impl Strategy<Value = Vec<Rule>> {
    let spec = (
        0..SELECTORS.len(),
        prop::option::weighted(0.75, 0..2usize),
        0..3i64,
        any::<bool>(),
    );
    prop::collection::vec(spec, 0..5).prop_map(move |specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (sel, vm, priority, follow))| {
                let selector = SELECTORS[sel].parse().expect("selector");
                let mut r = match vm {
                    Some(v) => Rule::pass(i, selector, ["a", "b"][v], AttachMode::Address),
                    None => Rule::forbid(i, selector),
                };
                r.priority = if vm.is_some() { priority } else { 0 };
                r.follow = (with_follow && follow && vm.is_some()).then_some(WINDOW);
                r
            })
            .collect()
    })
}

/// Devices at some ports (mice or bootloaders), and bindings at some ports to some rule
/// for some VM, some for another plug or another physical port.
fn scene() -> impl Strategy<Value = (Vec<Device>, BTreeMap<PortPath, Follow>)> {
    let dev = (any::<bool>(), any::<bool>());
    let bind = (0..5usize, 0..2usize, any::<bool>());
    (
        prop::collection::btree_map(0..PORTS.len(), dev, 0..=PORTS.len()),
        prop::collection::btree_map(0..PORTS.len(), bind, 0..=PORTS.len()),
    )
        .prop_map(|(devs, binds)| {
            let devices = devs
                .into_iter()
                .map(|(i, (dfu, moved))| {
                    let mut d = match dfu {
                        true => bootloader(PORTS[i], 7),
                        false => mouse(PORTS[i], 7),
                    };
                    if moved {
                        d.physical_port = Some("0000:00:1d.0/1".parse().expect("physical port"));
                    }
                    d
                })
                .collect();
            let follows = binds
                .into_iter()
                .map(|(i, (rule, vm, same_plug))| {
                    let (port, mut f) = binding(PORTS[i], 7, rule, ["a", "b"][vm]);
                    f.previous.physical_port =
                        placed(device(PORTS[i], 1)).physical_port.expect("placed");
                    f.address = Some(if same_plug { 7 } else { 8 });
                    (port, f)
                })
                .collect();
            (devices, follows)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn a_follow_never_beats_a_forbid(rules in rules(true), (devices, follows) in scene()) {
        let desired = plan_with(&rules, &devices, &follows);
        for d in &devices {
            let forbidden = rules.iter().any(|r| r.follow.is_none() && r.action.vm().is_none() && r.selector.matches(d));
            let decision = &desired.devices[&d.port];
            prop_assert!(!forbidden || decision.placement == Placement::Host, "forbidden {} placed: {:?}", d.port, decision);
        }
    }

    #[test]
    fn a_follow_applies_only_on_the_same_physical_port_and_plug(rules in rules(true), (devices, follows) in scene()) {
        let desired = plan_with(&rules, &devices, &follows);
        for d in &devices {
            if let Reason::Followed { previous, .. } = &desired.devices[&d.port].reason {
                let f = &follows[&d.port];
                prop_assert_eq!(d.physical_port.as_ref(), Some(&previous.physical_port));
                prop_assert_eq!(d.address, f.address);
            }
        }
    }

    #[test]
    fn bindings_change_nothing_without_a_follow_rule(rules in rules(false), (devices, follows) in scene()) {
        let with = plan_with(&rules, &devices, &follows);
        let without = plan_with(&rules, &devices, &BTreeMap::new());
        prop_assert_eq!(with, without);
    }

    #[test]
    fn bindings_change_only_the_devices_they_are_for(rules in rules(true), (devices, follows) in scene()) {
        let with = plan_with(&rules, &devices, &follows);
        let without = plan_with(&rules, &devices, &BTreeMap::new());
        for d in devices.iter().filter(|d| !follows.contains_key(&d.port)) {
            prop_assert_eq!(&with.devices[&d.port], &without.devices[&d.port]);
        }
    }
}
