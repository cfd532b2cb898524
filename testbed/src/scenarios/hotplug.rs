//! Plug and unplug on each controller type; the guest kernel follows, devnum grows.

use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Result};

/// Plug a keyboard on xHCI, a full-speed one on the EHCI (handed to a UHCI) and a
/// storage device on the EHCI; each appears, disappears on unplug, and re-plugging
/// gives a new device address. Then a hub on the EHCI with a tablet behind it.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let devices = [
        UsbDevice::new(Kind::Kbd, "hp-kbd", Ctrl::Xhci, "6"),
        UsbDevice::new(Kind::Kbd, "hp-fs", Ctrl::Ehci, "3").full_speed_only(),
        UsbDevice::new(Kind::Storage, "hp-stor", Ctrl::Ehci, "2"),
    ];
    // A hub on the EHCI (full speed: handed to a UHCI) with a device behind it.
    let hub = UsbDevice::new(Kind::Hub, "hp-hub", Ctrl::Ehci, "4");
    let behind = UsbDevice::new(Kind::Tablet, "hp-tab", Ctrl::Ehci, "4.1");
    for dev in &devices {
        let name = bed.plug(dev).await?;
        let first = bed
            .guest_ok(&format!("cat /sys/bus/usb/devices/{name}/devnum"))
            .await?;
        // unplug waits until the guest has dropped it too.
        bed.unplug(&dev.id).await?;
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
    bed.plug(&hub).await?;
    let name = bed.plug(&behind).await?;
    let parent = bed
        .guest_ok(&format!(
            "basename $(readlink -f /sys/bus/usb/devices/{name}/..)"
        ))
        .await?;
    ensure!(
        parent.trim() == name.rsplit_once('.').map_or("", |p| p.0),
        "{name} is not under its hub (parent {})",
        parent.trim()
    );
    bed.unplug(&behind.id).await?;
    bed.unplug(&hub.id).await?;
    Ok(())
}
