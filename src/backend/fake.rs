//! One fake VM beside the [`VmBackend`] trait, for the tests and benches of everything
//! above the backends (engine, daemon models). It behaves like QEMU as far as the engine
//! can see, and `tests/real_qemu/backend_contract.rs` runs the same cases against it and against a
//! real `qemu-system-x86_64` so it cannot drift:
//!
//! - it names our devices as QEMU does (`backend::qemu::ids`: the contract test compares
//!   its listings with a real QEMU's) and reads the [`AttachKey`] back from the id; an
//!   attach of an id the VM has already changes nothing and answers with what the VM has
//!   (QEMU's backend checks before `device_add`);
//! - by port and by id an absent device is accepted but not `attached`; by address it is
//!   refused (QEMU cannot find that plug), and an address entry whose plug goes away is
//!   never attached again (QEMU does not reopen it); hubs are refused;
//! - detach of an id the VM does not have is refused, naming the id;
//! - a (re)started VM has no usb-host devices; calls through a handle of an older process
//!   fail as unreachable.
//!
//! Faults are injected per call ([`Fault`]: refuse, hang, drop the connection, lose the
//! answer), or for a while ([`FakeVm::hang`]). Several VMs share one [`FakeHost`] (the
//! devices plugged in), which also records what a real host would show as a device fought
//! over ([`FakeHost::conflicts`]).
//!
//! Public so integration tests and benches can use it, hidden from the docs because it is
//! no part of the library's contract; always compiled (no feature to forget), and the
//! linker drops it from the binary, which never names it.

use crate::backend::qemu::ids;
use crate::backend::{
    AttachKey, AttachMode, BackendError, BoxFuture, HostMatch, VmBackend, VmConnection, VmUsbDevice,
};
use crate::inventory::{ClassTriple, Device, PortPath};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// Which call an injected fault waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// [`VmBackend::list`].
    List,
    /// [`VmBackend::attach`].
    Attach,
    /// [`VmBackend::detach`].
    Detach,
}

/// What an injected fault does to the one call it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The VM refuses; nothing changes (an attach says QEMU's "failed to open host usb
    /// device").
    Refuse,
    /// The VM does the work, but the answer is lost: the caller sees a timeout.
    LoseAnswer,
    /// The VM never answers this call (a stopped QEMU).
    Hang,
    /// The connection drops: this call and every later one on this handle fail as
    /// unreachable, and [`FakeVm::connection`]'s `closed` resolves. The VM keeps running;
    /// [`FakeHost::connect`] reaches it again.
    DropConnection,
}

/// The host the fake VMs run on: the USB devices plugged in, and every fake VM.
#[derive(Clone, Default)]
pub struct FakeHost {
    state: Arc<Mutex<HostState>>,
}

#[derive(Default)]
struct HostState {
    devices: BTreeMap<PortPath, Device>,
    vms: BTreeMap<String, VmState>,
    conflicts: Vec<String>,
    /// Seeds how many scheduler turns each call takes; `None`: calls take none.
    jitter: Option<u64>,
}

#[derive(Default)]
struct VmState {
    up: bool,
    incarnation: u64,
    entries: BTreeMap<String, Entry>,
    faults: VecDeque<(Option<Call>, Fault)>,
    calls: Vec<String>,
}

/// One usb-host device in a fake VM.
#[derive(Clone)]
struct Entry {
    matcher: HostMatch,
    /// An address entry whose plug went away: QEMU never reopens it.
    lost: bool,
}

impl FakeHost {
    /// A host with no devices and no VMs.
    pub fn new() -> FakeHost {
        FakeHost::default()
    }

    /// Every call of every VM first takes 0 to 3 scheduler turns, drawn from `seed`, so
    /// that model tests meet many interleavings.
    pub fn with_jitter(seed: u64) -> FakeHost {
        let host = FakeHost::default();
        host.lock().jitter = Some(seed);
        host
    }

    fn lock(&self) -> MutexGuard<'_, HostState> {
        // A test that panicked while holding the lock has failed already; its state is
        // still the best picture there is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plug `device` in (replacing whatever was at its port).
    pub fn plug(&self, device: Device) {
        self.lock().devices.insert(device.port.clone(), device);
    }

    /// Unplug what is at `port`, if anything: address entries for that plug are lost for
    /// good.
    pub fn unplug(&self, port: &PortPath) -> Option<Device> {
        let mut state = self.lock();
        let gone = state.devices.remove(port)?;
        for vm in state.vms.values_mut() {
            for entry in vm.entries.values_mut() {
                entry.lost |= matches!(entry.matcher, HostMatch::Address { .. })
                    && matches(&entry.matcher, &gone);
            }
        }
        Some(gone)
    }

    /// Make the host have exactly `devices` (what a rescan would report): a device gone or
    /// changed at its port is unplugged first, so it counts as a new plug.
    pub fn set_devices(&self, devices: &[Device]) {
        let stale: Vec<PortPath> = (self.lock().devices.values())
            .filter(|old| !devices.contains(old))
            .map(|old| old.port.clone())
            .collect();
        for port in &stale {
            self.unplug(port);
        }
        for device in devices {
            self.plug(device.clone());
        }
    }

    /// The devices plugged in now, by port.
    pub fn devices(&self) -> Vec<Device> {
        self.lock().devices.values().cloned().collect()
    }

    /// Start VM `name` (again): a new process with no usb-host devices; handles to an
    /// earlier one stop answering.
    pub fn start(&self, name: &str) -> Arc<FakeVm> {
        {
            let mut state = self.lock();
            let vm = state.vms.entry(name.to_string()).or_default();
            vm.up = true;
            vm.incarnation += 1;
            vm.entries.clear();
        }
        self.connect(name)
    }

    /// Stop VM `name`: its handles answer as unreachable from now on.
    pub fn stop(&self, name: &str) {
        if let Some(vm) = self.lock().vms.get_mut(name) {
            vm.up = false;
            vm.incarnation += 1;
            vm.entries.clear();
        }
    }

    /// A new connection to the VM `name` as it runs now (unreachable if it does not).
    pub fn connect(&self, name: &str) -> Arc<FakeVm> {
        let incarnation = self.lock().vms.get(name).map_or(0, |vm| vm.incarnation);
        Arc::new(FakeVm {
            name: name.to_string(),
            incarnation,
            host: self.clone(),
            hanging: watch::channel(false).0,
            dropped: watch::channel(false).0,
        })
    }

    /// The names of the VMs running now.
    pub fn running(&self) -> Vec<String> {
        let state = self.lock();
        let up = state.vms.iter().filter(|(_, vm)| vm.up);
        up.map(|(name, _)| name.clone()).collect()
    }

    /// What a real host would show as a device fought over, in words: an attach while
    /// another VM held the device, or of an id the VM had already.
    pub fn conflicts(&self) -> Vec<String> {
        self.lock().conflicts.clone()
    }

    /// Which VMs' usb-host devices take `device` now (`vm/id`): more than one is a device
    /// fought over.
    pub fn holders(&self, device: &Device) -> Vec<String> {
        FakeHost::holders_in(&self.lock(), device)
    }

    fn holders_in(state: &HostState, device: &Device) -> Vec<String> {
        let entries = state
            .vms
            .iter()
            .flat_map(|(vm, s)| s.entries.iter().map(move |(id, e)| (vm, id, e)));
        entries
            .filter(|(_, _, e)| !e.lost && matches(&e.matcher, device))
            .map(|(vm, id, _)| format!("{vm}/{id}"))
            .collect()
    }

    async fn delay(&self) {
        let turns = {
            let mut state = self.lock();
            let Some(seed) = state.jitter.as_mut() else {
                return;
            };
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 33) % 4
        };
        for _ in 0..turns {
            tokio::task::yield_now().await;
        }
    }
}

/// One connection to one fake VM; what the engine holds as its [`VmBackend`].
pub struct FakeVm {
    name: String,
    incarnation: u64,
    host: FakeHost,
    hanging: watch::Sender<bool>,
    dropped: watch::Sender<bool>,
}

impl FakeVm {
    /// The VM's name.
    pub fn vm_name(&self) -> &str {
        &self.name
    }

    /// Give the VM a usb-host device before anyone connects, as `-device usb-host,id=ID`
    /// on QEMU's command line would (our id or anyone else's).
    pub fn insert(&self, id: &str, matcher: HostMatch) {
        let mut state = self.host.lock();
        if let Some(vm) = state.vms.get_mut(&self.name) {
            let entry = Entry {
                matcher,
                lost: false,
            };
            vm.entries.insert(id.to_string(), entry);
        }
    }

    /// Make the next call (of any kind) meet `fault`; faults queue in order.
    pub fn inject(&self, fault: Fault) {
        self.queue(None, fault);
    }

    /// Make the next call of kind `call` meet `fault`.
    pub fn inject_on(&self, call: Call, fault: Fault) {
        self.queue(Some(call), fault);
    }

    /// A fault for a VM not started yet waits for it.
    fn queue(&self, call: Option<Call>, fault: Fault) {
        let mut state = self.host.lock();
        let vm = state.vms.entry(self.name.clone()).or_default();
        vm.faults.push_back((call, fault));
    }

    /// While `on`, every call on this handle waits without answering (a QEMU stopped
    /// with SIGSTOP); calls waiting go on once it is off.
    pub fn hang(&self, on: bool) {
        self.hanging.send_replace(on);
    }

    /// The ids the VM has now, in listing order (a peek: no faults, no waiting).
    pub fn ids(&self) -> Vec<String> {
        let state = self.host.lock();
        let vm = state.vms.get(&self.name);
        vm.map(|vm| vm.entries.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// What a list would answer now (a peek: no faults, no waiting).
    pub fn devices(&self) -> Vec<VmUsbDevice> {
        let state = self.host.lock();
        match state.vms.get(&self.name) {
            Some(vm) if vm.up && vm.incarnation == self.incarnation => listing(&state, vm),
            _ => vec![],
        }
    }

    /// Every attach and detach that reached the VM (`attach ID`, `detach ID`), faulted or
    /// not, in order; lists are not recorded.
    pub fn calls(&self) -> Vec<String> {
        let state = self.host.lock();
        let vm = state.vms.get(&self.name);
        vm.map(|vm| vm.calls.clone()).unwrap_or_default()
    }

    /// How many attaches reached the VM.
    pub fn attach_calls(&self) -> usize {
        let calls = self.calls();
        calls.iter().filter(|c| c.starts_with("attach ")).count()
    }

    /// This handle as a connection: `closed` resolves when a [`Fault::DropConnection`]
    /// hits it.
    pub fn connection(self: &Arc<Self>) -> VmConnection {
        let mut dropped = self.dropped.subscribe();
        VmConnection {
            backend: Arc::clone(self) as Arc<dyn VmBackend>,
            closed: Box::pin(async move {
                let _ = dropped.wait_for(|d| *d).await;
            }),
        }
    }

    fn unreachable(&self, reason: &str) -> BackendError {
        BackendError::Unreachable {
            vm: self.name.clone(),
            source: reason.into(),
        }
    }

    fn refused(&self, reason: String) -> BackendError {
        BackendError::Refused {
            vm: self.name.clone(),
            reason,
        }
    }

    fn lost_answer(&self, what: &str) -> BackendError {
        BackendError::Timeout {
            vm: self.name.clone(),
            what: what.to_string(),
            seconds: 0.0,
        }
    }

    /// Wait while hanging, take the jitter's turns, then check the connection and take the
    /// first queued fault meant for `call`; `record` goes into the call log.
    async fn arrive(
        &self,
        call: Call,
        record: Option<String>,
    ) -> Result<Option<Fault>, BackendError> {
        let mut hanging = self.hanging.subscribe();
        let _ = hanging.wait_for(|h| !*h).await;
        self.host.delay().await;
        let fault = {
            let mut state = self.host.lock();
            let Some(vm) = state.vms.get_mut(&self.name) else {
                return Err(self.unreachable("no such VM"));
            };
            if !vm.up || vm.incarnation != self.incarnation {
                return Err(self.unreachable("the VM process is gone"));
            }
            if *self.dropped.borrow() {
                return Err(self.unreachable("the connection dropped"));
            }
            vm.calls.extend(record);
            let at = vm
                .faults
                .iter()
                .position(|(on, _)| on.map_or(true, |c| c == call));
            at.and_then(|i| vm.faults.remove(i)).map(|(_, f)| f)
        };
        match fault {
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::DropConnection) => {
                self.dropped.send_replace(true);
                Err(self.unreachable("the connection dropped"))
            }
            other => Ok(other),
        }
    }

    async fn list_now(&self) -> Result<Vec<VmUsbDevice>, BackendError> {
        match self.arrive(Call::List, None).await? {
            Some(Fault::Refuse) => Err(self.refused("refused a listing".into())),
            Some(_) => Err(self.lost_answer("qom-list")),
            None => Ok(self.devices()),
        }
    }

    async fn attach_now(
        &self,
        device: &Device,
        mode: AttachMode,
    ) -> Result<VmUsbDevice, BackendError> {
        let what = format!("device {} (bus {})", device.port, device.bus);
        let is_hub = device.hub
            || device
                .class
                .is_some_and(|c| c.class == ClassTriple::HUB_CLASS);
        if is_hub {
            return Err(self.refused(format!("{what} is a hub: QEMU cannot pass a hub")));
        }
        let Some(key) = AttachKey::of(mode, device) else {
            return Err(self.refused(format!("{what} lacks what --by {mode:?} needs")));
        };
        let id = ids::device_id(&key);
        let fault = self
            .arrive(Call::Attach, Some(format!("attach {id}")))
            .await?;
        if fault == Some(Fault::Refuse) {
            return Err(self.refused(format!(
                "cannot attach {what}: QEMU said \"failed to open host usb device\" \
                 (a fault injected by the fake)"
            )));
        }
        let mut state = self.host.lock();
        let done = if state.vms[&self.name].entries.contains_key(&id) {
            let note = format!("{}: attach of {id}, which it has already", self.name);
            state.conflicts.push(note);
            let listed = listing(&state, &state.vms[&self.name]);
            listed.into_iter().find(|d| d.id == id)
        } else {
            let matcher = key.host_match();
            let on_host = state.devices.values().any(|d| matches(&matcher, d));
            if mode == AttachMode::Address && !on_host {
                return Err(self.refused(format!(
                    "cannot attach {what}: QEMU said \"failed to find host usb device {}:{}\"",
                    device.bus,
                    device.address.unwrap_or_default()
                )));
            }
            let held: Vec<String> = (state.devices.values())
                .filter(|d| matches(&matcher, d))
                .flat_map(|d| FakeHost::holders_in(&state, d))
                .collect();
            if !held.is_empty() {
                let note = format!("{}: attach of {id} while held by {held:?}", self.name);
                state.conflicts.push(note);
            }
            let entry = Entry {
                matcher: matcher.clone(),
                lost: false,
            };
            let vm = state.vms.get_mut(&self.name).expect("checked on arrival");
            vm.entries.insert(id.clone(), entry);
            Some(VmUsbDevice {
                id,
                attached: on_host,
                key: Some(key),
                matcher,
            })
        };
        match fault {
            Some(_) => Err(self.lost_answer("device_add")),
            None => Ok(done.expect("the entry is there")),
        }
    }

    async fn detach_now(&self, key: &AttachKey) -> Result<(), BackendError> {
        let id = &ids::device_id(key);
        let fault = self
            .arrive(Call::Detach, Some(format!("detach {id}")))
            .await?;
        if fault == Some(Fault::Refuse) {
            return Err(self.refused(format!(
                "the guest refused to release device `{id}` (a fault injected by the fake)"
            )));
        }
        let mut state = self.host.lock();
        let vm = state.vms.get_mut(&self.name).expect("checked on arrival");
        if vm.entries.remove(id).is_none() {
            return Err(self.refused(format!(
                "has no device `{id}`; `usbroute vm devices --qmp SOCKET` lists them"
            )));
        }
        match fault {
            Some(_) => Err(self.lost_answer("device_del")),
            None => Ok(()),
        }
    }
}

impl VmBackend for FakeVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
        Box::pin(self.list_now())
    }

    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
        Box::pin(self.attach_now(device, mode))
    }

    fn detach<'a>(&'a self, key: &'a AttachKey) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.detach_now(key))
    }

    fn device_id(&self, key: &AttachKey) -> String {
        ids::device_id(key)
    }
}

/// What `vm` lists: every entry by id, `attached` when its device is plugged in and (for
/// an address entry) is still the plug it was made for.
fn listing(state: &HostState, vm: &VmState) -> Vec<VmUsbDevice> {
    let listed = vm.entries.iter().map(|(id, e)| VmUsbDevice {
        id: id.clone(),
        attached: !e.lost && state.devices.values().any(|d| matches(&e.matcher, d)),
        key: ids::key_of(id),
        matcher: e.matcher.clone(),
    });
    listed.collect()
}

/// Does a usb-host matching on `matcher` take `device`?
fn matches(matcher: &HostMatch, device: &Device) -> bool {
    match matcher {
        HostMatch::Address { bus, address } => {
            device.bus == *bus && device.address == Some(*address)
        }
        HostMatch::Port { bus, port } => device.bus == *bus && device.port.chain() == *port,
        HostMatch::Id {
            vendor_id,
            product_id,
        } => device.vendor_id == Some(*vendor_id) && device.product_id == Some(*product_id),
        HostMatch::Other {} => false,
    }
}

#[cfg(test)]
#[path = "fake_tests.rs"]
mod tests;
