//! Rules in file order: precedence (forbid, then `priority`, then the earlier rule) and
//! `policy::overlaps`, the pairs of rules for different VMs that `check` and the daemon
//! warn about, held to the plan over random rules and devices.

use crate::policy_support;

use policy_support::{device, with_id};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use usbroute::backend::AttachMode;
use usbroute::inventory::Device;
use usbroute::policy::{overlaps, plan, PlanInput, Reason, Rule, RuleAction, WinsBy};

const PORTS: [&str; 5] = ["1-1", "1-2", "1-3.1", "1-3.2", "2-1"];
const SELECTORS: [&str; 8] = [
    "port:1-1",
    "port:1-2",
    "hub:1-3",
    "id:046d:*",
    "id:0781:5567",
    "class:00",
    "1-3.1",
    "addr:2.9",
];
/// Modes that never make one device's placement depend on another's (`by = "id"` does).
const MODES: [AttachMode; 2] = [AttachMode::Address, AttachMode::Port];

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    prop::collection::vec(
        (
            0..SELECTORS.len(),
            prop::option::weighted(0.8, 0..3usize),
            0..MODES.len(),
            0..3i64,
        ),
        0..7,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (sel, vm, mode, priority))| {
                let selector = SELECTORS[sel].parse().expect("selector");
                match vm {
                    Some(v) => {
                        let mut r = Rule::pass(i, selector, ["a", "b", "c"][v], MODES[mode]);
                        r.priority = priority;
                        r.line = 10 * i + 3;
                        r
                    }
                    None => Rule::forbid(i, selector),
                }
            })
            .collect()
    })
}

fn devices() -> impl Strategy<Value = Vec<Device>> {
    prop::collection::btree_map(0..PORTS.len(), any::<bool>(), 1..=PORTS.len()).prop_map(|m| {
        m.into_iter()
            .map(|(port, sandisk)| {
                let d = device(PORTS[port], port as u16 + 2);
                if sandisk {
                    with_id(d, 0x0781, 0x5567)
                } else {
                    d
                }
            })
            .collect()
    })
}

/// Every VM up, no protections, no overrides: only the rules decide.
fn placements(rules: &[Rule], devices: &[Device]) -> BTreeMap<String, Reason> {
    let up: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let desired = plan(&PlanInput {
        rules,
        devices,
        mounted_disks: &BTreeSet::new(),
        vms_up: &up,
        backends: &BTreeMap::new(),
        overrides: &BTreeMap::new(),
        follows: &BTreeMap::new(),
        controllers_owned: &BTreeMap::new(),
    });
    desired
        .devices
        .into_iter()
        .map(|(port, d)| (port.to_string(), d.reason))
        .collect()
}

fn pass(index: usize, selector: &str, vm: &str) -> Rule {
    let mut r = Rule::pass(
        index,
        selector.parse().expect("selector"),
        vm,
        AttachMode::Address,
    );
    r.line = 10 * index + 3;
    r
}

fn decided_by(rules: &[Rule], d: &Device) -> Option<usize> {
    match placements(rules, std::slice::from_ref(d)).remove(&d.port.to_string()) {
        Some(Reason::Rule { rule, .. }) | Some(Reason::Forbidden { rule }) => Some(rule.index),
        _ => None,
    }
}

#[test]
fn among_equal_priorities_the_earlier_rule_wins_whatever_its_vm() {
    let d = device("1-1", 2);
    let rules = [pass(0, "id:046d:c016", "a"), pass(1, "port:1-1", "b")];

    assert_eq!(decided_by(&rules, &d), Some(0));
}

#[test]
fn overlap_names_both_lines_the_winner_and_why() {
    let mut high = pass(2, "port:1-1", "b");
    high.priority = 5;
    let rules = [pass(0, "id:046d:c016", "a"), pass(1, "port:1-1", "c"), high];

    let text: Vec<String> = overlaps(&rules).iter().map(ToString::to_string).collect();

    assert_eq!(
        text,
        [
            "the rule on line 3 (vm = \"a\", by = \"address\") and the rule on line 13 (vm = \"c\", by = \"address\") can match the same device and send it to different VMs; the rule on line 3 wins: it comes earlier in the file (both have priority 0); if that is not meant, give the other a higher `priority = N` or make the `match` selectors exclusive",
            "the rule on line 3 (vm = \"a\", by = \"address\") and the rule on line 23 (vm = \"b\", by = \"address\") can match the same device and send it to different VMs; the rule on line 23 wins: its priority is higher (5 > 0)",
            "the rule on line 13 (vm = \"c\", by = \"address\") and the rule on line 23 (vm = \"b\", by = \"address\") can match the same device and send it to different VMs; the rule on line 23 wins: its priority is higher (5 > 0)",
        ]
    );
}

#[test]
fn rules_for_one_vm_differing_in_by_or_force_do_not_overlap() {
    let mut by_port = pass(1, "port:1-1", "a");
    by_port.action = RuleAction::Pass {
        vm: "a".into(),
        mode: AttachMode::Port,
    };
    by_port.force = true;
    let rules = [pass(0, "id:046d:c016", "a"), by_port];

    assert_eq!(overlaps(&rules), []);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// The plan's precedence: a matching forbid rule decides wherever it is, else the
    /// matching pass rule of the highest priority, the earliest among equals.
    #[test]
    fn the_first_matching_rule_by_forbid_priority_and_file_order_decides(rules in rules(), devices in devices()) {
        let placed = placements(&rules, &devices);
        for d in &devices {
            let matching: Vec<&Rule> = rules.iter().filter(|r| r.selector.matches(d)).collect();
            let forbid = matching.iter().find(|r| r.action == RuleAction::Forbid);
            let top = matching.iter().map(|r| r.priority).max();
            let first_top = matching.iter().find(|r| Some(r.priority) == top);
            let expected = forbid.or(first_top).map(|r| r.index);
            let got = match &placed[&d.port.to_string()] {
                Reason::Rule { rule, .. } | Reason::Forbidden { rule } => Some(rule.index),
                Reason::NoRule => None,
                other => return Err(TestCaseError::fail(format!("{}: unexpected {other}", d.port))),
            };
            prop_assert_eq!(got, expected, "{}", d.port);
        }
    }

    /// Every pair of pass rules for different VMs that both match some device is listed,
    /// with the winner the plan picks when only those two rules exist.
    #[test]
    fn overlaps_lists_every_pair_that_can_disagree_with_the_plans_winner(rules in rules(), devices in devices()) {
        let listed = overlaps(&rules);
        for d in &devices {
            for (i, a) in rules.iter().enumerate() {
                for b in &rules[i + 1..] {
                    let (Some(va), Some(vb)) = (a.action.vm(), b.action.vm()) else { continue };
                    if va == vb || !a.selector.matches(d) || !b.selector.matches(d) {
                        continue;
                    }
                    let overlap = listed.iter().find(|o| {
                        (o.winner.index, o.loser.index) == (a.index, b.index)
                            || (o.winner.index, o.loser.index) == (b.index, a.index)
                    });
                    prop_assert!(overlap.is_some(), "{} and {} both match {}", a, b, d.port);
                    let overlap = overlap.unwrap();
                    let pair = [a.clone(), b.clone()];
                    prop_assert_eq!(decided_by(&pair, d), Some(overlap.winner.index));
                }
            }
        }
    }

    /// Only pass rules for different VMs are listed, each pair once, and the reason
    /// given is the priority exactly when the priorities differ.
    #[test]
    fn overlaps_are_pass_rules_for_different_vms_with_the_right_reason(rules in rules()) {
        let listed = overlaps(&rules);
        let mut seen = BTreeSet::new();
        for o in &listed {
            let (Some(w), Some(l)) = (o.winner.action.vm(), o.loser.action.vm()) else {
                return Err(TestCaseError::fail(format!("a forbid rule in {o}")));
            };
            prop_assert_ne!(w, l);
            prop_assert!(seen.insert((o.winner.index.min(o.loser.index), o.winner.index.max(o.loser.index))));
            let by = if o.winner.priority != o.loser.priority { WinsBy::Priority } else { WinsBy::FileOrder };
            prop_assert_eq!(o.by, by);
            prop_assert!(o.winner.priority > o.loser.priority || (o.winner.priority == o.loser.priority && o.winner.index < o.loser.index));
        }
    }
}
