//! A simulated host and daemon over the fake VMs (`usbroute::backend::fake`, driven
//! synchronously: with no hang and no jitter a fake answers at once) for the model-based
//! tests of the plan + diff + retry loop. The fake behaves like QEMU where the engine can
//! tell (its contract test holds it to that): an id is never added twice, `hostaddr`
//! attaches fail when that plug is gone and never come back, injected failures happen
//! before or after the VM did the work.

use super::{device, hub, with_id};
use futures_util::FutureExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use usbroute::backend::fake::{self, FakeHost, FakeVm};
use usbroute::backend::qemu::ids;
use usbroute::backend::{AttachKey, BackendError, HostMatch, VmBackend, VmUsbDevice};
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

/// One simulated VM: its connection while it runs.
#[derive(Clone, Default)]
pub struct SimVm {
    /// Running (QMP answers).
    pub up: bool,
    vm: Option<Arc<FakeVm>>,
}

/// The simulated host, VMs and daemon state.
pub struct Sim {
    /// The fake host the VMs run on; mirrors `devices`.
    host: FakeHost,
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
    /// How many of the fake host's conflicts are in `violations` already.
    conflicts_seen: usize,
}

/// Devnums wrap early here so that reuse of an address by another device happens often.
const DEVNUM_WRAP: u16 = 6;

impl Sim {
    /// An empty host with VMs `names`, all down, and no rules.
    pub fn new(names: &[&str]) -> Sim {
        Sim {
            host: FakeHost::new(),
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
            conflicts_seen: 0,
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
        self.host.plug(d.clone());
        self.devices.insert(path, d);
    }

    /// Unplug whatever is at `port`; QEMU loses address entries for that plug for good.
    pub fn unplug(&mut self, port: &str) {
        let path: PortPath = port.parse().expect("port");
        if self.devices.remove(&path).is_none() {
            return;
        }
        self.host.unplug(&path);
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
        vm.vm = match up {
            true => Some(self.host.start(name)),
            false => {
                self.host.stop(name);
                None
            }
        };
        // The daemon sees the QMP socket go away (or a new QEMU come up): memory of the
        // old process's devices is dropped.
        self.known.forget(name);
    }

    /// Make the next calls to `name` fail, one fault per call.
    pub fn inject(&mut self, name: &str, faults: &[Fault]) {
        let vm = self.host.connect(name);
        for fault in faults {
            vm.inject(match fault {
                Fault::Refuse => fake::Fault::Refuse,
                Fault::LostReply => fake::Fault::LoseAnswer,
            });
        }
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
            backends: &Default::default(),
            overrides: &self.overrides,
            follows: &BTreeMap::new(),
            controllers_owned: &owned,
        })
    }

    fn list(&mut self, name: &str) -> Option<Vec<VmUsbDevice>> {
        let vm = self.vms.get(name)?.vm.clone()?;
        // Faults hit only VMs the daemon has heard from since it started: a VM that never
        // answers after a daemon restart is the one window where usbroute relies on the
        // kernel's exclusive claim of a USB device (see docs/config.md). So the others are
        // read without a call (which would meet a queued fault).
        if !self.known.knows(name) {
            return Some(vm.devices());
        }
        // Any fault on a list is an unanswered list: the VM counts as unreachable.
        answer(vm.list()).ok()
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
        let vm = self.vms[action.vm()]
            .vm
            .clone()
            .expect("actions go to running VMs");
        let id = vm.device_id(action.key());
        let result = match action {
            Action::Attach { device, mode, .. } => answer(vm.attach(device, *mode)).map(|_| ()),
            Action::Detach { key, .. } => answer(vm.detach(key)),
        };
        let outcome = match result {
            Ok(()) => {
                self.retries.succeeded(action);
                Outcome::Done
            }
            Err(BackendError::Timeout { .. }) => {
                self.retries
                    .failed(action, &id, "reply lost".into(), self.now);
                Outcome::Unknown
            }
            Err(e) => {
                self.retries.failed(action, &id, e.to_string(), self.now);
                Outcome::Refused
            }
        };
        self.known.acted(action, &id, outcome);
        // An id added twice, or a device taken while another VM held it.
        let conflicts = self.host.conflicts();
        self.violations
            .extend_from_slice(&conflicts[self.conflicts_seen..]);
        self.conflicts_seen = conflicts.len();
        self.check_one_holder();
    }

    /// No present device may be referred to by usb-host entries in two places.
    fn check_one_holder(&mut self) {
        for d in self.devices.values() {
            let holders = self.host.holders(d);
            if holders.len() > 1 {
                self.violations
                    .push(format!("device {} held by {holders:?}", d.port));
            }
        }
    }

    /// `(vm, id)` of every usb-host each running VM has.
    pub fn held(&self) -> BTreeSet<(String, String)> {
        self.listings()
            .flat_map(|(n, devices)| devices.into_iter().map(move |d| (n.clone(), d.id)))
            .collect()
    }

    /// What each running VM has, read without a call.
    fn listings(&self) -> impl Iterator<Item = (String, Vec<VmUsbDevice>)> + '_ {
        let running = self
            .vms
            .iter()
            .filter_map(|(n, v)| Some((n, v.vm.as_ref()?)));
        running.map(|(n, vm)| (n.clone(), vm.devices()))
    }

    /// `(vm, id)` of address entries whose plug is gone (QEMU will never reopen them).
    pub fn stale(&self) -> BTreeSet<(String, String)> {
        // An address entry is made only for a plug that is there; not attached, it is one
        // whose plug went away.
        let lost = |d: &VmUsbDevice| matches!(d.matcher, HostMatch::Address { .. }) && !d.attached;
        self.listings()
            .flat_map(|(n, devices)| {
                let gone = devices.into_iter().filter(lost);
                gone.map(move |d| (n.clone(), d.id))
            })
            .collect()
    }

    /// `(vm, id)` the plan wants, for running VMs (the fake names devices as QEMU does).
    pub fn wanted(&self) -> BTreeSet<(String, String)> {
        let desired = self.desired();
        desired
            .devices
            .iter()
            .filter_map(|(port, decision)| match &decision.placement {
                Placement::Vm { vm, mode } => {
                    let key = AttachKey::of(*mode, &self.devices[port])?;
                    Some((vm.clone(), ids::device_id(&key)))
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

/// The answer of a fake VM's call, which comes at once (no hang, no jitter here).
fn answer<T>(call: usbroute::backend::BoxFuture<'_, T>) -> T {
    call.now_or_never()
        .expect("a fake VM without hangs answers at once")
}
