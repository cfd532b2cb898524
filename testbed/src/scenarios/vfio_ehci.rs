//! EHCI + UHCI companions to vfio-pci and back, twice.

use super::vfio_support::{devices_below, drivers, json_of};
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice, EHCI_PCI, UHCI_PCI};
use anyhow::{ensure, Context, Result};
use std::time::Duration;

/// EHCI + 3 UHCI (one IOMMU group): the verdict names the companions; bind moves all
/// four to vfio-pci and the USB devices leave the host; restore puts each back on its
/// driver, clears driver_override, drops the record, and the devices re-enumerate.
/// Twice in a row (the 6.1 kernel crashed on the second unbind of a shared group).
pub async fn run(bed: &mut Bed) -> Result<()> {
    let functions = [UHCI_PCI[0], UHCI_PCI[1], UHCI_PCI[2], EHCI_PCI];
    bed.plug(&UsbDevice::new(Kind::Storage, "vf-stor", Ctrl::Ehci, "2"))
        .await?;
    bed.plug(&UsbDevice::new(Kind::Mouse, "vf-mouse", Ctrl::Ehci, "3").full_speed_only())
        .await?;
    let check = json_of(bed, "usbroute controller check 00:1d.7 --json").await?;
    ensure!(
        check["status"] == "with-group" && check["goes_with"].as_array().map(Vec::len) == Some(3),
        "verdict for the EHCI: {check}"
    );
    let group = check["iommu_group"].as_u64().context("no IOMMU group")?;
    let before = drivers(bed, &functions).await?;
    for round in 1..=2 {
        bed.guest_ok("usbroute controller bind 00:1d.7").await?;
        let bound = drivers(bed, &functions).await?;
        ensure!(
            bound
                .iter()
                .all(|(d, o)| d == "vfio-pci" && o == "vfio-pci"),
            "round {round}: after bind {bound:?}"
        );
        bed.guest_ok(&format!(
            "test -e /dev/vfio/{group} && test -f /var/lib/usbroute/vfio/{group}.json"
        ))
        .await?;
        bed.wait_guest(
            "USB devices of the EHCI group to leave the host",
            &format!("! {}", devices_below(&functions, "46f4")),
            Duration::from_secs(10),
        )
        .await?;
        bed.guest_ok("usbroute controller restore 00:1d.7").await?;
        let restored = drivers(bed, &functions).await?;
        ensure!(
            restored == before,
            "round {round}: after restore {restored:?}, before {before:?}"
        );
        bed.guest_ok(&format!("! test -e /var/lib/usbroute/vfio/{group}.json"))
            .await?;
        bed.wait_guest(
            "the storage device to re-enumerate on the restored EHCI",
            &devices_below(&functions, "46f4"),
            Duration::from_secs(15),
        )
        .await?;
        bed.wait_guest(
            "the mouse to re-enumerate on a restored UHCI",
            &devices_below(&functions[..3], "0627"),
            Duration::from_secs(15),
        )
        .await?;
    }
    Ok(())
}
