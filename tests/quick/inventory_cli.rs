//! `list`, `show` and `controllers` through the binary, on the recorded guest
//! (tests/fixtures/guest-xhci-ehci, see tests/fixtures/README.md).

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-xhci-ehci")
}

fn usbroute(root: &Path) -> Command {
    let mut cmd = Command::cargo_bin("usbroute").unwrap();
    cmd.env_remove("USBROUTE_SYSFS_ROOT")
        .arg("--sysfs-root")
        .arg(root);
    cmd
}

fn json_of(args: &[&str]) -> Value {
    let out = usbroute(&fixture()).args(args).assert().success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

/// The port paths `show SELECTOR --json` prints.
fn shown_ports(selector: &str) -> Vec<String> {
    let v = json_of(&["show", selector, "--json"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d["port"].as_str().unwrap().to_string())
        .collect()
}

fn pick(device: &Value, fields: &[&str]) -> Value {
    fields
        .iter()
        .map(|f| (f.to_string(), device[f].clone()))
        .collect()
}

#[test]
fn list_json_has_controllers_buses_and_devices() {
    let v = json_of(&["list", "--json"]);

    assert_eq!(v["controllers"].as_array().unwrap().len(), 5);
    assert_eq!(v["buses"].as_array().unwrap().len(), 6);
    assert_eq!(v["devices"].as_array().unwrap().len(), 10);
}

#[test]
fn list_json_device_carries_the_schema_fields() {
    let v = json_of(&["list", "--json"]);
    let fields = [
        "port",
        "bus",
        "address",
        "vendor_id",
        "product_id",
        "serial",
        "speed_mbps",
        "hub",
        "controller",
        "parent",
    ];

    let devices: Vec<Value> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| pick(d, &fields))
        .collect();

    assert_eq!(
        devices[4],
        json!({"port": "1-2.3", "bus": 1, "address": 7, "vendor_id": "0409",
        "product_id": "55aa", "serial": "314159-0000:00:03.0-2.3", "speed_mbps": 12, "hub": true,
        "controller": "0000:00:03.0", "parent": "1-2"})
    );
    assert_eq!(
        devices[6],
        json!({"port": "1-4", "bus": 1, "address": 4, "vendor_id": "0627",
        "product_id": "0001", "serial": null, "speed_mbps": 480, "hub": false,
        "controller": "0000:00:03.0", "parent": null})
    );
    assert_eq!(
        devices[7],
        json!({"port": "2-3", "bus": 2, "address": 2, "vendor_id": "46f4",
        "product_id": "0001", "serial": "1-0000:00:03.0-3", "speed_mbps": 5000, "hub": false,
        "controller": "0000:00:03.0", "parent": null})
    );
}

#[test]
fn list_json_interfaces_carry_class_triple_and_driver() {
    let v = json_of(&["list", "--json"]);

    assert_eq!(
        v["devices"][7]["interfaces"],
        json!([{"number": 0, "class": 8, "subclass": 6, "protocol": 80, "driver": "usb-storage"}])
    );
    assert_eq!(v["devices"][7]["block_devices"], json!(["sdb"]));
}

#[test]
fn list_prints_the_tree_and_warnings_only_on_stderr() {
    usbroute(&fixture())
        .arg("list")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "│       └── 1-2.3.1  0000:00:03.0/2.3.1  dev 8  0627:0001 QEMU QEMU USB Keyboard  12 Mb/s  usbhid",
        ))
        .stdout(predicate::str::contains("warning").not())
        .stderr(predicate::str::contains(
            "usbroute: warning: pci 0000:00:1f.3: `class` is missing",
        ));
}

#[test]
fn controllers_json_gives_kind_and_group_for_xhci_ehci_and_uhci() {
    let v = json_of(&["controllers", "--json"]);

    let rows: Vec<Value> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| pick(c, &["pci", "kind", "iommu_group", "buses"]))
        .collect();

    assert_eq!(
        rows,
        [
            json!({"pci": "0000:00:03.0", "kind": "xhci", "iommu_group": 3, "buses": [1, 2]}),
            json!({"pci": "0000:00:1d.0", "kind": "uhci", "iommu_group": 4, "buses": [4]}),
            json!({"pci": "0000:00:1d.1", "kind": "uhci", "iommu_group": 4, "buses": [5]}),
            json!({"pci": "0000:00:1d.2", "kind": "uhci", "iommu_group": 4, "buses": [6]}),
            json!({"pci": "0000:00:1d.7", "kind": "ehci", "iommu_group": 4, "buses": [3]}),
        ]
    );
}

#[test]
fn controllers_json_verdict_lets_the_ehci_go_with_its_companions() {
    let v = json_of(&["controllers", "--json"]);

    assert_eq!(
        v[4]["verdict"],
        json!({"alone": true, "iommu_group": 4, "blockers": [],
            "goes_along": ["0000:00:1d.0", "0000:00:1d.1", "0000:00:1d.2"]})
    );
    assert_eq!(
        v[4]["companions"],
        json!(["0000:00:1d.0", "0000:00:1d.1", "0000:00:1d.2"])
    );
}

#[test]
fn show_resolves_port_forms() {
    assert_eq!(shown_ports("port:1-2.3.1"), ["1-2.3.1"]);
    assert_eq!(shown_ports("1-2.3.1"), ["1-2.3.1"]);
}

#[test]
fn show_resolves_id_forms_with_wildcard() {
    assert_eq!(shown_ports("id:46f4:0001"), ["2-3", "3-1"]);
    assert_eq!(shown_ports("46f4:0001"), ["2-3", "3-1"]);
    assert_eq!(
        shown_ports("id:0627:*"),
        ["1-1", "1-2.1", "1-2.2", "1-2.3.1", "1-4", "6-1"]
    );
}

#[test]
fn show_resolves_address_forms_zero_padded_as_decimal() {
    assert_eq!(shown_ports("addr:1.8"), ["1-2.3.1"]);
    assert_eq!(shown_ports("addr:1:8"), ["1-2.3.1"]);
    assert_eq!(shown_ports("001.008"), ["1-2.3.1"]);
    assert_eq!(shown_ports("addr:003.002"), ["3-1"]);
}

#[test]
fn show_resolves_serial_class_and_interface_forms() {
    assert_eq!(shown_ports("serial:1-0000:00:03.0-3"), ["2-3"]);
    assert_eq!(shown_ports("class:08"), ["2-3", "3-1"]);
    assert_eq!(
        shown_ports("iface:03:01:*"),
        ["1-1", "1-2.1", "1-2.3.1", "6-1"]
    );
}

#[test]
fn show_resolves_controller_and_hub_forms() {
    assert_eq!(shown_ports("controller:0000:00:1d.7"), ["3-1"]);
    assert_eq!(shown_ports("controller:0000:00:1d.2"), ["6-1"]);
    assert_eq!(
        shown_ports("hub:1-2"),
        ["1-2.1", "1-2.2", "1-2.3", "1-2.3.1"]
    );
    assert_eq!(
        shown_ports("id:0627:0001,hub:1-2"),
        ["1-2.1", "1-2.2", "1-2.3.1"]
    );
}

#[test]
fn show_prints_every_field_of_a_device() {
    usbroute(&fixture())
        .args(["show", "2-3"])
        .assert()
        .success()
        .stdout(predicate::str::contains("block devices  sdb"))
        .stdout(predicate::str::contains(
            "controller     0000:00:03.0 (xhci)",
        ));
}

#[test]
fn show_without_a_match_exits_1_naming_the_selector() {
    usbroute(&fixture())
        .args(["show", "port:1-2.3.1,addr:2.2"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "no device matches `port:1-2.3.1,addr:2.2`",
        ));
}

#[test]
fn show_with_a_bad_selector_exits_2_naming_the_bad_part() {
    usbroute(&fixture())
        .args(["show", "1-2,id:zz:0001"])
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains("bad selector part `id:zz:0001`"));
}

#[test]
fn record_sysfs_of_the_fixture_lists_the_same_json() {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("rec");
    usbroute(&fixture())
        .arg("record-sysfs")
        .arg(&dest)
        .assert()
        .success();

    let replayed = usbroute(&dest).args(["list", "--json"]).assert().success();

    let replayed: Value = serde_json::from_slice(&replayed.get_output().stdout).unwrap();
    assert_eq!(replayed, json_of(&["list", "--json"]));
}

#[test]
fn show_json_without_a_match_prints_an_empty_array_and_exits_1() {
    let out = usbroute(&fixture())
        .args(["show", "serial:nope", "--json"])
        .assert()
        .code(1);

    let v: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(v, json!([]));
}

#[test]
fn emit_for_qemu_json_by_port_gives_the_attach_id_and_arguments() {
    let v = json_of(&[
        "emit",
        "port:1-2.1",
        "--for",
        "qemu",
        "--by",
        "port",
        "--json",
    ]);

    assert_eq!(
        pick(&v, &["for", "by", "id", "present", "bus", "qemu_args"]),
        json!({
            "for": "qemu", "by": "port", "id": "usbroute-port-1-2.1", "present": true,
            "bus": "usbroute-xhci.0",
            "qemu_args": ["-device", "qemu-xhci,id=usbroute-xhci", "-device",
                          "usb-host,id=usbroute-port-1-2.1,bus=usbroute-xhci.0,hostbus=1,hostport=2.1"],
        })
    );
}

#[test]
fn emit_for_a_selector_matching_several_devices_fails_listing_them() {
    usbroute(&fixture())
        .args(["emit", "id:0627:0001", "--for", "qemu", "--by", "id"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("matches 6 devices"))
        .stderr(predicate::str::contains("port:1-2.1 "));
}
