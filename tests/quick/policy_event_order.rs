//! Every order of {device plugged, VM up, rules loaded} ends in the same state.

use crate::policy_support;

use policy_support::sim::Sim;
use std::collections::BTreeSet;
use usbroute::backend::AttachMode;
use usbroute::policy::Rule;

#[derive(Debug, Clone, Copy)]
enum Step {
    Plug,
    VmUp,
    LoadRules,
}

fn apply(sim: &mut Sim, step: Step, mode: AttachMode) {
    match step {
        Step::Plug => sim.plug("1-2", 0, false),
        Step::VmUp => sim.set_vm("win", true),
        Step::LoadRules => {
            sim.rules = vec![Rule::pass(
                0,
                "port:1-2".parse().expect("selector"),
                "win",
                mode,
            )]
        }
    }
}

fn permutations() -> Vec<[Step; 3]> {
    use Step::*;
    vec![
        [Plug, VmUp, LoadRules],
        [Plug, LoadRules, VmUp],
        [VmUp, Plug, LoadRules],
        [VmUp, LoadRules, Plug],
        [LoadRules, Plug, VmUp],
        [LoadRules, VmUp, Plug],
    ]
}

/// Final holdings for one order, settling the engine after every step.
fn final_state(order: [Step; 3], mode: AttachMode) -> BTreeSet<(String, String)> {
    let mut sim = Sim::new(&["win"]);
    for step in order {
        apply(&mut sim, step, mode);
        assert!(sim.run(50), "settles after {step:?}");
    }
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
    sim.held()
}

fn expected(id: &str) -> BTreeSet<(String, String)> {
    BTreeSet::from([("win".to_string(), id.to_string())])
}

#[test]
fn every_order_attaches_by_address() {
    let finals: Vec<_> = permutations()
        .into_iter()
        .map(|o| final_state(o, AttachMode::Address))
        .collect();
    assert_eq!(finals, vec![expected("usbroute-addr-1-1"); 6]);
}

#[test]
fn every_order_attaches_by_port() {
    let finals: Vec<_> = permutations()
        .into_iter()
        .map(|o| final_state(o, AttachMode::Port))
        .collect();
    assert_eq!(finals, vec![expected("usbroute-port-1-2"); 6]);
}

#[test]
fn every_order_attaches_by_id() {
    let finals: Vec<_> = permutations()
        .into_iter()
        .map(|o| final_state(o, AttachMode::Id))
        .collect();
    assert_eq!(finals, vec![expected("usbroute-id-046d-c016"); 6]);
}
