//! `usbroute emit SELECTOR --for libvirt` through the binary, on the recorded guest
//! (tests/fixtures/guest-xhci-ehci, see tests/fixtures/README.md): 1-2.1 is a mouse at
//! bus 1 address 5, 0627:0001.

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::{json, Value};
use std::path::Path;

fn usbroute() -> Command {
    let mut cmd = Command::cargo_bin("usbroute").unwrap();
    cmd.env_remove("USBROUTE_SYSFS_ROOT")
        .arg("--sysfs-root")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-xhci-ehci"));
    cmd
}

#[test]
fn emit_for_libvirt_json_gives_the_alias_and_the_optional_hostdev() {
    let out = usbroute()
        .args(["emit", "port:1-2.1", "--for", "libvirt", "--json"])
        .assert()
        .success();

    let v: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(
        json!({"for": v["for"], "by": v["by"], "alias": v["alias"], "present": v["present"],
               "xml": v["xml"]}),
        json!({
            "for": "libvirt", "by": "address", "alias": "ua-usbroute-addr-1-5", "present": true,
            "xml": "<hostdev mode='subsystem' type='usb'>\n  <source startupPolicy='optional'>\n    \
                    <address bus='1' device='5'/>\n  </source>\n  \
                    <alias name='ua-usbroute-addr-1-5'/>\n</hostdev>\n",
        })
    );
}

#[test]
fn emit_for_libvirt_prints_a_file_virsh_reads_comment_first() {
    let out = usbroute()
        .args(["emit", "port:1-2.1", "--for", "libvirt", "--by", "id"])
        .assert()
        .success();

    let text = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let (comment, xml) = text.split_once(" -->\n").unwrap();
    assert!(
        comment.starts_with("<!-- ") && !comment[4..].contains("--"),
        "{text}"
    );
    assert!(
        xml.contains("<vendor id='0x0627'/>\n    <product id='0x0001'/>"),
        "{text}"
    );
}

#[test]
fn emit_for_libvirt_by_port_is_refused_naming_what_to_use_instead() {
    usbroute()
        .args(["emit", "port:1-2.1", "--for", "libvirt", "--by", "port"])
        .assert()
        .failure()
        .stdout("")
        .stderr(predicate::str::contains(
            "cannot emit `port:1-2.1` for libvirt: libvirt cannot match a host port",
        ))
        .stderr(predicate::str::contains("use --by address"));
}

#[test]
fn emit_for_libvirt_refuses_vm_which_names_a_qemu_monitor() {
    usbroute()
        .args(["emit", "port:1-2.1", "--for", "libvirt", "--vm", "win11"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("drop --vm with --for libvirt"));
}
