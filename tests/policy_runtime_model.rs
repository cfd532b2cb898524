//! Model-based test of the async runtime itself (coordinator + one worker per VM), not
//! only its pure core: random sequences of plug, unplug, re-plug, VM start/stop, reload,
//! manual overrides, refused and lost-reply faults and daemon restarts, against simulated
//! in-process VMs sharing one simulated host. After each settle the VMs hold exactly what
//! the published plan wants; at no moment is a device on two VMs or an id added twice.

mod policy_support;

use policy_support::{device, with_id};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use usbroute::backend::{
    AttachKey, AttachMode, BackendError, BoxFuture, HostMatch, VmBackend, VmUsbDevice,
};
use usbroute::engine::coordinator::{spawn, EngineHandle, EngineOptions, Input, Status};
use usbroute::engine::BackoffPolicy;
use usbroute::inventory::{Device, PortPath};
use usbroute::policy::{Override, OverrideAction, Placement, Rule};

const PORTS: [&str; 4] = ["1-1", "1-2", "1-3", "2-1"];
const VMS: [&str; 3] = ["a", "b", "c"];
const MODES: [AttachMode; 3] = [AttachMode::Address, AttachMode::Port, AttachMode::Id];
const SELECTORS: [&str; 5] = [
    "port:1-1",
    "port:1-2",
    "id:046d:*",
    "id:0781:5567",
    "class:03",
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Refuse,
    LostReply,
}

#[derive(Default)]
struct VmState {
    up: bool,
    incarnation: u64,
    entries: BTreeMap<String, (AttachKey, bool)>,
    faults: VecDeque<Fault>,
}

/// The simulated host and VMs, shared by every backend handle.
#[derive(Default)]
struct World {
    devices: BTreeMap<PortPath, Device>,
    next_devnum: u16,
    vms: BTreeMap<String, VmState>,
    violations: Vec<String>,
    /// Drives how long each VM call takes (in scheduler turns), so interleavings vary.
    jitter: u64,
}

impl World {
    fn next_delay(&mut self) -> u64 {
        self.jitter = self
            .jitter
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.jitter >> 33) % 4
    }

    fn holders(&self, key: &AttachKey) -> Vec<String> {
        let taken: Vec<&Device> = self.devices.values().filter(|d| key.refers_to(d)).collect();
        self.vms
            .iter()
            .flat_map(|(vm, s)| s.entries.iter().map(move |(id, e)| (vm, id, e)))
            .filter(|(_, _, (k, lost))| !lost && taken.iter().any(|d| k.refers_to(d)))
            .map(|(vm, id, _)| format!("{vm}/{id}"))
            .collect()
    }
}

/// One VM process as the engine reaches it; calls from an old process fail.
struct SimVm {
    name: String,
    incarnation: u64,
    world: Arc<Mutex<World>>,
}

impl SimVm {
    /// Take a few scheduler turns first, as a real VM takes its time.
    async fn delay(&self) {
        let turns = self.world.lock().expect("world").next_delay();
        for _ in 0..turns {
            tokio::task::yield_now().await;
        }
    }

    fn call<T>(
        &self,
        f: impl FnOnce(&mut World, &str) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut world = self.world.lock().expect("world");
        let vm = &world.vms[&self.name];
        if !vm.up || vm.incarnation != self.incarnation {
            return Err(BackendError::Unreachable {
                vm: self.name.clone(),
                reason: "gone".into(),
            });
        }
        f(&mut world, &self.name)
    }
}

fn refused(vm: &str, why: &str) -> BackendError {
    BackendError::Refused {
        vm: vm.into(),
        reason: why.into(),
    }
}

fn lost(vm: &str) -> BackendError {
    BackendError::Timeout {
        vm: vm.into(),
        what: "device_add".into(),
        seconds: 1.0,
    }
}

impl VmBackend for SimVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
        Box::pin(async move {
            self.delay().await;
            self.call(|world, name| {
                let present: Vec<Device> = world.devices.values().cloned().collect();
                let vm = world.vms.get_mut(name).expect("vm");
                if vm.faults.pop_front().is_some() {
                    return Err(lost(name));
                }
                Ok(vm
                    .entries
                    .iter()
                    .map(|(id, (key, lost))| VmUsbDevice {
                        id: id.clone(),
                        attached: !lost && present.iter().any(|d| key.refers_to(d)),
                        ours: true,
                        matcher: HostMatch::Other {},
                    })
                    .collect())
            })
        })
    }

    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
        Box::pin(async move {
            self.delay().await;
            self.call(|world, name| {
                let key = AttachKey::of(mode, device).expect("key");
                let id = key.to_id();
                let fault = world.vms.get_mut(name).expect("vm").faults.pop_front();
                if fault == Some(Fault::Refuse) {
                    return Err(refused(name, "injected"));
                }
                if world.vms[name].entries.contains_key(&id) {
                    world.violations.push(format!("{name}: {id} added twice"));
                    return Err(refused(name, "duplicate id"));
                }
                let gone = mode == AttachMode::Address
                    && !world.devices.values().any(|d| key.refers_to(d));
                if gone {
                    return Err(refused(name, "failed to find host usb device"));
                }
                let holders = world.holders(&key);
                if !holders.is_empty() {
                    world
                        .violations
                        .push(format!("{name}: {id} while held by {holders:?}"));
                }
                world
                    .vms
                    .get_mut(name)
                    .expect("vm")
                    .entries
                    .insert(id.clone(), (key, false));
                match fault {
                    Some(_) => Err(lost(name)),
                    None => Ok(VmUsbDevice {
                        id,
                        attached: true,
                        ours: true,
                        matcher: HostMatch::Other {},
                    }),
                }
            })
        })
    }

    fn detach<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.delay().await;
            self.call(|world, name| {
                let vm = world.vms.get_mut(name).expect("vm");
                let fault = vm.faults.pop_front();
                if fault == Some(Fault::Refuse) {
                    return Err(refused(name, "injected"));
                }
                vm.entries.remove(id);
                match fault {
                    Some(_) => Err(lost(name)),
                    None => Ok(()),
                }
            })
        })
    }
}

#[derive(Debug, Clone)]
enum Event {
    Plug(usize, bool),
    Unplug(usize),
    Replug(usize),
    VmStart(usize),
    VmStop(usize),
    Reload(Vec<(usize, usize, usize, i64)>),
    Manual(usize, Option<(usize, usize)>),
    Faults(usize, Vec<bool>),
    RestartDaemon,
    Settle,
}

fn event() -> impl Strategy<Value = Event> {
    let port = 0..PORTS.len();
    let vm = 0..VMS.len();
    prop_oneof![
        4 => (port.clone(), any::<bool>()).prop_map(|(p, k)| Event::Plug(p, k)),
        2 => port.clone().prop_map(Event::Unplug),
        2 => port.clone().prop_map(Event::Replug),
        3 => vm.clone().prop_map(Event::VmStart),
        1 => vm.clone().prop_map(Event::VmStop),
        4 => prop::collection::vec((0..SELECTORS.len(), 0..VMS.len() + 1, 0..3usize, 0..3i64), 1..4).prop_map(Event::Reload),
        1 => (port, prop::option::of((vm.clone(), 0..3usize))).prop_map(|(p, t)| Event::Manual(p, t)),
        2 => (vm, prop::collection::vec(any::<bool>(), 1..3)).prop_map(|(v, f)| Event::Faults(v, f)),
        1 => Just(Event::RestartDaemon),
        4 => Just(Event::Settle),
    ]
}

struct Harness {
    world: Arc<Mutex<World>>,
    engine: EngineHandle,
    task: tokio::task::JoinHandle<()>,
    rules: Vec<Rule>,
}

fn options() -> EngineOptions {
    let backoff = BackoffPolicy {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(4),
    };
    EngineOptions {
        backoff,
        dry_run: false,
        // The model checks that a device is never on two VMs: attaches must wait until
        // every VM's holdings are known (the finite injected faults let lists answer).
        unknown_holdings_grace: Duration::from_secs(3600),
        ..EngineOptions::default()
    }
}

impl Harness {
    fn new(jitter: u64) -> Harness {
        let world = World {
            jitter,
            vms: VMS
                .iter()
                .map(|v| (v.to_string(), VmState::default()))
                .collect(),
            next_devnum: 1,
            ..World::default()
        };
        let (engine, task) = spawn(options());
        Harness {
            world: Arc::new(Mutex::new(world)),
            engine,
            task,
            rules: vec![],
        }
    }

    fn backend(&self, name: &str) -> Arc<dyn VmBackend> {
        let incarnation = self.world.lock().expect("world").vms[name].incarnation;
        Arc::new(SimVm {
            name: name.into(),
            incarnation,
            world: Arc::clone(&self.world),
        })
    }

    fn send_devices(&self) {
        let devices = self
            .world
            .lock()
            .expect("world")
            .devices
            .values()
            .cloned()
            .collect();
        self.engine.send(Input::Devices(devices));
    }

    async fn apply(&mut self, event: &Event) -> Result<(), TestCaseError> {
        match event {
            Event::Plug(p, other_kind) => {
                let mut w = self.world.lock().expect("world");
                let port: PortPath = PORTS[*p].parse().expect("port");
                if !w.devices.contains_key(&port) {
                    let address = w.next_devnum;
                    w.next_devnum = w.next_devnum % 6 + 1;
                    let d = device(PORTS[*p], address);
                    let d = if *other_kind {
                        with_id(d, 0x0781, 0x5567)
                    } else {
                        d
                    };
                    w.devices.insert(port, d);
                }
                drop(w);
                self.send_devices();
            }
            Event::Unplug(p) | Event::Replug(p) => {
                let mut w = self.world.lock().expect("world");
                let port: PortPath = PORTS[*p].parse().expect("port");
                if let Some(gone) = w.devices.remove(&port) {
                    for vm in w.vms.values_mut() {
                        for (key, lost) in vm.entries.values_mut() {
                            *lost |= key.mode() == AttachMode::Address && key.refers_to(&gone);
                        }
                    }
                    if matches!(event, Event::Replug(_)) {
                        let mut again = gone;
                        again.address = Some(w.next_devnum);
                        w.next_devnum = w.next_devnum % 6 + 1;
                        w.devices.insert(port, again);
                    }
                }
                drop(w);
                self.send_devices();
            }
            Event::VmStart(v) | Event::VmStop(v) => {
                let up = matches!(event, Event::VmStart(_));
                {
                    let mut w = self.world.lock().expect("world");
                    let vm = w.vms.get_mut(VMS[*v]).expect("vm");
                    vm.up = up;
                    vm.incarnation += 1;
                    vm.entries.clear();
                }
                let name = VMS[*v].to_string();
                let input = match up {
                    true => Input::VmUp {
                        backend: self.backend(&name),
                        name,
                    },
                    false => Input::VmGone { name },
                };
                self.engine.send(input);
            }
            Event::Reload(specs) => {
                self.rules = specs
                    .iter()
                    .enumerate()
                    .map(|(i, (sel, target, mode, priority))| {
                        let selector = SELECTORS[*sel].parse().expect("selector");
                        let mut r = match VMS.get(*target) {
                            Some(vm) => Rule::pass(i, selector, vm, MODES[*mode]),
                            None => Rule::forbid(i, selector),
                        };
                        r.priority = *priority;
                        r
                    })
                    .collect();
                self.engine.send(Input::Rules(self.rules.clone()));
            }
            Event::Manual(p, target) => {
                let port: PortPath = PORTS[*p].parse().expect("port");
                let address = self
                    .world
                    .lock()
                    .expect("world")
                    .devices
                    .get(&port)
                    .and_then(|d| d.address);
                let action = match target {
                    Some((vm, mode)) => OverrideAction::Attach {
                        vm: VMS[*vm].into(),
                        mode: MODES[*mode],
                        force: false,
                    },
                    None => OverrideAction::Detach,
                };
                self.engine.send(Input::Override {
                    port,
                    value: Some(Override { address, action }),
                });
            }
            Event::Faults(v, faults) => {
                let mut w = self.world.lock().expect("world");
                let vm = w.vms.get_mut(VMS[*v]).expect("vm");
                vm.faults.extend(faults.iter().map(|l| {
                    if *l {
                        Fault::LostReply
                    } else {
                        Fault::Refuse
                    }
                }));
            }
            Event::RestartDaemon => self.restart().await,
            Event::Settle => self.settle_and_check().await?,
        }
        let violations = self.world.lock().expect("world").violations.clone();
        prop_assert!(violations.is_empty(), "violations: {violations:?}");
        Ok(())
    }

    async fn restart(&mut self) {
        let (engine, task) = spawn(options());
        let old = std::mem::replace(&mut self.engine, engine);
        drop(old);
        let old_task = std::mem::replace(&mut self.task, task);
        let _ = old_task.await;
        // Let the old workers finish what they had started, as a killed daemon's last
        // QMP command would.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        self.engine.send(Input::Rules(self.rules.clone()));
        self.send_devices();
        let up: Vec<String> = {
            let w = self.world.lock().expect("world");
            w.vms
                .iter()
                .filter(|(_, s)| s.up)
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in up {
            self.engine.send(Input::VmUp {
                backend: self.backend(&name),
                name,
            });
        }
    }

    async fn settle_and_check(&mut self) -> Result<(), TestCaseError> {
        // A `why` is answered after every earlier input was handled: a barrier.
        self.engine.why(PORTS[0].parse().expect("port")).await;
        let up: BTreeSet<String> = {
            let w = self.world.lock().expect("world");
            w.vms
                .iter()
                .filter(|(_, s)| s.up)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let mut status = self.engine.status();
        let at_rest = |s: &Status| {
            s.busy.is_empty()
                && s.pending.is_empty()
                && up
                    .iter()
                    .all(|vm| s.vms.get(vm).is_some_and(|v| v.reachable))
        };
        let settled = tokio::time::timeout(Duration::from_secs(5), status.wait_for(at_rest)).await;
        prop_assert!(settled.is_ok(), "engine did not come to rest");
        let status = self.engine.status().borrow().clone();
        let w = self.world.lock().expect("world");
        let wanted: BTreeSet<(String, String)> = status
            .desired
            .devices
            .iter()
            .filter_map(|(port, decision)| match &decision.placement {
                Placement::Vm { vm, mode } => {
                    Some((vm.clone(), AttachKey::of(*mode, &w.devices[port])?.to_id()))
                }
                Placement::Host => None,
            })
            .collect();
        let held: BTreeSet<(String, String)> = w
            .vms
            .iter()
            .filter(|(_, s)| s.up)
            .flat_map(|(n, s)| s.entries.keys().map(move |id| (n.clone(), id.clone())))
            .collect();
        let stale = w
            .vms
            .values()
            .flat_map(|s| s.entries.values())
            .filter(|(_, lost)| *lost)
            .count();
        prop_assert_eq!(held, wanted);
        prop_assert_eq!(stale, 0, "address entries whose plug is gone were kept");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, max_shrink_iters: 500, ..ProptestConfig::default() })]

    #[test]
    fn runtime_converges_to_plan_and_never_doubles(events in prop::collection::vec(event(), 1..25), jitter in any::<u64>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        rt.block_on(async {
            let mut h = Harness::new(jitter);
            for e in &events {
                h.apply(e).await?;
            }
            h.settle_and_check().await
        })?;
    }
}
