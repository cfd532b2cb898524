//! A rule's `follow` in the async engine: the coordinator and a fake VM, with tokio's
//! paused clock moved by the test (the engine's only clock), and the helpers of
//! `policy_runtime`.

use crate::policy_runtime::{backend, holds, options, plug, rule, start, wait_for};
use crate::policy_support::{device, placed, with_id};
use std::time::Duration;
use usbroute::backend::fake::FakeHost;
use usbroute::engine::coordinator::Status;
use usbroute::policy::Reason;

/// A device `follow` rule 0 gave VM a leaves; a device with other ids appears on the same
/// physical port: within the window it follows into a, after it it stays home. The
/// engine's clock is tokio's, paused: the test moves it.
#[tokio::test(start_paused = true)]
async fn a_re_enumerated_device_follows_into_the_vm_within_the_window_only() {
    let host = FakeHost::new();
    let a = host.start("a");
    let mut follow = rule(0, "id:046d:c016", "a");
    follow.follow = Some(Duration::from_secs(10));
    let app = placed(device("1-3", 4));
    let dfu = |address| placed(with_id(device("1-3", address), 0x0483, 0xdf11));
    let engine = start(&host, vec![follow], vec![app], &[backend(&a)], options());
    let mut status = engine.status();
    wait_for(&mut status, "a holds the app", |s| {
        holds(s, "a", "usbroute-addr-1-4")
    })
    .await;
    let empty = |s: &Status| {
        s.vms
            .get("a")
            .is_some_and(|v| v.reachable && v.devices.is_empty())
    };

    plug(&host, &engine, vec![]);
    wait_for(&mut status, "the app's usb-host gone", empty).await;
    tokio::time::advance(Duration::from_secs(9)).await;
    plug(&host, &engine, vec![dfu(5)]);
    wait_for(&mut status, "a holds the bootloader", |s| {
        holds(s, "a", "usbroute-addr-1-5")
    })
    .await;
    let reason = status.borrow().desired.devices[&"1-3".parse().expect("port")]
        .reason
        .clone();
    plug(&host, &engine, vec![]);
    wait_for(&mut status, "the bootloader's usb-host gone", empty).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    plug(&host, &engine, vec![dfu(6)]);
    wait_for(&mut status, "the late bootloader planned", |s| {
        let late = s.desired.devices.get(&"1-3".parse().expect("port"));
        late.is_some_and(|d| d.reason == Reason::NoRule) && empty(s)
    })
    .await;

    assert!(
        matches!(&reason, Reason::Followed { rule, after_ms: 9000, .. } if rule.index == 0),
        "{reason:?}"
    );
    assert_eq!(a.ids(), Vec::<String>::new());
}
