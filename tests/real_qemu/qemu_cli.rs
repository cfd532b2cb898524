//! `usbroute attach`, `detach` and `vm devices --qmp` against a real QEMU. The inventory is
//! an empty sysfs root (this host has no USB devices), so attaches here are of absent
//! devices by port or id, which QEMU accepts and attaches when they appear.

use crate::qemu_support;

use assert_cmd::Command;
use predicates::str::contains;
use qemu_support::QemuGuard;
use serde_json::{json, Value};

const XHCI: &str = "qemu-xhci,id=xhci";

fn usbroute(root: &tempfile::TempDir) -> Command {
    let mut cmd = Command::cargo_bin("usbroute").expect("binary");
    cmd.arg("--sysfs-root").arg(root.path());
    cmd
}

/// What a successful command printed, as JSON.
fn json_of(command: &mut Command) -> Value {
    let out = command.output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn devices_json(root: &tempfile::TempDir, qemu: &QemuGuard) -> Value {
    json_of(
        usbroute(root)
            .args(["vm", "devices", "--json", "--qmp"])
            .arg(qemu.socket()),
    )
}

#[test]
fn vm_devices_json_lists_match_fields_and_ours() {
    let qemu = QemuGuard::q35(&[
        "-device",
        XHCI,
        "-device",
        // As an earlier run of usbroute would have left it.
        "usb-host,id=usbroute-port-1-9,bus=xhci.0,hostbus=1,hostport=9",
        "-device",
        "usb-host,id=mine,bus=xhci.0,vendorid=0x046d,productid=0xC016",
    ]);
    let root = tempfile::tempdir().expect("root");

    let listed = devices_json(&root, &qemu);

    assert_eq!(
        listed,
        json!([
            {"id": "mine", "attached": false, "ours": false,
             "vendor_id": "046d", "product_id": "c016"},
            {"id": "usbroute-port-1-9", "attached": false, "ours": true, "bus": 1, "port": "9"},
        ])
    );
}

#[test]
fn attach_by_id_of_absent_device_then_detach_by_selector() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let root = tempfile::tempdir().expect("root");

    usbroute(&root)
        .args(["attach", "id:046d:c016", "--by", "id", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .success()
        .stdout(contains("attached `usbroute-id-046d-c016`"))
        .stdout(contains("not attached yet"));
    let after_attach = devices_json(&root, &qemu);
    usbroute(&root)
        .args(["detach", "id:046d:c016", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .success()
        .stdout(contains("detached `usbroute-id-046d-c016`"));
    let after_detach = devices_json(&root, &qemu);

    assert_eq!(
        after_attach,
        json!([{"id": "usbroute-id-046d-c016", "attached": false, "ours": true,
                "vendor_id": "046d", "product_id": "c016"}])
    );
    assert_eq!(after_detach, json!([]));
}

#[test]
fn attach_by_port_of_absent_device_then_detach_by_id() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let root = tempfile::tempdir().expect("root");

    usbroute(&root)
        .args(["attach", "port:1-3.4.2", "--by", "port", "--json", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .success()
        .stdout(contains("\"port\": \"3.4.2\""));
    usbroute(&root)
        .args(["detach", "usbroute-port-1-3.4.2", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .success();

    assert_eq!(devices_json(&root, &qemu), json!([]));
}

#[test]
fn attach_by_address_of_absent_device_says_what_to_do() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let root = tempfile::tempdir().expect("root");

    usbroute(&root)
        .args(["attach", "addr:1.2", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .failure()
        .stderr(contains(format!(
            "cannot attach `addr:1.2` to VM {}",
            qemu.socket().display()
        )))
        .stderr(contains(
            "device at bus 1 addr 2 is not on this host; use --by port",
        ))
        .stderr(contains("--by id"));

    assert_eq!(devices_json(&root, &qemu), json!([]));
}

#[test]
fn detach_of_a_device_the_vm_does_not_have_names_the_vm() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let root = tempfile::tempdir().expect("root");

    usbroute(&root)
        .args(["detach", "id:1234:5678", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .failure()
        .stderr(contains(qemu.socket().display().to_string()))
        .stderr(contains("usbroute vm devices"));
}

#[test]
fn vm_devices_on_a_missing_socket_names_it() {
    let root = tempfile::tempdir().expect("root");
    let socket = root.path().join("gone.sock");

    usbroute(&root)
        .args(["vm", "devices", "--qmp"])
        .arg(&socket)
        .assert()
        .failure()
        .stderr(contains(socket.display().to_string()))
        .stderr(contains("is QEMU running"));
}

/// The recorded test-bed guest: xHCI with keyboards, mice, tablets and nested hubs, an
/// EHCI with UHCI companions (see tests/fixtures/README.md). It has no /dev/bus/usb, and
/// this host's QEMU sees none of its devices.
const GUEST: &str = "tests/fixtures/guest-xhci-ehci";

fn usbroute_on_guest() -> Command {
    let mut cmd = Command::cargo_bin("usbroute").expect("binary");
    cmd.args(["--sysfs-root", GUEST]);
    cmd
}

#[test]
fn attach_by_address_of_a_device_not_on_this_host_names_it_and_the_fix() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let root = tempfile::tempdir().expect("root");

    usbroute_on_guest()
        .args(["attach", "1-1", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .failure()
        .stderr(contains(format!("VM {}", qemu.socket().display())))
        .stderr(contains("device 1-1 (bus 1 addr 2) 0627:0001"))
        .stderr(contains(
            "is not on this host (no tests/fixtures/guest-xhci-ehci/dev/bus/usb/001/002); \
             use --by port or --by id to attach it when it appears",
        ));

    assert_eq!(devices_json(&root, &qemu), json!([]));
}

#[test]
fn attach_of_a_selector_matching_several_devices_lists_the_candidates() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let root = tempfile::tempdir().expect("root");

    usbroute_on_guest()
        .args(["attach", "id:0627:0001", "--by", "id", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .failure()
        .stderr(contains("`id:0627:0001` matches 6 devices"))
        .stderr(contains("port:1-2.3.1"))
        .stderr(contains("port:6-1"));

    assert_eq!(devices_json(&root, &qemu), json!([]));
}

#[test]
fn attach_of_a_hub_is_refused_with_what_to_do_instead() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);

    usbroute_on_guest()
        .args(["attach", "1-2", "--by", "port", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .failure()
        .stderr(contains("QEMU cannot pass a hub"))
        .stderr(contains("hub:1-2"));
}

#[test]
fn attach_by_port_of_a_listed_device_then_detach_by_the_same_selector() {
    let qemu = QemuGuard::q35(&["-device", XHCI]);
    let root = tempfile::tempdir().expect("root");

    usbroute_on_guest()
        .args(["attach", "1-2.1", "--by", "port", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .success()
        .stdout(contains("attached `usbroute-port-1-2.1`"));
    let attached = devices_json(&root, &qemu);
    usbroute_on_guest()
        .args(["detach", "1-2.1", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .success();

    assert_eq!(
        attached,
        json!([{"id": "usbroute-port-1-2.1", "attached": false, "ours": true,
                "bus": 1, "port": "2.1"}])
    );
    assert_eq!(devices_json(&root, &qemu), json!([]));
}

#[test]
fn vm_qmp_wait_answers_once_a_qemu_started_later_is_ready() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("late.qmp");
    let root = tempfile::tempdir().expect("root");
    // The client starts first: the socket does not exist yet.
    let client = std::process::Command::new(env!("CARGO_BIN_EXE_usbroute"))
        .arg("--sysfs-root")
        .arg(root.path())
        .args(["vm", "qmp", "--wait", "--timeout", "60", "--qmp"])
        .arg(&socket)
        .args(["qom-get", r#"{"path": "/machine", "property": "type"}"#])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run usbroute");
    let _qemu = qemu_support::QemuAt::spawn(&[&socket], &["-M", "q35"]);

    let out = client.wait_with_output().expect("wait");

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let machine_type = reply.as_str().unwrap_or_default();
    assert!(
        machine_type.starts_with("pc-q35-"),
        "qom-get /machine type: {reply}"
    );
}

#[test]
fn vm_qmp_error_names_the_command_and_the_socket() {
    let qemu = QemuGuard::q35(&[]);
    let root = tempfile::tempdir().expect("root");

    usbroute(&root)
        .args(["vm", "qmp", "--qmp"])
        .arg(qemu.socket())
        .args([
            "qom-get",
            r#"{"path": "/machine/nothing", "property": "x"}"#,
        ])
        .assert()
        .failure()
        .stderr(contains("qom-get"))
        .stderr(contains(qemu.socket().display().to_string()));
}

/// `usbroute emit` for a device absent from this host: QEMU starts with the printed
/// arguments, lists the device as ours, and `attach` of the same device finds it there.
#[test]
fn emit_by_port_starts_a_qemu_holding_the_device_attach_would_add() {
    let root = tempfile::tempdir().expect("root");
    let emitted = json_of(usbroute(&root).args([
        "emit",
        "port:1-7.2",
        "--for",
        "qemu",
        "--by",
        "port",
        "--json",
    ]));
    let args: Vec<&str> = emitted["qemu_args"]
        .as_array()
        .expect("qemu_args")
        .iter()
        .map(|a| a.as_str().expect("string"))
        .collect();

    let qemu = QemuGuard::q35(&args);

    assert_eq!(
        devices_json(&root, &qemu),
        json!([{"id": "usbroute-port-1-7.2", "attached": false, "ours": true,
                "bus": 1, "port": "7.2"}])
    );
    usbroute(&root)
        .args(["attach", "port:1-7.2", "--by", "port", "--qmp"])
        .arg(qemu.socket())
        .assert()
        .success()
        .stdout(contains("has `usbroute-port-1-7.2` already"));
}

/// `usbroute emit --vm NAME` adds usbroute's own monitor (the config's `qmp` of that VM):
/// a QEMU started with it and its user's monitor (the guard's) serves both, so usbroute
/// lists the VM while the user's client holds the other one.
#[test]
fn emit_for_a_vm_gives_usbroute_a_monitor_beside_the_users_own() {
    let root = tempfile::tempdir().expect("root");
    let ours = root.path().join("win11-usbroute.qmp");
    let config = root.path().join("usbroute.toml");
    let vm = format!("[[vm]]\nname = \"win11\"\nqmp = \"{}\"\n", ours.display());
    std::fs::write(&config, vm).expect("config");
    let emitted = json_of(usbroute(&root).arg("--config").arg(&config).args([
        "emit",
        "port:1-7.2",
        "--for",
        "qemu",
        "--by",
        "port",
        "--vm",
        "win11",
        "--json",
    ]));
    let words = |field: &str| -> Vec<String> {
        emitted[field]
            .as_array()
            .expect(field)
            .iter()
            .map(|a| a.as_str().expect("string").to_string())
            .collect()
    };
    let args: Vec<String> = [words("qemu_args"), words("monitor_args")].concat();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let qemu = QemuGuard::q35(&args);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _users_client = runtime
        .block_on(usbroute::backend::qemu::qmp::Qmp::connect(qemu.socket()))
        .expect("the user's client holds the guard's monitor");
    let listed = json_of(
        usbroute(&root)
            .args(["vm", "devices", "--json", "--qmp"])
            .arg(&ours),
    );

    assert_eq!(
        words("monitor_args"),
        [
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", ours.display())
        ]
    );
    assert_eq!(listed[0]["id"], "usbroute-port-1-7.2");
}
