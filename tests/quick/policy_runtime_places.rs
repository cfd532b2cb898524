//! The engine runtime keeps places, not plugs: a socket's two speeds and a hub's subtree,
//! over the fake VMs (`usbroute::backend::fake`), with `policy_runtime`'s helpers.

use crate::policy_runtime::{backend, holds, options, plug, rule, start, wait_for};
use crate::policy_support::{device, hub};
use usbroute::backend::fake::FakeHost;
use usbroute::backend::AttachMode;
use usbroute::inventory::Device;
use usbroute::policy::{Placement, Rule};

#[tokio::test(start_paused = true)]
async fn a_usb2_device_replacing_a_usb3_one_in_a_socket_swaps_the_usb_host() {
    // One socket of the xHCI: USB 3 devices show up on bus 2, USB 2 ones on bus 1; the
    // inventory names both by the socket, so one rule matches either.
    let socket = |port: &str| Device {
        physical_port: Some("0000:00:14.0/3".parse().unwrap()),
        ..device(port, 2)
    };
    let host = FakeHost::new();
    let a = host.start("a");
    let by_port = Rule::pass(
        0,
        "port:0000:00:14.0/3".parse().unwrap(),
        "a",
        AttachMode::Port,
    );
    let engine = start(
        &host,
        vec![by_port],
        vec![socket("2-1")],
        &[backend(&a)],
        options(),
    );
    let mut status = engine.status();
    wait_for(&mut status, "a holds the USB 3 device", |s| {
        holds(s, "a", "usbroute-port-2-1")
    })
    .await;

    plug(&host, &engine, vec![socket("1-3")]);

    wait_for(&mut status, "a holds the USB 2 device only", |s| {
        holds(s, "a", "usbroute-port-1-3") && !holds(s, "a", "usbroute-port-2-1")
    })
    .await;
    assert_eq!(a.ids(), vec!["usbroute-port-1-3"]);
}

#[tokio::test(start_paused = true)]
async fn a_hub_rule_gives_every_device_behind_the_hub_now_and_later_and_never_a_hub() {
    let host = FakeHost::new();
    let a = host.start("a");
    let mut present = vec![hub("1-3", 2), device("1-3.1", 3)];
    let engine = start(
        &host,
        vec![rule(0, "hub:1-3", "a")],
        present.clone(),
        &[backend(&a)],
        options(),
    );
    let mut status = engine.status();
    wait_for(&mut status, "a holds the device behind the hub", |s| {
        holds(s, "a", "usbroute-addr-1-3")
    })
    .await;

    // Later: a device behind the hub, a second hub behind it, a device behind that one.
    for later in [device("1-3.2", 4), hub("1-3.4", 5), device("1-3.4.1", 6)] {
        present.push(later);
        plug(&host, &engine, present.clone());
    }
    wait_for(
        &mut status,
        "a holds every device behind 1-3, at any depth",
        |s| {
            [
                "usbroute-addr-1-3",
                "usbroute-addr-1-4",
                "usbroute-addr-1-6",
            ]
            .iter()
            .all(|id| holds(s, "a", id))
                && s.desired.devices.len() == 5
        },
    )
    .await;
    let passed: Vec<String> = status
        .borrow()
        .desired
        .devices
        .iter()
        .filter(|(_, d)| d.placement != Placement::Host)
        .map(|(p, _)| p.to_string())
        .collect();

    assert_eq!(
        a.ids(),
        [
            "usbroute-addr-1-3",
            "usbroute-addr-1-4",
            "usbroute-addr-1-6"
        ]
    );
    assert_eq!(passed, ["1-3.1", "1-3.2", "1-3.4.1"]);
    let why = engine.why("1-3.4".parse().unwrap()).await.expect("why");
    assert!(
        why.decision
            .reason
            .to_string()
            .ends_with("gives the devices behind it to VM a"),
        "{}",
        why.decision.reason
    );
}
