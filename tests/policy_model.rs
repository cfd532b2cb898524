//! Model-based test of plan + diff + retry: a simulated host and simulated VMs driven
//! through long random sequences of plug, unplug, re-plug (new devnum), VM up/down, daemon
//! restart, config reload, manual attach/detach, mounts, controller hand-over and injected
//! VM failures. Events also land between engine rounds (not only at quiescence). After
//! every quiescent point: what the VMs hold equals the plan, and at no moment was a device
//! held twice or an id attached twice.

mod policy_support;

use policy_support::sim::{controller_of, Fault, Sim};
use proptest::prelude::*;
use std::collections::BTreeMap;
use usbroute::backend::AttachMode;
use usbroute::inventory::PortPath;
use usbroute::policy::{Override, OverrideAction, Rule};

const PORTS: [&str; 6] = ["1-1", "1-2", "1-3", "1-3.1", "1-3.2", "2-1"];
const VMS: [&str; 3] = ["a", "b", "c"];
const MODES: [AttachMode; 3] = [AttachMode::Address, AttachMode::Port, AttachMode::Id];

#[derive(Debug, Clone)]
enum Event {
    Plug {
        port: usize,
        kind: u8,
        nic: bool,
    },
    Unplug {
        port: usize,
    },
    Replug {
        port: usize,
    },
    Vm {
        vm: usize,
        up: bool,
    },
    RestartDaemon,
    Reload {
        rules: Vec<RuleSpec>,
    },
    ManualAttach {
        port: usize,
        vm: usize,
        mode: usize,
        force: bool,
    },
    ManualDetach {
        port: usize,
    },
    ClearOverride {
        port: usize,
    },
    Mount {
        port: usize,
        mounted: bool,
    },
    GiveController {
        vm: Option<usize>,
    },
    Fail {
        vm: usize,
        faults: Vec<bool>,
    },
    /// Run a few engine rounds without waiting for quiescence.
    Partial {
        rounds: usize,
    },
    /// Run to quiescence and check.
    Settle,
}

#[derive(Debug, Clone)]
struct RuleSpec {
    selector: usize,
    target: Option<usize>,
    mode: usize,
    priority: i64,
    force: bool,
}

const SELECTORS: [&str; 8] = [
    "port:1-1",
    "port:1-2",
    "hub:1-3",
    "id:046d:c016",
    "id:0781:*",
    "class:03",
    "port:1-3",
    "controller:0000:00:1d.0",
];

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        0..SELECTORS.len(),
        prop::option::weighted(0.85, 0..VMS.len()),
        0..3usize,
        0..3i64,
        any::<bool>(),
    )
        .prop_map(|(selector, target, mode, priority, force)| RuleSpec {
            selector,
            target,
            mode,
            priority,
            force,
        })
}

fn event() -> impl Strategy<Value = Event> {
    let port = 0..PORTS.len();
    prop_oneof![
        4 => (port.clone(), 0..3u8, prop::bool::weighted(0.15)).prop_map(|(port, kind, nic)| Event::Plug { port, kind, nic }),
        2 => port.clone().prop_map(|port| Event::Unplug { port }),
        2 => port.clone().prop_map(|port| Event::Replug { port }),
        3 => (0..VMS.len(), prop::bool::weighted(0.7)).prop_map(|(vm, up)| Event::Vm { vm, up }),
        1 => Just(Event::RestartDaemon),
        2 => prop::collection::vec(rule_spec(), 0..5).prop_map(|rules| Event::Reload { rules }),
        1 => (port.clone(), 0..VMS.len(), 0..3usize, any::<bool>()).prop_map(|(port, vm, mode, force)| Event::ManualAttach { port, vm, mode, force }),
        1 => port.clone().prop_map(|port| Event::ManualDetach { port }),
        1 => port.clone().prop_map(|port| Event::ClearOverride { port }),
        1 => (port.clone(), any::<bool>()).prop_map(|(port, mounted)| Event::Mount { port, mounted }),
        1 => prop::option::of(0..VMS.len()).prop_map(|vm| Event::GiveController { vm }),
        2 => (0..VMS.len(), prop::collection::vec(any::<bool>(), 1..4)).prop_map(|(vm, faults)| Event::Fail { vm, faults }),
        3 => (1..3usize).prop_map(|rounds| Event::Partial { rounds }),
        2 => Just(Event::Settle),
    ]
}

fn rules_from(specs: &[RuleSpec]) -> Vec<Rule> {
    specs
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let selector = SELECTORS[s.selector].parse().expect("selector");
            let mut rule = match s.target {
                Some(vm) => Rule::pass(index, selector, VMS[vm], MODES[s.mode]),
                None => Rule::forbid(index, selector),
            };
            rule.priority = s.priority;
            rule.force = s.force;
            rule
        })
        .collect()
}

fn port(i: usize) -> PortPath {
    PORTS[i].parse().expect("port")
}

fn apply(sim: &mut Sim, event: &Event) -> Result<(), TestCaseError> {
    match event {
        Event::Plug { port, kind, nic } => sim.plug(PORTS[*port], *kind, *nic),
        Event::Unplug { port } => sim.unplug(PORTS[*port]),
        Event::Replug { port } => sim.replug(PORTS[*port]),
        Event::Vm { vm, up } => sim.set_vm(VMS[*vm], *up),
        Event::RestartDaemon => sim.restart_daemon(),
        Event::Reload { rules } => sim.rules = rules_from(rules),
        Event::ManualAttach {
            port: p,
            vm,
            mode,
            force,
        } => {
            let address = sim.devices.get(&port(*p)).and_then(|d| d.address);
            let action = OverrideAction::Attach {
                vm: VMS[*vm].into(),
                mode: MODES[*mode],
                force: *force,
            };
            sim.overrides.insert(port(*p), Override { address, action });
        }
        Event::ManualDetach { port: p } => {
            let address = sim.devices.get(&port(*p)).and_then(|d| d.address);
            sim.overrides.insert(
                port(*p),
                Override {
                    address,
                    action: OverrideAction::Detach,
                },
            );
        }
        Event::ClearOverride { port: p } => {
            sim.overrides.remove(&port(*p));
        }
        Event::Mount { port, mounted } => {
            let disk = format!("sd{}", PORTS[*port]);
            match mounted {
                true => sim.mounted.insert(disk),
                false => sim.mounted.remove(&disk),
            };
        }
        Event::GiveController { vm } => {
            sim.controllers = vm
                .map(|v| (controller_of(2), VMS[v].to_string()))
                .into_iter()
                .collect::<BTreeMap<_, _>>();
        }
        Event::Fail { vm, faults } => {
            let faults: Vec<Fault> = faults
                .iter()
                .map(|lost| {
                    if *lost {
                        Fault::LostReply
                    } else {
                        Fault::Refuse
                    }
                })
                .collect();
            sim.inject(VMS[*vm], &faults);
        }
        Event::Partial { rounds } => {
            sim.run(*rounds);
        }
        Event::Settle => settle_and_check(sim)?,
    }
    prop_assert!(
        sim.violations.is_empty(),
        "violations: {:?}",
        sim.violations
    );
    Ok(())
}

fn settle_and_check(sim: &mut Sim) -> Result<(), TestCaseError> {
    prop_assert!(sim.run(200), "engine did not settle within 200 rounds");
    prop_assert_eq!(sim.held(), sim.wanted());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn engine_converges_to_plan_and_never_doubles(events in prop::collection::vec(event(), 1..40)) {
        let mut sim = Sim::new(&VMS);
        for event in &events {
            apply(&mut sim, event)?;
        }
        settle_and_check(&mut sim)?;
    }
}
