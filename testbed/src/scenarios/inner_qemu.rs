//! The test bed's own plumbing for inner VMs: an inner QEMU starts in the guest, as
//! root and as an unprivileged user, and takes a guest USB device with `usb-host`.

use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Context, Result};
use serde_json::json;

/// Plug a keyboard, give it to an inner QEMU by bus and address, check `attached` and
/// that the guest's own driver let go; start a second inner QEMU as `nobody`.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "iq-kbd", Ctrl::Xhci, "5");
    let name = bed.plug(&kbd).await?;
    let ids = bed
        .guest_ok(&format!(
            "cat /sys/bus/usb/devices/{name}/busnum /sys/bus/usb/devices/{name}/devnum"
        ))
        .await?;
    let nums: Vec<u32> = ids
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("busnum/devnum of {name}: {ids}"))?;
    ensure!(nums.len() == 2, "busnum/devnum of {name}: {ids}");

    let inner = bed.start_inner_qemu("root", "root", "").await?;
    let add = json!({"execute": "device_add", "arguments": {
        "driver": "usb-host", "id": "host-kbd", "bus": "xhci.0",
        "hostbus": nums[0], "hostaddr": nums[1]}});
    let reply = bed.inner_qmp(&inner, &add).await?;
    ensure!(
        reply.get("return").is_some(),
        "usb-host device_add: {reply}"
    );
    let attached = json!({"execute": "qom-get", "arguments": {
        "path": "/machine/peripheral/host-kbd", "property": "attached"}});
    let reply = bed.inner_qmp(&inner, &attached).await?;
    ensure!(reply["return"] == true, "usb-host not attached: {reply}");
    let driver = bed
        .guest(&format!(
            "basename $(readlink /sys/bus/usb/devices/{name}:1.0/driver)"
        ))
        .await?;
    ensure!(
        driver.stdout.trim() != "usbhid",
        "the guest's usbhid still holds {name} while the inner QEMU has it"
    );

    let unprivileged = bed.start_inner_qemu("nobody", "nobody", "").await?;
    let status = bed
        .inner_qmp(&unprivileged, &json!({"execute": "query-status"}))
        .await?;
    ensure!(
        status["return"]["status"].is_string(),
        "query-status as nobody: {status}"
    );
    let owner = bed
        .guest_ok(&format!(
            "ps -o user,pid | awk '$2 == {} {{print $1}}'",
            unprivileged.pid
        ))
        .await?;
    ensure!(
        owner.trim() == "nobody",
        "the unprivileged inner QEMU runs as `{}`",
        owner.trim()
    );
    Ok(())
}
