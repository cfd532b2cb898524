//! usbroute's QEMU backend on a device the guest kernel really has: `usbroute attach`
//! (by address, the default) gives it to an inner QEMU, which reports `attached: true`;
//! `usbroute detach` waits for QEMU and the guest's own driver takes it back.

use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Context, Result};
use serde_json::Value;
use std::time::Duration;

/// Plug a keyboard, attach it by address to an inner QEMU (root) with `usbroute attach`,
/// check `attach --json`, `vm devices --json` and the guest's driver; detach it again.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "qa-kbd", Ctrl::Xhci, "5");
    let name = bed.plug(&kbd).await?;
    let address = bed
        .guest_ok(&format!(
            "echo $(cat /sys/bus/usb/devices/{name}/busnum)-$(cat /sys/bus/usb/devices/{name}/devnum)"
        ))
        .await?;
    let inner = bed.start_inner_qemu("attach", "root", "").await?;
    let qmp = inner.qmp.clone();

    let out = bed
        .guest_ok(&format!("usbroute attach port:{name} --json --qmp {qmp}"))
        .await?;
    let attached = json(&out)?;
    let want_id = format!("usbroute-addr-{}", address.trim());
    ensure!(
        attached["id"] == want_id.as_str() && attached["attached"] == true,
        "usbroute attach --json printed {attached}, expected id {want_id}, attached true"
    );
    let listed = json(
        &bed.guest_ok(&format!("usbroute vm devices --json --qmp {qmp}"))
            .await?,
    )?;
    ensure!(
        listed.as_array().map(Vec::len) == Some(1)
            && listed[0]["id"] == want_id.as_str()
            && listed[0]["attached"] == true
            && listed[0]["ours"] == true,
        "usbroute vm devices --json printed {listed}"
    );
    let driver = bed
        .guest(&format!(
            "basename $(readlink /sys/bus/usb/devices/{name}:1.0/driver)"
        ))
        .await?;
    ensure!(
        driver.stdout.trim() != "usbhid",
        "the guest's usbhid still holds {name} while the inner QEMU has it"
    );

    bed.guest_ok(&format!("usbroute detach port:{name} --qmp {qmp}"))
        .await?;
    let after = json(
        &bed.guest_ok(&format!("usbroute vm devices --json --qmp {qmp}"))
            .await?,
    )?;
    ensure!(after == Value::Array(Vec::new()), "after detach: {after}");
    bed.wait_guest(
        "usbhid to take the keyboard back after detach",
        &format!("readlink /sys/bus/usb/devices/{name}:1.0/driver | grep -q usbhid"),
        Duration::from_secs(10),
    )
    .await?;
    Ok(())
}

/// Parse what a usbroute command printed as JSON.
pub fn json(out: &str) -> Result<Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}
