//! `usbroute serve` as a process: the empty policy (no config file), the control socket,
//! sd-notify READY/STATUS on a real notify socket, SIGHUP, SIGTERM. Needs root (uevent
//! socket with SO_RCVBUFFORCE is optional, but the control socket is made root:root 0660).

use crate::serve_support;

use assert_cmd::cargo::CommandCargoExt;
use serve_support::Serve;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `usbroute serve -v` with its control socket and an empty sysfs root in `dir` (and
/// `NOTIFY_SOCKET` when given), its log collected.
fn start(dir: &Path, notify: Option<&Path>) -> Serve {
    let sysfs = dir.join("sysfs");
    std::fs::create_dir_all(&sysfs).unwrap();
    let serve = Serve::at(dir.join("control.sock"))
        .sysfs_root(&sysfs)
        .args(&["-v"])
        .log();
    match notify {
        Some(n) => serve.env("NOTIFY_SOCKET", Some(n.as_os_str())),
        None => serve,
    }
    .start()
}

#[test]
fn serve_without_config_runs_the_empty_policy() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), None);

    let out = daemon.cli_output(&["status", "--json"]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["config"], serde_json::Value::Null);
    assert_eq!(status["vms"], serde_json::json!([]));
}

/// Write `text` as the default config (/etc/usbroute/usbroute.toml) under the sysfs root
/// [`start`] uses in `dir`; its path.
fn default_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("sysfs/etc/usbroute/usbroute.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// `usbroute --sysfs-root DIR/sysfs ARGS` with neither `--config` nor `--control`.
fn bare_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--sysfs-root")
        .arg(dir.join("sysfs"))
        .args(args)
        .env_remove("USBROUTE_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn serve_without_config_reads_the_default_file_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let default = default_config(
        dir.path(),
        "[[vm]]\nname = \"lab\"\nqmp = \"/nonexistent/lab.qmp\"\n",
    );
    let mut daemon = start(dir.path(), None);

    let out = daemon.cli_output(&["status", "--json"]);
    let log = daemon.stop();

    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["config"], default.display().to_string());
    assert_eq!(status["vms"][0]["name"], "lab");
    assert!(
        log.contains(&format!("config {} (the default)", default.display())),
        "{log}"
    );
}

#[test]
fn status_finds_the_daemon_through_the_default_configs_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    default_config(
        dir.path(),
        &format!("control_socket = \"{}\"\n", socket.display()),
    );
    let _daemon = start(dir.path(), None);

    let out = bare_cli(dir.path(), &["status", "--json"]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usbroute_config_in_the_environment_names_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let config = dir.path().join("elsewhere.toml");
    std::fs::write(
        &config,
        format!("control_socket = \"{}\"\n", socket.display()),
    )
    .unwrap();
    let _daemon = start(dir.path(), None);

    let out = Command::cargo_bin("usbroute")
        .unwrap()
        .args(["status", "--json"])
        .env("USBROUTE_CONFIG", &config)
        .output()
        .unwrap();

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_given_config_that_does_not_exist_is_an_error_naming_it_for_serve_and_status() {
    let dir = tempfile::tempdir().unwrap();
    default_config(dir.path(), "");
    let typo = dir.path().join("typo.toml");
    let typo = typo.to_str().unwrap();

    let serve = bare_cli(dir.path(), &["--config", typo, "serve"]);
    let status = bare_cli(dir.path(), &["--config", typo, "status"]);

    for out in [serve, status] {
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("typo.toml") && err.contains("does not exist"),
            "{err}"
        );
    }
}

#[test]
fn reload_without_config_says_there_is_nothing_to_reload() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), None);

    let out = daemon.cli_output(&["reload"]);

    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("running without a config file"), "{err}");
}

#[test]
fn serve_notifies_systemd_ready_with_a_status() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let _daemon = start(dir.path(), Some(&notify_path));
    let mut messages = String::new();
    let mut buf = [0u8; 4096];
    while !(messages.contains("READY=1") && messages.contains("STATUS=")) {
        let n = notify
            .recv(&mut buf)
            .expect("sd-notify message within 10 s");
        messages.push_str(&String::from_utf8_lossy(&buf[..n]));
        messages.push('\n');
    }

    assert!(
        messages.contains("STATUS=0 USB devices, 0 for VMs; 0/0 VMs up"),
        "{messages}"
    );
}

#[test]
fn sighup_keeps_the_daemon_running_and_sigterm_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = start(dir.path(), None);

    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let after_hup = daemon.cli_output(&["status"]);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.child.wait().unwrap();

    assert!(after_hup.status.success());
    assert!(status.success(), "exit status {status:?}");
    assert!(!daemon.control().exists(), "control socket removed on exit");
}

#[test]
fn status_without_a_daemon_says_how_to_start_one_and_the_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");

    let out = Command::cargo_bin("usbroute")
        .unwrap()
        .arg("--control")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();

    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "usbroute: cannot reach the usbroute daemon at {}; is `usbroute serve` running? \
             (give --control SOCKET or --config FILE if it uses another socket): \
             No such file or directory (os error 2)\n",
            socket.display()
        )
    );
}

#[test]
fn serve_at_default_verbosity_says_it_is_ready_and_sees_no_usb_in_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = dir.path().join("sysfs");
    std::fs::create_dir_all(&sysfs).unwrap();
    let mut daemon = Serve::at(dir.path().join("control.sock"))
        .sysfs_root(&sysfs)
        .env("RUST_LOG", None)
        .log()
        .spawn();
    daemon.wait_until(Duration::from_secs(30), "the ready line", || {
        daemon.logged("daemon ready")
    });
    let said = daemon.stop();

    let text = said;
    assert!(text.contains("daemon ready"), "no ready line:\n{text}");
    assert!(
        text.contains("sees no USB"),
        "no word on what it sees:\n{text}"
    );
    assert!(
        text.contains("the empty policy"),
        "no word on the policy:\n{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "escape codes on a pipe:\n{text:?}"
    );
}

#[test]
fn serve_watches_a_xen_vm_beside_a_qemu_one_and_reports_both_down_without_their_daemons() {
    let dir = tempfile::tempdir().unwrap();
    default_config(
        dir.path(),
        "[[vm]]\nname = \"lab\"\nqmp = \"/nonexistent/lab.qmp\"\n\n[[vm]]\nname = \"dom1\"\nxen = \"dom1\"\n",
    );
    let mut daemon = start(dir.path(), None);

    let reload = daemon.cli_output(&["reload"]);
    let out = daemon.cli_output(&["status", "--json"]);
    let log = daemon.stop();

    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut managed: Vec<(&str, bool)> = status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["up"] == true))
        .collect();
    managed.sort();
    assert_eq!(managed, [("dom1", false), ("lab", false)]);
    assert!(!log.contains("backend in this build"), "{log}");
}

#[test]
fn serve_warns_once_per_load_about_rules_for_two_vms_that_overlap_naming_both_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config(
        dir.path(),
        "[[vm]]\nname = \"lab\"\nqmp = \"/nonexistent/lab.qmp\"\n\n[[vm]]\nname = \"win11\"\nqmp = \"/nonexistent/win11.qmp\"\n\n[[rule]]\nmatch = \"id:046d:c016\"\nvm = \"lab\"\nby = \"id\"\n\n[[rule]]\nmatch = \"port:1-2\"\nvm = \"lab\"\nby = \"port\"\n\n[[rule]]\nmatch = \"class:03\"\nvm = \"win11\"\n",
    );
    let mut daemon = start(dir.path(), None);

    let reload = daemon.cli_output(&["reload"]);
    let log = daemon.stop();

    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    let at_line_9 = format!(
        "{}:19: the rule on line 9 (vm = \"lab\", by = \"id\") and the rule on line 19 (vm = \"win11\", by = \"address\") can match the same device and send it to different VMs; the rule on line 9 wins: it comes earlier in the file",
        config.display()
    );
    let at_line_14 = "the rule on line 14 (vm = \"lab\", by = \"port\") and the rule on line 19";
    // Once at start, once for the reload; the two rules for lab never warn.
    assert_eq!(log.matches(&at_line_9).count(), 2, "{log}");
    assert_eq!(log.matches(at_line_14).count(), 2, "{log}");
    assert_eq!(log.matches("can match the same device").count(), 4, "{log}");
}
