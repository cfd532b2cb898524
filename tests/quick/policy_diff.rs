//! The diff, holdings and retry book, one behaviour per test. The engine goes by
//! [`AttachKey`]; the tests write keys as QEMU's ids (`usbroute-addr-1-5`), read into
//! keys as the QEMU backend's listing would ([`ids`]), for brevity.

use crate::policy_support;

use policy_support::device;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use usbroute::backend::qemu::ids;
use usbroute::backend::{AttachKey, AttachMode, HostMatch, VmUsbDevice};
use usbroute::engine::{
    reconcile, Action, Actual, BackoffPolicy, Holdings, Outcome, RetryBook, VmView,
};
use usbroute::inventory::{Device, PortPath};
use usbroute::policy::{Decision, Desired, Placement, Reason};

fn desired(entries: &[(&str, &str, AttachMode)]) -> Desired {
    let devices = entries
        .iter()
        .map(|(port, vm, mode)| {
            let placement = match *vm {
                "host" => Placement::Host,
                vm => Placement::Vm {
                    vm: vm.into(),
                    mode: *mode,
                },
            };
            let port: PortPath = port.parse().expect("port");
            (
                port,
                Decision {
                    placement,
                    reason: Reason::NoRule,
                },
            )
        })
        .collect();
    Desired { devices }
}

fn usb(id: &str, attached: bool) -> VmUsbDevice {
    VmUsbDevice {
        id: id.into(),
        attached,
        key: ids::key_of(id),
        matcher: HostMatch::Other {},
    }
}

fn actual(vms: &[(&str, &[(&str, bool)])]) -> Actual {
    vms.iter()
        .map(|(vm, list)| {
            let devices = list.iter().map(|(id, a)| usb(id, *a)).collect();
            (
                vm.to_string(),
                VmView {
                    devices,
                    reachable: true,
                },
            )
        })
        .collect()
}

fn summary(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Attach { vm, key, .. } => format!("attach {vm} {}", ids::device_id(key)),
            Action::Detach { vm, key } => format!("detach {vm} {}", ids::device_id(key)),
        })
        .collect()
}

fn devices() -> Vec<Device> {
    vec![device("1-1", 5), device("1-2", 6)]
}

const ADDR: AttachMode = AttachMode::Address;

#[test]
fn attaches_wanted_device_by_address_id() {
    let actions = reconcile(
        &desired(&[("1-1", "a", ADDR)]),
        &actual(&[("a", &[])]),
        &devices(),
    );
    assert_eq!(summary(&actions), vec!["attach a usbroute-addr-1-5"]);
}

#[test]
fn leaves_right_device_alone() {
    let now = actual(&[("a", &[("usbroute-addr-1-5", true)])]);
    let actions = reconcile(&desired(&[("1-1", "a", ADDR)]), &now, &devices());
    assert_eq!(actions, vec![]);
}

#[test]
fn detaches_ours_that_is_not_wanted() {
    let now = actual(&[("a", &[("usbroute-addr-1-5", true)])]);
    let actions = reconcile(&desired(&[("1-1", "host", ADDR)]), &now, &devices());
    assert_eq!(summary(&actions), vec!["detach a usbroute-addr-1-5"]);
}

#[test]
fn leaves_foreign_usb_host_devices_alone() {
    let now = actual(&[("a", &[("usb0", true), ("my-mouse", true)])]);
    let actions = reconcile(&desired(&[]), &now, &devices());
    assert_eq!(actions, vec![]);
}

#[test]
fn moving_between_vms_detaches_first_and_attaches_next_round() {
    let want = desired(&[("1-1", "b", ADDR)]);
    let before = actual(&[("a", &[("usbroute-addr-1-5", true)]), ("b", &[])]);
    let after = actual(&[("a", &[]), ("b", &[])]);
    assert_eq!(
        (
            summary(&reconcile(&want, &before, &devices())),
            summary(&reconcile(&want, &after, &devices()))
        ),
        (
            vec!["detach a usbroute-addr-1-5".to_string()],
            vec!["attach b usbroute-addr-1-5".to_string()]
        )
    );
}

#[test]
fn changing_mode_in_same_vm_detaches_old_id_first() {
    let want = desired(&[("1-1", "a", AttachMode::Port)]);
    let now = actual(&[("a", &[("usbroute-addr-1-5", true)])]);
    assert_eq!(
        summary(&reconcile(&want, &now, &devices())),
        vec!["detach a usbroute-addr-1-5"]
    );
}

#[test]
fn stale_address_entry_with_reused_devnum_is_detached() {
    let now = actual(&[("a", &[("usbroute-addr-1-5", false)])]);
    let actions = reconcile(&desired(&[("1-1", "a", ADDR)]), &now, &devices());
    assert_eq!(summary(&actions), vec!["detach a usbroute-addr-1-5"]);
}

#[test]
fn port_entry_waiting_for_device_is_kept() {
    let now = actual(&[("a", &[("usbroute-port-1-1", false)])]);
    let actions = reconcile(
        &desired(&[("1-1", "a", AttachMode::Port)]),
        &now,
        &devices(),
    );
    assert_eq!(actions, vec![]);
}

#[test]
fn id_attach_waits_while_another_device_of_kind_is_held() {
    let want = desired(&[("1-1", "host", ADDR), ("1-2", "b", AttachMode::Id)]);
    let now = actual(&[("a", &[("usbroute-port-1-1", true)]), ("b", &[])]);
    assert_eq!(
        summary(&reconcile(&want, &now, &devices())),
        vec!["detach a usbroute-port-1-1"]
    );
}

#[test]
fn unreachable_vm_is_not_acted_on_but_still_holds() {
    let want = desired(&[("1-1", "b", ADDR)]);
    let mut now = actual(&[("a", &[("usbroute-addr-1-5", true)]), ("b", &[])]);
    now.get_mut("a").expect("a").reachable = false;
    assert_eq!(reconcile(&want, &now, &devices()), vec![]);
}

#[test]
fn vm_not_in_actual_gets_nothing() {
    let actions = reconcile(&desired(&[("1-1", "a", ADDR)]), &Actual::new(), &devices());
    assert_eq!(actions, vec![]);
}

#[test]
fn device_absent_from_snapshot_is_not_attached() {
    let actions = reconcile(
        &desired(&[("1-9", "a", ADDR)]),
        &actual(&[("a", &[])]),
        &devices(),
    );
    assert_eq!(actions, vec![]);
}

#[test]
fn actions_are_sorted_detaches_first() {
    let want = desired(&[("1-1", "b", ADDR), ("1-2", "a", ADDR)]);
    let now = actual(&[("a", &[("usbroute-addr-1-9", true)]), ("b", &[])]);
    assert_eq!(
        summary(&reconcile(&want, &now, &devices())),
        vec![
            "detach a usbroute-addr-1-9",
            "attach a usbroute-addr-1-6",
            "attach b usbroute-addr-1-5"
        ]
    );
}

#[test]
fn holdings_keep_unknown_attach_as_held() {
    let mut holdings = Holdings::default();
    holdings.listed("a", vec![]);
    let attach = Action::Attach {
        vm: "a".into(),
        device: Box::new(device("1-1", 5)),
        mode: ADDR,
        key: key("usbroute-addr-1-5"),
    };
    holdings.acted(&attach, "usbroute-addr-1-5", Outcome::Unknown);
    let view = holdings.actual(&BTreeSet::new());
    // As the VM's list would show it.
    let held = VmUsbDevice {
        matcher: HostMatch::Address { bus: 1, address: 5 },
        ..usb("usbroute-addr-1-5", true)
    };
    assert_eq!(
        view["a"],
        VmView {
            devices: vec![held],
            reachable: false
        }
    );
}

#[test]
fn holdings_refused_attach_changes_nothing() {
    let mut holdings = Holdings::default();
    holdings.listed("a", vec![]);
    let attach = Action::Attach {
        vm: "a".into(),
        device: Box::new(device("1-1", 5)),
        mode: ADDR,
        key: key("usbroute-addr-1-5"),
    };
    holdings.acted(&attach, "usbroute-addr-1-5", Outcome::Refused);
    assert_eq!(
        holdings.actual(&BTreeSet::from(["a".to_string()]))["a"].devices,
        vec![]
    );
}

#[test]
fn holdings_forget_drops_vm() {
    let mut holdings = Holdings::default();
    holdings.listed("a", vec![usb("usbroute-addr-1-5", true)]);
    holdings.forget("a");
    assert_eq!(holdings.actual(&BTreeSet::new()), BTreeMap::new());
}

fn key(id: &str) -> AttachKey {
    ids::key_of(id).expect("one of our ids")
}

fn detach(id: &str) -> Action {
    Action::Detach {
        vm: "a".into(),
        key: key(id),
    }
}

#[test]
fn backoff_doubles_and_caps() {
    let policy = BackoffPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(700),
    };
    let delays: Vec<u128> = (1..=5).map(|n| policy.delay(n).as_millis()).collect();
    assert_eq!(delays, vec![100, 200, 400, 700, 700]);
}

#[test]
fn retry_waits_until_backoff_elapsed() {
    let mut book = RetryBook::new(BackoffPolicy::default());
    let action = detach("usbroute-addr-1-5");
    book.failed(
        &action,
        "usbroute-addr-1-5",
        "timeout".into(),
        Duration::from_secs(10),
    );
    let at = |ms: u64| book.ready(&action, Duration::from_millis(ms));
    assert_eq!((at(10_100), at(10_250)), (false, true));
}

#[test]
fn retry_keeps_last_error_and_count() {
    let mut book = RetryBook::new(BackoffPolicy::default());
    let action = detach("usbroute-addr-1-5");
    book.failed(&action, "usbroute-addr-1-5", "first".into(), Duration::ZERO);
    book.failed(
        &action,
        "usbroute-addr-1-5",
        "second".into(),
        Duration::from_secs(1),
    );
    let pending = book.get("a", &key("usbroute-addr-1-5")).expect("pending");
    assert_eq!(
        (
            pending.failures,
            pending.last_error.as_str(),
            pending.retry_at
        ),
        (2, "second", Duration::from_millis(1500))
    );
}

#[test]
fn retry_success_clears_backoff() {
    let mut book = RetryBook::new(BackoffPolicy::default());
    let action = detach("usbroute-addr-1-5");
    book.failed(&action, "usbroute-addr-1-5", "x".into(), Duration::ZERO);
    book.succeeded(&action);
    assert_eq!(
        (book.ready(&action, Duration::ZERO), book.next_retry()),
        (true, None)
    );
}

#[test]
fn retry_forgets_actions_no_longer_wanted() {
    let mut book = RetryBook::new(BackoffPolicy::default());
    book.failed(
        &detach("usbroute-addr-1-5"),
        "usbroute-addr-1-5",
        "x".into(),
        Duration::ZERO,
    );
    book.keep_only(&[detach("usbroute-addr-1-6")]);
    assert_eq!(book.pending().count(), 0);
}
