//! Port routing on a real kernel: usbroute's positioned reads of the guest xHCI's live
//! sysfs `config` file agree byte for byte with `dd`, `usbroute ports` refuses the
//! non-Intel xHCI naming it, and neither changes a byte of config space.
//!
//! Not proven here: writes and port moves. QEMU does not emulate Intel's XUSB2PR (its
//! xHCI is 1b36:000d and reads 0 at 0xD0), and usbroute never writes to a controller it
//! does not know to be switchable. The write path is proven on config-space fixtures
//! (tests/quick/routing_registers.rs: only 0xD0-0xD1 and 0xD8-0xDB ever change); a port moving
//! between controllers is shown only on real Intel 7/8/9-series or X99 hardware.

use crate::bed::Bed;
use crate::usb::XHCI_PCI;
use anyhow::{ensure, Context, Result};

/// Reads, a refusal, and an unchanged config space.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let config = format!("/sys/bus/pci/devices/{XHCI_PCI}/config");
    let before = bed.guest_ok(&format!("md5sum {config}")).await?;

    let out = bed
        .guest_ok(&format!("usbroute ports registers {XHCI_PCI} --json"))
        .await?;
    let listed: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("parsing `usbroute ports registers --json`: {out}"))?;
    let row = &listed[0];
    ensure!(
        row["vendor"] == "1b36" && row["device"] == "000d" && row["chipset"].is_null(),
        "usbroute read the wrong identity from {config}: {row}"
    );
    // The 16 bytes at 0xD0 as four little-endian 32-bit words.
    let dd = bed
        .guest_ok(&format!(
            "dd if={config} bs=1 skip=208 count=16 2>/dev/null | od -An -tu4 -v"
        ))
        .await?;
    let words: Vec<u64> = dd
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing od output `{dd}`"))?;
    ensure!(words.len() == 4, "dd read {words:?} at 0xD0-0xDF");
    let regs = &row["registers"];
    let from_usbroute = [
        regs["xusb2pr"].as_u64(),
        regs["xusb2prm"].as_u64(),
        regs["usb3_pssen"].as_u64(),
        regs["usb3prm"].as_u64(),
    ];
    // XUSB2PR and XUSB2PRM are the low 16 bits of their words.
    let from_dd = [
        Some(words[0] & 0xffff),
        Some(words[1] & 0xffff),
        Some(words[2]),
        Some(words[3]),
    ];
    ensure!(
        from_usbroute == from_dd,
        "usbroute read {from_usbroute:?} at 0xD0-0xDF, dd read {from_dd:?}"
    );

    let refused = bed.guest("usbroute ports").await?;
    let expected = format!("{XHCI_PCI} is not an Intel xHCI (vendor 1b36, device 000d");
    ensure!(
        refused.rc != 0 && refused.stderr.contains(&expected),
        "`usbroute ports` on QEMU's xHCI: rc {}, stderr {}",
        refused.rc,
        refused.stderr
    );

    let after = bed.guest_ok(&format!("md5sum {config}")).await?;
    ensure!(
        before == after,
        "config space of {XHCI_PCI} changed: {before} -> {after}"
    );
    Ok(())
}
