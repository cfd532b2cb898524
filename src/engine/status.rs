//! The engine's published [`Status`], and the questions the daemon asks of it: who holds a device,
//! what the status says about one device present, whether the engine is at rest, whether
//! a manual override has settled, and how a rule would attach a device. The meaning of
//! the engine's data is written here once; the control socket only words the answers.

use super::diff::{is_stale, Action, VmView};
use super::routing::RoutingStatus;
use super::Pending;
use crate::backend::AttachMode;
use crate::inventory::{Device, PortPath};
use crate::policy::{Decision, Desired, Override, OverrideAction, Placement, Rule, RuleAction};
use crate::vfio::RuleOutcome;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// What the engine knows, published after every round (for `usbroute status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The plan for every device present.
    pub desired: Desired,
    /// What each running VM holds (last list, plus attaches of unknown outcome).
    pub vms: BTreeMap<String, VmView>,
    /// Failed actions waiting for their retry, with the last error.
    pub pending: Vec<Pending>,
    /// Manual overrides in force.
    pub overrides: BTreeMap<PortPath, Override>,
    /// Actions that the plan wants but `--dry-run` did not do.
    pub dry_run_actions: Vec<Action>,
    /// VMs with work in flight (actions or a list). With none busy, nothing pending and
    /// every VM answering, the engine is at rest: the VMs hold what the plan wants.
    pub busy: BTreeSet<String>,
    /// VMs with actions in flight whose answers have not come back (a subset of `busy`:
    /// the list that follows them may still be under way).
    pub acting: BTreeSet<String>,
    /// Port routing, when the daemon routes ports.
    pub routing: Option<RoutingStatus>,
    /// The last bind, restore or keep (in a dry run: its description) of each
    /// `[[controller]]` rule's group, by address; a group given back drops out.
    pub controllers: Vec<RuleOutcome>,
    /// The device rules in force (for [`Status::rule_mode`]).
    #[serde(skip)]
    pub rules: Arc<[Rule]>,
    /// How many batches of controller work have finished: each moves USB devices between
    /// the host and VMs, so the daemon reads sysfs again when this grows.
    pub controller_batches: u64,
}

/// What the status says about one device present on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// The VM holding it now ([`Status::holder`]); `None`: the host.
    pub holder: Option<String>,
    /// Where the plan wants it and why; `None` while the engine has not planned it yet (it
    /// appeared after the engine's last round).
    pub decision: Option<&'a Decision>,
    /// The manual override in force for it.
    pub manual_override: Option<&'a Override>,
    /// A failed action about it, waiting for its retry.
    pub pending: Option<&'a Pending>,
}

/// Where an `attach` or `detach` request stands, once the engine has taken it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Detach asked: no VM holds the device.
    OnHost,
    /// Attach asked: the VM listed the device itself (its work is done).
    Attached {
        /// The VM.
        vm: String,
    },
    /// Attach asked, but the plan keeps the device on the host, for this reason.
    StaysOnHost {
        /// Why (the plan's reason, in words).
        reason: String,
    },
    /// An action about the device failed; the engine keeps retrying.
    Failed(Pending),
}

impl Status {
    /// Who holds `device` now: the VM with a usb-host of ours for it. By port or id QEMU
    /// holds the place even while it (re)connects the device; by address an entry that
    /// lost its device is stale and holds nothing. By id, QEMU holds a kind, not a device:
    /// it counts for the device the plan sent there.
    pub fn holder(&self, device: &Device) -> Option<String> {
        let planned_vm = match self.desired.devices.get(&device.port).map(|d| &d.placement) {
            Some(Placement::Vm { vm, .. }) => Some(vm.as_str()),
            _ => None,
        };
        self.vms.iter().find_map(|(vm, view)| {
            view.devices
                .iter()
                .any(|e| {
                    e.key.as_ref().is_some_and(|k| {
                        let for_this_vm =
                            k.mode() != AttachMode::Id || planned_vm == Some(vm.as_str());
                        !is_stale(e, k) && for_this_vm && k.refers_to(device)
                    })
                })
                .then(|| vm.clone())
        })
    }

    /// A failed action about `device` waiting for its retry.
    pub fn pending_for(&self, device: &Device) -> Option<&Pending> {
        self.pending.iter().find(|p| p.key.refers_to(device))
    }

    /// Everything the status says about `device`, one of the devices present.
    pub fn device(&self, device: &Device) -> DeviceState<'_> {
        DeviceState {
            holder: self.holder(device),
            decision: self.desired.devices.get(&device.port),
            manual_override: self.overrides.get(&device.port),
            pending: self.pending_for(device),
        }
    }

    /// Nothing left to do on its own: every device in `present` is planned, every VM in
    /// `vms_up` has been listed, no action is in flight and none waits for a retry.
    pub fn at_rest<'a>(
        &self,
        present: &[Device],
        mut vms_up: impl Iterator<Item = &'a str>,
    ) -> bool {
        self.busy.is_empty()
            && self.pending.is_empty()
            && self.desired.devices.len() == present.len()
            && present
                .iter()
                .all(|d| self.desired.devices.contains_key(&d.port))
            && vms_up.all(|vm| self.vms.contains_key(vm))
    }

    /// Where a manual override of `device` to `to` (a VM and how, `None`: the host)
    /// stands. `None` until the engine has taken that override in (before, its status
    /// answers an older question) and while the outcome is still open.
    pub fn settled(&self, device: &Device, to: Option<(&str, AttachMode)>) -> Option<Settled> {
        let port = &device.port;
        let expected = match to {
            Some((vm, mode)) => OverrideAction::Attach {
                vm: vm.to_string(),
                mode,
                force: false,
            },
            None => OverrideAction::Detach,
        };
        if self.overrides.get(port).map(|o| &o.action) != Some(&expected) {
            return None;
        }
        let decision = self.desired.devices.get(port)?;
        // An attach in flight already shows as held (so no other VM gets the device); once
        // the VM answered it, without a failure waiting for its retry (an answer lost is
        // not a yes), the VM has it.
        let here = self.holder(device);
        match (to, &decision.placement) {
            (None, _) if here.is_none() => Some(Settled::OnHost),
            (Some((vm, _)), Placement::Vm { vm: planned, .. })
                if planned == vm
                    && here.as_deref() == Some(vm)
                    && !self.acting.contains(vm)
                    && self.pending_for(device).is_none() =>
            {
                Some(Settled::Attached { vm: vm.to_string() })
            }
            (Some(_), Placement::Host) => Some(Settled::StaysOnHost {
                reason: decision.reason.to_string(),
            }),
            _ => self.pending_for(device).cloned().map(Settled::Failed),
        }
    }

    /// The attach mode of the first rule in force that passes `device` to `vm`.
    pub fn rule_mode(&self, device: &Device, vm: &str) -> Option<AttachMode> {
        self.rules.iter().find_map(|rule| match &rule.action {
            RuleAction::Pass { vm: v, mode } if v == vm && rule.selector.matches(device) => {
                Some(*mode)
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{AttachKey, HostMatch, VmUsbDevice};
    use crate::engine::VmView;
    use crate::policy::{Reason, Rule};
    use std::time::Duration;

    fn device(port: &str, address: u16) -> Device {
        Device {
            address: Some(address),
            ..Device::at(port.parse().unwrap())
        }
    }

    fn key_of(mode: AttachMode, d: &Device) -> AttachKey {
        AttachKey::of(mode, d).unwrap()
    }

    /// One of ours, under a handle the engine never reads.
    fn entry(key: AttachKey, attached: bool) -> VmUsbDevice {
        VmUsbDevice {
            id: "a handle of the backend's".into(),
            attached,
            key: Some(key),
            matcher: HostMatch::Other {},
        }
    }

    fn holding(vm: &str, entries: Vec<VmUsbDevice>) -> Status {
        let mut s = Status::default();
        s.vms.insert(
            vm.to_string(),
            VmView {
                devices: entries,
                reachable: true,
            },
        );
        s
    }

    fn plan(s: &mut Status, d: &Device, placement: Placement, reason: Reason) {
        s.desired
            .devices
            .insert(d.port.clone(), Decision { placement, reason });
    }

    fn to_vm(vm: &str) -> Placement {
        Placement::Vm {
            vm: vm.to_string(),
            mode: AttachMode::Port,
        }
    }

    fn override_to(s: &mut Status, d: &Device, action: OverrideAction) {
        s.overrides.insert(
            d.port.clone(),
            Override {
                address: d.address,
                action,
            },
        );
    }

    #[test]
    fn holder_by_port_holds_the_place_even_while_the_device_reconnects() {
        let d = device("1-3", 5);
        let s = holding("win", vec![entry(key_of(AttachMode::Port, &d), false)]);

        assert_eq!(s.holder(&d).as_deref(), Some("win"));
    }

    #[test]
    fn holder_by_address_without_its_device_is_stale_and_holds_nothing() {
        let d = device("1-3", 5);
        let stale = holding("win", vec![entry(key_of(AttachMode::Address, &d), false)]);
        let live = holding("win", vec![entry(key_of(AttachMode::Address, &d), true)]);

        assert_eq!(stale.holder(&d), None);
        assert_eq!(live.holder(&d).as_deref(), Some("win"));
    }

    #[test]
    fn holder_by_id_counts_only_for_the_device_the_plan_sent_there() {
        let mut d = device("1-3", 5);
        d.vendor_id = Some(crate::inventory::HexId(0x046d));
        d.product_id = Some(crate::inventory::HexId(0xc016));
        let mut s = holding("win", vec![entry(key_of(AttachMode::Id, &d), true)]);
        let unplanned = s.holder(&d);
        plan(&mut s, &d, to_vm("win"), Reason::ManualAttach);

        assert_eq!(unplanned, None);
        assert_eq!(s.holder(&d).as_deref(), Some("win"));
    }

    #[test]
    fn a_device_the_engine_has_not_planned_yet_has_no_decision_and_the_engine_is_not_at_rest() {
        let planned = device("1-3", 5);
        let new = device("1-4", 6);
        let mut s = Status::default();
        plan(&mut s, &planned, Placement::Host, Reason::NoRule);

        let state = s.device(&new);

        assert_eq!(state.decision, None);
        assert!(!s.at_rest(&[planned.clone(), new], std::iter::empty()));
        assert!(s.at_rest(&[planned], std::iter::empty()));
    }

    #[test]
    fn at_rest_waits_for_every_vm_up_to_be_listed() {
        let s = holding("win", vec![]);

        assert!(s.at_rest(&[], ["win"].into_iter()));
        assert!(!s.at_rest(&[], ["win", "lab"].into_iter()));
    }

    #[test]
    fn settled_waits_until_the_engine_has_taken_the_override_in() {
        let d = device("1-3", 5);
        let mut s = Status::default();
        plan(&mut s, &d, Placement::Host, Reason::NoRule);

        assert_eq!(s.settled(&d, None), None);
        override_to(&mut s, &d, OverrideAction::Detach);
        assert_eq!(s.settled(&d, None), Some(Settled::OnHost));
    }

    /// A failed attach of `d` by port to VM win, `failures` times, waiting for its retry.
    fn failed_on_win(d: &Device, failures: u32, error: &str) -> Pending {
        Pending {
            vm: "win".into(),
            key: key_of(AttachMode::Port, d),
            id: "a handle of the backend's".into(),
            failures,
            retry_at: Duration::ZERO,
            last_error: error.into(),
        }
    }

    /// `d` attached to VM win by hand, by port: planned there, held there, the override
    /// taken in.
    fn attached_by_hand_to_win(d: &Device) -> Status {
        let mut s = holding("win", vec![entry(key_of(AttachMode::Port, d), true)]);
        plan(&mut s, d, to_vm("win"), Reason::ManualAttach);
        let action = OverrideAction::Attach {
            vm: "win".into(),
            mode: AttachMode::Port,
            force: false,
        };
        override_to(&mut s, d, action);
        s
    }

    #[test]
    fn settled_attach_needs_the_vm_to_hold_it_and_to_have_answered() {
        let d = device("1-3", 5);
        let mut s = attached_by_hand_to_win(&d);
        s.acting.insert("win".into());
        let in_flight = s.settled(&d, Some(("win", AttachMode::Port)));
        s.acting.clear();
        // Its answer came back; the list that follows may still be on its way.
        s.busy.insert("win".into());

        assert_eq!(in_flight, None);
        assert_eq!(
            s.settled(&d, Some(("win", AttachMode::Port))),
            Some(Settled::Attached { vm: "win".into() })
        );
    }

    #[test]
    fn settled_attach_the_plan_refuses_says_why_and_a_failure_is_reported() {
        let d = device("1-3", 5);
        let mut s = Status::default();
        let action = OverrideAction::Attach {
            vm: "win".into(),
            mode: AttachMode::Port,
            force: false,
        };
        override_to(&mut s, &d, action);
        plan(&mut s, &d, Placement::Host, Reason::Hub { subtree: None });
        let refused = s.settled(&d, Some(("win", AttachMode::Port)));
        plan(&mut s, &d, to_vm("win"), Reason::ManualAttach);
        let failure = failed_on_win(&d, 2, "QMP said no");
        s.pending.push(failure.clone());

        assert_eq!(
            refused,
            Some(Settled::StaysOnHost {
                reason: Reason::Hub { subtree: None }.to_string()
            })
        );
        assert_eq!(
            s.settled(&d, Some(("win", AttachMode::Port))),
            Some(Settled::Failed(failure))
        );
    }

    #[test]
    fn settled_attach_whose_answer_was_lost_is_a_failure_not_an_attach() {
        // The attach timed out: it counts as held until a list says otherwise, and its
        // retry waits. That is not the VM confirming it.
        let d = device("1-3", 5);
        let mut s = attached_by_hand_to_win(&d);
        let lost = failed_on_win(&d, 1, "no answer within 10 s");
        s.pending.push(lost.clone());

        assert_eq!(
            s.settled(&d, Some(("win", AttachMode::Port))),
            Some(Settled::Failed(lost))
        );
    }

    #[test]
    fn rule_mode_is_the_mode_of_the_first_rule_passing_the_device_to_that_vm() {
        let d = device("1-3", 5);
        let s = Status {
            rules: std::sync::Arc::from(vec![
                Rule::pass(0, "port:1-4".parse().unwrap(), "win", AttachMode::Address),
                Rule::pass(1, "port:1-3".parse().unwrap(), "lab", AttachMode::Address),
                Rule::pass(2, "port:1-3".parse().unwrap(), "win", AttachMode::Id),
                Rule::pass(3, "port:1-3".parse().unwrap(), "win", AttachMode::Port),
            ]),
            ..Status::default()
        };

        assert_eq!(s.rule_mode(&d, "win"), Some(AttachMode::Id));
        assert_eq!(s.rule_mode(&d, "other"), None);
    }
}
