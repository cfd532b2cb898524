//! A simulated host and simulated VMs (pure, in-process) for the model-based tests of the
//! plan + diff + retry loop. The simulated VM behaves like QEMU where the engine can tell:
//! duplicate ids are refused, `hostaddr` attaches fail when that plug is gone and never
//! come back, injected failures happen before or after the VM did the work.

use super::{device, hub, with_id};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use usbroute::backend::{AttachKey, HostMatch, VmUsbDevice};
use usbroute::engine::{due_actions, Action, Actual, BackoffPolicy, Holdings, Outcome, RetryBook};
use usbroute::inventory::{Device, PciAddress, PortPath};
use usbroute::policy::{plan, Desired, Override, Placement, PlanInput, Rule};

/// How an injected failure behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The VM refuses; nothing changed.
    Refuse,
    /// The VM did it, but the answer was lost (a timeout).
    LostReply,
}

/// One usb-host device in a simulated VM.
#[derive(Debug, Clone)]
struct Entry {
    key: AttachKey,
    /// An address entry whose plug went away: QEMU never reopens it.
    lost: bool,
}

/// One simulated VM.
#[derive(Debug, Clone, Default)]
pub struct SimVm {
    /// Running (QMP answers).
    pub up: bool,
    entries: BTreeMap<String, Entry>,
    faults: Vec<Fault>,
}

/// The simulated host, VMs and daemon state.
pub struct Sim {
    /// Devices present, by port.
    pub devices: BTreeMap<PortPath, Device>,
    next_devnum: BTreeMap<u8, u16>,
    /// The VMs by name.
    pub vms: BTreeMap<String, SimVm>,
    /// The daemon's rules.
    pub rules: Vec<Rule>,
    /// The daemon's manual overrides.
    pub overrides: BTreeMap<PortPath, Override>,
    /// Controllers given whole to a VM (effective only while that VM runs).
    pub controllers: BTreeMap<PciAddress, String>,
    /// Host block devices with a mounted filesystem.
    pub mounted: BTreeSet<String>,
    retries: RetryBook,
    now: Duration,
    /// The daemon's memory of each running VM's last answered list.
    known: Holdings,
    /// Every broken invariant seen, in words.
    pub violations: Vec<String>,
    /// Actions run so far.
    pub actions_run: usize,
}

/// Devnums wrap early here so that reuse of an address by another device happens often.
const DEVNUM_WRAP: u16 = 6;

impl Sim {
    /// An empty host with VMs `names`, all down, and no rules.
    pub fn new(names: &[&str]) -> Sim {
        Sim {
            devices: BTreeMap::new(),
            next_devnum: BTreeMap::new(),
            vms: names
                .iter()
                .map(|n| (n.to_string(), SimVm::default()))
                .collect(),
            rules: vec![],
            overrides: BTreeMap::new(),
            controllers: BTreeMap::new(),
            mounted: BTreeSet::new(),
            retries: RetryBook::new(BackoffPolicy::default()),
            now: Duration::ZERO,
            known: Holdings::default(),
            violations: vec![],
            actions_run: 0,
        }
    }

    fn devnum(&mut self, bus: u8) -> u16 {
        let used: BTreeSet<u16> = self
            .devices
            .values()
            .filter(|d| d.bus == bus)
            .filter_map(|d| d.address)
            .collect();
        let mut n = *self.next_devnum.get(&bus).unwrap_or(&1);
        while used.contains(&n) {
            n = n % DEVNUM_WRAP + 1;
        }
        self.next_devnum.insert(bus, n % DEVNUM_WRAP + 1);
        n
    }

    /// Plug a device of `kind` (0: 046d:c016, 1: 0781:5567, 2: a hub) at `port`, with a
    /// host netdev if `nic`. A port already in use is left as it is.
    pub fn plug(&mut self, port: &str, kind: u8, nic: bool) {
        let path: PortPath = port.parse().expect("port");
        if self.devices.contains_key(&path) {
            return;
        }
        let address = self.devnum(path.bus);
        let mut d = match kind {
            0 => device(port, address),
            1 => with_id(device(port, address), 0x0781, 0x5567),
            _ => hub(port, address),
        };
        if nic {
            d.netdevs = vec![format!("usb{}", address)];
        }
        d.block_devices = vec![format!("sd{port}")];
        d.controller = Some(controller_of(path.bus));
        self.devices.insert(path, d);
    }

    /// Unplug whatever is at `port`; QEMU loses address entries for that plug for good.
    pub fn unplug(&mut self, port: &str) {
        let path: PortPath = port.parse().expect("port");
        let Some(gone) = self.devices.remove(&path) else {
            return;
        };
        for vm in self.vms.values_mut() {
            for e in vm.entries.values_mut() {
                if matches!(e.key, AttachKey::Address { .. }) && e.key.refers_to(&gone) {
                    e.lost = true;
                }
            }
        }
        // Overrides hold for one plug only; the daemon forgets them on unplug.
        self.overrides.remove(&path);
    }

    /// Unplug and plug the same kind again: a new devnum.
    pub fn replug(&mut self, port: &str) {
        let path: PortPath = port.parse().expect("port");
        let Some(old) = self.devices.get(&path).cloned() else {
            return;
        };
        self.unplug(port);
        let kind = match (old.hub, old.vendor_id.map(|v| v.0)) {
            (true, _) => 2,
            (false, Some(0x0781)) => 1,
            _ => 0,
        };
        self.plug(port, kind, !old.netdevs.is_empty());
    }

    /// Start or stop a VM; a (re)started QEMU has no usb-host devices.
    pub fn set_vm(&mut self, name: &str, up: bool) {
        let vm = self.vms.get_mut(name).expect("vm");
        vm.up = up;
        vm.entries.clear();
        // The daemon sees the QMP socket go away (or a new QEMU come up): memory of the
        // old process's devices is dropped.
        self.known.forget(name);
    }

    /// Make the next calls to `name` fail, one fault per call.
    pub fn inject(&mut self, name: &str, faults: &[Fault]) {
        self.vms.get_mut(name).expect("vm").faults.extend(faults);
    }

    /// The daemon dies and starts again: retry state and manual overrides are gone
    /// (documented); what the VMs have is read back.
    pub fn restart_daemon(&mut self) {
        self.retries = RetryBook::new(BackoffPolicy::default());
        self.overrides.clear();
        self.known = Holdings::default();
    }

    fn vms_up(&self) -> BTreeSet<String> {
        self.vms
            .iter()
            .filter(|(_, v)| v.up)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn owned(&self) -> BTreeMap<PciAddress, String> {
        let up = self.vms_up();
        self.controllers
            .iter()
            .filter(|(_, vm)| up.contains(*vm))
            .map(|(c, vm)| (*c, vm.clone()))
            .collect()
    }

    /// What the plan wants now.
    pub fn desired(&self) -> Desired {
        let devices: Vec<Device> = self.devices.values().cloned().collect();
        let up = self.vms_up();
        let owned = self.owned();
        plan(&PlanInput {
            rules: &self.rules,
            devices: &devices,
            mounted_disks: &self.mounted,
            vms_up: &up,
            overrides: &self.overrides,
            controllers_owned: &owned,
        })
    }

    fn list(&mut self, name: &str) -> Option<Vec<VmUsbDevice>> {
        let devices: Vec<&Device> = self.devices.values().collect();
        let vm = self.vms.get_mut(name)?;
        if !vm.up {
            return None;
        }
        // Faults hit only VMs the daemon has heard from since it started: a VM that never
        // answers after a daemon restart is the one window where usbroute relies on the
        // kernel's exclusive claim of a USB device (see docs/config.md).
        if !vm.faults.is_empty() && self.known.knows(name) {
            // Any fault on a list is an unanswered list: the VM counts as unreachable.
            vm.faults.remove(0);
            return None;
        }
        Some(
            vm.entries
                .iter()
                .map(|(id, e)| VmUsbDevice {
                    id: id.clone(),
                    attached: !e.lost && devices.iter().any(|d| e.key.refers_to(d)),
                    ours: true,
                    matcher: HostMatch::Other {},
                })
                .collect(),
        )
    }

    fn actual(&mut self) -> Actual {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        let mut answering = BTreeSet::new();
        for name in names {
            if let Some(devices) = self.list(&name) {
                self.known.listed(&name, devices);
                answering.insert(name);
            }
        }
        self.known.actual(&answering)
    }

    /// Run up to `limit` rounds of the engine; returns `true` when it is quiescent (nothing
    /// to do and nothing waiting for a retry).
    pub fn run(&mut self, limit: usize) -> bool {
        for _ in 0..limit {
            let actual = self.actual();
            let desired = self.desired();
            let devices: Vec<Device> = self.devices.values().cloned().collect();
            let due = due_actions(&desired, &actual, &devices, &mut self.retries, self.now);
            if due.is_empty() {
                match self.retries.next_retry() {
                    Some(at) => self.now = self.now.max(at),
                    None if actual.values().filter(|v| v.reachable).count()
                        == self.vms_up().len() =>
                    {
                        return true
                    }
                    None => {}
                }
                continue;
            }
            for action in due {
                self.execute(&action);
            }
        }
        false
    }

    fn execute(&mut self, action: &Action) {
        self.actions_run += 1;
        let devices: Vec<Device> = self.devices.values().cloned().collect();
        let vm = self.vms.get_mut(action.vm()).expect("vm");
        let fault = (!vm.faults.is_empty()).then(|| vm.faults.remove(0));
        if fault == Some(Fault::Refuse) {
            self.retries
                .failed(action, "injected refusal".into(), self.now);
            self.known.acted(action, Outcome::Refused);
            return;
        }
        let result = match action {
            Action::Attach {
                id, device, mode, ..
            } => {
                let key = AttachKey::of(*mode, device).expect("attach has a key");
                let gone = matches!(key, AttachKey::Address { .. })
                    && !devices.iter().any(|d| key.refers_to(d));
                if vm.entries.contains_key(id) {
                    self.violations
                        .push(format!("attached {id} twice to {}", action.vm()));
                    Err("duplicate id".to_string())
                } else if gone {
                    Err("failed to find host usb device".to_string())
                } else {
                    vm.entries.insert(id.clone(), Entry { key, lost: false });
                    Ok(())
                }
            }
            Action::Detach { id, .. } => match vm.entries.remove(id) {
                Some(_) => Ok(()),
                None => Err(format!("Device '{id}' not found")),
            },
        };
        let outcome = match (result, fault) {
            (Ok(()), None) => {
                self.retries.succeeded(action);
                Outcome::Done
            }
            (Ok(()), Some(_)) => {
                self.retries.failed(action, "reply lost".into(), self.now);
                Outcome::Unknown
            }
            (Err(e), _) => {
                self.retries.failed(action, e, self.now);
                Outcome::Refused
            }
        };
        self.known.acted(action, outcome);
        self.check_one_holder();
    }

    /// No present device may be referred to by usb-host entries in two places.
    fn check_one_holder(&mut self) {
        for d in self.devices.values() {
            let holders: Vec<String> = self
                .vms
                .iter()
                .flat_map(|(n, vm)| {
                    vm.entries
                        .iter()
                        .filter(|(_, e)| !e.lost && e.key.refers_to(d))
                        .map(move |(id, _)| format!("{n}/{id}"))
                })
                .collect();
            if holders.len() > 1 {
                self.violations
                    .push(format!("device {} held by {holders:?}", d.port));
            }
        }
    }

    /// `(vm, id)` of every usb-host each running VM has.
    pub fn held(&self) -> BTreeSet<(String, String)> {
        self.vms
            .iter()
            .filter(|(_, v)| v.up)
            .flat_map(|(n, v)| v.entries.keys().map(move |id| (n.clone(), id.clone())))
            .collect()
    }

    /// `(vm, id)` of address entries whose plug is gone (QEMU will never reopen them).
    pub fn stale(&self) -> BTreeSet<(String, String)> {
        self.vms
            .iter()
            .filter(|(_, v)| v.up)
            .flat_map(|(n, v)| {
                v.entries
                    .iter()
                    .filter(|(_, e)| e.lost)
                    .map(move |(id, _)| (n.clone(), id.clone()))
            })
            .collect()
    }

    /// `(vm, id)` the plan wants, for running VMs.
    pub fn wanted(&self) -> BTreeSet<(String, String)> {
        let desired = self.desired();
        desired
            .devices
            .iter()
            .filter_map(|(port, decision)| match &decision.placement {
                Placement::Vm { vm, mode } => {
                    let key = AttachKey::of(*mode, &self.devices[port])?;
                    Some((vm.clone(), key.to_id()))
                }
                Placement::Host => None,
            })
            .collect()
    }
}

/// Bus 1 and 3 hang off the xHCI, bus 2 off an EHCI that can be given whole to a VM.
pub fn controller_of(bus: u8) -> PciAddress {
    match bus {
        2 => "0000:00:1d.0".parse().expect("pci"),
        _ => "0000:00:14.0".parse().expect("pci"),
    }
}
