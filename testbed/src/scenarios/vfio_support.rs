//! Helpers of the `vfio-*` scenarios (whole-controller passthrough on the guest's real
//! kernel, with the vIOMMU).

use crate::bed::Bed;
use anyhow::{Context, Result};
use serde_json::Value;

/// The driver each function of a group is on, and its `driver_override`.
pub async fn drivers(bed: &mut Bed, functions: &[&str]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for f in functions {
        let dir = format!("/sys/bus/pci/devices/{f}");
        let driver = bed
            .guest_ok(&format!(
                "basename \"$(readlink {dir}/driver)\" 2>/dev/null || echo none"
            ))
            .await?;
        let over = bed.guest_ok(&format!("cat {dir}/driver_override")).await?;
        out.push((driver.trim().to_string(), over.trim().to_string()));
    }
    Ok(out)
}

/// `vendor` devices below any of `functions`, as the guest lists them.
pub fn devices_below(functions: &[&str], vendor: &str) -> String {
    let dirs: Vec<String> = functions
        .iter()
        .map(|f| format!("/sys/bus/pci/devices/{f}/usb*/*/idVendor"))
        .collect();
    format!("cat {} 2>/dev/null | grep -q {vendor}", dirs.join(" "))
}

pub async fn json_of(bed: &mut Bed, command: &str) -> Result<Value> {
    let out = bed.guest_ok(command).await?;
    serde_json::from_str(&out).with_context(|| format!("`{command}` printed: {out}"))
}
