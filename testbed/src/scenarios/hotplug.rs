//! Plug and unplug on each controller type; the guest kernel follows, devnum grows.

use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Result};
use std::time::Duration;

/// Plug a keyboard on xHCI, a full-speed one on the EHCI (handed to a UHCI) and a
/// storage device on the EHCI; each appears, disappears on unplug, and re-plugging
/// gives a new device address.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let devices = [
        UsbDevice::new(Kind::Kbd, "hp-kbd", Ctrl::Xhci, "6"),
        UsbDevice::new(Kind::Kbd, "hp-fs", Ctrl::Ehci, "3").full_speed_only(),
        UsbDevice::new(Kind::Storage, "hp-stor", Ctrl::Ehci, "2"),
    ];
    for dev in &devices {
        let name = bed.plug(dev).await?;
        let first = bed
            .guest_ok(&format!("cat /sys/bus/usb/devices/{name}/devnum"))
            .await?;
        bed.unplug(&dev.id).await?;
        bed.wait_guest(
            &format!("{name} to leave the guest"),
            &format!("! test -e /sys/bus/usb/devices/{name}"),
            Duration::from_secs(10),
        )
        .await?;
        let again = bed.plug(dev).await?;
        ensure!(
            again == name,
            "{} re-plugged as {again}, first as {name}",
            dev.id
        );
        let second = bed
            .guest_ok(&format!("cat /sys/bus/usb/devices/{name}/devnum"))
            .await?;
        ensure!(
            first.trim() != second.trim(),
            "{name}: devnum {} did not change on re-plug",
            first.trim()
        );
        bed.unplug(&dev.id).await?;
    }
    Ok(())
}
