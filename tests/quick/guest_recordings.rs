//! The recordings made live in the test-bed guest (scripts/record-fixtures) replay to
//! exactly the listing the guest printed when they were made.

use assert_cmd::Command;
use serde_json::Value;

fn replayed_listing(name: &str) -> Value {
    let dir = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::cargo_bin("usbroute")
        .unwrap()
        .args(["--sysfs-root", &dir, "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn live_listing(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/{name}.list.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn guest_rich_recording_lists_as_the_live_guest_did() {
    assert_eq!(replayed_listing("guest-rich"), live_listing("guest-rich"));
}

#[test]
fn guest_no_iommu_recording_lists_as_the_live_guest_did() {
    assert_eq!(
        replayed_listing("guest-no-iommu"),
        live_listing("guest-no-iommu")
    );
}

#[test]
fn every_device_of_the_guest_has_its_controller_anchored_physical_port() {
    let listing = replayed_listing("guest-rich");

    let places: Vec<(&str, &str)> = listing["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let physical = d["physical_port"].as_str().unwrap();
            (d["port"].as_str().unwrap(), physical)
        })
        .collect();

    assert_eq!(
        places,
        [
            ("1-1", "0000:00:03.0/1"),
            ("1-2", "0000:00:03.0/2"),
            ("1-2.1", "0000:00:03.0/2.1"),
            ("1-2.2", "0000:00:03.0/2.2"),
            ("1-2.3", "0000:00:03.0/2.3"),
            ("1-2.3.1", "0000:00:03.0/2.3.1"),
            ("1-4", "0000:00:03.0/4"),
            // USB 3 storage on the USB 3 bus, named by its socket's USB 2 twin.
            ("2-3", "0000:00:03.0/3"),
            ("3-1", "0000:00:1d.7/1"),
            ("6-1", "0000:00:1d.2/1"),
        ]
    );
    assert_eq!(listing["buses"][0]["controller_name"], "0000:00:03.0");
    assert_eq!(
        (&listing["buses"][0]["twin"], &listing["buses"][1]["twin"]),
        (&2.into(), &1.into())
    );
}
