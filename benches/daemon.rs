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

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use usbroute::backend::qemu::{QemuBackend, QemuOptions};
use usbroute::backend::VmBackend;
use usbroute::config::Config;
use usbroute::engine::{reconcile, Action, Actual, VmView};
use usbroute::events::{Received, Trigger, UeventSocket};
use usbroute::inventory::synth::{PciFunction, SysfsBuilder, UsbDevice};
use usbroute::policy::{plan, PlanInput};
use usbroute::sysfs::SysfsRoot;

#[path = "support/daemon_peers.rs"]
mod peers;
use peers::{control_line, qmp_commands, status, wait_for, Daemon, Percentiles, Qemu};

const DEVICE_UEVENT: &str = "/sys/devices/virtual/mem/null/uevent";
/// The recorded test-bed guest: its mouse at 1-2.1 is what the pipeline attaches.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/guest-xhci-ehci"
);

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
    let raw_add = raw_device_add(&qemu.qmp, iterations);
    println!("{}", raw_add.line("(a2) raw QMP device_add usb-host alone"));
    let socat = socat_per_event(dir.path(), &qemu.qmp, iterations.min(200));
    println!("{}", socat.line("(b) udev-style script, socat per event"));
    let (pipeline, deciding) = rt.block_on(usbroute_pipeline(&qemu.qmp, iterations));
    println!(
        "{}",
        pipeline.line("(c) usbroute: uevent receipt → device_add confirmed")
    );
    println!(
        "{}",
        deciding.line("    of which receipt → scan, plan, diff done")
    );
    let daemon = through_daemon(dir.path(), iterations.min(200));
    println!(
        "{}",
        daemon.line("(d) usbroute serve: control attach → confirmed")
    );
    let receipt = rt.block_on(uevent_receipt(iterations));
    println!(
        "{}",
        receipt.line("    uevent write → receipt (kernel path alone)")
    );
    println!(
        "    p50 ratios: usbroute/raw {:.1}x, socat/raw {:.1}x, socat/usbroute {:.1}x",
        pipeline.p50() / raw.p50(),
        socat.p50() / raw.p50(),
        socat.p50() / pipeline.p50()
    );

    println!("== event storm");
    let seconds = if full { 5 } else { 1 };
    let rate = if full { 10_000 } else { 1_000 };
    println!("   8 MiB buffer (SO_RCVBUFFORCE), listener always reading:");
    rt.block_on(storm(rate, seconds, 8 << 20, Duration::ZERO));
    println!(
        "   208 KiB buffer (the default rmem_max), listener stalled 1 s mid-storm (a slow rescan):"
    );
    rt.block_on(storm(rate, seconds, 212_992, Duration::from_secs(1)));

    println!("== scale");
    scale(if full { 64 } else { 2 });
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

/// (a2) QEMU's own cost of a usb-host `device_add` (by port), on an open connection;
/// each is removed again (not timed).
fn raw_device_add(qmp: &Path, n: usize) -> Percentiles {
    let stream = UnixStream::connect(qmp).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    let mut reply = |cmd: &str| -> String {
        writer.write_all(cmd.as_bytes()).unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line.clone();
            }
        }
    };
    // The greeting carries no "return": the first reply() skips it.
    reply("{\"execute\":\"qmp_capabilities\"}\n");
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = reply("{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"usb-host\",\"bus\":\"xhci.0\",\"hostbus\":1,\"hostport\":\"2.1\",\"id\":\"raw\"}}\n");
        samples.push(t.elapsed());
        assert!(r.contains("\"return\""), "{r}");
        reply("{\"execute\":\"device_del\",\"arguments\":{\"id\":\"raw\"}}\n");
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

/// (c) What serve does for an event, in one task: receive the kernel's uevent on the
/// netlink socket, rescan sysfs (the recorded guest), plan, diff, and `device_add` through
/// the QEMU backend until QEMU confirms. Timed from receipt. The usb-host is removed
/// again after each sample (not timed).
async fn usbroute_pipeline(qmp: &Path, n: usize) -> (Percentiles, Percentiles) {
    let root = SysfsRoot::new(FIXTURE);
    let text = format!(
        "[[vm]]\nname = \"bench\"\nqmp = \"{}\"\n[[rule]]\nvm = \"bench\"\nmatch = \"port:1-2.1\"\nby = \"port\"\n",
        qmp.display()
    );
    let config = Config::parse(&text, None).unwrap();
    let backend = QemuBackend::connect(qmp, QemuOptions::default())
        .await
        .unwrap();
    let mut sock = UeventSocket::open().unwrap();
    let up = BTreeSet::from(["bench".to_string()]);
    let (overrides, mounted, owned) = (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
    let mut samples = Vec::with_capacity(n);
    let mut deciding = Vec::with_capacity(n);
    for i in 0..n {
        let uuid = format!("{:08x}-0000-4000-8000-{i:012x}", std::process::id() + 1);
        std::fs::write(DEVICE_UEVENT, format!("change {uuid}")).unwrap();
        let t = loop {
            if let Received::Event(ev) = sock.recv().await {
                if ev.env.get("SYNTH_UUID") == Some(&uuid) {
                    break Instant::now();
                }
            }
        };
        let snapshot = usbroute::inventory::scan(&root);
        let input = PlanInput {
            rules: &config.rules,
            devices: &snapshot.devices,
            mounted_disks: &mounted,
            vms_up: &up,
            backends: &Default::default(),
            overrides: &overrides,
            follows: &Default::default(),
            controllers_owned: &owned,
        };
        let desired = plan(&input);
        let actual = Actual::from([(
            "bench".to_string(),
            VmView {
                devices: vec![],
                reachable: true,
            },
        )]);
        let actions = reconcile(&desired, &actual, &snapshot.devices);
        deciding.push(t.elapsed());
        let mut attached = Vec::new();
        for action in actions {
            if let Action::Attach { device, mode, .. } = action {
                attached.push(backend.attach(&device, mode).await.unwrap().id);
            }
        }
        samples.push(t.elapsed());
        assert_eq!(attached, ["usbroute-port-1-2.1"]);
        for id in attached {
            backend.detach_id(&id).await.unwrap();
        }
    }
    (Percentiles::new(samples), Percentiles::new(deciding))
}

/// (d) The whole daemon: `attach` over the control socket until the reply says the VM
/// confirmed (plan, diff, engine, QMP, the VM's own list), then `detach` (not timed).
fn through_daemon(dir: &Path, n: usize) -> Percentiles {
    let qmp = dir.join("serve.qmp");
    let _qemu = Qemu::start(&qmp);
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!("[[vm]]\nname = \"serve\"\nqmp = \"{}\"\n", qmp.display()),
    )
    .unwrap();
    let control = dir.join("serve.sock");
    let daemon = Daemon::start(&config, Path::new(FIXTURE), &control);
    wait_for(Duration::from_secs(20), || {
        status(&control)["vms"][0]["up"] == true
    });
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let reply = control_line(
            &control,
            "{\"request\":\"attach\",\"selector\":\"port:1-4\",\"vm\":\"serve\",\"by\":\"port\"}",
        );
        samples.push(t.elapsed());
        assert!(reply.contains("confirmed by the VM"), "{reply}");
        let reply = control_line(
            &control,
            "{\"request\":\"detach\",\"selector\":\"port:1-4\"}",
        );
        assert!(reply.contains("\"done\""), "{reply}");
    }
    drop(daemon);
    Percentiles::new(samples)
}

/// A device of the scale fixture.
fn scale_device(port: &str, devnum: u16, class: u8, product: u16) -> UsbDevice<'_> {
    UsbDevice {
        port,
        devnum,
        vendor: 0x1234,
        product,
        class,
        speed: "480",
        manufacturer: None,
        product_name: None,
        serial: None,
        interfaces: vec![(class.max(3), None)],
    }
}

/// A host with `vms` × 8 devices: bus b, root port p holds a hub, 8 devices behind it.
/// Returns the config: VM i gets `hub:B-P` by port.
fn scale_fixture(dir: &Path, vms: usize) -> PathBuf {
    let sysfs = dir.join("sysfs");
    let b = SysfsBuilder::new(&sysfs);
    let buses = vms.div_ceil(8);
    let mut config = String::new();
    for bus in 1..=buses {
        let pci = format!("0000:00:{:02x}.0", bus + 3);
        b.pci(&PciFunction {
            address: &pci,
            class: 0x0c0330,
            vendor: 0x1b36,
            device: 0x000d,
            driver: Some("xhci_hcd"),
            iommu_group: Some(bus as u32),
        })
        .unwrap();
        b.bus(&pci, bus as u8, "480", "2.00", 8).unwrap();
        for port in 1..=8usize {
            let vm = (bus - 1) * 8 + port - 1;
            if vm >= vms {
                break;
            }
            let hub = format!("{bus}-{port}");
            b.device(&scale_device(&hub, (port * 9) as u16, 9, 0x0001))
                .unwrap();
            for leaf in 1..=8usize {
                let name = format!("{hub}.{leaf}");
                b.device(&scale_device(
                    &name,
                    (port * 9 + leaf) as u16,
                    0,
                    0x1000 + leaf as u16,
                ))
                .unwrap();
            }
            config.push_str(&format!(
                "[[vm]]\nname = \"vm{vm}\"\nqmp = \"{}\"\n\n[[rule]]\nvm = \"vm{vm}\"\nmatch = \"hub:{hub}\"\nby = \"port\"\n\n",
                dir.join(format!("vm{vm}.qmp")).display()
            ));
        }
    }
    let path = dir.join("usbroute.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// `vms` QEMUs, `vms` × 8 devices: time until every device is attached, and the daemon's RSS.
fn scale(vms: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = scale_fixture(dir.path(), vms);
    let qemus: Vec<Qemu> = (0..vms)
        .map(|i| Qemu::start(&dir.path().join(format!("vm{i}.qmp"))))
        .collect();
    let control = dir.path().join("control.sock");
    let start = Instant::now();
    let daemon = Daemon::start(&config, &dir.path().join("sysfs"), &control);
    let want = vms * 8;
    let deadline = Instant::now() + Duration::from_secs(300);
    let attached = loop {
        let n = attached_count(&control);
        if n >= want || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let converged = start.elapsed();
    let rss = rss_kb(daemon.0.id());
    let qemu_rss_kb: u64 = qemus.iter().map(|q| rss_kb(q.child.id())).sum();
    println!(
        "   {vms} VMs, {want} devices: {attached}/{want} in their VMs {:.2} s after start; daemon RSS {:.1} MiB (the {vms} QEMUs: {} MiB together)",
        converged.as_secs_f64(),
        rss as f64 / 1024.0,
        qemu_rss_kb / 1024
    );
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            })
        })
        .unwrap_or(0)
}

/// How many devices `status` places in a VM (where = a VM name).
fn attached_count(control: &Path) -> usize {
    status(control)["devices"]
        .as_array()
        .map_or(0, |d| d.iter().filter(|d| d["location"] != "host").count())
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
