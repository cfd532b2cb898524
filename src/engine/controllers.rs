//! Controller groups: the engine's second reconciler. Desired: the `[[controller]]`
//! rules, like driverctl's persistent overrides (each rule's IOMMU group on vfio-pci).
//! Actual: the groups the engine has put there ([`Groups`]). The difference is a list of
//! [`GroupStep`]s, pure data, which the coordinator carries out through a
//! [`ControllerHost`](super::controller_host::ControllerHost) off its loop.
//!
//! A removed rule's group goes back to the host only once its VM has stopped: pulling a
//! controller out from under a running guest hangs vfio-pci's unbind until the guest lets
//! go. Nothing is forced (a group the host seems to need is reported, not taken), and
//! nothing is given back at shutdown: the VM may keep running with it.
//!
//! This module is also the one place that says what running VMs own ([`owned_by_running`]):
//! the plan keeps device rules away from USB devices on those functions.

use crate::inventory::PciAddress;
use crate::vfio::ControllerRule;
use std::collections::{BTreeMap, BTreeSet};

/// The config's `[[controller]]` rules as the engine needs them (one [`Input`] at start
/// and on each reload).
///
/// [`Input`]: super::coordinator::Input
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerConfig {
    /// The rules, in config order: each one's group should be on vfio-pci.
    pub rules: Vec<ControllerRule>,
    /// Every PCI function the rules hold, with the rule's VM: the whole IOMMU group of each
    /// rule's controller, as [`crate::vfio::held_by_rules`] reads it. While that VM runs,
    /// devices on any of them stay out of the device rules.
    pub functions: Vec<ControllerRule>,
    /// The VMs the config names: a removed rule's group waits for its VM to stop only if
    /// usbroute can see that VM stop.
    pub vms: BTreeSet<String>,
}

/// Every function held for a running VM, with that VM: the entries of `functions` (see
/// [`ControllerConfig::functions`]) whose VM is in `running`. The first rule holding a
/// function wins. This is the one computation of what running VMs own; the plan reads it
/// as [`PlanInput::controllers_owned`](crate::policy::PlanInput::controllers_owned).
pub fn owned_by_running(
    functions: &[ControllerRule],
    running: &BTreeSet<String>,
) -> BTreeMap<PciAddress, String> {
    let mut owned = BTreeMap::new();
    for f in functions.iter().filter(|f| running.contains(&f.vm)) {
        owned.entry(f.pci).or_insert_with(|| f.vm.clone());
    }
    owned
}

/// One thing to do about one rule's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupStep {
    /// Move the group to vfio-pci for the rule's VM (a group already there is reported
    /// as such).
    Bind(ControllerRule),
    /// Give the group back to the host's drivers.
    Restore(ControllerRule),
    /// Its rule is gone but its VM runs: the group stays on vfio-pci for now.
    /// `vm_configured` says whether usbroute will see the VM stop (else the group is left
    /// for the user to give back by hand).
    Keep {
        /// The removed rule.
        rule: ControllerRule,
        /// Whether the config still names the rule's VM.
        vm_configured: bool,
    },
}

impl GroupStep {
    /// The rule it is about.
    pub fn rule(&self) -> &ControllerRule {
        match self {
            GroupStep::Bind(rule) | GroupStep::Restore(rule) | GroupStep::Keep { rule, .. } => rule,
        }
    }
}

/// A group the engine manages: bound (or tried) for a rule, or kept for a running VM
/// after its rule went.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    vm: String,
    /// Its rule is gone; it goes back when `vm` stops.
    kept: bool,
}

/// The actual side: every group the engine has bound (or tried to: a failed bind is not
/// retried until its rule is removed and added again, as a reload never retried it) and
/// every group kept for a running VM.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    held: BTreeMap<PciAddress, Held>,
}

impl Groups {
    /// The steps that move the host towards `desired`, given the VMs `running` and those
    /// the config names (`configured`), and the record of them as done (a step is decided
    /// once; its outcome only goes to the status). In order: keeps, restores (so a
    /// controller moved between rules is never held twice), then binds in config order.
    /// A rule that only moves its controller to another VM touches nothing. Pure.
    pub fn next(
        &mut self,
        desired: &[ControllerRule],
        running: &BTreeSet<String>,
        configured: &BTreeSet<String>,
    ) -> Vec<GroupStep> {
        let mut keeps = Vec::new();
        let mut restores = Vec::new();
        for (pci, held) in &self.held {
            if desired.iter().any(|r| r.pci == *pci) {
                continue;
            }
            let rule = ControllerRule {
                pci: *pci,
                vm: held.vm.clone(),
            };
            let vm_configured = configured.contains(&held.vm);
            if running.contains(&held.vm) || (held.kept && !vm_configured) {
                // A kept group whose VM left the config: usbroute no longer sees that VM,
                // so it cannot tell whether it stopped; say so once and let go of it.
                if !held.kept || !vm_configured {
                    keeps.push(GroupStep::Keep {
                        rule,
                        vm_configured,
                    });
                }
            } else {
                restores.push(GroupStep::Restore(rule));
            }
        }
        let binds = desired
            .iter()
            .filter(|r| !matches!(self.held.get(&r.pci), Some(held) if !held.kept))
            .map(|r| GroupStep::Bind(r.clone()));
        let steps: Vec<GroupStep> = keeps.into_iter().chain(restores).chain(binds).collect();
        for step in &steps {
            let pci = step.rule().pci;
            match step {
                GroupStep::Bind(rule) => {
                    self.held.insert(
                        pci,
                        Held {
                            vm: rule.vm.clone(),
                            kept: false,
                        },
                    );
                }
                GroupStep::Keep {
                    vm_configured: true,
                    ..
                } => {
                    if let Some(held) = self.held.get_mut(&pci) {
                        held.kept = true;
                    }
                }
                GroupStep::Restore(_) | GroupStep::Keep { .. } => {
                    self.held.remove(&pci);
                }
            }
        }
        // A rule that moved its controller to another VM: the group stays, now for that VM.
        for rule in desired {
            if let Some(held) = self.held.get_mut(&rule.pci) {
                held.vm.clone_from(&rule.vm);
            }
        }
        steps
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The rule giving the controller at `pci` to `vm`.
    pub(in crate::engine) fn rule(pci: &str, vm: &str) -> ControllerRule {
        ControllerRule {
            pci: pci.parse().unwrap(),
            vm: vm.into(),
        }
    }

    fn names(vms: &[&str]) -> BTreeSet<String> {
        vms.iter().map(|s| s.to_string()).collect()
    }

    /// Groups after the engine applied `rules` with no VM running.
    fn applied(rules: &[ControllerRule], configured: &BTreeSet<String>) -> Groups {
        let mut groups = Groups::default();
        groups.next(rules, &BTreeSet::new(), configured);
        groups
    }

    #[test]
    fn at_start_every_rule_is_bound_in_config_order() {
        let rules = [rule("00:1d.7", "win11"), rule("00:14.0", "lab")];

        let steps = Groups::default().next(&rules, &BTreeSet::new(), &names(&["win11", "lab"]));

        assert_eq!(
            steps,
            [
                GroupStep::Bind(rules[0].clone()),
                GroupStep::Bind(rules[1].clone())
            ]
        );
    }

    #[test]
    fn a_reload_binds_only_added_rules_and_restores_only_removed_ones() {
        let vms = names(&["win11", "lab"]);
        let mut groups = applied(&[rule("00:1d.7", "win11"), rule("00:14.0", "lab")], &vms);

        let steps = groups.next(
            &[rule("00:14.0", "lab"), rule("21:00.3", "win11")],
            &BTreeSet::new(),
            &vms,
        );

        assert_eq!(
            steps,
            [
                GroupStep::Restore(rule("00:1d.7", "win11")),
                GroupStep::Bind(rule("21:00.3", "win11")),
            ]
        );
    }

    #[test]
    fn the_same_rules_again_change_nothing() {
        let vms = names(&["win11"]);
        let rules = [rule("00:1d.7", "win11")];
        let mut groups = applied(&rules, &vms);

        let steps = groups.next(&rules, &names(&["win11"]), &vms);

        assert_eq!(steps, []);
    }

    #[test]
    fn moving_a_controller_to_another_vm_touches_nothing() {
        let vms = names(&["win11", "lab"]);
        let mut groups = applied(&[rule("00:1d.7", "win11")], &vms);

        let steps = groups.next(&[rule("00:1d.7", "lab")], &BTreeSet::new(), &vms);

        assert_eq!(steps, []);
    }

    #[test]
    fn a_moved_controller_removed_later_waits_for_its_new_vm() {
        let vms = names(&["win11", "lab"]);
        let mut groups = applied(&[rule("00:1d.7", "win11")], &vms);
        groups.next(&[rule("00:1d.7", "lab")], &BTreeSet::new(), &vms);

        let steps = groups.next(&[], &names(&["lab"]), &vms);

        assert_eq!(
            steps,
            [GroupStep::Keep {
                rule: rule("00:1d.7", "lab"),
                vm_configured: true
            }]
        );
    }

    #[test]
    fn removing_a_rule_while_its_vm_runs_keeps_the_group_until_the_vm_stops() {
        let vms = names(&["win11", "lab"]);
        let mut groups = applied(&[rule("00:1d.7", "win11"), rule("00:14.0", "lab")], &vms);
        let running = names(&["win11"]);

        let removed = groups.next(&[], &running, &vms);
        let while_running = groups.next(&[], &running, &vms);
        let stopped = groups.next(&[], &BTreeSet::new(), &vms);

        assert_eq!(
            removed,
            [
                GroupStep::Keep {
                    rule: rule("00:1d.7", "win11"),
                    vm_configured: true
                },
                GroupStep::Restore(rule("00:14.0", "lab")),
            ]
        );
        assert_eq!(while_running, []);
        assert_eq!(stopped, [GroupStep::Restore(rule("00:1d.7", "win11"))]);
    }

    #[test]
    fn removing_a_rule_after_its_vm_stopped_gives_the_group_back_at_once() {
        let vms = names(&["win11"]);
        let mut groups = applied(&[rule("00:1d.7", "win11")], &vms);

        let steps = groups.next(&[], &BTreeSet::new(), &vms);

        assert_eq!(steps, [GroupStep::Restore(rule("00:1d.7", "win11"))]);
    }

    #[test]
    fn a_running_vm_gone_from_the_config_keeps_its_group_for_good() {
        let mut groups = applied(&[rule("21:00.3", "gone")], &names(&["gone"]));

        let removed = groups.next(&[], &names(&["gone"]), &BTreeSet::new());
        let after_it_stopped = groups.next(&[], &BTreeSet::new(), &BTreeSet::new());

        assert_eq!(
            removed,
            [GroupStep::Keep {
                rule: rule("21:00.3", "gone"),
                vm_configured: false
            }]
        );
        assert_eq!(after_it_stopped, []);
    }

    #[test]
    fn a_kept_group_whose_vm_leaves_the_config_is_let_go_of_not_given_back() {
        let mut groups = applied(&[rule("00:1d.7", "win11")], &names(&["win11"]));
        groups.next(&[], &names(&["win11"]), &names(&["win11"]));

        let vm_removed = groups.next(&[], &BTreeSet::new(), &BTreeSet::new());
        let later = groups.next(&[], &BTreeSet::new(), &BTreeSet::new());

        assert_eq!(
            vm_removed,
            [GroupStep::Keep {
                rule: rule("00:1d.7", "win11"),
                vm_configured: false
            }]
        );
        assert_eq!(later, []);
    }

    #[test]
    fn a_rule_added_back_while_its_group_is_kept_is_bound_again_and_no_longer_kept() {
        let vms = names(&["win11"]);
        let running = names(&["win11"]);
        let mut groups = applied(&[rule("00:1d.7", "win11")], &vms);
        groups.next(&[], &running, &vms);

        let re_added = groups.next(&[rule("00:1d.7", "win11")], &running, &vms);
        let vm_stopped = groups.next(&[rule("00:1d.7", "win11")], &BTreeSet::new(), &vms);

        assert_eq!(re_added, [GroupStep::Bind(rule("00:1d.7", "win11"))]);
        assert_eq!(vm_stopped, []);
    }

    #[test]
    fn owned_by_running_holds_only_the_functions_of_running_vms() {
        let functions = [
            rule("00:1d.0", "lab"),
            rule("00:1d.7", "lab"),
            rule("00:14.0", "off"),
        ];

        let owned = owned_by_running(&functions, &names(&["lab"]));

        assert_eq!(
            owned.into_iter().collect::<Vec<_>>(),
            [
                ("0000:00:1d.0".parse().unwrap(), "lab".to_string()),
                ("0000:00:1d.7".parse().unwrap(), "lab".to_string()),
            ]
        );
        assert!(owned_by_running(&functions, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn owned_by_running_gives_a_function_two_rules_hold_to_the_first() {
        let functions = [rule("00:1d.0", "lab"), rule("00:1d.0", "win11")];

        let owned = owned_by_running(&functions, &names(&["lab", "win11"]));

        assert_eq!(owned.values().collect::<Vec<_>>(), ["lab"]);
    }
}
