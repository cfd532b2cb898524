//! A bind failing after every member moved rolls back; the only keyboard is refused.

use super::vfio_support::{devices_below, drivers};
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice, EHCI_PCI, UHCI_PCI, XHCI_PCI};
use anyhow::{ensure, Result};
use std::time::Duration;

/// A bind that fails after all four members moved (the /dev/vfio node is hidden under a
/// tmpfs, so it never appears) rolls every member back onto its own driver; and a
/// keyboard that is the host's only one makes bind refuse without --force.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let functions = [UHCI_PCI[0], UHCI_PCI[1], UHCI_PCI[2], EHCI_PCI];
    bed.plug(&UsbDevice::new(Kind::Storage, "vr-stor", Ctrl::Ehci, "2"))
        .await?;
    let before = drivers(bed, &functions).await?;
    let out = bed
        .guest("mkdir -p /dev/vfio && mount -t tmpfs none /dev/vfio && usbroute controller bind 00:1d.7 --timeout 2; rc=$?; umount /dev/vfio; exit $rc")
        .await?;
    ensure!(
        out.rc != 0 && out.stderr.contains("did not appear") && out.stderr.contains("Rolled back."),
        "bind with /dev/vfio hidden: rc {} {}",
        out.rc,
        out.stderr
    );
    let after = drivers(bed, &functions).await?;
    ensure!(
        after == before,
        "after roll-back {after:?}, before {before:?}"
    );
    bed.wait_guest(
        "the storage device to re-enumerate after the roll-back",
        &devices_below(&functions, "46f4"),
        Duration::from_secs(15),
    )
    .await?;

    // q35 has a PS/2 keyboard (atkbd on serio0), so the USB keyboard is only the host's
    // only keyboard once that one is let go.
    bed.plug(&UsbDevice::new(Kind::Kbd, "vr-kbd", Ctrl::Xhci, "1"))
        .await?;
    let both = bed
        .guest("usbroute controller bind 00:03.0 --dry-run")
        .await?;
    ensure!(
        both.rc == 0,
        "with the PS/2 keyboard bound the xHCI may go: rc {} {}",
        both.rc,
        both.stderr
    );
    bed.guest_ok("echo -n serio0 > /sys/bus/serio/drivers/atkbd/unbind")
        .await?;
    let out = bed.guest("usbroute controller bind 00:03.0").await?;
    bed.guest_ok("echo -n serio0 > /sys/bus/serio/drivers/atkbd/bind")
        .await?;
    ensure!(
        out.rc != 0
            && out
                .stderr
                .contains("has the host's only keyboard (USB 1-1)"),
        "bind of the only keyboard's controller: rc {} {}",
        out.rc,
        out.stderr
    );
    let xhci = drivers(bed, &[XHCI_PCI]).await?;
    ensure!(
        xhci == vec![("xhci_hcd".to_string(), "(null)".to_string())],
        "xHCI after refusal: {xhci:?}"
    );
    Ok(())
}
