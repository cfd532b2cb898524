//! `[[controller]]` rules in `usbroute serve`, like driverctl's persistent overrides:
//! every rule's group goes to vfio-pci at start, a rule added by a reload is bound then,
//! and a rule removed by a reload gives its controller back to the host, but only once
//! its VM has stopped ([`hold_for_running`]): pulling a controller out from under a
//! running guest hangs vfio-pci's unbind until the guest lets go, and the bind worker
//! with it. Never forced (a group the host seems to need is reported, not taken), and
//! never restored at shutdown: the VM may keep running with it.
//!
//! [`rule_changes`] is the pure diff of two configs; [`carry_out`] does (or, in a dry
//! run, describes) the binds and restores through a [`PciHost`], blocking: the daemon runs
//! it in `spawn_blocking`.

use super::protocol::ControllerStatus;
use crate::sysfs::SysfsRoot;
use crate::vfio::{self, BindOptions, ControllerRule, PciHost, RuleOutcome};

/// What a reload changes about controller rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleChanges {
    /// Rules for a controller no rule named before: bind their groups.
    pub added: Vec<ControllerRule>,
    /// Rules whose controller no rule names any more: give their groups back.
    pub removed: Vec<ControllerRule>,
}

impl RuleChanges {
    /// Nothing to bind or restore.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The controllers `new` names that `old` did not, and those `old` named that `new` does
/// not, each in config order. A rule that only moves a controller to another VM changes
/// nothing on the host (the group stays on vfio-pci), so it is in neither list.
pub fn rule_changes(old: &[ControllerRule], new: &[ControllerRule]) -> RuleChanges {
    let missing_from = |rules: &[ControllerRule], r: &ControllerRule| {
        !rules.iter().any(|other| other.pci == r.pci)
    };
    RuleChanges {
        added: new
            .iter()
            .filter(|r| missing_from(old, r))
            .cloned()
            .collect(),
        removed: old
            .iter()
            .filter(|r| missing_from(new, r))
            .cloned()
            .collect(),
    }
}

/// Which way a rule's group moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// To vfio-pci, for the rule's VM.
    Bind,
    /// Back to the host's drivers.
    Restore,
    /// Its rule is gone but its VM still runs: it stays on vfio-pci for now.
    Kept,
}

/// One rule's bind or restore, done or (dry run) described.
#[derive(Debug, Clone)]
pub struct ControllerStep {
    /// Bind or restore.
    pub direction: Direction,
    /// How it went; `message` is a full sentence for the log and `status`.
    pub outcome: RuleOutcome,
}

impl ControllerStep {
    /// The `status` line of this step.
    pub fn status(&self) -> ControllerStatus {
        ControllerStatus {
            pci: self.outcome.pci.to_string(),
            vm: self.outcome.vm.clone(),
            ok: self.outcome.ok,
            message: self.outcome.message.clone(),
        }
    }
}

/// Split removed rules into those to give back now and those whose VM (by the old rule)
/// is in `running`: those stay on vfio-pci, each with the step that says so, until that
/// VM stops. `in_config` says whether the VM is still configured (else usbroute cannot
/// see it stop, and the message says to restore by hand). Pure.
pub fn hold_for_running(
    removed: Vec<ControllerRule>,
    running: &std::collections::BTreeSet<String>,
    in_config: impl Fn(&str) -> bool,
) -> (Vec<ControllerRule>, Vec<ControllerStep>) {
    let (held, now): (Vec<_>, Vec<_>) = removed.into_iter().partition(|r| running.contains(&r.vm));
    let kept = held
        .iter()
        .map(|rule| {
            let vm = &rule.vm;
            let when = if in_config(vm) {
                format!("it goes back to the host when {vm} stops")
            } else {
                format!(
                    "{vm} is no longer in the config, so usbroute cannot see it stop: run \
                     `usbroute controller restore {}` once it has",
                    rule.pci
                )
            };
            ControllerStep {
                direction: Direction::Kept,
                outcome: outcome(
                    rule,
                    None,
                    true,
                    format!(
                        "its rule is gone, but VM {vm} is running with it: it stays on vfio-pci; {when}"
                    ),
                ),
            }
        })
        .collect();
    (now, kept)
}

/// Give back the removed rules' groups, then bind the added ones (removed first, so a
/// controller moved between rules is never held twice). With `dry_run` nothing is
/// written: each step's message lists what would be written where. Blocking.
pub fn carry_out(
    root: &SysfsRoot,
    host: &dyn PciHost,
    changes: &RuleChanges,
    opts: &BindOptions,
    dry_run: bool,
) -> Vec<ControllerStep> {
    let opts = BindOptions {
        force: false,
        ..opts.clone()
    };
    let (restored, bound) = if dry_run {
        (
            changes
                .removed
                .iter()
                .map(|r| would_restore(root, host, r))
                .collect(),
            changes
                .added
                .iter()
                .map(|r| would_bind(root, host, r, &opts))
                .collect(),
        )
    } else {
        (
            vfio::restore_controller_rules(root, host, &changes.removed, &opts).outcomes,
            vfio::apply_controller_rules(root, host, &changes.added, &opts).outcomes,
        )
    };
    let step = |direction| move |outcome| ControllerStep { direction, outcome };
    restored
        .into_iter()
        .map(step(Direction::Restore))
        .chain(bound.into_iter().map(step(Direction::Bind)))
        .collect()
}

fn would_bind(
    root: &SysfsRoot,
    host: &dyn PciHost,
    rule: &ControllerRule,
    opts: &BindOptions,
) -> RuleOutcome {
    match vfio::plan_bind(root, host, &rule.pci, opts) {
        Ok(plan) => outcome(
            rule,
            Some(plan.group.number),
            true,
            format!(
                "dry run: would move IOMMU group {} to vfio-pci for VM {}: {}",
                plan.group.number,
                rule.vm,
                steps_text(&plan.steps)
            ),
        ),
        Err(e) => outcome(rule, None, false, format!("dry run: would fail: {e}")),
    }
}

fn would_restore(root: &SysfsRoot, host: &dyn PciHost, rule: &ControllerRule) -> RuleOutcome {
    match vfio::plan_restore(root, host, &rule.pci) {
        Ok((group, _, steps)) => outcome(
            rule,
            Some(group.number),
            true,
            format!(
                "dry run: would give IOMMU group {} back to the host: {}",
                group.number,
                steps_text(&steps)
            ),
        ),
        Err(e) => outcome(rule, None, false, format!("dry run: would fail: {e}")),
    }
}

fn steps_text(steps: &[vfio::Step]) -> String {
    match steps {
        [] => "nothing to do".into(),
        steps => steps
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

fn outcome(rule: &ControllerRule, group: Option<u32>, ok: bool, message: String) -> RuleOutcome {
    RuleOutcome {
        pci: rule.pci,
        vm: rule.vm.clone(),
        group,
        ok,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pci: &str, vm: &str) -> ControllerRule {
        ControllerRule {
            pci: pci.parse().unwrap(),
            vm: vm.into(),
        }
    }

    #[test]
    fn rule_changes_at_start_bind_every_rule() {
        let new = [rule("00:1d.7", "win11"), rule("00:14.0", "lab")];

        let changes = rule_changes(&[], &new);

        assert_eq!(changes.added, new);
        assert_eq!(changes.removed, []);
    }

    #[test]
    fn rule_changes_on_reload_name_only_added_and_removed_controllers() {
        let old = [rule("00:1d.7", "win11"), rule("00:14.0", "lab")];
        let new = [rule("00:14.0", "lab"), rule("21:00.3", "win11")];

        let changes = rule_changes(&old, &new);

        assert_eq!(changes.added, [rule("21:00.3", "win11")]);
        assert_eq!(changes.removed, [rule("00:1d.7", "win11")]);
    }

    #[test]
    fn hold_for_running_keeps_the_controllers_of_running_vms_and_says_until_when() {
        let removed = vec![
            rule("00:1d.7", "win11"),
            rule("00:14.0", "lab"),
            rule("21:00.3", "gone"),
        ];
        let running = ["win11".to_string(), "gone".to_string()].into();

        let (now, kept) = hold_for_running(removed, &running, |vm| vm != "gone");

        assert_eq!(now, [rule("00:14.0", "lab")]);
        let messages: Vec<&str> = kept.iter().map(|k| k.outcome.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "its rule is gone, but VM win11 is running with it: it stays on vfio-pci; it goes back to the host when win11 stops",
                "its rule is gone, but VM gone is running with it: it stays on vfio-pci; gone is no longer in the config, so usbroute cannot see it stop: run `usbroute controller restore 0000:21:00.3` once it has",
            ]
        );
    }

    #[test]
    fn rule_changes_moving_a_controller_to_another_vm_touches_nothing() {
        let old = [rule("00:1d.7", "win11")];
        let new = [rule("00:1d.7", "lab")];

        let changes = rule_changes(&old, &new);

        assert!(changes.is_empty(), "{changes:?}");
    }
}
