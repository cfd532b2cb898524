//! `usbroute record-sysfs` in the guest; the recording lists the same everywhere.

use crate::bed::Bed;
use crate::usb::rich_topology;
use anyhow::{ensure, Context, Result};
use serde_json::Value;
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
    let differences = json_differences(&live, &in_guest)?;
    ensure!(
        differences.is_empty(),
        "the recording, listed in the guest, differs from the live listing (live vs recorded):\n  {}",
        differences.join("\n  ")
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
    let differences = json_differences(&live, &on_host)?;
    ensure!(
        differences.is_empty(),
        "the recording, listed on the host, differs from the live listing (live vs host):\n  {}",
        differences.join("\n  ")
    );
    Ok(())
}

/// The JSON paths where two listings differ (at most 12), empty when equal.
fn json_differences(a: &str, b: &str) -> Result<Vec<String>> {
    let a: Value = serde_json::from_str(a).with_context(|| format!("not JSON: {a}"))?;
    let b: Value = serde_json::from_str(b).with_context(|| format!("not JSON: {b}"))?;
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out.truncate(12);
    Ok(out)
}

fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                walk(&format!("{path}.{k}"), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                walk(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_differences_name_the_path_of_each_change() {
        let live = r#"{"devices": [{"port": "1-1", "block_devices": []}]}"#;
        let recorded = r#"{"devices": [{"port": "1-1", "block_devices": ["sda"]}]}"#;

        let differences = json_differences(live, recorded).unwrap();

        assert_eq!(
            differences,
            vec![r#".devices[0].block_devices: [] vs ["sda"]"#]
        );
    }
}
