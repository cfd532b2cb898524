//! `usbroute emit SELECTOR --for xl` through the binary, on the recorded guest
//! (tests/fixtures/guest-xhci-ehci, see tests/fixtures/README.md): 1-2.3.1 is a keyboard
//! at address 8, behind two hubs.

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

fn stdout(args: &[&str]) -> String {
    let out = usbroute().args(args).assert().success();
    String::from_utf8(out.get_output().stdout.clone()).unwrap()
}

/// Every `hostbus=`/`hostaddr=` value in `text`.
fn numbers(text: &str) -> Vec<String> {
    text.split(['"', ',', '\n'])
        .filter_map(|kv| {
            kv.strip_prefix("hostbus=")
                .or_else(|| kv.strip_prefix("hostaddr="))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn emit_for_xl_json_gives_the_xl_cfg_lines_and_stable_fields() {
    let v: Value =
        serde_json::from_str(&stdout(&["emit", "port:1-2.3.1", "--for", "xl", "--json"])).unwrap();

    let fields = [
        "for", "by", "present", "hostbus", "hostaddr", "usbctrl", "usbdev", "xl_cfg", "note",
    ];
    let picked: Value = fields
        .iter()
        .map(|f| (f.to_string(), v[f].clone()))
        .collect();
    assert_eq!(
        picked,
        json!({
            "for": "xl", "by": "address", "present": true, "hostbus": 1, "hostaddr": 8,
            "usbctrl": "type=qusb,version=2,ports=8", "usbdev": "hostbus=1,hostaddr=8",
            "xl_cfg": ["usbctrl=[\"type=qusb,version=2,ports=8\"]", "usbdev=[\"hostbus=1,hostaddr=8\"]"],
            "note": null,
        })
    );
}

#[test]
fn emit_for_xl_text_ends_with_the_two_lines_for_xl_cfg() {
    let text = stdout(&["emit", "port:1-2.1", "--for", "xl"]);

    assert!(
        text.ends_with(
            "\nusbctrl=[\"type=qusb,version=2,ports=8\"]\nusbdev=[\"hostbus=1,hostaddr=5\"]\n"
        ),
        "{text}"
    );
    assert!(
        text.lines().rev().skip(2).all(|l| l.starts_with('#')),
        "{text}"
    );
}

#[test]
fn emit_for_xl_never_prints_a_zero_padded_or_octal_looking_number() {
    // Every device of the recording, text and JSON: xl reads `08` as 0 and `010` as 8.
    let mut seen = Vec::new();
    for port in [
        "1-1", "1-2.1", "1-2.2", "1-2.3.1", "1-4", "2-3", "3-1", "6-1",
    ] {
        let selector = format!("port:{port}");
        seen.extend(numbers(&stdout(&["emit", &selector, "--for", "xl"])));
        let v: Value =
            serde_json::from_str(&stdout(&["emit", &selector, "--for", "xl", "--json"])).unwrap();
        let mut lines = vec![v["usbdev"].as_str().unwrap().to_string()];
        lines.extend(
            v["xl_cfg"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_string()),
        );
        seen.extend(numbers(&lines.join("\n")));
    }

    assert_eq!(seen.len(), 48, "{seen:?}");
    assert!(
        seen.iter()
            .all(|n| !n.starts_with('0') && n.parse::<u16>().is_ok()),
        "{seen:?}"
    );
    assert!(seen.contains(&"8".to_string()), "{seen:?}");
}

/// The comment lines of `text` as one paragraph.
fn prose(text: &str) -> String {
    let words = text.lines().filter_map(|l| l.strip_prefix("# "));
    words.collect::<Vec<_>>().join(" ")
}

#[test]
fn emit_for_xl_by_port_says_xl_attaches_by_address_and_serve_follows_the_port() {
    let text = stdout(&["emit", "port:1-2.1", "--for", "xl", "--by", "port"]);

    let prose = prose(&text);
    assert!(prose.contains("Xen attaches by bus+address only"), "{text}");
    assert!(prose.contains("rule with by = \"port\""), "{text}");
}

#[test]
fn emit_for_xl_refuses_vm_which_names_a_qemu_monitor() {
    usbroute()
        .args(["emit", "port:1-2.1", "--for", "xl", "--vm", "lab"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("xl has none"));
}
