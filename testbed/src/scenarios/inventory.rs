//! `usbroute list --json` in the guest against what the outer QMP plugged.

use crate::bed::Bed;
use crate::usb::{rich_topology, UsbDevice};
use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use usbroute::inventory::Device;

/// What `usbroute list --json` prints (fields this check does not need are ignored).
#[derive(Debug, Deserialize)]
pub struct Listing {
    /// Every USB device.
    pub devices: Vec<Device>,
}

/// Plug the rich topology, then compare the listing device by device: port path,
/// ids, speed, controller, hub flag, parent hub, serial presence; and nothing extra.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let mut plugged = Vec::new();
    for dev in rich_topology() {
        let name = bed.plug(&dev).await?;
        plugged.push((dev, name));
    }
    let out = bed.guest_ok("usbroute list --json").await?;
    let listing: Listing = serde_json::from_str(&out)
        .with_context(|| format!("parsing `usbroute list --json`: {out}"))?;
    let problems = mismatches(&plugged, &listing.devices);
    ensure!(
        problems.is_empty(),
        "usbroute list --json disagrees with QMP:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

/// Every disagreement between plugged devices (with their kernel names) and a listing.
pub fn mismatches(plugged: &[(UsbDevice, String)], listed: &[Device]) -> Vec<String> {
    let mut problems = Vec::new();
    for (dev, name) in plugged {
        let e = dev.expected();
        let Some(d) = listed.iter().find(|d| d.port.to_string() == *name) else {
            problems.push(format!(
                "{} ({}) at {name}: not listed",
                dev.id,
                dev.kind.driver()
            ));
            continue;
        };
        let mut check = |field: &str, got: String, want: String| {
            if got != want {
                problems.push(format!(
                    "{} at {name}: {field} is {got}, want {want}",
                    dev.id
                ));
            }
        };
        let id =
            |v: Option<usbroute::inventory::HexId>| v.map(|v| v.to_string()).unwrap_or_default();
        check("vendor_id", id(d.vendor_id), e.vendor.into());
        check("product_id", id(d.product_id), e.product.into());
        check(
            "speed",
            format!("{:?}", d.speed_mbps.map(|s| s.0)),
            format!("{:?}", Some(f64::from(e.speed))),
        );
        check(
            "controller",
            format!("{:?}", d.controller.map(|c| c.to_string())),
            format!("{:?}", Some(e.controller)),
        );
        check("hub", d.hub.to_string(), e.hub.to_string());
        check(
            "has serial",
            d.serial.is_some().to_string(),
            e.serial.to_string(),
        );
        check(
            "bus",
            d.bus.to_string(),
            name.split('-').next().unwrap_or_default().to_string(),
        );
        let parent = name.rsplit_once('.').map(|(p, _)| p.to_string());
        check(
            "parent",
            format!("{:?}", d.parent.as_ref().map(ToString::to_string)),
            format!("{parent:?}"),
        );
    }
    for d in listed {
        let port = d.port.to_string();
        if !plugged.iter().any(|(_, name)| *name == port) {
            problems.push(format!(
                "{port} ({}) is listed but was not plugged",
                d.label()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::{Ctrl, Kind};

    fn listed_device(port: &str, speed: f64, parent: Option<&str>) -> Device {
        serde_json::from_value(serde_json::json!({
            "port": port, "bus": 1, "address": 2, "vendor_id": "0627", "product_id": "0001",
            "manufacturer": "QEMU", "product": "QEMU USB Mouse", "serial": "89126",
            "class": {"class": 0, "subclass": 0, "protocol": 0}, "speed_mbps": speed,
            "hub": false, "removable": "unknown", "controller": "0000:00:03.0",
            "parent": parent, "sysfs_path": "/sys/devices/x", "driver": "usb", "interfaces": []
        }))
        .unwrap()
    }

    #[test]
    fn matching_listing_has_no_mismatches() {
        let mouse = UsbDevice::new(Kind::Mouse, "m", Ctrl::Xhci, "1");
        let plugged = [(mouse, "1-1".to_string())];

        let problems = mismatches(&plugged, &[listed_device("1-1", 480.0, None)]);

        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn wrong_speed_and_unplugged_extra_are_both_reported() {
        let mouse = UsbDevice::new(Kind::Mouse, "m", Ctrl::Xhci, "1");
        let plugged = [(mouse, "1-1".to_string())];
        let listed = [
            listed_device("1-1", 12.0, None),
            listed_device("1-2", 480.0, None),
        ];

        let problems = mismatches(&plugged, &listed);

        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
