//! From decisions and what the VMs have to the actions that close the gap. Pure.
//!
//! Detach first, attach after: a device moving from one VM to another is attached to the
//! new VM only once no VM holds it any more (the next pass, after the detach is confirmed).

use super::decide::{holds, holds_any, Decision, Target};
use crate::backend::{AttachMode, VmUsbDevice};
use crate::inventory::Device;
use std::collections::BTreeMap;

/// One thing to do in one VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Attach a host device.
    Attach {
        /// The device (boxed: a device is large, a detach small).
        device: Box<Device>,
        /// By which mode.
        mode: AttachMode,
    },
    /// Detach one of our usb-host devices.
    Detach {
        /// Its id in the VM.
        id: String,
        /// Why it goes (for the log).
        reason: String,
    },
}

impl Action {
    /// A stable key for retries and dry-run dedup: `attach 1-3 address` / `detach ID`.
    pub fn key(&self) -> String {
        match self {
            Action::Attach { device, mode } => format!("attach {} {mode:?}", device.port),
            Action::Detach { id, .. } => format!("detach {id}"),
        }
    }

    /// The device label or id, for logs.
    pub fn subject(&self) -> String {
        match self {
            Action::Attach { device, .. } => format!("{} ({})", device.port, device.label()),
            Action::Detach { id, .. } => id.clone(),
        }
    }
}

/// The actions per VM that make `actual` (the up VMs' usb-host devices) match `decisions`.
/// Only our own devices are ever detached; a user's usb-host devices are left alone.
pub fn plan_actions(
    decisions: &[Decision],
    actual: &BTreeMap<String, Vec<VmUsbDevice>>,
) -> BTreeMap<String, Vec<Action>> {
    let mut out: BTreeMap<String, Vec<Action>> = BTreeMap::new();
    for (vm, devices) in actual {
        for held in devices.iter().filter(|d| d.ours) {
            let wanted = decisions.iter().any(|d| match &d.target {
                Target::Vm { name, mode } => name == vm && holds(held, &d.device, *mode),
                Target::Host => false,
            });
            if !wanted {
                let reason = match decisions.iter().find(|d| holds_any(held, &d.device)) {
                    Some(d) => d.reason.clone(),
                    None => "its host device is gone".to_string(),
                };
                out.entry(vm.clone()).or_default().push(Action::Detach {
                    id: held.id.clone(),
                    reason,
                });
            }
        }
    }
    for d in decisions {
        let Target::Vm { name, mode } = &d.target else {
            continue;
        };
        let Some(in_vm) = actual.get(name) else {
            continue;
        };
        if in_vm.iter().any(|held| holds(held, &d.device, *mode)) {
            continue;
        }
        let held_elsewhere = actual
            .values()
            .flatten()
            .any(|held| held.ours && holds_any(held, &d.device));
        let already_planned = out.get(name).is_some_and(|acts| {
            acts.iter().any(|a| matches!(a, Action::Attach { device, mode: m } if m == mode && same_key(device, &d.device, *mode)))
        });
        if !held_elsewhere && !already_planned {
            out.entry(name.clone()).or_default().push(Action::Attach {
                device: Box::new(d.device.clone()),
                mode: *mode,
            });
        }
    }
    out
}

/// Two devices share a usb-host key under `mode` (two mice of one kind, by id).
fn same_key(a: &Device, b: &Device, mode: AttachMode) -> bool {
    match mode {
        AttachMode::Address => a.bus == b.bus && a.address == b.address,
        AttachMode::Port => a.port == b.port,
        AttachMode::Id => a.vendor_id == b.vendor_id && a.product_id == b.product_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::HostMatch;
    use crate::inventory::HexId;

    fn device(port: &str, address: u16) -> Device {
        let port: crate::inventory::PortPath = port.parse().unwrap();
        Device {
            bus: port.bus,
            port,
            address: Some(address),
            vendor_id: Some(HexId(0x046d)),
            product_id: Some(HexId(0xc016)),
            manufacturer: None,
            product: None,
            serial: None,
            class: None,
            speed_mbps: None,
            hub: false,
            removable: None,
            controller: None,
            parent: None,
            sysfs_path: String::new(),
            driver: None,
            interfaces: vec![],
            netdevs: vec![],
            block_devices: vec![],
        }
    }

    fn to_vm(d: &Device, vm: &str) -> Decision {
        Decision {
            device: d.clone(),
            target: Target::Vm {
                name: vm.into(),
                mode: AttachMode::Address,
            },
            reason: "rule 1".into(),
        }
    }

    fn held_by_address(bus: u8, address: u16) -> VmUsbDevice {
        VmUsbDevice {
            id: format!("usbroute-addr-{bus}-{address}"),
            attached: true,
            ours: true,
            matcher: HostMatch::Address { bus, address },
        }
    }

    #[test]
    fn missing_device_is_attached_to_an_up_vm() {
        let d = device("1-3", 5);
        let actual = BTreeMap::from([("a".to_string(), vec![])]);

        let acts = plan_actions(&[to_vm(&d, "a")], &actual);

        assert_eq!(
            acts["a"],
            vec![Action::Attach {
                device: Box::new(d),
                mode: AttachMode::Address
            }]
        );
    }

    #[test]
    fn device_already_held_needs_nothing() {
        let d = device("1-3", 5);
        let actual = BTreeMap::from([("a".to_string(), vec![held_by_address(1, 5)])]);

        let acts = plan_actions(&[to_vm(&d, "a")], &actual);

        assert!(acts.is_empty(), "{acts:?}");
    }

    #[test]
    fn moving_device_is_detached_first_and_not_yet_attached() {
        let d = device("1-3", 5);
        let actual = BTreeMap::from([
            ("a".to_string(), vec![held_by_address(1, 5)]),
            ("b".to_string(), vec![]),
        ]);

        let acts = plan_actions(&[to_vm(&d, "b")], &actual);

        assert_eq!(acts.len(), 1);
        assert!(matches!(&acts["a"][..], [Action::Detach { id, .. }] if id == "usbroute-addr-1-5"));
    }

    #[test]
    fn users_own_usb_host_devices_are_left_alone() {
        let mine = VmUsbDevice {
            ours: false,
            ..held_by_address(1, 9)
        };
        let actual = BTreeMap::from([("a".to_string(), vec![mine])]);

        let acts = plan_actions(&[], &actual);

        assert!(acts.is_empty());
    }

    #[test]
    fn our_device_whose_host_device_is_gone_is_detached() {
        let actual = BTreeMap::from([("a".to_string(), vec![held_by_address(1, 9)])]);

        let acts = plan_actions(&[], &actual);

        assert!(
            matches!(&acts["a"][..], [Action::Detach { reason, .. }] if reason == "its host device is gone")
        );
    }

    #[test]
    fn down_vm_gets_no_actions() {
        let d = device("1-3", 5);

        let acts = plan_actions(&[to_vm(&d, "a")], &BTreeMap::new());

        assert!(acts.is_empty());
    }
}
