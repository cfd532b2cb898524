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
