//! `usbroute attach --by port` follows the physical port: attached while nothing is
//! plugged there (QEMU accepts, `attached: false`), QEMU takes the device when it is
//! plugged, lets go on unplug and takes it again on re-plug.

use super::qemu_attach::json;
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice, XHCI_PCI};
use anyhow::{ensure, Result};
use std::time::Duration;

/// Attach xHCI port 6 of the USB 2 bus before anything is there, then plug, unplug and
/// re-plug a keyboard at it and watch `attached` in `usbroute vm devices --json`.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let bus = bed
        .guest_ok(&format!(
            "for hub in /sys/bus/pci/devices/{XHCI_PCI}/usb*; do \
               if [ \"$(cat $hub/speed)\" = 480 ]; then cat $hub/busnum; fi; done"
        ))
        .await?;
    let port = format!("{}-6", bus.trim());
    let inner = bed.start_inner_qemu("port", "root", "").await?;
    let qmp = inner.qmp.clone();

    let out = bed
        .guest_ok(&format!(
            "usbroute attach port:{port} --by port --json --qmp {qmp}"
        ))
        .await?;
    let attached = json(&out)?;
    ensure!(
        attached["id"] == format!("usbroute-port-{port}").as_str() && attached["attached"] == false,
        "attach by port of an empty port printed {attached}"
    );

    let kbd = UsbDevice::new(Kind::Kbd, "qp-kbd", Ctrl::Xhci, "6");
    // The inner QEMU takes the keyboard from the guest's usbhid as soon as its rescan
    // finds it: whether the guest driver is ever seen bound is a race, so do not wait
    // for it.
    let name = bed.plug_unbound(&kbd).await?;
    ensure!(name == port, "the keyboard showed up as {name}, not {port}");
    let is_attached =
        format!("usbroute vm devices --json --qmp {qmp} | grep -q '\"attached\": true'");
    let is_detached =
        format!("usbroute vm devices --json --qmp {qmp} | grep -q '\"attached\": false'");
    // QEMU rescans every 2 s.
    bed.wait_guest(
        "the inner QEMU to take the plugged keyboard",
        &is_attached,
        Duration::from_secs(10),
    )
    .await?;
    bed.unplug("qp-kbd").await?;
    bed.wait_guest(
        "the inner QEMU to let go of the unplugged keyboard",
        &is_detached,
        Duration::from_secs(10),
    )
    .await?;
    bed.plug_unbound(&kbd).await?;
    bed.wait_guest(
        "the inner QEMU to take the re-plugged keyboard",
        &is_attached,
        Duration::from_secs(10),
    )
    .await?;
    bed.guest_ok(&format!("usbroute detach port:{port} --qmp {qmp}"))
        .await?;
    Ok(())
}
