//! The diff: what to do so that the VMs hold what the plan wants. Pure.
//!
//! Guarantees, for any input:
//! - nothing already right is touched (a key present where it is wanted stays);
//! - nothing is attached twice (a key a VM lists is never attached to it again);
//! - a device is never on two VMs: an attach is emitted only when no usb-host of ours in
//!   any VM could be holding a device the new one could take (for `by = "id"`, any device
//!   of that kind); otherwise only the detach is emitted now, and the
//!   attach follows on a later round, after the VM confirmed the detach;
//! - usb-host devices that are not ours (listed without an [`AttachKey`]) are left alone.
//!
//! Our devices are known by their [`AttachKey`] only; what a hypervisor calls them is its
//! backend's business.

use crate::backend::{AttachKey, AttachMode, VmUsbDevice};
use crate::inventory::Device;
use crate::policy::{Desired, Placement};
use serde::Serialize;
use std::collections::BTreeMap;

/// One thing to do to one VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Action {
    /// Add a usb-host device for `device` to `vm`, matching by `mode`, keyed on `key`.
    Attach {
        /// The VM.
        vm: String,
        /// The host device (as the inventory saw it).
        device: Box<Device>,
        /// How the usb-host finds it.
        mode: AttachMode,
        /// What it is attached for (`device`'s key under `mode`).
        key: AttachKey,
    },
    /// Remove our usb-host device attached for `key` from `vm`.
    Detach {
        /// The VM.
        vm: String,
        /// What it was attached for.
        key: AttachKey,
    },
}

impl Action {
    /// The VM it acts on.
    pub fn vm(&self) -> &str {
        match self {
            Action::Attach { vm, .. } | Action::Detach { vm, .. } => vm,
        }
    }

    /// The key of the usb-host device it acts on.
    pub fn key(&self) -> &AttachKey {
        match self {
            Action::Attach { key, .. } | Action::Detach { key, .. } => key,
        }
    }
}

/// What one running VM holds, as far as the engine knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmView {
    /// Its usb-host devices: from the last `list` that answered.
    pub devices: Vec<VmUsbDevice>,
    /// `true` when that list is from now; `false` when the VM stopped answering and
    /// `devices` is the last known state. Nothing is done to an unreachable VM, but what
    /// it last held still counts as held: a VM that times out keeps its devices.
    pub reachable: bool,
}

/// Every running VM's view, by name. A VM that is not here holds nothing (it is down, or
/// it never answered since the daemon started; see docs/config.md).
pub type Actual = BTreeMap<String, VmView>;

/// Compute the actions that move `actual` towards `desired`. Detaches come first, then
/// attaches; both sorted by VM and key, so the same inputs always give the same list.
pub fn reconcile(desired: &Desired, actual: &Actual, devices: &[Device]) -> Vec<Action> {
    let by_port: BTreeMap<_, _> = devices.iter().map(|d| (&d.port, d)).collect();
    let mut wanted: BTreeMap<(&str, AttachKey), &Device> = BTreeMap::new();
    for (port, decision) in &desired.devices {
        let (Placement::Vm { vm, mode }, Some(device)) = (&decision.placement, by_port.get(port))
        else {
            continue;
        };
        if let Some(key) = AttachKey::of(*mode, device) {
            wanted.insert((vm.as_str(), key), device);
        }
    }
    let ours: Vec<(&str, &VmUsbDevice, &AttachKey)> = actual
        .iter()
        .flat_map(|(vm, view)| view.devices.iter().map(move |e| (vm.as_str(), e)))
        .filter_map(|(vm, e)| e.key.as_ref().map(|k| (vm, e, k)))
        .collect();
    let right = |vm: &str, e: &VmUsbDevice, key: &AttachKey| {
        !is_stale(e, key) && wanted.contains_key(&(vm, key.clone()))
    };
    let reachable = |vm: &str| actual.get(vm).is_some_and(|v| v.reachable);
    let mut actions: Vec<Action> = ours
        .iter()
        .filter(|(vm, e, key)| reachable(vm) && !right(vm, e, key))
        .map(|(vm, _, key)| Action::Detach {
            vm: vm.to_string(),
            key: (*key).clone(),
        })
        .collect();
    for ((vm, key), device) in &wanted {
        let Some(view) = actual.get(*vm).filter(|v| v.reachable) else {
            continue;
        };
        let present = view.devices.iter().any(|e| e.key.as_ref() == Some(key));
        // Every device this usb-host could take (all devices of a kind, for `by = "id"`)
        // must be free of our other usb-host devices first.
        let held_elsewhere = devices.iter().filter(|d| key.refers_to(d)).any(|d| {
            ours.iter()
                .any(|(v, _, k)| (v != vm || *k != key) && k.refers_to(d))
        });
        if !present && !held_elsewhere {
            actions.push(Action::Attach {
                vm: vm.to_string(),
                device: Box::new((*device).clone()),
                mode: key.mode(),
                key: key.clone(),
            });
        }
    }
    actions
}

/// After the host resumed: a detach of every usb-host device of ours `vm` lists in
/// `view` that `due` does not act on already. The kernel reset every USB device on resume
/// and gave their interfaces back to its own drivers, so a device QEMU lists as attached
/// may hold nothing; detached, it is attached again by the next round like any wanted
/// device that is missing (its key unchanged, or a new devnum's).
pub fn renewals(vm: &str, view: &VmView, due: &[Action]) -> Vec<Action> {
    view.devices
        .iter()
        .filter_map(|e| e.key.as_ref())
        .filter(|key| !due.iter().any(|a| a.vm() == vm && a.key() == *key))
        .map(|key| Action::Detach {
            vm: vm.to_string(),
            key: key.clone(),
        })
        .collect()
}

/// An address entry that lost its device is stale for good: QEMU never reopens hostaddr,
/// and the kernel may hand the same devnum to another device later. It holds nothing, and
/// the diff detaches it. (By port or id QEMU holds the place even while it reconnects.)
pub(super) fn is_stale(entry: &VmUsbDevice, key: &AttachKey) -> bool {
    key.mode() == AttachMode::Address && !entry.attached
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::HostMatch;

    fn ours(key: AttachKey) -> VmUsbDevice {
        VmUsbDevice {
            id: "id".into(),
            attached: true,
            key: Some(key),
            matcher: HostMatch::Other {},
        }
    }

    fn addr(address: u16) -> AttachKey {
        AttachKey::Address { bus: 1, address }
    }

    #[test]
    fn renewals_detach_every_device_of_ours_and_leave_the_users_own_alone() {
        let users_own = VmUsbDevice {
            key: None,
            ..ours(addr(9))
        };
        let view = VmView {
            devices: vec![ours(addr(2)), users_own, ours(addr(3))],
            reachable: true,
        };

        let renew = renewals("vm", &view, &[]);

        let keys: Vec<&AttachKey> = renew.iter().map(Action::key).collect();
        assert_eq!(keys, vec![&addr(2), &addr(3)]);
        assert!(renew
            .iter()
            .all(|a| matches!(a, Action::Detach { vm, .. } if vm == "vm")));
    }

    #[test]
    fn renewals_skip_a_device_the_round_already_acts_on() {
        let view = VmView {
            devices: vec![ours(addr(2)), ours(addr(3))],
            reachable: true,
        };
        let due = vec![Action::Detach {
            vm: "vm".into(),
            key: addr(2),
        }];

        let renew = renewals("vm", &view, &due);

        assert_eq!(
            renew,
            vec![Action::Detach {
                vm: "vm".into(),
                key: addr(3)
            }]
        );
    }
}
