//! Model-based test of plan + diff + retry: a simulated host and simulated VMs driven
//! through long random sequences of plug, unplug, re-plug (new devnum), VM up/down, daemon
//! restart, config reload, manual attach/detach, mounts, controller hand-over and injected
//! VM failures. Events also land between engine rounds (not only at quiescence). After
//! every quiescent point: what the VMs hold equals the plan, and at no moment was a device
//! held twice or an id attached twice.

use crate::policy_support;

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

/// Reads small numbers off one random word, so that generating a long sequence costs
/// one `u64` per event (proptest's nested strategies are slow to build in debug builds),
/// while shrinking a word towards 0 still simplifies its event.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: u64) -> usize {
        let v = self.0 % n;
        self.0 /= n;
        v as usize
    }

    fn flip(&mut self) -> bool {
        self.roll(2) == 1
    }
}

fn rule_spec(dice: &mut Dice) -> RuleSpec {
    RuleSpec {
        selector: dice.roll(SELECTORS.len() as u64),
        // One rule in seven is a forbid rule.
        target: Some(dice.roll(7))
            .filter(|t| *t < VMS.len() * 2)
            .map(|t| t % VMS.len()),
        mode: dice.roll(3),
        priority: dice.roll(3) as i64,
        force: dice.flip(),
    }
}

/// Event kinds by weight: plugging and VM changes often, restarts rarely.
fn decode(word: u64) -> Event {
    let mut dice = Dice(word);
    let port = |d: &mut Dice| d.roll(PORTS.len() as u64);
    match dice.roll(27) {
        0..=3 => Event::Plug {
            port: port(&mut dice),
            kind: dice.roll(3) as u8,
            nic: dice.roll(7) == 0,
        },
        4..=5 => Event::Unplug {
            port: port(&mut dice),
        },
        6..=7 => Event::Replug {
            port: port(&mut dice),
        },
        8..=10 => Event::Vm {
            vm: dice.roll(3),
            up: dice.roll(10) < 7,
        },
        11 => Event::RestartDaemon,
        12..=13 => {
            let count = dice.roll(5);
            Event::Reload {
                rules: (0..count).map(|_| rule_spec(&mut dice)).collect(),
            }
        }
        14 => Event::ManualAttach {
            port: port(&mut dice),
            vm: dice.roll(3),
            mode: dice.roll(3),
            force: dice.flip(),
        },
        15 => Event::ManualDetach {
            port: port(&mut dice),
        },
        16 => Event::ClearOverride {
            port: port(&mut dice),
        },
        17 => Event::Mount {
            port: port(&mut dice),
            mounted: dice.flip(),
        },
        18 => Event::GiveController {
            vm: Some(dice.roll(4)).filter(|v| *v < VMS.len()),
        },
        19..=20 => {
            let count = 1 + dice.roll(3);
            Event::Fail {
                vm: dice.roll(3),
                faults: (0..count).map(|_| dice.flip()).collect(),
            }
        }
        21..=23 => Event::Partial {
            rounds: 1 + dice.roll(2),
        },
        _ => Event::Settle,
    }
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
    prop_assert!(
        sim.stale().is_empty(),
        "stale entries kept: {:?}",
        sim.stale()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn engine_converges_to_plan_and_never_doubles(words in prop::collection::vec(any::<u64>(), 1..40)) {
        let events: Vec<Event> = words.into_iter().map(decode).collect();
        let mut sim = Sim::new(&VMS);
        let outcome = events
            .iter()
            .try_for_each(|event| apply(&mut sim, event))
            .and_then(|()| settle_and_check(&mut sim));
        // Name the decoded events: the shrunk words alone say nothing.
        outcome.map_err(|e| TestCaseError::fail(format!("{e}\nevents: {events:#?}")))?;
    }
}
