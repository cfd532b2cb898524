//! One socket, two speeds: with one rule naming an xHCI socket by its controller
//! (`port:0000:00:03.0/5`, `by = "port"`), a USB 3 storage device (on the guest's USB 3
//! bus at 5000 Mb/s) and then a USB 2 keyboard (on the USB 2 bus) plugged in turn into
//! that socket both go to the inner QEMU and are attached there (`attached: true`).
//!
//! QEMU's qemu-xhci gives each of its ports a USB 2 and a USB 3 side (hw/usb/hcd-xhci.c:
//! port N is USB 2 port N and USB 3 port N of the guest's two root hubs), and the guest
//! kernel links those as `peer` twins: a SuperSpeed device lands on the USB 3 bus, a
//! high-speed one on the USB 2 bus, at the same port number.

use super::daemon::{
    qom_attached, start_daemon, usb_hosts, wait_hosts, wait_settled, CONFIG, CONTROL, PROBE,
};
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice, XHCI_PCI};
use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::time::Duration;

/// The socket the rule names (QEMU's xhci.0 port, the guest's root port number).
const SOCKET: &str = "5";

/// Plug the storage device, see it attached; unplug it, see its usb-host go; plug the
/// keyboard, see it attached; each time the device's physical port is the socket's name.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let socket = format!("{XHCI_PCI}/{SOCKET}");
    let extra = format!("-qmp unix:{PROBE},server=on,wait=off");
    let inner = bed.start_inner_qemu("twins", "root", &extra).await?;
    let config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"inner\"\nqmp = \"{}\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"port:{socket}\"\nby = \"port\"\n",
        inner.qmp
    );
    bed.guest_ok(&format!("cat > {CONFIG} <<'EOF'\n{config}EOF"))
        .await?;
    let daemon = start_daemon(bed).await?;

    let storage = UsbDevice::new(Kind::Storage, "tw-stor", Ctrl::Xhci, SOCKET);
    let usb3 = plug_into_socket(bed, &storage, "5000", &socket).await?;
    bed.unplug(&storage.id).await?;
    wait_hosts(bed, "the storage device's usb-host to go", &[]).await?;

    let keyboard = UsbDevice::new(Kind::Kbd, "tw-kbd", Ctrl::Xhci, SOCKET);
    let usb2 = plug_into_socket(bed, &keyboard, "480", &socket).await?;
    ensure!(
        usb2.split('-').next() != usb3.split('-').next(),
        "the keyboard ({usb2}) and the storage device ({usb3}) were on the same bus: \
         the socket was not tried at both speeds"
    );
    bed.guest_ok(&format!("kill -9 {daemon}; rm -f {CONTROL} {CONFIG}"))
        .await?;
    Ok(())
}

/// Plug `dev` into the socket; check the guest sees it at `speed` Mb/s and usbroute
/// names it by the socket; wait until the inner QEMU holds it for the rule (a usb-host by
/// port of the bus it is on) and has it attached. Its kernel name.
async fn plug_into_socket(
    bed: &mut Bed,
    dev: &UsbDevice,
    speed: &str,
    socket: &str,
) -> Result<String> {
    // The inner QEMU may take it before the guest's own drivers bind.
    let name = bed.plug_unbound(dev).await?;
    let seen = bed
        .guest_ok(&format!("cat /sys/bus/usb/devices/{name}/speed"))
        .await?;
    ensure!(
        seen.trim() == speed,
        "{} ({name}) runs at {} Mb/s, not {speed}",
        dev.id,
        seen.trim()
    );
    let listed = bed.guest_ok("usbroute list --json").await?;
    let listed: Value =
        serde_json::from_str(&listed).with_context(|| format!("list --json printed {listed}"))?;
    let physical = listed["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["port"] == name.as_str())
        .map(|d| d["physical_port"].clone());
    ensure!(
        physical == Some(Value::from(socket)),
        "usbroute names {name} {physical:?}, not the socket {socket}"
    );
    let id = format!("usbroute-port-{name}");
    wait_hosts(
        bed,
        &format!("{} ({name}) in the inner QEMU", dev.id),
        &[&id],
    )
    .await?;
    wait_settled(bed, &format!("the daemon to settle on {name}"), &[&name]).await?;
    // QEMU finds a device by port on its 2 s rescan.
    let poll = bed.poll(
        &format!("the inner QEMU to attach {id}"),
        Duration::from_secs(10),
    );
    loop {
        if qom_attached(bed, &id).await? {
            poll.met(bed);
            break;
        }
        let hosts = usb_hosts(bed).await?;
        poll.again(bed, format!("{id} not attached; usb-hosts {hosts:?}"))
            .await?;
    }
    Ok(name)
}
