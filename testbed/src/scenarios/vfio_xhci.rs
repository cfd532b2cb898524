//! The xHCI to vfio-pci, into an inner QEMU at start and by hot-add.

use super::vfio_support::{devices_below, drivers, json_of};
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice, XHCI_PCI};
use anyhow::{ensure, Result};
use serde_json::json;
use std::time::Duration;

/// The xHCI alone: bound, an inner QEMU starts with `-device vfio-pci,host=...` and
/// realizes it; restore gives it back. Then `controller attach` hot-adds it into the
/// inner QEMU's free pcie-root-port; and into one without a free port it refuses,
/// says how to start QEMU, and gives the group back to the host.
pub async fn run(bed: &mut Bed) -> Result<()> {
    bed.plug(&UsbDevice::new(Kind::Storage, "vx-stor", Ctrl::Xhci, "2"))
        .await?;
    bed.guest_ok("usbroute controller bind 00:03.0").await?;
    let inner = bed
        .start_inner_qemu(
            "vfio",
            "root",
            &format!("-device vfio-pci,host={XHCI_PCI},id=passed"),
        )
        .await?;
    let realized = bed
        .inner_qmp(&inner, &json!({"execute": "qom-get", "arguments": {"path": "/machine/peripheral/passed", "property": "realized"}}))
        .await?;
    ensure!(
        realized["return"] == json!(true),
        "inner QEMU with the xHCI: {realized}"
    );
    bed.guest_ok(&format!(
        "kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done",
        pid = inner.pid
    ))
    .await?;
    bed.guest_ok("usbroute controller restore 00:03.0").await?;
    bed.wait_guest(
        "the storage device to come back on the xHCI",
        &devices_below(&[XHCI_PCI], "46f4"),
        Duration::from_secs(15),
    )
    .await?;

    let inner = bed
        .start_inner_qemu("attach", "root", "-device pcie-root-port,id=rp1,chassis=1")
        .await?;
    let done = json_of(
        bed,
        &format!(
            "usbroute controller attach 00:03.0 --qmp {} --json",
            inner.qmp
        ),
    )
    .await?;
    ensure!(done["added"][0]["bus"] == "rp1", "attach: {done}");
    let realized = bed
        .inner_qmp(&inner, &json!({"execute": "qom-get", "arguments": {"path": "/machine/peripheral/vfio-0000-00-03.0", "property": "realized"}}))
        .await?;
    ensure!(
        realized["return"] == json!(true),
        "hot-added xHCI: {realized}"
    );
    bed.guest_ok(&format!(
        "kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done",
        pid = inner.pid
    ))
    .await?;
    bed.guest_ok("usbroute controller restore 00:03.0").await?;

    let full = bed.start_inner_qemu("full", "root", "").await?;
    let out = bed
        .guest(&format!(
            "usbroute controller attach 00:03.0 --qmp {}",
            full.qmp
        ))
        .await?;
    ensure!(
        out.rc != 0
            && out.stderr.contains("free pcie-root-port")
            && out.stderr.contains("is back with the host"),
        "attach without a free root port: rc {} {}",
        out.rc,
        out.stderr
    );
    let after = drivers(bed, &[XHCI_PCI]).await?;
    ensure!(
        after == vec![("xhci_hcd".to_string(), "(null)".to_string())],
        "xHCI after refused attach: {after:?}"
    );
    Ok(())
}
