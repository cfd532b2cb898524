//! Recordings from the guest: `usbroute record-sysfs` fixtures for the unit tests,
//! and a raw sysfs dump for working on the readers.

use crate::bed::Bed;
use crate::machine::MachineConfig;
use crate::usb::{rich_topology, UsbDevice};
use anyhow::{ensure, Context, Result};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Boot, plug the rich topology; the bed and each device's kernel name.
async fn rich_bed(cfg: &MachineConfig) -> Result<(Bed, Vec<(UsbDevice, String)>)> {
    let mut bed = Bed::boot(cfg).await?;
    let mut plugged = Vec::new();
    for dev in rich_topology() {
        match bed.plug(&dev).await {
            Ok(name) => plugged.push((dev, name)),
            Err(e) => {
                let log = bed.failure_log();
                bed.shutdown().await;
                return Err(e.context(log));
            }
        }
    }
    Ok((bed, plugged))
}

/// What was plugged where, for a human reading a fixture.
fn topology_text(cfg: &MachineConfig, plugged: &[(UsbDevice, String)]) -> String {
    let mut s = format!(
        "Recorded in the usbroute test-bed guest (q35, {}, qemu-xhci 00:03.0 p2=8 p3=8,\n\
         ich9-usb-ehci1 00:1d.7 with ich9-usb-uhci1..3 companions 00:1d.0-2).\n\
         QEMU device (bus port)  ->  guest kernel name\n",
        if cfg.iommu { "intel-iommu" } else { "no IOMMU" }
    );
    for (dev, name) in plugged {
        let e = dev.expected();
        let _ = writeln!(
            s,
            "  {:<8} {:<12} {} {:<6} -> {:<8} {}:{} {} Mb/s on {}{}{}",
            dev.id,
            dev.kind.driver(),
            dev.ctrl.qemu_bus(),
            dev.port,
            name,
            e.vendor,
            e.product,
            e.speed,
            e.controller,
            if dev.full_speed_only {
                " (usb_version=1)"
            } else {
                ""
            },
            if dev.no_serial { " (no serial)" } else { "" },
        );
    }
    s
}

/// Replace `dir` with the contents of the tar file `tar`.
fn untar_fresh(tar: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let ok = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-xf")
        .arg(tar)
        .status()
        .context("running tar")?
        .success();
    ensure!(
        ok,
        "tar -xf {} into {} failed",
        tar.display(),
        dir.display()
    );
    Ok(())
}

/// `tests/fixtures/guest-rich` (with intel-iommu) and `tests/fixtures/guest-no-iommu`,
/// each a `usbroute record-sysfs` recording, plus `<name>.list.json` (the live listing
/// in the guest when it was recorded) and `<name>.topology.txt`.
pub async fn record_fixtures(cfg: &MachineConfig, dir: &Path) -> Result<()> {
    for (name, iommu) in [("guest-rich", true), ("guest-no-iommu", false)] {
        let cfg = MachineConfig {
            iommu,
            ..cfg.clone()
        };
        let (mut bed, plugged) = rich_bed(&cfg).await?;
        let result = bed
            .guest_ok(
                "rm -rf /tmp/rec && usbroute record-sysfs /tmp/rec >&2 && \
                 usbroute list --json > /host/record.list.json && \
                 tar -C /tmp/rec -cf /host/record.tar .",
            )
            .await;
        let log = bed.failure_log();
        bed.shutdown().await;
        result.with_context(|| log)?;
        untar_fresh(&cfg.share.join("record.tar"), &dir.join(name))?;
        std::fs::copy(
            cfg.share.join("record.list.json"),
            dir.join(format!("{name}.list.json")),
        )?;
        std::fs::write(
            dir.join(format!("{name}.topology.txt")),
            topology_text(&cfg, &plugged),
        )?;
        println!("recorded {}", dir.join(name).display());
    }
    Ok(())
}

/// The guest's raw sysfs (testbed/guest/dump-sysfs) with the rich topology, into `dir`.
pub async fn dump_raw(cfg: &MachineConfig, dir: &Path) -> Result<()> {
    let (mut bed, plugged) = rich_bed(cfg).await?;
    let result = bed
        .guest_with_timeout(
            "rm -rf /tmp/dump && /testbed/dump-sysfs /tmp/dump && tar -C /tmp/dump -cf /host/raw-sysfs.tar .",
            // A KVM base: the dump reads every sysfs file, slowly under TCG.
            Duration::from_secs(150),
        )
        .await;
    bed.shutdown().await;
    let out = result?;
    ensure!(
        out.rc == 0,
        "dump-sysfs failed (rc {}): {}",
        out.rc,
        out.stderr
    );
    untar_fresh(&cfg.share.join("raw-sysfs.tar"), dir)?;
    std::fs::write(dir.join("TOPOLOGY.txt"), topology_text(cfg, &plugged))?;
    println!("dumped {}", dir.display());
    Ok(())
}
