//! `usbroute serve --uevent-socket PATH`: uevents in the kernel's format on a Unix
//! socket, the seam through which benches tell a daemon running on a recording
//! (`--sysfs-root`) that a recorded device went or came (a real uevent can only name
//! the machine's own devices). Any user: no netlink, no root.

use crate::serve_support::{self, Serve};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/guest-xhci-ehci"
);
/// The recorded guest's mouse, its interface, and where the kernel put it.
const MOUSE: &str = "1-2.1";
const MOUSE_INTERFACE: &str = "1-2.1:1.0";
const MOUSE_DEVPATH: &str = "/devices/pci0000:00/0000:00:03.0/usb1/1-2/1-2.1";

/// A copy of the recorded guest in `dir/sysfs`, and the daemon on it with its uevent
/// socket at `dir/uevents.sock` (no config: the empty policy), its log collected.
fn start(dir: &Path) -> Serve {
    let copied = Command::new("cp")
        .arg("-a")
        .arg(FIXTURE)
        .arg(dir.join("sysfs"))
        .status()
        .unwrap();
    assert!(copied.success());
    Serve::at(dir.join("control.sock"))
        .sysfs_root(dir.join("sysfs"))
        .args(&[
            "--uevent-socket".as_ref(),
            dir.join("uevents.sock").as_os_str(),
        ])
        .log()
        .start()
}

fn has_mouse(daemon: &Serve) -> bool {
    daemon.status()["devices"]
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["port"] == MOUSE))
}

/// Take the mouse out of the copied sysfs, as the kernel does on unplug.
fn unplug_mouse(dir: &Path) {
    let listing = dir.join("sysfs/sys/bus/usb/devices");
    std::fs::remove_file(listing.join(MOUSE)).unwrap();
    std::fs::remove_file(listing.join(MOUSE_INTERFACE)).unwrap();
    std::fs::remove_dir_all(dir.join(format!("sysfs/sys{MOUSE_DEVPATH}"))).unwrap();
}

fn send(dir: &Path, datagram: &[u8]) {
    UnixDatagram::unbound()
        .unwrap()
        .send_to(datagram, dir.join("uevents.sock"))
        .unwrap();
}

#[test]
fn a_remove_uevent_on_the_socket_makes_the_daemon_see_the_recorded_device_gone() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());
    assert!(has_mouse(&daemon), "{}", daemon.log());

    unplug_mouse(dir.path());
    send(
        dir.path(),
        format!("remove@{MOUSE_DEVPATH}\0ACTION=remove\0DEVPATH={MOUSE_DEVPATH}\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0BUSNUM=001\0DEVNUM=003\0").as_bytes(),
    );

    daemon.wait_until(Duration::from_secs(10), "the mouse to be gone", || {
        !has_mouse(&daemon)
    });
    assert!(daemon.logged("uevent: remove 1-2.1"), "{}", daemon.log());
}

#[test]
fn a_datagram_that_is_not_a_uevent_is_logged_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path());

    unplug_mouse(dir.path());
    send(dir.path(), b"remove everything");

    daemon.wait_until(
        serve_support::STARTUP,
        "the daemon to say it ignored the datagram",
        || daemon.logged("ignored a uevent datagram: uevent socket: malformed uevent"),
    );
    // The datagram was read and judged (logged above) without a rescan: the picture still
    // holds the mouse that sysfs no longer has.
    assert!(has_mouse(&daemon), "{}", daemon.log());
}

#[test]
fn the_uevent_socket_is_for_the_daemons_own_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let _daemon = start(dir.path());

    let mode = std::fs::metadata(dir.path().join("uevents.sock"))
        .unwrap()
        .permissions()
        .mode();

    assert_eq!(mode & 0o777, 0o600);
}
