//! The daemon, measured as it runs, side by side in one run (`cargo bench --bench
//! daemon`; needs root, qemu-system-x86_64 and socat). Every figure is latency to a
//! `device_add` QEMU confirmed, on small paused QEMUs (`-S`, one qemu-xhci each):
//!
//! - `raw_query_status`: one QMP round trip on an open, negotiated socket;
//! - `raw_device_add`: a usb-host `device_add` by port alone on such a socket (the
//!   floor: what QEMU itself needs);
//! - `raw_device_add_after_delete`: the same, each after the previous device's
//!   `DEVICE_DELETED`, the pause the uevent part's plugs come after (a control);
//! - `uevent_to_confirmed`: `usbroute serve` as a process on a copy of the recorded
//!   test-bed guest (`--sysfs-root`), its mouse (1-2.1) taken out and put back, and the
//!   kernel's uevents for each sent to its uevent input (`--uevent-socket`: the same
//!   parser and daemon code as the kernel's netlink, which cannot name a recorded
//!   device). Timed from the first uevent sent (the device's files are back by then, as
//!   the kernel has them before its uevent) to the time the daemon stamped on its log line saying the attach is done (QEMU's answer
//!   reached it; when the bench read the line is printed too): watching the log adds no
//!   round trip to the daemon's path (a second QMP monitor polling `query-usb` would compete
//!   with it for QEMU's main loop, and can only see what it polls for);
//! - `control_attach_to_confirmed`: `attach` over the same daemon's control socket until
//!   its reply says the VM confirmed;
//! - `socat_per_event`: a udev-style script, a shell and socat per event;
//! - `scale`: N QEMUs × M devices (synthetic sysfs), `usbroute serve` from start to
//!   every device attached, against a bare client sending the same `device_add`s (one
//!   connection per VM, all in parallel); the daemon's RSS once it is at rest after that;
//! - `idle_rss_kib`: the daemon's RSS with no config, once it answers at rest.
//!
//! Figures go to `target/bench/daemon.json` (a stable interface, read by regression
//! checks) and a table with ratios to the floor. Under `cargo test` (no `--bench`
//! argument) every part runs a few iterations on 4 VMs × 4 devices, writing
//! `target/bench/daemon-smoke.json` instead, so the bench stays working.
//!
//! `USBROUTE_BENCH_SCALE_ONLY=/path/to/usbroute` runs only the scale part with that binary
//! (for a profiler's wrapper). `USBROUTE_BENCH_BASELINE=/path/to/usbroute` runs the daemon's parts (uevent and
//! control latency, idle, scale) again with that binary (one built before a change) and
//! prints both side by side, with ratios.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

#[path = "support/daemon_peers.rs"]
mod peers;
#[path = "support/daemon_scale.rs"]
mod scale;
#[path = "support/daemon_uevents.rs"]
mod uevents;
use peers::{control_line, device_add_by_port, device_del, Daemon, Percentiles, Qemu, Qmp};

/// The recorded test-bed guest: its mouse at 1-2.1 is what a uevent brings.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/guest-xhci-ehci"
);
/// The daemon's id for the mouse attached by port.
const MOUSE_ID: &str = "usbroute-port-1-2.1";
/// How long one step of the daemon may take before the bench gives up.
const STEP: Duration = Duration::from_secs(30);

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    assert_eq!(
        peers::log_stamp("2026-12-02T05:27:55.930953Z  INFO attach done"),
        Some(SystemTime::UNIX_EPOCH + Duration::new(1_796_189_275, 930_953_000))
    );
    assert_eq!(
        peers::log_stamp("2000-02-29T23:59:59.5Z DEBUG x"),
        Some(SystemTime::UNIX_EPOCH + Duration::new(951_868_799, 500_000_000))
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "the daemon bench needs root (the daemon's control socket is made root-only)"
    );
    let n = if full { 500 } else { 5 };
    let (vms, per_vm) = if full { (64, 8) } else { (4, 4) };
    let dir = tempfile::tempdir().unwrap();
    if let Some(wrapper) = std::env::var_os("USBROUTE_BENCH_SCALE_ONLY") {
        // Profiling the scale part alone: `USBROUTE_BENCH_SCALE_ONLY=/path/to/usbroute`
        // (a wrapper script running it under heaptrack, say). Writes no figures.
        let scale = scale::run(Path::new(&wrapper), vms, per_vm);
        println!(
            "scale only: placed {} ms, RSS {} KiB ({} KiB anonymous)",
            scale.placed.as_millis(),
            scale.rss_kib,
            scale.anon_kib
        );
        return;
    }

    let idle_rss_kib = idle_rss(&peers::usbroute(), dir.path());
    let raw_qemu = Qemu::start(&dir.path().join("raw.qmp"));
    let raw_query_status = raw_round_trip(&raw_qemu.qmp, n);
    let back_to_back = raw_device_add(&raw_qemu.qmp, n, false);
    let after_delete = raw_device_add(&raw_qemu.qmp, n, true);
    let socat_per_event = socat_per_event(dir.path(), &raw_qemu.qmp, n.min(200));
    drop(raw_qemu);
    let (uevent_to_confirmed, control_attach_to_confirmed) =
        through_daemon(&peers::usbroute(), dir.path(), n);
    let scale = scale::run(&peers::usbroute(), vms, per_vm);

    let rows = [
        ("raw_query_status", &raw_query_status),
        ("raw_device_add", &back_to_back),
        ("raw_device_add_after_delete", &after_delete),
        ("uevent_to_confirmed", &uevent_to_confirmed),
        ("control_attach_to_confirmed", &control_attach_to_confirmed),
        ("socat_per_event", &socat_per_event),
    ];
    print_table(&rows, &scale, idle_rss_kib);
    let mut json = serde_json::Map::new();
    for (name, p) in rows {
        json.insert(name.to_string(), p.json());
    }
    json.insert(
        "scale".into(),
        serde_json::json!({
            "placed_ms": scale.placed.as_millis() as u64,
            "bare_ms": scale.bare.as_millis() as u64,
            "rss_kib": scale.rss_kib,
            "anon_kib": scale.anon_kib,
            "vms": scale.vms,
            "devices": scale.devices,
        }),
    );
    json.insert("idle_rss_kib".into(), idle_rss_kib.into());
    let path = bench_dir().join(if full {
        "daemon.json"
    } else {
        "daemon-smoke.json"
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::Value::Object(json)).unwrap() + "\n",
    )
    .unwrap();
    println!("figures written to {}", path.display());
    if let Some(baseline) = std::env::var_os("USBROUTE_BENCH_BASELINE") {
        let ours = (&uevent_to_confirmed, &control_attach_to_confirmed);
        compare_baseline(
            Path::new(&baseline),
            &dir.path().join("baseline"),
            (n, vms, per_vm),
            ours,
            &scale,
            idle_rss_kib,
        );
    }
}

/// The daemon's parts again with another `usbroute` binary (`USBROUTE_BENCH_BASELINE`,
/// say one built before a change), printed beside this build's figures of the same run.
fn compare_baseline(
    baseline: &Path,
    dir: &Path,
    (n, vms, per_vm): (usize, usize, usize),
    (uevent, control): (&Percentiles, &Percentiles),
    scale: &scale::ScaleFigures,
    idle_rss_kib: u64,
) {
    std::fs::create_dir_all(dir).unwrap();
    let (their_uevent, their_control) = through_daemon(baseline, dir, n);
    let idle = idle_rss(baseline, dir);
    let theirs = scale::run(baseline, vms, per_vm);
    println!("this build vs {} (p50 / p99 µs):", baseline.display());
    for (name, ours, theirs) in [
        ("uevent_to_confirmed", uevent, &their_uevent),
        ("control_attach_to_confirmed", control, &their_control),
    ] {
        println!(
            "  {name:<28} {:>8.1} / {:>8.1} vs {:>8.1} / {:>8.1} ({:.2}x / {:.2}x)",
            ours.p50(),
            ours.p99(),
            theirs.p50(),
            theirs.p99(),
            ours.p50() / theirs.p50(),
            ours.p99() / theirs.p99()
        );
    }
    println!(
        "  idle RSS {idle_rss_kib} KiB vs {idle} KiB ({:+} KiB)",
        idle_rss_kib as i64 - idle as i64
    );
    println!(
        "  {} VMs x {} devices: RSS {} KiB vs {} KiB ({:+} KiB); placed {} ms vs {} ms \
         ({:.2}x vs {:.2}x their runs' bare clients)",
        scale.vms,
        scale.devices,
        scale.rss_kib,
        theirs.rss_kib,
        scale.rss_kib as i64 - theirs.rss_kib as i64,
        scale.placed.as_millis(),
        theirs.placed.as_millis(),
        scale.placed.as_secs_f64() / scale.bare.as_secs_f64(),
        theirs.placed.as_secs_f64() / theirs.bare.as_secs_f64()
    );
}

/// `target/bench` (or under `CARGO_TARGET_DIR`).
fn bench_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench")
}

fn print_table(rows: &[(&str, &Percentiles)], scale: &scale::ScaleFigures, idle_rss_kib: u64) {
    // (p50, p99) of the row named `wanted`.
    let row = |wanted: &str| {
        rows.iter()
            .find(|(name, _)| *name == wanted)
            .map(|(_, p)| (p.p50(), p.p99()))
            .unwrap()
    };
    let floor = row("raw_device_add");
    println!(
        "{:<30} {:>11} {:>11} {:>5} {:>9} {:>9}",
        "path", "p50 µs", "p99 µs", "n", "p50/floor", "p99/floor"
    );
    for (name, p) in rows {
        println!(
            "{name:<30} {:>11.1} {:>11.1} {:>5} {:>8.2}x {:>8.2}x",
            p.p50(),
            p.p99(),
            p.0.len(),
            p.p50() / floor.0,
            p.p99() / floor.1
        );
    }
    println!("(floor: raw_device_add)");
    let (after_delete, uevent) = (
        row("raw_device_add_after_delete"),
        row("uevent_to_confirmed"),
    );
    println!(
        "uevent_to_confirmed above its floor: p50 +{:.0} µs / p99 +{:.0} µs over raw_device_add, +{:.0} / +{:.0} µs over raw_device_add_after_delete",
        uevent.0 - floor.0,
        uevent.1 - floor.1,
        uevent.0 - after_delete.0,
        uevent.1 - after_delete.1
    );
    println!(
        "scale: {} VMs x {} devices: usbroute serve placed all {:.0} ms after start, bare client {:.0} ms ({:.2}x); daemon RSS {} KiB ({:.1} MiB; {} KiB anonymous)",
        scale.vms,
        scale.devices,
        scale.placed.as_secs_f64() * 1e3,
        scale.bare.as_secs_f64() * 1e3,
        scale.placed.as_secs_f64() / scale.bare.as_secs_f64(),
        scale.rss_kib,
        scale.rss_kib as f64 / 1024.0,
        scale.anon_kib
    );
    println!(
        "idle: no config, RSS {idle_rss_kib} KiB ({:.1} MiB)",
        idle_rss_kib as f64 / 1024.0
    );
}

/// The daemon (`binary`) with no config on the recorded guest, its RSS once it answers
/// `status` at rest.
fn idle_rss(binary: &Path, dir: &Path) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let control = dir.join("idle.sock");
    let uevents = dir.join("idle-uevents.sock");
    let daemon = Daemon::start(
        binary,
        &control,
        &[
            "--sysfs-root".as_ref(),
            OsStr::new(FIXTURE),
            "--uevent-socket".as_ref(),
            uevents.as_os_str(),
        ],
    );
    peers::wait_at_rest(&control);
    daemon.rss_kib()
}

/// `query-status` on an open, negotiated QMP connection.
fn raw_round_trip(qmp: &Path, n: usize) -> Percentiles {
    let mut qmp = Qmp::connect(qmp);
    let samples = (0..n)
        .map(|_| {
            let t = Instant::now();
            qmp.ok("{\"execute\":\"query-status\"}");
            t.elapsed()
        })
        .collect();
    Percentiles::new(samples)
}

/// QEMU's own cost of a usb-host `device_add` (by port), on an open connection; each is
/// removed again (not timed), the next sent at once (`raw_device_add`, the floor) or after
/// the removed device's `DEVICE_DELETED` (`raw_device_add_after_delete`).
///
/// The second is the floor as the uevent part meets it: QEMU's unplug ends about 60 ms
/// after `device_del` answers, and each plug of the uevent part comes after the daemon's
/// detach is done, the machine idle meanwhile. It is a control: if the pause made QEMU
/// slower, the uevent part's distance from the back-to-back floor would not all be the
/// daemon's. On this machine the two agree (280 against 293 µs p50).
fn raw_device_add(qmp: &Path, n: usize, after_delete: bool) -> Percentiles {
    let mut qmp = Qmp::connect(qmp);
    let add = device_add_by_port("raw", 1, "2.1");
    let samples = (0..n)
        .map(|_| {
            let t = Instant::now();
            qmp.ok(&add);
            let took = t.elapsed();
            qmp.ok(&device_del("raw"));
            if after_delete {
                qmp.wait_event("DEVICE_DELETED", STEP);
            }
            took
        })
        .collect();
    Percentiles::new(samples)
}

/// What a udev `RUN+=` script does per event: a shell and socat, whose other end is a
/// second shell holding the QMP dialogue (negotiate, `device_add`), each answer waited
/// for. The common one-liner, `printf ... | socat - UNIX-CONNECT:...`, closes the
/// connection after its last line, and QEMU drops a command still queued when its client
/// goes: on this machine most of its attaches never happened.
fn socat_per_event(dir: &Path, qmp: &Path, n: usize) -> Percentiles {
    let dialogue = dir.join("qmp-dialogue.sh");
    std::fs::write(
        &dialogue,
        concat!(
            "#!/bin/sh\n",
            "# stdin: QEMU's lines, stdout: commands. $1: the device id.\n",
            "reply() { while read -r line; do case $line in *'\"return\"'*|*'\"error\"'*) return;; esac; done; }\n",
            "read -r greeting\n",
            "echo '{\"execute\":\"qmp_capabilities\"}'; reply\n",
            "echo '{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"usb-host\",\"bus\":\"xhci.0\",\"hostbus\":1,\"hostport\":\"2.1\",\"id\":\"'\"$1\"'\"}}'; reply\n",
        ),
    )
    .unwrap();
    let script = dir.join("attach.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# $1: QMP socket, $2: device id\nexec socat UNIX-CONNECT:\"$1\" EXEC:\"/bin/sh {} $2\"\n",
            dialogue.display()
        ),
    )
    .unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("socat{i}");
        let t = Instant::now();
        // Its exit status says little: socat fails when QEMU writes after the dialogue
        // ended (EPIPE). The device_del below is the proof that it attached.
        Command::new("/bin/sh")
            .arg(&script)
            .arg(qmp)
            .arg(&id)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("/bin/sh");
        samples.push(t.elapsed());
        // Not timed, on a connection of its own (QEMU serves one client per monitor); it
        // frees the xHCI port too (a usb-host holds one even while it waits for its device).
        let reply = Qmp::connect(qmp).command(&device_del(&id)).to_string();
        assert!(
            reply.contains("\"return\""),
            "the socat script did not attach {id} (is socat installed?): {reply}"
        );
    }
    Percentiles::new(samples)
}

/// `usbroute serve` on a copy of the recorded guest with a rule giving its mouse (1-2.1)
/// to a VM by port: (1) the mouse unplugged and plugged `n` times through the daemon's
/// uevent input, each plug timed to its "attach done"; (2) `attach` of another device
/// (1-4) over the control socket `n` times, timed to the reply, each detached again
/// (not timed).
fn through_daemon(usbroute: &Path, dir: &Path, n: usize) -> (Percentiles, Percentiles) {
    let qemu = Qemu::start(&dir.join("serve.qmp"));
    let mouse = uevents::RecordedDevice::copy(Path::new(FIXTURE), dir, "1-2.1");
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[[vm]]\nname = \"serve\"\nqmp = \"{}\"\n\n[[rule]]\nvm = \"serve\"\nmatch = \"port:1-2.1\"\nby = \"port\"\n",
            qemu.qmp.display()
        ),
    )
    .unwrap();
    let control = dir.join("serve.sock");
    let socket = dir.join("serve-uevents.sock");
    let mut daemon = Daemon::start(
        usbroute,
        &control,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--sysfs-root".as_ref(),
            mouse.root().as_os_str(),
            "--uevent-socket".as_ref(),
            socket.as_os_str(),
        ],
    );
    let feed = uevents::UeventFeed::to(&socket);
    let done = |verb: &'static str| move |line: &str| peers::done(line, verb, Some(MOUSE_ID));
    daemon.wait_line(STEP, done("attach"));
    let mut plugs = Vec::with_capacity(n);
    let mut read = Vec::with_capacity(n);
    for _ in 0..n {
        mouse.unplug(&feed);
        daemon.wait_line(STEP, done("detach"));
        // The clock starts with the first uevent, as the kernel sends it: its files are
        // in sysfs by then.
        mouse.put_back();
        let (t, wall) = (Instant::now(), SystemTime::now());
        mouse.announce(&feed);
        let (seen, stamped) = daemon.wait_stamped(STEP, done("attach"));
        // To the daemon's own stamp on "done" (when QEMU's answer reached it), not to
        // when this process read the line: the pipe and the reader thread are the
        // bench's, not the daemon's. Both are shown.
        plugs.push(stamped.duration_since(wall).unwrap_or_default());
        read.push(seen - t);
    }
    let read = Percentiles::new(read);
    println!(
        "(uevent_to_confirmed read by the bench from the daemon's log pipe: p50 {:.1} µs, p99 {:.1} µs)",
        read.p50(),
        read.p99()
    );

    let mut attaches = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let reply = control_line(
            &control,
            "{\"request\":\"attach\",\"selector\":\"port:1-4\",\"vm\":\"serve\",\"by\":\"port\"}",
        );
        attaches.push(t.elapsed());
        assert!(reply.contains("confirmed by the VM"), "{reply}");
        let reply = control_line(
            &control,
            "{\"request\":\"detach\",\"selector\":\"port:1-4\"}",
        );
        assert!(reply.contains("\"done\""), "{reply}");
    }
    drop(daemon);
    (Percentiles::new(plugs), Percentiles::new(attaches))
}
