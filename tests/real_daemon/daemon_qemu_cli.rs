//! The CLI against `usbroute serve` and a real QEMU (the bed of `daemon_qemu.rs`): `attach
//! --vm` goes through the daemon and is confirmed, also for a device named by its
//! controller-anchored port; `detach` keeps a ruled device on the host until cleared; the
//! QMP forms on a managed VM go through the daemon unless forced.

use crate::daemon_qemu::{Bed, EXPECTED};
use crate::serve_support::wait_until;
use std::time::Duration;

/// `usbroute attach SELECTOR --vm guest --by port` through the daemon, for the recording's
/// 1-4: the reply says the VM confirmed it, and QEMU has its usb-host.
fn attach_1_4_through_the_daemon(selector: &str) {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));

    let out = bed.cli(&["attach", selector, "--vm", "guest", "--by", "port"]);

    assert_eq!(out, "1-4 attached to VM guest (confirmed by the VM)\n");
    assert!(
        bed.usb_hosts().contains(&"usbroute-port-1-4".to_string()),
        "{:?}",
        bed.usb_hosts()
    );
}

#[test]
fn cli_attach_vm_goes_through_the_daemon_and_is_confirmed() {
    attach_1_4_through_the_daemon("port:1-4");
}

#[test]
fn cli_attach_vm_takes_a_device_named_by_its_controller_anchored_port() {
    // 1-4 of the recording: socket 4 of the xHCI at 0000:00:03.0.
    attach_1_4_through_the_daemon("port:0000:00:03.0/4");
}

#[test]
fn cli_detach_keeps_a_ruled_device_on_the_host_until_cleared() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));

    bed.cli(&["detach", "port:1-2.1"]);
    let detached = bed.usb_hosts();
    bed.cli(&["detach", "port:1-2.1", "--clear"]);
    wait_until(
        Duration::from_secs(10),
        "the rule to attach 1-2.1 again",
        || bed.usb_hosts() == EXPECTED,
    );

    assert_eq!(detached, ["usbroute-id-46f4-0001"]);
}

/// Changed with issue 13 item 7: a `--qmp` form on a VM the daemon manages used to be
/// refused; the daemon holds that monitor's one connection, so now the daemon does it,
/// and `--force` talks to QEMU directly (and finds the monitor held).
#[test]
fn cli_qmp_forms_on_a_managed_vm_go_through_the_daemon_unless_forced() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));
    let qmp = bed.path("guest.qmp");

    let out = bed.cli(&[
        "attach",
        "port:1-4",
        "--by",
        "port",
        "--qmp",
        qmp.to_str().unwrap(),
    ]);
    let forced = bed.cli_fails(&[
        "detach",
        "port:1-2.1",
        "--force",
        "--qmp",
        qmp.to_str().unwrap(),
    ]);

    assert!(out.starts_with("the usbroute daemon ("), "{out}");
    assert!(out.contains("manages VM `guest`"), "{out}");
    assert!(
        out.ends_with("1-4 attached to VM guest (confirmed by the VM)\n"),
        "{out}"
    );
    assert!(
        forced.contains("is probably held by another client"),
        "{forced}"
    );
    assert_eq!(
        bed.usb_hosts(),
        [EXPECTED[0], EXPECTED[1], "usbroute-port-1-4"]
    );
}
