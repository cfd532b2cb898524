//! What the daemon asks of the policy, and the manual overrides it keeps.
//!
//! The daemon loop does not look inside rules: it asks a [`PolicyView`] where each device
//! belongs and why. [`EmptyPolicy`] is the policy without a config file (everything stays on
//! the host); `ConfiguredPolicy` (in `configured.rs`) answers from the config through the
//! pure `crate::policy` plan.

use super::protocol::{RuleVerdict, WhyDevice};
use crate::backend::{AttachMode, HostMatch, VmUsbDevice};
use crate::inventory::{Device, PortPath, Snapshot};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Where a device should be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// On the host.
    Host,
    /// In this VM, attached by this mode.
    Vm {
        /// VM name.
        name: String,
        /// How the VM's usb-host finds it.
        mode: AttachMode,
    },
}

impl Target {
    /// `host` or the VM name.
    pub fn label(&self) -> &str {
        match self {
            Target::Host => "host",
            Target::Vm { name, .. } => name,
        }
    }
}

/// The policy's answer for one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The device.
    pub device: Device,
    /// Where it should be.
    pub target: Target,
    /// Why, in one sentence (the deciding rule, an override, a protection).
    pub reason: String,
}

/// A manual override from `attach --vm` / `detach`, held until the device is unplugged
/// (its port no longer has a device with the same address) or cleared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// The device's address when the override was made: a re-plug ends it.
    pub address: Option<u16>,
    /// Where the user wants it.
    pub target: Target,
}

/// Overrides by port path.
pub type Overrides = BTreeMap<PortPath, Override>;

/// Drop the overrides of devices that are gone (unplugged or re-plugged with a new address).
pub fn expire_overrides(overrides: &mut Overrides, snapshot: &Snapshot) {
    overrides.retain(|port, o| {
        snapshot
            .device_at(port)
            .is_some_and(|d| d.address == o.address)
    });
}

/// What the daemon needs from a policy.
pub trait PolicyView: Send + Sync {
    /// The config file, `None` for the empty policy.
    fn origin(&self) -> Option<PathBuf>;
    /// Every VM: name and QMP socket.
    fn vms(&self) -> Vec<(String, PathBuf)>;
    /// Where each device of the snapshot should be, given which VMs are up and the overrides.
    fn decide(
        &self,
        snapshot: &Snapshot,
        vms_up: &BTreeSet<String>,
        overrides: &Overrides,
    ) -> Vec<Decision>;
    /// For `why`: every rule's verdict on `device`.
    fn verdicts(&self, snapshot: &Snapshot, device: &Device) -> Vec<RuleVerdict>;
}

/// No config file: every device stays on the host (events are still logged).
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyPolicy;

/// The reason the empty policy gives.
pub const EMPTY_POLICY_REASON: &str =
    "no config file: every device stays on the host (start with --config FILE to pass devices)";

impl PolicyView for EmptyPolicy {
    fn origin(&self) -> Option<PathBuf> {
        None
    }

    fn vms(&self) -> Vec<(String, PathBuf)> {
        Vec::new()
    }

    fn decide(&self, snapshot: &Snapshot, _: &BTreeSet<String>, _: &Overrides) -> Vec<Decision> {
        snapshot
            .devices
            .iter()
            .map(|d| Decision {
                device: d.clone(),
                target: Target::Host,
                reason: EMPTY_POLICY_REASON.to_string(),
            })
            .collect()
    }

    fn verdicts(&self, _: &Snapshot, _: &Device) -> Vec<RuleVerdict> {
        Vec::new()
    }
}

/// Does this usb-host device of a VM hold `device` when attached by `mode`?
pub fn holds(vm_device: &VmUsbDevice, device: &Device, mode: AttachMode) -> bool {
    match (&vm_device.matcher, mode) {
        (HostMatch::Address { bus, address }, AttachMode::Address) => {
            *bus == device.bus && Some(*address) == device.address
        }
        (HostMatch::Port { bus, port }, AttachMode::Port) => {
            *bus == device.port.bus && *port == device.port.chain()
        }
        (
            HostMatch::Id {
                vendor_id,
                product_id,
            },
            AttachMode::Id,
        ) => Some(*vendor_id) == device.vendor_id && Some(*product_id) == device.product_id,
        _ => false,
    }
}

/// Does this usb-host device hold `device` by any mode?
pub fn holds_any(vm_device: &VmUsbDevice, device: &Device) -> bool {
    [AttachMode::Address, AttachMode::Port, AttachMode::Id]
        .into_iter()
        .any(|m| holds(vm_device, device, m))
}

/// One `why` entry from a decision and the rule verdicts.
pub fn why_entry(decision: &Decision, rules: Vec<RuleVerdict>) -> WhyDevice {
    WhyDevice {
        port: decision.device.port.to_string(),
        label: decision.device.label(),
        target: decision.target.label().to_string(),
        reason: decision.reason.clone(),
        rules,
    }
}
