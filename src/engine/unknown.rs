//! Which attaches a VM of unknown holdings holds back. Pure.
//!
//! A VM that came up but has not answered a list yet may hold devices the engine does not
//! know about, so attaching one of those elsewhere could put a device on two VMs. But
//! only devices it *could* hold need to wait:
//! - a VM never heard from since the engine started may hold anything (a previous
//!   daemon, under another config, may have given it any device): every attach waits,
//!   for at most the grace period counted from the first time it came up in this run;
//!   coming and going again does not restart that period, so VMs whose sockets re-create
//!   themselves out of phase cannot keep every attach waiting forever;
//! - a VM that answered once in this run can only hold what it was last seen with, what
//!   this run sent it since, and what a rule or override could send it now: only
//!   attaches of those devices wait, for the grace period from its latest coming up.

use super::diff::Action;
use crate::backend::{AttachKey, AttachMode, VmUsbDevice};
use crate::inventory::{Device, PortPath};
use crate::policy::{Override, OverrideAction, Rule, RuleAction};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What the engine knows of one VM across its comings and goings in this run.
#[derive(Debug, Clone, Default)]
struct Acquaintance {
    /// When it first came up in this run (engine clock).
    first_up: Duration,
    /// It answered a list at least once in this run.
    answered: bool,
    /// Every key of ours it was listed with or sent an attach for in this run.
    keys: BTreeSet<AttachKey>,
}

/// Per VM name, what bounds what it may hold while its holdings are unknown.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unknowns {
    vms: BTreeMap<String, Acquaintance>,
}

/// What could send a device to a VM now.
pub(crate) struct Policy<'a> {
    /// The rules in force.
    pub(crate) rules: &'a [Rule],
    /// The manual overrides in force.
    pub(crate) overrides: &'a BTreeMap<PortPath, Override>,
    /// The devices present.
    pub(crate) devices: &'a [Device],
}

impl Unknowns {
    /// `vm` came up at `now`; the first time in this run starts its grace period.
    pub(crate) fn came_up(&mut self, vm: &str, now: Duration) {
        self.vms
            .entry(vm.to_string())
            .or_insert_with(|| Acquaintance {
                first_up: now,
                ..Acquaintance::default()
            });
    }

    /// `vm` answered a list: from now on it can hold only what is accounted for.
    pub(crate) fn listed(&mut self, vm: &str, devices: &[VmUsbDevice]) {
        let known = self.vms.entry(vm.to_string()).or_default();
        known.answered = true;
        known
            .keys
            .extend(devices.iter().filter_map(|d| d.key.clone()));
    }

    /// An attach of `key` is being sent to `vm`.
    pub(crate) fn attaching(&mut self, vm: &str, key: &AttachKey) {
        if let Some(known) = self.vms.get_mut(vm) {
            known.keys.insert(key.clone());
        }
    }

    /// When the wait for `vm` (up since `up_since`, holdings unknown) ends.
    pub(crate) fn wait_ends(&self, vm: &str, up_since: Duration, grace: Duration) -> Duration {
        match self.vms.get(vm) {
            Some(known) if !known.answered => known.first_up + grace,
            _ => up_since + grace,
        }
    }

    /// Must `action` wait for the VMs in `waiting` (holdings unknown, within their
    /// grace) to answer? Detaches never wait; an attach waits when one of those VMs,
    /// other than its own, could hold a device the new usb-host could take.
    pub(crate) fn holds_back(&self, waiting: &[&str], action: &Action, policy: &Policy) -> bool {
        let Action::Attach {
            vm, device, key, ..
        } = action
        else {
            return false;
        };
        let taken: Vec<&Device> = policy
            .devices
            .iter()
            .filter(|d| key.refers_to(d))
            .chain(std::iter::once(&**device))
            .collect();
        waiting
            .iter()
            .filter(|w| **w != vm.as_str())
            .any(|w| taken.iter().any(|d| self.may_hold(w, d, policy)))
    }

    /// Could `vm` hold `device` while its holdings are unknown?
    fn may_hold(&self, vm: &str, device: &Device, policy: &Policy) -> bool {
        let Some(known) = self.vms.get(vm).filter(|k| k.answered) else {
            return true;
        };
        let by_key = |key: &AttachKey| key.refers_to(device);
        let by_override = policy.overrides.get(&device.port).is_some_and(
            |o| matches!(&o.action, OverrideAction::Attach { vm: to, .. } if to == vm),
        );
        known.keys.iter().any(by_key) || by_override || by_rule(vm, device, policy)
    }
}

/// Does a rule send `device` to `vm`, or a device of its kind by id (that usb-host would
/// take `device` too)?
fn by_rule(vm: &str, device: &Device, policy: &Policy) -> bool {
    policy.rules.iter().any(|rule| {
        let RuleAction::Pass { vm: to, mode } = &rule.action else {
            return false;
        };
        if to != vm {
            return false;
        }
        rule.selector.matches(device)
            || (*mode == AttachMode::Id
                && policy.devices.iter().any(|other| {
                    rule.selector.matches(other)
                        && AttachKey::of(AttachMode::Id, other).is_some_and(|k| k.refers_to(device))
                }))
    })
}
