//! The async engine runtime against simulated VMs (in-process `VmBackend`s holding their
//! usb-host devices in memory; they can refuse, hang, or hold their first answer back).

mod policy_support;

use policy_support::device;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use usbroute::backend::{
    usbroute_device_id, AttachMode, BackendError, BoxFuture, HostMatch, VmBackend, VmUsbDevice,
};
use usbroute::engine::coordinator::{spawn, EngineHandle, EngineOptions, Input, Status};
use usbroute::engine::BackoffPolicy;
use usbroute::inventory::Device;
use usbroute::policy::{Rule, RuleMatch};

/// A simulated VM: its usb-host ids in memory, a log of calls, and knobs for faults.
#[derive(Default)]
struct SimVm {
    name: String,
    ids: Mutex<Vec<String>>,
    calls: Mutex<Vec<String>>,
    refuse_attaches: Mutex<u32>,
    hang: std::sync::atomic::AtomicBool,
    /// When set, the first list waits for one permit.
    first_list_gate: Option<Semaphore>,
    /// When set, every attach waits for one permit.
    attach_gate: Option<Semaphore>,
    attaches_started: std::sync::atomic::AtomicU32,
    lists: std::sync::atomic::AtomicU32,
}

impl SimVm {
    fn new(name: &str) -> Arc<SimVm> {
        Arc::new(SimVm {
            name: name.into(),
            ..SimVm::default()
        })
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().expect("lock").clone()
    }

    fn attach_calls(&self) -> usize {
        let calls = self.calls.lock().expect("lock");
        calls.iter().filter(|c| c.starts_with("attach")).count()
    }

    async fn maybe_hang(&self) {
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

impl VmBackend for SimVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<VmUsbDevice>, BackendError>> {
        Box::pin(async move {
            let first = self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            if let (true, Some(gate)) = (first, &self.first_list_gate) {
                let _permit = gate.acquire().await.expect("gate");
            }
            self.maybe_hang().await;
            Ok(self
                .ids()
                .into_iter()
                .map(|id| VmUsbDevice {
                    id,
                    attached: true,
                    ours: true,
                    matcher: HostMatch::Other {},
                })
                .collect())
        })
    }

    fn attach<'a>(
        &'a self,
        device: &'a Device,
        mode: AttachMode,
    ) -> BoxFuture<'a, Result<VmUsbDevice, BackendError>> {
        Box::pin(async move {
            self.attaches_started
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(gate) = &self.attach_gate {
                gate.acquire().await.expect("gate").forget();
            }
            self.maybe_hang().await;
            let id = usbroute_device_id(mode, device).expect("id");
            self.calls
                .lock()
                .expect("lock")
                .push(format!("attach {id}"));
            let mut refuse = self.refuse_attaches.lock().expect("lock");
            if *refuse > 0 {
                *refuse -= 1;
                return Err(BackendError::Refused {
                    vm: self.name.clone(),
                    reason: "failed to open host usb device".into(),
                });
            }
            self.ids.lock().expect("lock").push(id.clone());
            Ok(VmUsbDevice {
                id,
                attached: true,
                ours: true,
                matcher: HostMatch::Other {},
            })
        })
    }

    fn detach<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.maybe_hang().await;
            self.calls
                .lock()
                .expect("lock")
                .push(format!("detach {id}"));
            self.ids.lock().expect("lock").retain(|i| i != id);
            Ok(())
        })
    }
}

fn rule(index: usize, selector: &str, vm: &str) -> Rule {
    Rule::pass(
        index,
        selector.parse().expect("selector"),
        vm,
        AttachMode::Address,
    )
}

fn options() -> EngineOptions {
    EngineOptions {
        backoff: BackoffPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        dry_run: false,
        // The model checks that a device is never on two VMs: attaches must wait until
        // every VM's holdings are known (the finite injected faults let lists answer).
        unknown_holdings_grace: Duration::from_secs(3600),
        ..EngineOptions::default()
    }
}

async fn wait_for(status: &mut watch::Receiver<Status>, what: &str, ok: impl Fn(&Status) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| ok(s))).await;
    assert!(waited.is_ok(), "timed out waiting for: {what}");
}

fn holds(status: &Status, vm: &str, id: &str) -> bool {
    status
        .vms
        .get(vm)
        .is_some_and(|v| v.reachable && v.devices.iter().any(|d| d.id == id))
}

fn start(
    rules: Vec<Rule>,
    devices: Vec<Device>,
    vms: &[&Arc<SimVm>],
    opts: EngineOptions,
) -> EngineHandle {
    let (engine, _task) = spawn(opts);
    engine.send(Input::Rules(rules));
    engine.send(Input::Devices(devices));
    for vm in vms {
        engine.send(Input::VmUp {
            name: vm.name.clone(),
            backend: Arc::clone(vm) as Arc<dyn VmBackend>,
        });
    }
    engine
}

#[tokio::test]
async fn attaches_matching_device_once_vm_confirms() {
    let a = SimVm::new("a");
    let engine = start(
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[&a],
        options(),
    );
    wait_for(&mut engine.status(), "a holds 1-1", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(a.ids(), vec!["usbroute-addr-1-5"]);
}

#[tokio::test]
async fn hung_vm_does_not_delay_another_vm() {
    let (a, b) = (SimVm::new("a"), SimVm::new("b"));
    let rules = vec![rule(0, "port:1-1", "a"), rule(1, "port:1-2", "b")];
    let engine = start(rules, vec![], &[&a, &b], options());
    let mut status = engine.status();
    wait_for(&mut status, "both VMs answered", |s| {
        s.vms.values().filter(|v| v.reachable).count() == 2
    })
    .await;
    a.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    engine.send(Input::Devices(vec![device("1-1", 5), device("1-2", 6)]));
    wait_for(&mut status, "b holds 1-2 while a hangs", |s| {
        holds(s, "b", "usbroute-addr-1-6")
    })
    .await;
    assert_eq!(b.ids(), vec!["usbroute-addr-1-6"]);
}

#[tokio::test]
async fn vm_that_has_not_answered_yet_keeps_its_device() {
    let a = Arc::new(SimVm {
        name: "a".into(),
        ids: Mutex::new(vec!["usbroute-addr-1-5".into()]),
        first_list_gate: Some(Semaphore::new(0)),
        ..SimVm::default()
    });
    let b = SimVm::new("b");
    let engine = start(
        vec![rule(0, "port:1-1", "b")],
        vec![device("1-1", 5)],
        &[&a, &b],
        options(),
    );
    let mut status = engine.status();
    wait_for(&mut status, "b answered", |s| {
        s.vms.get("b").is_some_and(|v| v.reachable)
    })
    .await;
    let before = b.attach_calls();
    a.first_list_gate.as_ref().expect("gate").add_permits(1);
    wait_for(&mut status, "b holds 1-1", |s| {
        holds(s, "b", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(
        (before, a.ids(), b.ids()),
        (0, vec![], vec!["usbroute-addr-1-5".to_string()])
    );
}

#[tokio::test]
async fn restarted_engine_changes_nothing_that_is_right() {
    let a = SimVm::new("a");
    let first = start(
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[&a],
        options(),
    );
    wait_for(&mut first.status(), "a holds 1-1", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    drop(first);
    let second = start(
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[&a],
        options(),
    );
    wait_for(&mut second.status(), "restarted engine read a", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(
        (a.attach_calls(), a.ids()),
        (1, vec!["usbroute-addr-1-5".to_string()])
    );
}

#[tokio::test]
async fn refused_attach_is_retried_with_last_error_shown() {
    let a = SimVm::new("a");
    *a.refuse_attaches.lock().expect("lock") = 2;
    let engine = start(
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[&a],
        options(),
    );
    let mut status = engine.status();
    wait_for(&mut status, "a pending retry with error", |s| {
        s.pending
            .iter()
            .any(|p| p.last_error.contains("failed to open host usb device"))
    })
    .await;
    wait_for(&mut status, "a holds 1-1 after retries", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(a.attach_calls(), 3);
}

#[tokio::test]
async fn moving_device_detaches_from_old_vm_before_attaching() {
    let (a, b) = (SimVm::new("a"), SimVm::new("b"));
    let engine = start(
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[&a, &b],
        options(),
    );
    let mut status = engine.status();
    wait_for(&mut status, "a holds 1-1", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    engine.send(Input::Rules(vec![rule(0, "port:1-1", "b")]));
    wait_for(&mut status, "b holds 1-1", |s| {
        holds(s, "b", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(a.ids(), Vec::<String>::new());
}

#[tokio::test]
async fn attach_in_flight_counts_as_held_when_target_changes() {
    let a = Arc::new(SimVm {
        name: "a".into(),
        attach_gate: Some(Semaphore::new(0)),
        ..SimVm::default()
    });
    let b = SimVm::new("b");
    let engine = start(vec![rule(0, "port:1-1", "a")], vec![], &[&a, &b], options());
    let mut status = engine.status();
    wait_for(&mut status, "both answered", |s| {
        s.vms.values().filter(|v| v.reachable).count() == 2
    })
    .await;
    engine.send(Input::Devices(vec![device("1-1", 5)]));
    let started = async {
        while a.attaches_started.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let in_flight = tokio::time::timeout(Duration::from_secs(5), started).await;
    assert!(in_flight.is_ok(), "attach to a never started");
    engine.send(Input::Rules(vec![rule(0, "port:1-1", "b")]));
    wait_for(&mut status, "plan says b", |s| {
        s.desired
            .devices
            .values()
            .any(|d| d.placement.to_string() == "b")
    })
    .await;
    let b_attaches_while_in_flight = b.attach_calls();
    a.attach_gate.as_ref().expect("gate").add_permits(1);
    wait_for(&mut status, "b holds 1-1", |s| {
        holds(s, "b", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(
        (b_attaches_while_in_flight, a.ids()),
        (0, Vec::<String>::new())
    );
}

#[tokio::test]
async fn dry_run_decides_but_never_acts() {
    let a = SimVm::new("a");
    let opts = EngineOptions {
        dry_run: true,
        ..options()
    };
    let engine = start(
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[&a],
        opts,
    );
    wait_for(&mut engine.status(), "a dry-run attach", |s| {
        !s.dry_run_actions.is_empty()
    })
    .await;
    assert_eq!(a.attach_calls(), 0);
}

#[tokio::test]
async fn why_through_handle_names_deciding_rule() {
    let a = SimVm::new("a");
    let engine = start(
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[&a],
        options(),
    );
    let answer = engine
        .why("1-1".parse().expect("port"))
        .await
        .expect("device present");
    assert_eq!(answer.rules[0].1, RuleMatch::Decided);
}

#[tokio::test]
async fn override_ends_when_device_is_replugged() {
    let a = SimVm::new("a");
    let engine = start(vec![], vec![device("1-1", 5)], &[&a], options());
    let mut status = engine.status();
    let attach = usbroute::policy::Override {
        address: Some(5),
        action: usbroute::policy::OverrideAction::Attach {
            vm: "a".into(),
            mode: AttachMode::Address,
            force: false,
        },
    };
    engine.send(Input::Override {
        port: "1-1".parse().expect("port"),
        value: Some(attach),
    });
    wait_for(&mut status, "a holds 1-1 by hand", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    engine.send(Input::Devices(vec![device("1-1", 7)]));
    wait_for(&mut status, "override gone and a empty", |s| {
        s.overrides.is_empty()
            && s.vms
                .get("a")
                .is_some_and(|v| v.reachable && v.devices.is_empty())
    })
    .await;
    assert_eq!(a.ids(), Vec::<String>::new());
}

#[tokio::test]
async fn engine_without_a_picture_of_the_host_detaches_nothing() {
    // The daemon sends no device list while sysfs cannot be read (its first scan failed):
    // the VM's device must not be taken for unplugged.
    let a = Arc::new(SimVm {
        name: "a".into(),
        ids: Mutex::new(vec!["usbroute-addr-1-5".into()]),
        ..SimVm::default()
    });
    let (engine, _task) = spawn(options());
    engine.send(Input::Rules(vec![rule(0, "port:1-1", "a")]));
    engine.send(Input::VmUp {
        name: "a".into(),
        backend: Arc::clone(&a) as Arc<dyn VmBackend>,
    });

    wait_for(
        &mut engine.status(),
        "a answered and nothing in flight",
        |s| s.busy.is_empty() && s.vms.get("a").is_some_and(|v| v.reachable),
    )
    .await;

    assert_eq!(
        (a.ids(), a.calls.lock().expect("lock").clone()),
        (vec!["usbroute-addr-1-5".to_string()], vec![])
    );
}

/// A VM whose QMP socket keeps re-creating itself and never answers a list: gone and
/// up again now (before this returns) and every `period`, until the returned task is
/// aborted.
fn flap(engine: &EngineHandle, vm: &Arc<SimVm>, period: Duration) -> tokio::task::JoinHandle<()> {
    vm.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let reappear = |engine: &EngineHandle, vm: &Arc<SimVm>| {
        engine.send(Input::VmGone {
            name: vm.name.clone(),
        });
        engine.send(Input::VmUp {
            name: vm.name.clone(),
            backend: Arc::clone(vm) as Arc<dyn VmBackend>,
        });
    };
    reappear(engine, vm);
    let (engine, vm) = (engine.clone(), Arc::clone(vm));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            reappear(&engine, &vm);
        }
    })
}

#[tokio::test]
async fn vms_flapping_out_of_phase_hold_attaches_back_for_one_grace_at_most() {
    let (f1, f2, b) = (SimVm::new("f1"), SimVm::new("f2"), SimVm::new("b"));
    let opts = EngineOptions {
        unknown_holdings_grace: Duration::from_millis(300),
        ..options()
    };
    let engine = start(vec![rule(0, "port:1-1", "b")], vec![], &[&b], opts);
    let first = flap(&engine, &f1, Duration::from_millis(40));
    tokio::time::sleep(Duration::from_millis(20)).await; // out of phase: not a result
    let second = flap(&engine, &f2, Duration::from_millis(40));

    engine.send(Input::Devices(vec![device("1-1", 5)]));
    wait_for(
        &mut engine.status(),
        "b holds 1-1 while f1 and f2 flap",
        |s| holds(s, "b", "usbroute-addr-1-5"),
    )
    .await;
    first.abort();
    second.abort();

    assert_eq!(b.ids(), vec!["usbroute-addr-1-5"]);
}

#[tokio::test]
async fn vm_that_answered_once_holds_back_only_what_it_could_hold() {
    let (a, b) = (SimVm::new("a"), SimVm::new("b"));
    // 1-2 goes to b, but a rule could send it to a as well.
    let mut to_b = rule(1, "port:1-2", "b");
    to_b.priority = 1;
    let rules = vec![rule(0, "port:1-1", "b"), to_b, rule(2, "port:1-2", "a")];
    let engine = start(rules, vec![], &[&a, &b], options());
    let mut status = engine.status();
    wait_for(&mut status, "both VMs answered", |s| {
        s.vms.values().filter(|v| v.reachable).count() == 2
    })
    .await;
    // a's socket is re-created and a stops answering: its holdings are unknown again,
    // for the whole (hour-long) grace.
    let flapping = flap(&engine, &a, Duration::from_millis(40));

    engine.send(Input::Devices(vec![device("1-1", 5), device("1-2", 6)]));
    wait_for(&mut status, "b holds 1-1", |s| {
        holds(s, "b", "usbroute-addr-1-5")
    })
    .await;
    engine.why("1-1".parse().expect("port")).await;
    flapping.abort();

    assert_eq!(b.ids(), vec!["usbroute-addr-1-5"]);
}
