//! `usbroute serve` against a real QEMU, with the recorded test-bed guest as sysfs and rules `by = "id"` and
//! `by = "port"`: attaches at start; SIGKILL + restart of the daemon leaves exactly the same
//! usb-host set; a QEMU killed and started again gets its devices back within 2 s of its
//! QMP socket appearing; a rule naming a hub attaches nothing and `why` says why.
//!
//! QEMU gets two QMP monitors: one for the daemon, one the test reads through, so the test
//! never competes with the daemon for a connection. The CLI's commands against this bed
//! are in `daemon_qemu_cli.rs`.

use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::qemu_support;
use crate::serve_support;
use qemu_support::QemuAt;
use serve_support::{wait_until, Serve};

/// The ids usbroute derives for the two devices the rules pass.
pub(crate) const EXPECTED: [&str; 2] = ["usbroute-id-46f4-0001", "usbroute-port-1-2.1"];

/// The recorded test-bed guest: a mouse at 1-2.1 (behind the hub 1-2), USB 3 storage at 2-3.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/guest-xhci-ehci"
);

pub(crate) struct Bed {
    dir: tempfile::TempDir,
}

impl Bed {
    pub(crate) fn new() -> Bed {
        let bed = Bed {
            dir: tempfile::tempdir().unwrap(),
        };
        bed.write_config();
        bed
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The mouse by port, the USB 3 disk by id, and a rule naming the hub.
    pub(crate) fn write_config(&self) {
        let config = format!(
            "[[vm]]\nname = \"guest\"\nqmp = \"{}\"\n\n\
             [[rule]]\nvm = \"guest\"\nmatch = \"port:1-2.1\"\nby = \"port\"\n\n\
             [[rule]]\nvm = \"guest\"\nmatch = \"port:2-3\"\nby = \"id\"\n\n\
             [[rule]]\nvm = \"guest\"\nmatch = \"port:1-2\"\nby = \"port\"\n",
            self.path("guest.qmp").display()
        );
        std::fs::write(self.path("usbroute.toml"), config).unwrap();
    }

    /// Start QEMU without waiting for it.
    pub(crate) fn spawn_qemu(&self) -> QemuAt {
        QemuAt::spawn(
            &[&self.path("guest.qmp"), &self.path("probe.qmp")],
            &[
                "-machine",
                "q35",
                "-m",
                "64",
                "-device",
                "qemu-xhci,id=xhci",
            ],
        )
    }

    /// Start QEMU and wait until it serves QMP.
    pub(crate) fn qemu(&self) -> QemuAt {
        let qemu = self.spawn_qemu();
        wait_until(Duration::from_secs(20), "QEMU's probe QMP socket", || {
            UnixStream::connect(self.path("probe.qmp")).is_ok()
        });
        qemu
    }

    /// The daemon's VM is up and the daemon is at rest (`status.at_rest`).
    pub(crate) fn at_rest(&self) -> bool {
        let status: serde_json::Value =
            serde_json::from_str(&self.cli(&["status", "--json"])).unwrap();
        status["vms"][0]["up"] == true && status["at_rest"] == true
    }

    pub(crate) fn daemon(&self) -> Serve {
        self.daemon_with(&[])
    }

    pub(crate) fn daemon_with(&self, extra: &[&str]) -> Serve {
        self.daemon_on(Path::new(FIXTURE), extra)
    }

    /// The daemon reading sysfs under `sysfs` (a copy of the fixture a test may break).
    pub(crate) fn daemon_on(&self, sysfs: &Path, extra: &[&str]) -> Serve {
        Serve::at(self.path("control.sock"))
            .args(&["-vv"])
            .args(extra)
            .config(self.path("usbroute.toml"))
            .sysfs_root(sysfs)
            .start()
    }

    pub(crate) fn cli(&self, args: &[&str]) -> String {
        serve_support::cli(&self.path("control.sock"), args)
    }

    /// `usbroute ARGS` that must fail: its stderr.
    pub(crate) fn cli_fails(&self, args: &[&str]) -> String {
        serve_support::cli_fails(&self.path("control.sock"), args)
    }

    /// The usb-host ids QEMU has, read through the probe monitor (none while that
    /// monitor is not up yet, as right after a QEMU restart).
    pub(crate) fn usb_hosts(&self) -> Vec<String> {
        let Ok(stream) = UnixStream::connect(self.path("probe.qmp")) else {
            return Vec::new();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut reply = |cmd: &str| -> serde_json::Value {
            writer.write_all(cmd.as_bytes()).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if v.get("return").is_some() || v.get("error").is_some() {
                    return v;
                }
            }
        };
        reply("{\"execute\":\"qmp_capabilities\"}\n");
        let list =
            reply("{\"execute\":\"qom-list\",\"arguments\":{\"path\":\"/machine/peripheral\"}}\n");
        let mut ids: Vec<String> = list["return"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] == "child<usb-host>")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    pub(crate) fn wait_for_hosts(&self, within: Duration) -> Duration {
        let start = Instant::now();
        wait_until(within, "QEMU to have the expected usb-host devices", || {
            self.usb_hosts() == EXPECTED
        });
        start.elapsed()
    }
}

/// Which file is at `path`: inode and change time (a new socket may reuse the inode number).
fn identity(path: &Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

#[test]
fn serve_attaches_matching_devices_at_start() {
    let bed = Bed::new();
    let _qemu = bed.qemu();

    let _daemon = bed.daemon();

    bed.wait_for_hosts(Duration::from_secs(15));
    assert_eq!(bed.usb_hosts(), EXPECTED);
}

#[test]
fn daemon_sigkill_and_restart_leaves_the_same_usb_host_set() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));
    let before = bed.usb_hosts();

    daemon.kill();
    let _daemon = bed.daemon();
    // At rest: it has listed the VM, planned every device and has nothing in flight, so
    // anything it would (wrongly) change is changed by now.
    wait_until(
        Duration::from_secs(10),
        "the restarted daemon to see the VM up and come to rest",
        || bed.at_rest(),
    );

    assert_eq!(bed.usb_hosts(), before);
}

#[test]
fn restarted_qemu_gets_its_devices_back_within_two_seconds() {
    let bed = Bed::new();
    let qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));
    // SIGKILL leaves the old socket file behind (as a crash does); the new QEMU replaces it.
    let old_socket = identity(&bed.path("guest.qmp"));

    qemu.kill();
    let _qemu = bed.spawn_qemu();
    wait_until(Duration::from_secs(20), "the new QMP socket", || {
        let now = identity(&bed.path("guest.qmp"));
        now.is_some() && now != old_socket
    });
    let took = bed.wait_for_hosts(Duration::from_secs(10));

    assert!(
        took <= Duration::from_secs(2),
        "devices back after {took:?}"
    );
}

#[test]
fn hub_rule_attaches_nothing_and_why_says_hubs_cannot_be_passed() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));

    let why = bed.cli(&["why", "port:1-2"]);

    assert_eq!(bed.usb_hosts(), EXPECTED, "nothing for the hub 1-2");
    assert!(why.contains("hubs cannot be passed to a VM"), "{why}");
}

fn ask(bed: &Bed, request: usbroute::daemon::Request) -> usbroute::daemon::Reply {
    usbroute::daemon::request(&bed.path("control.sock"), &request).unwrap()
}

#[test]
fn manual_attach_is_confirmed_by_the_vm_and_manual_detach_removes_it() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));

    let attached = ask(
        &bed,
        usbroute::daemon::Request::Attach {
            selector: "port:1-4".into(),
            vm: "guest".into(),
            by: Some(usbroute::backend::AttachMode::Port),
        },
    );
    let with_tablet = bed.usb_hosts();
    let detached = ask(
        &bed,
        usbroute::daemon::Request::Detach {
            selector: "port:1-4".into(),
        },
    );
    let without_tablet = bed.usb_hosts();

    assert_eq!(
        attached,
        usbroute::daemon::Reply::done("1-4 attached to VM guest (confirmed by the VM)")
    );
    assert!(
        with_tablet.contains(&"usbroute-port-1-4".to_string()),
        "{with_tablet:?}"
    );
    assert!(
        matches!(detached, usbroute::daemon::Reply::Done { .. }),
        "{detached:?}"
    );
    assert_eq!(without_tablet, EXPECTED);
}

#[test]
fn manual_attach_to_an_unknown_vm_is_refused_with_the_known_ones() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();

    let reply = ask(
        &bed,
        usbroute::daemon::Request::Attach {
            selector: "port:1-4".into(),
            vm: "nope".into(),
            by: None,
        },
    );

    assert_eq!(
        reply,
        usbroute::daemon::Reply::error(
            usbroute::daemon::ErrorKind::NotFound,
            "no VM named `nope` in the config (known: guest)"
        )
    );
}

#[test]
fn reload_with_a_bad_config_keeps_the_running_one_and_says_where() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));
    std::fs::write(
        bed.path("usbroute.toml"),
        "[[rule]]\nvm = \"guest\"\nmatch = \"port:9-9-9\"\n",
    )
    .unwrap();

    let reply = ask(&bed, usbroute::daemon::Request::Reload {});

    let usbroute::daemon::Reply::Error { message, .. } = reply else {
        panic!("reload of a bad file succeeded")
    };
    assert!(message.contains("usbroute.toml:3:"), "{message}");
    assert!(
        message.contains("the running config stays in force"),
        "{message}"
    );
    assert_eq!(bed.usb_hosts(), EXPECTED);
}

#[test]
fn status_places_each_device_and_counts_a_kind_by_id_only_for_the_planned_device() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));

    let status: serde_json::Value = serde_json::from_str(&bed.cli(&["status", "--json"])).unwrap();

    let location = |port: &str| {
        status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["port"] == port)
            .unwrap()["location"]
            .clone()
    };
    assert_eq!(location("1-2.1"), "guest");
    assert_eq!(location("2-3"), "guest");
    // 3-1 is the same kind (46f4:0001) as 2-3, which goes by id; only 2-3 is planned there.
    assert_eq!(location("3-1"), "host");
    assert_eq!(location("1-2"), "host");
    assert_eq!(status["vms"][0]["up"], true);
}

#[test]
fn daemon_managing_names_the_vm_of_a_qmp_socket() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    let cli = usbroute::cli::Cli::try_parse_from([
        "usbroute",
        "--control",
        bed.path("control.sock").to_str().unwrap(),
        "status",
    ])
    .unwrap();

    let managed = usbroute::cli::daemon::daemon_managing(&cli.global, &bed.path("guest.qmp"));
    let unmanaged = usbroute::cli::daemon::daemon_managing(&cli.global, &bed.path("other.qmp"));

    assert_eq!(managed.as_deref(), Some("guest"));
    assert_eq!(unmanaged, None);
}

#[test]
fn dry_run_attaches_nothing_and_says_so() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon_with(&["--dry-run"]);
    wait_until(
        Duration::from_secs(10),
        "the dry-run daemon to see the VM up and come to rest",
        || bed.at_rest(),
    );

    let status: serde_json::Value = serde_json::from_str(&bed.cli(&["status", "--json"])).unwrap();

    assert_eq!(bed.usb_hosts(), Vec::<String>::new());
    assert_eq!(status["dry_run"], true);
}

#[test]
fn sighup_with_a_new_rule_attaches_its_device() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));
    let mut config = std::fs::read_to_string(bed.path("usbroute.toml")).unwrap();
    config.push_str("\n[[rule]]\nvm = \"guest\"\nmatch = \"port:1-4\"\nby = \"port\"\n");
    std::fs::write(bed.path("usbroute.toml"), config).unwrap();

    daemon.signal(nix::sys::signal::Signal::SIGHUP);

    wait_until(
        Duration::from_secs(10),
        "the new rule's device in QEMU",
        || bed.usb_hosts().contains(&"usbroute-port-1-4".to_string()),
    );
    assert_eq!(
        bed.usb_hosts(),
        [
            "usbroute-id-46f4-0001",
            "usbroute-port-1-2.1",
            "usbroute-port-1-4"
        ]
    );
}

#[test]
fn manual_attach_without_by_takes_the_passing_rules_mode() {
    let bed = Bed::new();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();
    bed.wait_for_hosts(Duration::from_secs(15));

    // Rule 1 passes 1-2.1 to guest by port; by address it would be a different usb-host.
    let reply = ask(
        &bed,
        usbroute::daemon::Request::Attach {
            selector: "port:1-2.1".into(),
            vm: "guest".into(),
            by: None,
        },
    );

    assert_eq!(
        reply,
        usbroute::daemon::Reply::done("1-2.1 attached to VM guest (confirmed by the VM)")
    );
    assert_eq!(bed.usb_hosts(), EXPECTED);
}

#[test]
fn unreadable_usb_listing_on_reload_keeps_every_device_in_the_vm_and_says_so() {
    let bed = Bed::new();
    let sysfs = bed.path("sysfs");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(FIXTURE)
        .arg(&sysfs)
        .status()
        .unwrap();
    assert!(copied.success());
    let _qemu = bed.qemu();
    let _daemon = bed.daemon_on(&sysfs, &[]);
    bed.wait_for_hosts(Duration::from_secs(15));
    // A file where the listing should be: reading it fails (ENOTDIR) as EMFILE or EIO do.
    let listing = sysfs.join("sys/bus/usb/devices");
    std::fs::rename(&listing, bed.path("devices.saved")).unwrap();
    std::fs::write(&listing, "").unwrap();

    bed.cli(&["reload"]);
    wait_until(
        Duration::from_secs(10),
        "status to report the failed scan",
        || {
            bed.cli(&["status", "--json"])
                .contains("\"sysfs_error\": \"cannot read /sys/bus/usb/devices")
        },
    );
    // `why` goes through the engine after the reload's inputs: any detach is under way.
    bed.cli(&["why", "port:1-2.1"]);

    assert_eq!(bed.usb_hosts(), EXPECTED);
    assert!(bed.cli(&["status"]).contains("1-2.1"));
}

#[test]
fn status_is_not_at_rest_while_an_attach_waits_for_its_retry() {
    let bed = Bed::new();
    // By address: QEMU must open the device now, and this host has no USB, so the
    // attach fails and waits for its retry.
    let mut config = std::fs::read_to_string(bed.path("usbroute.toml")).unwrap();
    config = config.replace(
        "match = \"port:1-2.1\"\nby = \"port\"",
        "match = \"port:1-2.1\"\nby = \"address\"",
    );
    std::fs::write(bed.path("usbroute.toml"), config).unwrap();
    let _qemu = bed.qemu();
    let _daemon = bed.daemon();

    wait_until(
        Duration::from_secs(15),
        "the by-address attach to fail and wait for its retry",
        || bed.cli(&["status", "--json"]).contains("\"attempts\""),
    );
    let status: serde_json::Value = serde_json::from_str(&bed.cli(&["status", "--json"])).unwrap();

    assert_eq!(status["at_rest"], false, "{status:#}");
}
