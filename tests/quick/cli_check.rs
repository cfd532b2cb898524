//! `usbroute check`: the config validated like `nginx -t`, its rules in the order they
//! win, and every error at `file:line:column` at once.

use assert_cmd::cargo::CommandCargoExt;
use std::path::Path;
use std::process::{Command, Output};

const VALID: &str = r#"[[vm]]
name = "win11"
qmp = "/run/qemu/win11.qmp"

[[vm]]
name = "lab"
qmp = "/run/qemu/lab.qmp"

[[rule]]
match = "id:046d:c016"
vm = "lab"

[[rule]]
match = "class:09"
forbid = true

[[rule]]
match = "port:1-3"
vm = "win11"
by = "port"
priority = 5

[[controller]]
pci = "0000:00:1d.7"
vm = "win11"

[routing]
toggle = ["host", "guest"]

[routing.profile.host]
mask = "0x3fff"

[routing.profile.guest]
ehci = ["ehci1:1"]
"#;

const INVALID: &str = r#"[[vm]]
name = "win11"
qmp = "/run/qemu/win11.qmp"

[[rule]]
match = "id:046d:c016"
vm = "nobody"

[[rule]]
match = "port:zz"
vm = "win11"

[routing]
toggle = ["host", "gest"]

[routing.profile.host]
mask = "0x3fff"
"#;

/// `usbroute check ARGS` on `text` written to DIR/usbroute.toml, with DIR as the sysfs
/// root (the host whose inventory `check` consults).
pub(crate) fn check(dir: &Path, text: &str, args: &[&str]) -> Output {
    let config = dir.join("usbroute.toml");
    std::fs::write(&config, text).unwrap();
    Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--config")
        .arg(&config)
        .arg("--sysfs-root")
        .arg(dir)
        .arg("check")
        .args(args)
        .env_remove("USBROUTE_CONFIG")
        .output()
        .unwrap()
}

/// What `usbroute check` prints for `text`, which it must find valid (exit 0).
fn check_valid(dir: &Path, text: &str) -> String {
    let out = check(dir, text, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `usbroute check --json` on `text`, which it must find valid (exit 0).
fn check_valid_json(dir: &Path, text: &str) -> serde_json::Value {
    let out = check(dir, text, &["--json"]);
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_valid_config_exits_0_and_lists_the_rules_in_the_order_they_win() {
    let dir = tempfile::tempdir().unwrap();

    let text = check_valid(dir.path(), VALID);

    let file = dir.path().join("usbroute.toml").display().to_string();
    let rules: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("rules"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert_eq!(
        rules,
        [
            format!("  1. class:09 -> forbid (stays on the host), priority 0  ({file}:13)"),
            format!("  2. port:1-3 -> vm win11, by port, priority 5  ({file}:17)"),
            format!("  3. id:046d:c016 -> vm lab, by address, priority 0  ({file}:9)"),
        ]
    );
    assert!(text.contains("0000:00:1d.7 -> vm win11"), "{text}");
    assert!(text.contains("toggle: host <-> guest"), "{text}");
}

#[test]
fn an_invalid_config_exits_1_with_every_error_at_its_place() {
    let dir = tempfile::tempdir().unwrap();

    let out = check(dir.path(), INVALID, &[]);

    assert_eq!(out.status.code(), Some(1));
    let file = dir.path().join("usbroute.toml").display().to_string();
    let err = String::from_utf8(out.stderr).unwrap();
    for place in [
        ":7:6: rule names VM `nobody`",
        ":10:9: `match`",
        ":14:1: [routing] toggle names profile `gest`",
    ] {
        assert!(
            err.contains(&format!("{file}{place}")),
            "{place} missing:\n{err}"
        );
    }
    assert!(err.contains("3 errors"), "{err}");
}

#[test]
fn json_gives_the_rules_vms_controllers_routing_and_warnings() {
    let dir = tempfile::tempdir().unwrap();

    let report = check_valid_json(dir.path(), VALID);

    assert_eq!(report["valid"], true);
    assert_eq!(report["errors"], serde_json::json!([]));
    assert_eq!(
        report["rules"][1],
        serde_json::json!({
            "at": format!("{}:17", dir.path().join("usbroute.toml").display()),
            "line": 17,
            "rule": 3,
            "match": "port:1-3",
            "action": "pass",
            "vm": "win11",
            "by": "port",
            "priority": 5,
            "force": false,
        })
    );
    assert_eq!(report["vms"][1]["name"], "lab");
    assert_eq!(
        report["controllers"],
        serde_json::json!([{"pci": "0000:00:1d.7", "vm": "win11"}])
    );
    assert_eq!(
        report["routing"]["toggle"],
        serde_json::json!(["host", "guest"])
    );
    // Issue 13 added the overlap of the lab and win11 rules (a fourth warning).
    assert_eq!(
        report["warnings"].as_array().unwrap().len(),
        4,
        "{}",
        report["warnings"]
    );
    let bus_numbered = report["warnings"][3].as_str().unwrap();
    assert!(
        bus_numbered.contains(":17: `port:1-3` names the port by its bus number"),
        "{bus_numbered}"
    );
}

#[test]
fn json_of_an_invalid_config_lists_each_error_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();

    let out = check(dir.path(), INVALID, &["--json"]);

    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["valid"], false);
    let places: Vec<(u64, u64)> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["column"].as_u64().unwrap()))
        .collect();
    assert_eq!(places, [(7, 6), (10, 9), (14, 1)]);
}

/// `usbroute --sysfs-root DIR check` with neither `--config` nor `USBROUTE_CONFIG`.
fn check_without_config(dir: &Path) -> Output {
    Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--sysfs-root")
        .arg(dir)
        .arg("check")
        .env_remove("USBROUTE_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn without_a_config_file_check_says_it_is_the_empty_policy() {
    let dir = tempfile::tempdir().unwrap();

    let out = check_without_config(dir.path());

    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("the empty policy"));
}

const OTHER_BACKENDS: &str = r#"[[vm]]
name = "win11"
qmp = "/run/qemu/win11.qmp"

[[vm]]
name = "dom1"
xen = "dom1"

[[vm]]
name = "lv"
libvirt = "lv-domain"
uri = "qemu:///system"

[[rule]]
match = "port:1-3"
vm = "dom1"
"#;

#[test]
fn vms_of_every_backend_are_listed_and_managed_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();

    let text = check_valid(dir.path(), OTHER_BACKENDS);

    for line in [
        "  win11 (qmp /run/qemu/win11.qmp)",
        "  dom1 (xen domain dom1)",
        "  lv (libvirt domain lv-domain at qemu:///system)",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    assert!(
        !text.contains("backend in this build"),
        "this build manages QEMU, libvirt and Xen VMs:\n{text}"
    );
}

#[test]
fn json_names_the_backend_of_each_vm() {
    let dir = tempfile::tempdir().unwrap();

    let report = check_valid_json(dir.path(), OTHER_BACKENDS);

    let vms: Vec<serde_json::Value> = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| serde_json::json!([v["name"], v["backend"], v["qmp"], v["domain"], v["uri"]]))
        .collect();
    assert_eq!(
        vms,
        [
            serde_json::json!(["win11", "qemu", "/run/qemu/win11.qmp", null, null]),
            serde_json::json!(["dom1", "xen", null, "dom1", null]),
            serde_json::json!(["lv", "libvirt", null, "lv-domain", "qemu:///system"]),
        ]
    );
}

#[test]
fn without_config_check_reads_the_default_file_under_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("etc/usbroute/usbroute.toml");
    std::fs::create_dir_all(default.parent().unwrap()).unwrap();
    std::fs::write(&default, INVALID).unwrap();

    let out = check_without_config(dir.path());

    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:7:6: rule names VM `nobody`",
            default.display()
        )),
        "{err}"
    );
}

/// Two rules for `lab` differing in `by`, then one for `last_vm` that overlaps both.
fn overlapping(last_vm: &str) -> String {
    let other = match last_vm {
        "lab" => String::new(),
        vm => format!("[[vm]]\nname = \"{vm}\"\nqmp = \"/run/qemu/{vm}.qmp\"\n\n"),
    };
    format!(
        r#"{other}[[vm]]
name = "lab"
qmp = "/run/qemu/lab.qmp"

[[rule]]
match = "id:046d:c016"
vm = "lab"
by = "id"

[[rule]]
match = "port:0000:00:14.0/2"
vm = "lab"
by = "port"

[[rule]]
match = "class:03"
vm = "{last_vm}"
"#
    )
}

#[test]
fn overlapping_rules_for_two_vms_are_valid_with_a_warning_naming_both_lines_and_the_winner() {
    let dir = tempfile::tempdir().unwrap();

    let text = check_valid(dir.path(), &overlapping("win11"));

    let file = dir.path().join("usbroute.toml").display().to_string();
    let warnings: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "warnings:")
        .skip(1)
        .collect();
    assert_eq!(
        warnings,
        [
            format!("  {file}:19: the rule on line 9 (vm = \"lab\", by = \"id\") and the rule on line 19 (vm = \"win11\", by = \"address\") can match the same device and send it to different VMs; the rule on line 9 wins: it comes earlier in the file (both have priority 0); if that is not meant, give the other a higher `priority = N` or make the `match` selectors exclusive"),
            format!("  {file}:19: the rule on line 14 (vm = \"lab\", by = \"port\") and the rule on line 19 (vm = \"win11\", by = \"address\") can match the same device and send it to different VMs; the rule on line 14 wins: it comes earlier in the file (both have priority 0); if that is not meant, give the other a higher `priority = N` or make the `match` selectors exclusive"),
        ]
    );
}

#[test]
fn rules_for_one_vm_differing_in_by_are_valid_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();

    let report = check_valid_json(dir.path(), &overlapping("lab"));

    assert_eq!(report["rules"].as_array().unwrap().len(), 3);
    assert_eq!(report["warnings"], serde_json::json!([]));
}
