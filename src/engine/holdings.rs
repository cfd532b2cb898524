//! What the engine believes each running VM holds: its last answered `list`, with the
//! actions it confirmed since (a job the VM said yes to throughout is not followed by a
//! list). An attach whose outcome is unknown (a timeout, a lost reply) counts as held
//! until a list says otherwise, so that a VM that stops answering can never make the
//! engine give the same device to a second VM. Pure data.

use super::diff::{Action, Actual, VmView};
use crate::backend::VmUsbDevice;
use std::collections::{BTreeMap, BTreeSet};

/// How an action ended, as far as holdings are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The VM confirmed it.
    Done,
    /// The VM refused it: nothing changed.
    Refused,
    /// No answer (timeout, connection lost): it may or may not have happened.
    Unknown,
}

/// Per VM: the last known usb-host devices.
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    known: BTreeMap<String, Vec<VmUsbDevice>>,
}

impl Holdings {
    /// `vm` answered a list: that is now the truth.
    pub fn listed(&mut self, vm: &str, devices: Vec<VmUsbDevice>) {
        self.known.insert(vm.to_string(), devices);
    }

    /// `vm` is gone (its QEMU exited: the socket vanished or refuses connections), and so
    /// are its devices. Do not call this for a VM that merely stopped answering.
    pub fn forget(&mut self, vm: &str) {
        self.known.remove(vm);
    }

    /// Has `vm` answered a list since the engine started (or since it was forgotten)?
    pub fn knows(&self, vm: &str) -> bool {
        self.known.contains_key(vm)
    }

    /// Account for an action's outcome until the next list; `id` is the backend's handle
    /// for its device ([`crate::backend::VmBackend::device_id`]), shown until the VM lists
    /// it itself.
    pub fn acted(&mut self, action: &Action, id: &str, outcome: Outcome) {
        let Some(list) = self.known.get_mut(action.vm()) else {
            return;
        };
        let key = action.key();
        let is_this = |e: &VmUsbDevice| e.key.as_ref() == Some(key);
        match (action, outcome) {
            // Nothing changed. An attach is sent only for a key the VM did not list, so
            // the entry for it is the one put in while it was in flight: it goes.
            (Action::Attach { .. }, Outcome::Refused) => list.retain(|e| !is_this(e)),
            (Action::Detach { .. }, Outcome::Refused) => {}
            (Action::Attach { .. }, _) => {
                if !list.iter().any(is_this) {
                    // What the VM's list would show for it (a list follows only a job
                    // with a failure in it).
                    list.push(VmUsbDevice {
                        id: id.to_string(),
                        attached: true,
                        key: Some(key.clone()),
                        matcher: key.host_match(),
                    });
                }
            }
            (Action::Detach { .. }, Outcome::Done) => list.retain(|e| !is_this(e)),
            (Action::Detach { .. }, Outcome::Unknown) => {}
        }
    }

    /// The engine's view for the diff: VMs in `answering` are reachable now; other known
    /// VMs appear with their last known devices, unreachable.
    pub fn actual(&self, answering: &BTreeSet<String>) -> Actual {
        self.known
            .iter()
            .map(|(vm, devices)| {
                let view = VmView {
                    devices: devices.clone(),
                    reachable: answering.contains(vm),
                };
                (vm.clone(), view)
            })
            .collect()
    }
}
