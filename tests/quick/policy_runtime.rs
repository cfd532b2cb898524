//! The async engine runtime against fake VMs (`usbroute::backend::fake`: in-process VMs
//! holding their usb-host devices in memory; they can refuse, hang, or, through the
//! [`Gated`] fault injector here, hold their first list or their attaches back).

use crate::policy_support;

use policy_support::backends::{Aliased, Gated};
use policy_support::device;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use usbroute::backend::fake::{Call, FakeHost, FakeVm, Fault};
use usbroute::backend::{AttachMode, HostMatch, VmBackend};
use usbroute::engine::coordinator::{spawn, EngineHandle, EngineOptions, Input, Status};
use usbroute::engine::BackoffPolicy;
use usbroute::inventory::Device;
use usbroute::policy::{Rule, RuleMatch};

/// The fake VM `name`, holding the mouse at 1-1 (address 5) from before the engine.
fn vm_holding_the_mouse(host: &FakeHost, name: &str) -> Arc<FakeVm> {
    let vm = host.start(name);
    vm.insert(
        "usbroute-addr-1-5",
        HostMatch::Address { bus: 1, address: 5 },
    );
    vm
}

pub(crate) fn rule(index: usize, selector: &str, vm: &str) -> Rule {
    Rule::pass(
        index,
        selector.parse().expect("selector"),
        vm,
        AttachMode::Address,
    )
}

pub(crate) fn options() -> EngineOptions {
    EngineOptions {
        backoff: BackoffPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        dry_run: false,
        // The model checks that a device is never on two VMs: attaches must wait until
        // every VM's holdings are known (the finite injected faults let lists answer).
        unknown_holdings_grace: Duration::from_secs(3600),
    }
}

pub(crate) async fn wait_for(
    status: &mut watch::Receiver<Status>,
    what: &str,
    ok: impl Fn(&Status) -> bool,
) {
    let waited = tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| ok(s))).await;
    assert!(waited.is_ok(), "timed out waiting for: {what}");
}

pub(crate) fn holds(status: &Status, vm: &str, id: &str) -> bool {
    status
        .vms
        .get(vm)
        .is_some_and(|v| v.reachable && v.devices.iter().any(|d| d.id == id))
}

pub(crate) fn start(
    host: &FakeHost,
    rules: Vec<Rule>,
    devices: Vec<Device>,
    vms: &[Arc<dyn VmBackend>],
    opts: EngineOptions,
) -> EngineHandle {
    let (engine, _task) = spawn(opts);
    engine.send(Input::Rules(rules));
    plug(host, &engine, devices);
    for vm in vms {
        engine.send(Input::VmUp {
            name: vm.name().to_string(),
            backend: Arc::clone(vm),
        });
    }
    engine
}

/// The host has exactly `devices` now, and the engine is told (as after a rescan).
pub(crate) fn plug(host: &FakeHost, engine: &EngineHandle, devices: Vec<Device>) {
    host.set_devices(&devices);
    engine.send(Input::Devices(devices.into()));
}

pub(crate) fn backend(vm: &Arc<impl VmBackend + 'static>) -> Arc<dyn VmBackend> {
    Arc::clone(vm) as Arc<dyn VmBackend>
}

/// Attach the device at `port` (devnum `address`) to `vm` by hand, by address.
fn attach_by_hand(engine: &EngineHandle, port: &str, address: u16, vm: &str) {
    let attach = usbroute::policy::Override {
        address: Some(address),
        action: usbroute::policy::OverrideAction::Attach {
            vm: vm.into(),
            mode: AttachMode::Address,
            force: false,
        },
    };
    engine.send(Input::Override {
        port: port.parse().expect("port"),
        value: Some(attach),
    });
}

/// Wait until `vm` answered a list and no worker has work in flight.
async fn listed_and_idle(status: &mut watch::Receiver<Status>, vm: &str) {
    wait_for(status, &format!("{vm} listed"), |s| {
        s.vms.get(vm).is_some_and(|v| v.reachable) && s.busy.is_empty()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn attaches_matching_device_once_vm_confirms() {
    let host = FakeHost::new();
    let a = host.start("a");
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[backend(&a)],
        options(),
    );
    wait_for(&mut engine.status(), "a holds 1-1", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(a.ids(), vec!["usbroute-addr-1-5"]);
}

#[tokio::test(start_paused = true)]
async fn hung_vm_does_not_delay_another_vm() {
    let host = FakeHost::new();
    let (a, b) = (host.start("a"), host.start("b"));
    let rules = vec![rule(0, "port:1-1", "a"), rule(1, "port:1-2", "b")];
    let engine = start(&host, rules, vec![], &[backend(&a), backend(&b)], options());
    let mut status = engine.status();
    wait_for(&mut status, "both VMs answered", |s| {
        s.vms.values().filter(|v| v.reachable).count() == 2
    })
    .await;
    a.hang(true);
    plug(&host, &engine, vec![device("1-1", 5), device("1-2", 6)]);
    wait_for(&mut status, "b holds 1-2 while a hangs", |s| {
        holds(s, "b", "usbroute-addr-1-6")
    })
    .await;
    assert_eq!(b.ids(), vec!["usbroute-addr-1-6"]);
}

#[tokio::test(start_paused = true)]
async fn vm_that_has_not_answered_yet_keeps_its_device() {
    let host = FakeHost::new();
    let a = vm_holding_the_mouse(&host, "a");
    let gated_a = Gated::first_list(&a);
    let b = host.start("b");
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "b")],
        vec![device("1-1", 5)],
        &[backend(&gated_a), backend(&b)],
        options(),
    );
    let mut status = engine.status();
    wait_for(&mut status, "b answered", |s| {
        s.vms.get("b").is_some_and(|v| v.reachable)
    })
    .await;
    let before = b.attach_calls();
    gated_a
        .first_list_gate
        .as_ref()
        .expect("gate")
        .add_permits(1);
    wait_for(&mut status, "b holds 1-1", |s| {
        holds(s, "b", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(
        (before, a.ids(), b.ids()),
        (0, vec![], vec!["usbroute-addr-1-5".to_string()])
    );
}

#[tokio::test(start_paused = true)]
async fn restarted_engine_changes_nothing_that_is_right() {
    let host = FakeHost::new();
    let a = host.start("a");
    let first = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[backend(&a)],
        options(),
    );
    wait_for(&mut first.status(), "a holds 1-1", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    drop(first);
    let second = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[backend(&a)],
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

#[tokio::test(start_paused = true)]
async fn refused_attach_is_retried_with_last_error_shown() {
    let host = FakeHost::new();
    let a = host.start("a");
    a.inject_on(Call::Attach, Fault::Refuse);
    a.inject_on(Call::Attach, Fault::Refuse);
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[backend(&a)],
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

#[tokio::test(start_paused = true)]
async fn moving_device_detaches_from_old_vm_before_attaching() {
    let host = FakeHost::new();
    let (a, b) = (host.start("a"), host.start("b"));
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[backend(&a), backend(&b)],
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

#[tokio::test(start_paused = true)]
async fn attach_in_flight_counts_as_held_when_target_changes() {
    let host = FakeHost::new();
    let a = host.start("a");
    let gated_a = Gated::attaches(&a);
    let b = host.start("b");
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![],
        &[backend(&gated_a), backend(&b)],
        options(),
    );
    let mut status = engine.status();
    wait_for(&mut status, "both answered", |s| {
        s.vms.values().filter(|v| v.reachable).count() == 2
    })
    .await;
    plug(&host, &engine, vec![device("1-1", 5)]);
    let started = async {
        while gated_a.attaches_started.load(Ordering::SeqCst) == 0 {
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
    gated_a.attach_gate.as_ref().expect("gate").add_permits(1);
    wait_for(&mut status, "b holds 1-1", |s| {
        holds(s, "b", "usbroute-addr-1-5")
    })
    .await;
    assert_eq!(
        (b_attaches_while_in_flight, a.ids()),
        (0, Vec::<String>::new())
    );
}

#[tokio::test(start_paused = true)]
async fn dry_run_decides_but_never_acts() {
    let host = FakeHost::new();
    let a = host.start("a");
    let opts = EngineOptions {
        dry_run: true,
        ..options()
    };
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[backend(&a)],
        opts,
    );
    wait_for(&mut engine.status(), "a dry-run attach", |s| {
        !s.dry_run_actions.is_empty()
    })
    .await;
    assert_eq!(a.attach_calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn why_through_handle_names_deciding_rule() {
    let host = FakeHost::new();
    let a = host.start("a");
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![device("1-1", 5)],
        &[backend(&a)],
        options(),
    );
    let answer = engine
        .why("1-1".parse().expect("port"))
        .await
        .expect("device present");
    assert_eq!(answer.rules[0].1, RuleMatch::Decided);
}

#[tokio::test(start_paused = true)]
async fn override_ends_when_device_is_replugged() {
    let host = FakeHost::new();
    let a = host.start("a");
    let engine = start(
        &host,
        vec![],
        vec![device("1-1", 5)],
        &[backend(&a)],
        options(),
    );
    let mut status = engine.status();
    attach_by_hand(&engine, "1-1", 5, "a");
    wait_for(&mut status, "a holds 1-1 by hand", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    plug(&host, &engine, vec![device("1-1", 7)]);
    wait_for(&mut status, "override gone and a empty", |s| {
        s.overrides.is_empty()
            && s.vms
                .get("a")
                .is_some_and(|v| v.reachable && v.devices.is_empty())
    })
    .await;
    assert_eq!(a.ids(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn engine_without_a_picture_of_the_host_detaches_nothing() {
    // The daemon sends no device list while sysfs cannot be read (its first scan failed):
    // the VM's device must not be taken for unplugged.
    // The mouse is on the host (and in a); only the engine has not been told.
    let host = FakeHost::new();
    host.plug(device("1-1", 5));
    let a = vm_holding_the_mouse(&host, "a");
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
        (a.ids(), a.calls()),
        (vec!["usbroute-addr-1-5".to_string()], vec![])
    );
}

/// A VM whose QMP socket keeps re-creating itself and never answers a list: gone and
/// up again now (before this returns) and every `period`, until the returned task is
/// aborted.
fn flap(engine: &EngineHandle, vm: &Arc<FakeVm>, period: Duration) -> tokio::task::JoinHandle<()> {
    vm.hang(true);
    let reappear = |engine: &EngineHandle, vm: &Arc<FakeVm>| {
        engine.send(Input::VmGone {
            name: vm.vm_name().to_string(),
        });
        engine.send(Input::VmUp {
            name: vm.vm_name().to_string(),
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

#[tokio::test(start_paused = true)]
async fn vms_flapping_out_of_phase_hold_attaches_back_for_one_grace_at_most() {
    let host = FakeHost::new();
    let (f1, f2, b) = (host.start("f1"), host.start("f2"), host.start("b"));
    let opts = EngineOptions {
        unknown_holdings_grace: Duration::from_millis(300),
        ..options()
    };
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "b")],
        vec![],
        &[backend(&b)],
        opts,
    );
    let first = flap(&engine, &f1, Duration::from_millis(40));
    tokio::time::sleep(Duration::from_millis(20)).await; // out of phase: not a result
    let second = flap(&engine, &f2, Duration::from_millis(40));

    plug(&host, &engine, vec![device("1-1", 5)]);
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

#[tokio::test(start_paused = true)]
async fn vm_that_answered_once_holds_back_only_what_it_could_hold() {
    let host = FakeHost::new();
    let (a, b) = (host.start("a"), host.start("b"));
    // 1-2 goes to b, but a rule could send it to a as well.
    let mut to_b = rule(1, "port:1-2", "b");
    to_b.priority = 1;
    let rules = vec![rule(0, "port:1-1", "b"), to_b, rule(2, "port:1-2", "a")];
    let engine = start(&host, rules, vec![], &[backend(&a), backend(&b)], options());
    let mut status = engine.status();
    wait_for(&mut status, "both VMs answered", |s| {
        s.vms.values().filter(|v| v.reachable).count() == 2
    })
    .await;
    // a's socket is re-created and a stops answering: its holdings are unknown again,
    // for the whole (hour-long) grace.
    let flapping = flap(&engine, &a, Duration::from_millis(40));

    plug(&host, &engine, vec![device("1-1", 5), device("1-2", 6)]);
    wait_for(&mut status, "b holds 1-1", |s| {
        holds(s, "b", "usbroute-addr-1-5")
    })
    .await;
    engine.why("1-1".parse().expect("port")).await;
    flapping.abort();

    assert_eq!(b.ids(), vec!["usbroute-addr-1-5"]);
}

#[tokio::test(start_paused = true)]
async fn a_backend_with_device_names_of_its_own_is_driven_by_key_alone() {
    let host = FakeHost::new();
    let vm = vm_holding_the_mouse(&host, "a");
    let a = Arc::new(Aliased {
        vm: Arc::clone(&vm),
        aliases: Mutex::default(),
    });
    let rules = vec![rule(0, "port:1-1", "a"), rule(1, "port:1-2", "a")];
    let devices = vec![device("1-1", 5), device("1-2", 6)];
    let engine = start(&host, rules, devices, &[backend(&a)], options());
    let mut status = engine.status();

    wait_for(&mut status, "a holds both, under its own names", |s| {
        holds(s, "a", "ua-0") && holds(s, "a", "ua-1")
    })
    .await;
    let attaches = vm.attach_calls();
    engine.send(Input::Rules(vec![]));
    wait_for(&mut status, "a holds nothing", |s| {
        s.vms.get("a").is_some_and(|v| v.devices.is_empty()) && s.busy.is_empty()
    })
    .await;

    assert_eq!(attaches, 1, "the mouse it held was recognised by its key");
    assert_eq!(vm.ids(), Vec::<String>::new());
    assert_eq!(
        vm.calls().len(),
        3,
        "one attach, two detaches: {:?}",
        vm.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn an_attach_the_vm_said_yes_to_settles_with_no_list_behind_it() {
    // A control request waits on `Status::settled`; a list is several round trips more
    // and must not hold the reply, nor the next job. Here a list would never answer.
    let host = FakeHost::new();
    let a = host.start("a");
    let d = device("1-1", 5);
    let engine = start(&host, vec![], vec![d.clone()], &[backend(&a)], options());
    let mut status = engine.status();
    listed_and_idle(&mut status, "a").await;
    a.inject_on(Call::List, Fault::Hang);
    attach_by_hand(&engine, "1-1", 5, "a");
    let to = Some(("a", AttachMode::Address));
    wait_for(&mut status, "the attach settled", |s| {
        s.settled(&d, to).is_some()
    })
    .await;

    let s = status.borrow().clone();
    assert_eq!(
        s.settled(&d, to),
        Some(usbroute::engine::Settled::Attached { vm: "a".into() })
    );
    assert!(s.busy.is_empty(), "no list after a job the VM said yes to");
    assert_eq!(a.ids(), vec!["usbroute-addr-1-5"]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_attach_is_not_held_while_the_list_behind_it_is_out() {
    // A refusal is followed by a list. Until it answers, the engine's view is what the
    // results said: a refused attach holds nothing, and its retry waits out its backoff.
    let host = FakeHost::new();
    let a = host.start("a");
    let engine = start(
        &host,
        vec![rule(0, "port:1-1", "a")],
        vec![],
        &[backend(&a)],
        options(),
    );
    let mut status = engine.status();
    listed_and_idle(&mut status, "a").await;
    a.inject_on(Call::Attach, Fault::Refuse);
    a.inject_on(Call::List, Fault::Hang);
    plug(&host, &engine, vec![device("1-1", 5)]);
    wait_for(&mut status, "the refusal is pending a retry", |s| {
        !s.pending.is_empty()
    })
    .await;

    let s = status.borrow().clone();
    assert!(s.busy.contains("a") && s.acting.is_empty());
    assert_eq!(s.holder(&device("1-1", 5)), None);
    assert_eq!(s.pending[0].failures, 1);
}
