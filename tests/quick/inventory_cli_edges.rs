//! `list`, `controllers` and `record-sysfs` on roots without USB, and their refusals.

use assert_cmd::Command;
use predicates::prelude::*;

fn usbroute(root: &std::path::Path) -> Command {
    let mut cmd = Command::cargo_bin("usbroute").unwrap();
    cmd.env_remove("USBROUTE_SYSFS_ROOT")
        .arg("--sysfs-root")
        .arg(root);
    cmd
}

#[test]
fn list_without_usb_says_so_and_exits_zero() {
    let root = tempfile::tempdir().unwrap();

    usbroute(root.path())
        .arg("list")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("No USB:"))
        .stderr("");
}

#[test]
fn list_json_without_usb_is_empty_arrays() {
    let root = tempfile::tempdir().unwrap();

    let out = usbroute(root.path())
        .args(["list", "--json"])
        .assert()
        .success();

    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"controllers": [], "buses": [], "devices": []})
    );
}

#[test]
fn missing_sysfs_root_is_an_error_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope");

    usbroute(&missing)
        .arg("list")
        .assert()
        .failure()
        .stderr(predicate::str::contains("nope: no such directory"));
}

#[test]
fn record_sysfs_refuses_a_non_empty_directory_and_keeps_its_files() {
    let root = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    std::fs::write(dest.path().join("notes.txt"), "mine").unwrap();

    usbroute(root.path())
        .arg("record-sysfs")
        .arg(dest.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains("is not empty"));

    assert_eq!(
        std::fs::read_to_string(dest.path().join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn list_of_an_unreadable_usb_listing_fails_instead_of_saying_no_usb() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("sys/bus/usb")).unwrap();
    // A file where the directory should be: reading it fails, as EIO or EMFILE would.
    std::fs::write(root.path().join("sys/bus/usb/devices"), "").unwrap();

    usbroute(root.path())
        .arg("list")
        .assert()
        .failure()
        .stdout("")
        .stderr(predicate::str::contains("cannot read /sys/bus/usb/devices"));
}
