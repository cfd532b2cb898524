//! fd passing: an inner QEMU running as `nobody` cannot open the device node itself, but
//! gets the device when `usbroute attach` opens it and passes the open file over QMP
//! (chosen by `--fd-passing auto` because SO_PEERCRED on the QMP socket says uid 65534).

use super::qemu_attach::json;
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Result};

/// Make the device nodes root-only, start the inner QEMU as `nobody`, show that
/// `--fd-passing never` fails on permissions and that the default attaches the device,
/// with QEMU holding the node it never opened.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "qf-kbd", Ctrl::Xhci, "7");
    let name = bed.plug(&kbd).await?;
    bed.guest_ok("chmod 600 /dev/bus/usb/*/*").await?;
    let inner = bed.start_inner_qemu("fd", "nobody", "").await?;
    let qmp = inner.qmp.clone();

    let denied = bed
        .guest(&format!(
            "usbroute attach port:{name} --fd-passing never --qmp {qmp}"
        ))
        .await?;
    ensure!(
        denied.rc != 0
            && denied.stderr.contains("failed to open host usb device")
            && denied.stderr.contains("--fd-passing always"),
        "without fd passing the unprivileged QEMU must fail to open the node and usbroute \
         must say what to do: rc {}, stderr {}",
        denied.rc,
        denied.stderr.trim()
    );

    let out = bed
        .guest_ok(&format!("usbroute attach port:{name} --json --qmp {qmp}"))
        .await?;
    let attached = json(&out)?;
    ensure!(
        attached["attached"] == true,
        "attach with fd passing printed {attached}"
    );
    let held = bed
        .guest(&format!(
            "ls -l /proc/{}/fd | grep /dev/bus/usb/",
            inner.pid
        ))
        .await?;
    ensure!(
        held.rc == 0,
        "the inner QEMU (pid {}) holds no /dev/bus/usb node: {}",
        inner.pid,
        held.stderr.trim()
    );
    bed.guest_ok(&format!("usbroute detach port:{name} --qmp {qmp}"))
        .await?;
    Ok(())
}
