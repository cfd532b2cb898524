//! The uevent socket against the real kernel: real events, a real spoofing sender, and a
//! real receive-buffer overflow. Needs root (writing a sysfs `uevent` file makes the kernel
//! emit an event, and SO_RCVBUFFORCE needs CAP_NET_ADMIN).

use nix::sys::socket::{
    sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::os::fd::AsRawFd;
use std::time::Duration;
use usbroute::events::{Received, UeventAction, UeventSocket};

/// The kernel object we poke: always present, harmless to re-announce.
const DEVICE_UEVENT: &str = "/sys/devices/virtual/mem/null/uevent";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root: run `sudo cargo test --features real-tests --test daemon_uevents` (writing {DEVICE_UEVENT} makes the kernel emit a uevent)"
    );
}

/// Ask the kernel to emit a synthetic `change` uevent tagged with a fresh UUID (argument
/// keys must be alphanumeric: the kernel refuses `_`).
fn trigger_change(uuid: &str) {
    std::fs::write(DEVICE_UEVENT, format!("change {uuid} USBROUTETEST=1"))
        .unwrap_or_else(|e| panic!("writing {DEVICE_UEVENT}: {e}"));
}

fn fresh_uuid(n: u32) -> String {
    let pid = std::process::id();
    format!("{pid:08x}-0000-4000-8000-{n:012x}")
}

/// Receive until the event carrying `uuid` arrives; everything else (other agents' events) is skipped.
async fn receive_tagged(sock: &mut UeventSocket, uuid: &str) -> Received {
    loop {
        let item = sock.recv().await;
        let tagged = matches!(&item, Received::Event(ev) if ev.env.get("SYNTH_UUID").map(String::as_str) == Some(uuid));
        if tagged {
            return item;
        }
    }
}

#[tokio::test]
async fn kernel_uevent_arrives_typed_from_the_kernel() {
    require_root();
    let mut sock = UeventSocket::open().expect("open uevent socket");
    let uuid = fresh_uuid(1);

    trigger_change(&uuid);
    let item = tokio::time::timeout(Duration::from_secs(5), receive_tagged(&mut sock, &uuid))
        .await
        .expect("the kernel's uevent arrived within 5 s");

    let Received::Event(ev) = item else {
        unreachable!("receive_tagged returns events only")
    };
    assert_eq!(ev.action, UeventAction::Change);
    assert_eq!(ev.devpath, "/devices/virtual/mem/null");
    assert_eq!(ev.subsystem.as_deref(), Some("mem"));
    assert_eq!(
        ev.env.get("SYNTH_ARG_USBROUTETEST").map(String::as_str),
        Some("1")
    );
    assert!(ev.seqnum.is_some());
}

#[tokio::test]
async fn uevent_from_a_userspace_sender_is_rejected() {
    let mut sock = UeventSocket::open().expect("open uevent socket");
    let spoofer = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )
    .expect("spoofing socket");
    let forged = b"bind@/devices/pci0000:00/0000:00:14.0/usb1/1-1\0ACTION=bind\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0BUSNUM=001\0DEVNUM=002\0";

    sendto(
        spoofer.as_raw_fd(),
        forged,
        &NetlinkAddr::new(sock.port_id(), 0),
        MsgFlags::empty(),
    )
    .expect("unicast to the listener's port");
    let item = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sock.recv().await {
                Received::Event(ev) if ev.subsystem.as_deref() != Some("usb") => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the forged datagram arrived within 5 s");

    assert!(
        matches!(&item, Received::Rejected { reason } if reason.contains("is not the kernel")),
        "got {item:?}"
    );
}

#[tokio::test]
async fn receive_buffer_overflow_reports_resync() {
    require_root();
    // The smallest buffer the kernel allows holds a couple of events; 200 unread ones overflow it.
    let mut sock = UeventSocket::open_with_buffer(1).expect("open uevent socket");
    for n in 0..200 {
        trigger_change(&fresh_uuid(1000 + n));
    }

    let mut seen = Vec::new();
    let resynced = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let item = sock.recv().await;
            let is_resync = matches!(item, Received::Resync { .. });
            seen.push(item);
            if is_resync {
                return;
            }
        }
    })
    .await;

    assert!(
        resynced.is_ok(),
        "no Resync after overflowing the buffer; got {} items",
        seen.len()
    );
    assert!(
        seen.len() < 200,
        "far fewer than 200 events fit in the smallest buffer"
    );
}
