//! One QMP monitor serves one client: a real QEMU started with ONE `-qmp`, held by
//! `usbroute serve` or by another client. QEMU takes a second client's connection and
//! says nothing (no greeting) until the first leaves, so:
//! - `vm devices --qmp SOCK` of a monitor the daemon holds answers through the daemon;
//!   `attach`/`detach --qmp` are done by the daemon as manual overrides; a raw `vm qmp` is
//!   refused at once, naming the daemon and the fix;
//! - a second client of a held monitor is told, after the greeting deadline, that the
//!   monitor is probably held and to give usbroute its own `-qmp`; the direct path works
//!   again once the daemon stopped;
//! - a daemon whose monitor another client holds says so once (log and `status`), waits
//!   its turn and connects when that client leaves.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::qemu_support::QemuAt;
use crate::serve_support::{self, wait_until, Serve};

/// The recorded test-bed guest: a mouse at 1-2.1 (behind the hub 1-2).
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/guest-xhci-ehci"
);

/// The device id the rule gives the mouse.
const MOUSE: &str = "usbroute-port-1-2.1";

/// What a held monitor's message must say (the fix, and why).
const HELD: [&str; 3] = [
    "is probably held by another client (QEMU serves one client per monitor",
    "give usbroute its own monitor: add `-qmp unix:/run/usbroute/NAME.qmp,server=on,wait=off`",
    "(`-qmp` may be repeated)",
];

/// A QEMU with ONE QMP monitor, and a config whose VM `guest` is at that monitor.
struct Bed {
    dir: tempfile::TempDir,
}

impl Bed {
    fn new() -> Bed {
        let bed = Bed {
            dir: tempfile::tempdir().unwrap(),
        };
        let config = format!(
            "[[vm]]\nname = \"guest\"\nqmp = \"{}\"\n\n\
             [[rule]]\nvm = \"guest\"\nmatch = \"port:1-2.1\"\nby = \"port\"\n",
            bed.qmp().display()
        );
        std::fs::write(bed.path("usbroute.toml"), config).unwrap();
        bed
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn qmp(&self) -> PathBuf {
        self.path("guest.qmp")
    }

    fn qmp_arg(&self) -> String {
        self.qmp().display().to_string()
    }

    /// QEMU with the one monitor, once it accepts connections.
    fn qemu(&self) -> QemuAt {
        let qemu = QemuAt::spawn(
            &[&self.qmp()],
            &[
                "-machine",
                "q35",
                "-m",
                "64",
                "-device",
                "qemu-xhci,id=xhci",
            ],
        );
        // Only `connect` (never read): a client that reads would be served and hold it.
        wait_until(Duration::from_secs(20), "QEMU's QMP socket", || {
            UnixStream::connect(self.qmp()).is_ok()
        });
        qemu
    }

    fn daemon(&self) -> Serve {
        Serve::at(self.path("control.sock"))
            .args(&["-v"])
            .config(self.path("usbroute.toml"))
            .sysfs_root(FIXTURE)
            .log()
            .start()
    }

    /// The daemon holds the monitor and has given the VM its device.
    fn wait_held_by_daemon(&self, daemon: &Serve) {
        daemon.wait_until(
            Duration::from_secs(20),
            "the daemon to hold the monitor and attach the mouse",
            || {
                let status = daemon.status();
                status["vms"][0]["up"] == true
                    && status["at_rest"] == true
                    && status["vms"][0]["devices"] == serde_json::json!([MOUSE])
            },
        );
    }

    /// `usbroute ARGS` with a control socket where no daemon listens: the CLI cannot
    /// learn that a daemon holds the monitor and talks to QEMU directly.
    fn cli_without_daemon(&self, args: &[&str]) -> std::process::Output {
        serve_support::command(&self.path("no-daemon.sock"))
            .args(args)
            .output()
            .expect("run usbroute")
    }
}

/// Connect to `socket` and read QEMU's greeting: this client holds the monitor while
/// the stream lives.
fn hold(socket: &std::path::Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect to the monitor");
    stream
        .set_read_timeout(Some(serve_support::scaled(Duration::from_secs(10))))
        .unwrap();
    let mut greeting = String::new();
    BufReader::new(&stream)
        .read_line(&mut greeting)
        .expect("QEMU's greeting");
    assert!(greeting.starts_with("{\"QMP\""), "{greeting}");
    stream
}

#[test]
fn vm_devices_of_a_monitor_the_daemon_holds_answers_through_the_daemon() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let daemon = bed.daemon();
    bed.wait_held_by_daemon(&daemon);

    let started = Instant::now();
    let out = daemon.cli_output(&["vm", "devices", "--qmp", &bed.qmp_arg(), "--json"]);
    let took = started.elapsed();
    let raw = daemon.cli_fails(&["vm", "qmp", "--qmp", &bed.qmp_arg(), "query-status"]);

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let devices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        devices,
        serde_json::json!([{"id": MOUSE, "attached": false, "ours": true, "bus": 1, "port": "2.1"}])
    );
    assert!(
        stderr.contains("listed by the usbroute daemon, which holds the monitor"),
        "{stderr}"
    );
    assert!(
        raw.contains("the usbroute daemon holds the monitor")
            && raw.contains("`-qmp unix:/run/usbroute/guest.qmp,server=on,wait=off`"),
        "{raw}"
    );
    eprintln!("vm devices through the daemon took {took:?}");
}

#[test]
fn a_second_client_of_a_held_monitor_is_told_to_give_usbroute_its_own_and_the_direct_path_works_once_the_daemon_stopped(
) {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let mut daemon = bed.daemon();
    bed.wait_held_by_daemon(&daemon);

    let raw = bed.cli_without_daemon(&[
        "vm",
        "qmp",
        "--timeout",
        "1",
        "--qmp",
        &bed.qmp_arg(),
        "query-status",
    ]);
    let listing = bed.cli_without_daemon(&["vm", "devices", "--qmp", &bed.qmp_arg()]);
    daemon.stop();
    let after = bed.cli_without_daemon(&["vm", "devices", "--qmp", &bed.qmp_arg(), "--json"]);

    for refused in [&raw, &listing] {
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{stderr}");
        for said in HELD {
            assert!(stderr.contains(said), "missing {said:?} in: {stderr}");
        }
        assert!(stderr.contains(&bed.qmp_arg()), "{stderr}");
    }
    let stderr = String::from_utf8_lossy(&after.stderr);
    assert!(after.status.success(), "{stderr}");
    let devices: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(devices[0]["id"], MOUSE);
}

#[test]
fn attach_and_detach_qmp_of_a_monitor_the_daemon_holds_are_done_by_the_daemon() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let daemon = bed.daemon();
    bed.wait_held_by_daemon(&daemon);
    let qmp = bed.qmp_arg();

    let attached = daemon.cli(&["attach", "port:1-4", "--by", "port", "--qmp", &qmp]);
    let detached = daemon.cli(&["detach", "usbroute-port-1-4", "--qmp", &qmp]);
    let listed = daemon.cli(&["vm", "devices", "--qmp", &qmp, "--json"]);

    assert!(
        attached.starts_with("the usbroute daemon (")
            && attached.contains("manages VM `guest` at")
            && attached.ends_with("1-4 attached to VM guest (confirmed by the VM)\n"),
        "{attached}"
    );
    assert!(
        detached.ends_with("1-4 is on the host (until unplugged or a `clear` request)\n"),
        "{detached}"
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MOUSE]);
}

#[test]
fn a_daemon_whose_monitor_another_client_holds_says_so_once_and_connects_when_it_leaves() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let holder = hold(&bed.qmp());
    let daemon = bed.daemon();

    daemon.wait_until(
        Duration::from_secs(30),
        "status to say the monitor is held",
        || daemon.status()["vms"][0]["monitor_held"] == true,
    );
    let while_held = daemon.status();
    let table = daemon.cli(&["status"]);
    drop(holder);
    bed.wait_held_by_daemon(&daemon);
    let after = daemon.status();

    assert_eq!(while_held["vms"][0]["up"], false);
    assert!(
        table.contains("vm guest: down, its monitor held by another client"),
        "{table}"
    );
    assert_eq!(after["vms"][0]["monitor_held"], false);
    let log = daemon.log();
    let said = log
        .lines()
        .filter(|l| l.contains("is probably held by another client"))
        .count();
    assert_eq!(said, 1, "{log}");
    assert!(
        log.contains("`-qmp unix:/run/usbroute/guest.qmp,server=on,wait=off`"),
        "{log}"
    );
}
