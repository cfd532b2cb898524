//! `usbroute record-sysfs` in the guest; the recording lists the same everywhere.

use crate::bed::Bed;
use crate::usb::rich_topology;
use anyhow::{ensure, Context, Result};
use std::process::Command;

/// Plug the rich topology, record it in the guest, and compare `list --json` live,
/// from the recording in the guest, and from the recording on the host.
pub async fn run(bed: &mut Bed) -> Result<()> {
    for dev in rich_topology() {
        bed.plug(&dev).await?;
    }
    let live = bed.guest_ok("usbroute list --json").await?;
    // Equal listings prove nothing if both are empty: the live one must show every device.
    let listing: super::inventory::Listing = serde_json::from_str(&live)
        .with_context(|| format!("parsing `usbroute list --json`: {live}"))?;
    let want = rich_topology().len();
    ensure!(
        listing.devices.len() == want,
        "the live listing shows {} devices, {want} were plugged",
        listing.devices.len()
    );
    let in_guest = bed
        .guest_ok(
            "rm -rf /tmp/rec && usbroute record-sysfs /tmp/rec >&2 && \
             usbroute --sysfs-root /tmp/rec list --json && \
             tar -C /tmp/rec -cf /host/record-sysfs.tar .",
        )
        .await?;
    ensure!(
        same_json(&live, &in_guest)?,
        "listing from the recording in the guest differs from the live one:\nlive: {live}\nrecorded: {in_guest}"
    );
    let dir = bed.share().join("record-sysfs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let untar = Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-xf")
        .arg(bed.share().join("record-sysfs.tar"))
        .status()
        .context("running tar on the host")?;
    ensure!(
        untar.success(),
        "tar -x of the guest's recording failed on the host"
    );
    let on_host = Command::new(bed.share().join("usbroute"))
        .arg("--sysfs-root")
        .arg(&dir)
        .args(["list", "--json"])
        .output()
        .context("running usbroute on the host")?;
    ensure!(
        on_host.status.success(),
        "usbroute --sysfs-root {} list --json failed on the host: {}",
        dir.display(),
        String::from_utf8_lossy(&on_host.stderr)
    );
    let on_host = String::from_utf8_lossy(&on_host.stdout);
    ensure!(
        same_json(&live, &on_host)?,
        "listing from the recording on the host differs from the live one:\nlive: {live}\nhost: {on_host}"
    );
    Ok(())
}

fn same_json(a: &str, b: &str) -> Result<bool> {
    let a: serde_json::Value = serde_json::from_str(a).with_context(|| format!("not JSON: {a}"))?;
    let b: serde_json::Value = serde_json::from_str(b).with_context(|| format!("not JSON: {b}"))?;
    Ok(a == b)
}
