//! `usbroute serve` with `[routing]` profiles, as a process, on a Lynx Point (8-series
//! PCH) config-space fixture: the TCP toggle listener, the control socket's `routing`
//! request, `usbroute toggle` against the daemon, reload with a bad `[routing]`, and a
//! bad `[routing]` at start.

use crate::routing_support;
use crate::serve_support;

use assert_cmd::cargo::CommandCargoExt;
use routing_support::*;
use serve_support::Serve;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const GUEST: u16 = 0x3ffc;
const DESK: u16 = 0x3f0f;

/// A running `usbroute serve` over a PCH fixture, killed on drop.
struct Daemon {
    serve: Serve,
    pch: Pch,
    config: PathBuf,
    control: PathBuf,
    port: u16,
}

fn usbroute(pch: &Pch, config: &Path, control: &Path) -> Command {
    let mut cmd = Command::cargo_bin("usbroute").unwrap();
    cmd.arg("--sysfs-root")
        .arg(pch.path())
        .arg("--config")
        .arg(config)
        .arg("--control")
        .arg(control);
    cmd
}

impl Daemon {
    fn start() -> Daemon {
        let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
        let port = free_port();
        let config = pch.path().join("usbroute.toml");
        std::fs::write(&config, toggle_daemon_config(port)).unwrap();
        let control = pch.path().join("control.sock");
        let serve = Serve::at(&control)
            .args(&["-v"])
            .config(&config)
            .sysfs_root(pch.path())
            .log()
            .start();
        let daemon = Daemon {
            serve,
            pch,
            config,
            control,
            port,
        };
        daemon.serve.wait_until(
            Duration::from_secs(10),
            "the daemon's toggle listener",
            || TcpStream::connect(("127.0.0.1", daemon.port)).is_ok(),
        );
        daemon
    }

    fn cli(&self, args: &[&str]) -> Output {
        usbroute(&self.pch, &self.config, &self.control)
            .args(args)
            .output()
            .unwrap()
    }

    /// One line to the TCP toggle listener after `auth`, its reply line.
    fn tcp(&self, line: &str) -> String {
        tcp_toggle(self.port, line)
    }

    /// One raw JSON request to the control socket, its reply line.
    fn control(&self, request: &str) -> serde_json::Value {
        self.serve.request(request)
    }
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_tcp_toggle_listener_switches_the_xhci_register() {
    let daemon = Daemon::start();
    let before = daemon.pch.config(XHCI);

    let reply = daemon.tcp("guest");

    assert_eq!(reply, "ok guest 0x3ffc");
    assert_eq!(daemon.pch.xusb2pr(), GUEST);
    let after = daemon.pch.config(XHCI);
    let changed: Vec<usize> = (0..256).filter(|&i| before[i] != after[i]).collect();
    // XUSB2PR, and USB3_PSSEN for the SuperSpeed lanes of ports routed to EHCI.
    assert_eq!(changed, vec![0xd0, 0xd8], "only the owned registers move");
}

#[test]
fn the_control_socket_answers_a_routing_request_with_the_toggle_reply() {
    let daemon = Daemon::start();

    let reply = daemon.control(r#"{"request":"routing","line":"toggle"}"#);
    let status = daemon.control(r#"{"request":"routing","line":"status"}"#);

    assert_eq!(
        reply,
        serde_json::json!({"reply": "routing", "line": "ok guest 0x3ffc"})
    );
    assert_eq!(status["line"], "ok guest 0x3ffc");
    assert_eq!(daemon.pch.xusb2pr(), GUEST);
}

#[test]
fn a_bad_routing_line_on_the_control_socket_gets_err_and_changes_nothing() {
    let daemon = Daemon::start();
    let before = daemon.pch.config(XHCI);

    let reply = daemon.control(r#"{"request":"routing","line":"gaming"}"#);

    assert_eq!(reply["reply"], "routing");
    assert!(
        reply["line"].as_str().unwrap().starts_with("err "),
        "{reply}"
    );
    assert_eq!(daemon.pch.config(XHCI), before);
}

#[test]
fn usbroute_toggle_goes_through_the_daemons_control_socket() {
    let daemon = Daemon::start();

    let out = daemon.cli(&["toggle", "desk"]);

    assert_eq!(stdout(&out), "desk (XUSB2PR 0x3f0f)\n");
    assert_eq!(daemon.pch.xusb2pr(), DESK);
}

#[test]
fn usbroute_toggle_falls_back_to_tcp_when_the_control_socket_is_not_there() {
    let daemon = Daemon::start();
    let nowhere = daemon.pch.path().join("no-daemon-here.sock");

    let out = usbroute(&daemon.pch, &daemon.config, &nowhere)
        .arg("toggle")
        .output()
        .unwrap();

    assert_eq!(stdout(&out), "guest (XUSB2PR 0x3ffc)\n");
    assert_eq!(daemon.pch.xusb2pr(), GUEST);
}

#[test]
fn usbroute_toggle_without_the_control_socket_or_a_tcp_listener_names_the_socket() {
    let daemon = Daemon::start();
    let nowhere = daemon.pch.path().join("no-daemon-here.sock");
    let no_tcp = daemon.pch.path().join("no-tcp.toml");
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(&no_tcp, &text[..text.find("[toggle]").unwrap()]).unwrap();

    let out = usbroute(&daemon.pch, &no_tcp, &nowhere)
        .arg("toggle")
        .output()
        .unwrap();

    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no-daemon-here.sock") && err.contains("control_group"),
        "{err}"
    );
    assert_eq!(daemon.pch.xusb2pr(), 0x3fff);
}

#[test]
fn reload_of_a_vanished_config_says_why_once_and_keeps_the_old_profiles() {
    let daemon = Daemon::start();
    std::fs::remove_file(&daemon.config).unwrap();

    // Straight to the control socket: the CLI would stop at the missing file itself.
    let reload = daemon.control(r#"{"request":"reload"}"#);
    let toggled = daemon.tcp("toggle");

    assert_eq!(reload["reply"], "error", "{reload}");
    let err = reload["message"].as_str().unwrap();
    let cause = "No such file or directory (os error 2)";
    assert!(err.contains("cannot read the config file"), "{err}");
    assert_eq!(err.matches(cause).count(), 1, "{err}");
    assert!(err.contains("the running config stays in force"), "{err}");
    assert_eq!(toggled, "ok guest 0x3ffc");
}

#[test]
fn reload_with_a_bad_routing_section_keeps_the_old_profiles() {
    let daemon = Daemon::start();
    let bad = toggle_daemon_config(daemon.port).replace(
        r#"toggle = ["host", "guest"]"#,
        r#"toggle = ["host", "gest"]"#,
    );
    std::fs::write(&daemon.config, bad).unwrap();

    let reload = daemon.cli(&["reload"]);
    let toggled = daemon.tcp("toggle");

    assert!(!reload.status.success());
    let err = String::from_utf8_lossy(&reload.stderr);
    assert!(err.contains("toggle names profile `gest`"), "{err}");
    assert!(err.contains("the running config stays in force"), "{err}");
    assert_eq!(toggled, "ok guest 0x3ffc");
}

#[test]
fn reload_with_changed_profiles_switches_to_the_new_masks() {
    let daemon = Daemon::start();
    let changed = toggle_daemon_config(daemon.port).replace("0x3f0f", "0x0fff");
    std::fs::write(&daemon.config, changed).unwrap();

    let reload = daemon.cli(&["reload"]);
    let reply = daemon.tcp("desk");

    stdout(&reload);
    assert_eq!(reply, "ok desk 0x0fff");
    assert_eq!(daemon.pch.xusb2pr(), 0x0fff);
}

#[test]
fn serve_with_a_bad_routing_section_refuses_to_start_and_says_why() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let config = pch.path().join("usbroute.toml");
    let text = toggle_daemon_config(free_port()).replace(r#"mask = "0x3f0f""#, r#"mask = "0xzz""#);
    std::fs::write(&config, text).unwrap();

    let out = usbroute(&pch, &config, &pch.path().join("control.sock"))
        .arg("serve")
        .stdin(Stdio::null())
        .output()
        .unwrap();

    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[routing.profile.desk] mask `0xzz` is not a 16-bit number"),
        "{err}"
    );
    assert_eq!(pch.xusb2pr(), 0x3fff);
}

#[test]
fn a_routing_request_to_a_daemon_without_profiles_says_routing_is_off() {
    let pch = Pch::lynx_point(Regs::LYNX_DEFAULT);
    let config = pch.path().join("usbroute.toml");
    std::fs::write(&config, "").unwrap();
    let control = pch.path().join("control.sock");
    let serve = Serve::at(&control)
        .config(&config)
        .sysfs_root(pch.path())
        .log()
        .start();

    let out = usbroute(&pch, &config, &control)
        .args(["toggle", "guest"])
        .output()
        .unwrap();
    drop(serve);

    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("port routing is off in this daemon"), "{err}");
    assert_eq!(pch.xusb2pr(), 0x3fff);
}

#[test]
fn clients_that_hang_up_before_their_reply_do_not_stop_the_daemon() {
    let mut daemon = Daemon::start();

    for _ in 0..20 {
        let mut stream = UnixStream::connect(&daemon.control).unwrap();
        stream
            .write_all(b"{\"request\":\"routing\",\"line\":\"status\"}\n")
            .unwrap();
        drop(stream);
    }
    let reply = daemon.control(r#"{"request":"routing","line":"status"}"#);

    assert_eq!(reply["line"], "ok host 0x3fff");
    assert!(
        daemon.serve.child.try_wait().unwrap().is_none(),
        "daemon alive"
    );
}
