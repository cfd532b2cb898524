//! `[[controller]]` rules: bind the named controllers at daemon start, restore them on
//! request, like driverctl's persistent overrides but without modprobe.d edits.

use super::bind::{bind, restore, BindOptions};
use super::host::PciHost;
use super::{ControllerRule, VfioError};
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::Serialize;

/// What happened to one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleOutcome {
    /// The controller.
    pub pci: PciAddress,
    /// The VM it belongs to.
    pub vm: String,
    /// The IOMMU group, when known.
    pub group: Option<u32>,
    /// `true` when the group is on vfio-pci (for apply) or back with the host (for restore).
    pub ok: bool,
    /// What happened, or what went wrong and what to do, in one line.
    pub message: String,
}

impl RuleOutcome {
    /// The outcome of `rule`.
    pub fn new(rule: &ControllerRule, group: Option<u32>, ok: bool, message: String) -> Self {
        RuleOutcome {
            pci: rule.pci,
            vm: rule.vm.clone(),
            group,
            ok,
            message,
        }
    }
}

/// One outcome per rule, in config order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RulesReport {
    /// Per rule.
    pub outcomes: Vec<RuleOutcome>,
}

impl RulesReport {
    /// `true` when every rule worked.
    pub fn all_ok(&self) -> bool {
        self.outcomes.iter().all(|o| o.ok)
    }
}

/// Bind every rule's controller group to vfio-pci. Never forces: a group the host seems
/// to need is reported, not taken (bind it by hand with `--force`; a group already on
/// vfio-pci counts as done). One failing rule does not stop the others.
pub fn apply_controller_rules(
    root: &SysfsRoot,
    host: &dyn PciHost,
    rules: &[ControllerRule],
    opts: &BindOptions,
) -> RulesReport {
    let opts = BindOptions {
        force: false,
        ..opts.clone()
    };
    let outcomes = rules
        .iter()
        .map(|rule| {
            let result = bind(root, host, &rule.pci, &opts).map(|done| {
                let message = if done.already_bound {
                    format!("IOMMU group {} was already on vfio-pci", done.group)
                } else {
                    format!(
                        "IOMMU group {} is on vfio-pci ({} function(s)), ready for VM {}",
                        done.group,
                        done.members.len(),
                        rule.vm
                    )
                };
                (done.group, message)
            });
            outcome(rule, result)
        })
        .collect();
    RulesReport { outcomes }
}

/// Give every rule's controller group back to the host (from the bind records).
pub fn restore_controller_rules(
    root: &SysfsRoot,
    host: &dyn PciHost,
    rules: &[ControllerRule],
    opts: &BindOptions,
) -> RulesReport {
    let outcomes = rules
        .iter()
        .map(|rule| {
            let result = restore(root, host, &rule.pci, opts).map(|done| {
                let message = format!("IOMMU group {} is back with the host", done.group);
                (done.group, message)
            });
            outcome(rule, result)
        })
        .collect();
    RulesReport { outcomes }
}

/// One rule's line in a report: the group and a sentence on success, the error's words
/// on failure.
fn outcome(rule: &ControllerRule, result: Result<(u32, String), VfioError>) -> RuleOutcome {
    match result {
        Ok((group, message)) => RuleOutcome::new(rule, Some(group), true, message),
        Err(e) => RuleOutcome::new(rule, None, false, crate::error_chain::one_line(&e)),
    }
}

/// Each rule expanded to every function it would hold, running VM or not: one entry per
/// passed member of the rule's IOMMU group (bridges excepted), with the rule's VM, in rule
/// order. A rule whose group cannot be read holds just its own controller. The daemon
/// reads this (sysfs I/O) when a config is applied and hands it to the engine, which keeps,
/// purely, the entries whose VM is running (`engine::owned_by_running`): device rules do
/// not fire for USB devices on those functions (EVE's `parentassigngrp`).
pub fn held_by_rules(root: &SysfsRoot, rules: &[ControllerRule]) -> Vec<ControllerRule> {
    rules
        .iter()
        .flat_map(|rule| {
            let members: Vec<PciAddress> = match super::group::read_group(root, &rule.pci) {
                Ok(Some(group)) => group.passed_members().map(|m| m.pci).collect(),
                _ => vec![rule.pci],
            };
            members.into_iter().map(|pci| ControllerRule {
                pci,
                vm: rule.vm.clone(),
            })
        })
        .collect()
}
