//! What an attach costs over QMP, against the cheapest QMP round trip on the same socket.
//!
//! One real QEMU (q35, qemu-xhci, paused), one connection. Measured side by side, each
//! sample one full round trip:
//! - `query-status`: the baseline, one command and its reply;
//! - `device_add` + `device_del` + DEVICE_DELETED: the raw QMP work of attach and detach;
//! - backend attach + detach: what `usbroute serve` does to attach by id and detach
//!   (`device_add` and the read of `attached` in one write, on the buses the connection
//!   listed when it was made; `device_del`, wait for the event).
//!
//! Run: `cargo bench --bench qmp` (`-- N` to set the attach sample count, default 200).
//! Under `cargo test` (no `--bench` argument) it runs 3 samples as a smoke test.

#[path = "../tests/qemu_support/mod.rs"]
mod qemu_support;

use qemu_support::{host_device, QemuGuard};
use serde_json::json;
use std::time::{Duration, Instant};
use usbroute::backend::qemu::qmp::Qmp;
use usbroute::backend::qemu::{QemuBackend, QemuOptions};
use usbroute::backend::AttachMode;

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let samples: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(if smoke { 3 } else { 200 });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let qemu = QemuGuard::q35(&["-device", "qemu-xhci,id=xhci"]);
    runtime.block_on(run(&qemu, samples));
}

async fn run(qemu: &QemuGuard, samples: usize) {
    let vm = QemuBackend::connect(qemu.socket(), QemuOptions::default())
        .await
        .expect("connect");
    // As the daemon's connector does: the VM's buses are listed with the connection.
    vm.learn_buses().await.expect("buses listed");
    let qmp = vm.qmp().clone();
    let mouse = host_device("1-3", 7, 0x046d, 0xc016, 12.0);

    // Warm up QEMU's and our own first-use paths.
    for _ in 0..samples.min(20) {
        query_status(&qmp).await;
        raw_attach_detach(&qmp).await;
        backend_attach_detach(&vm, &mouse).await;
    }

    let mut status = Vec::new();
    let (mut raw_add, mut raw_del, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut attach, mut detach, mut backend) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so drift in machine load hits all alike; each attach comes after the
    // same five query-status round trips behind a detach, so both meet QEMU in the same
    // state (the backend's attach used to follow the raw detach directly).
    for _ in 0..samples {
        for _ in 0..5 {
            status.push(query_status(&qmp).await);
        }
        let (a, d) = raw_attach_detach(&qmp).await;
        raw_add.push(a);
        raw_del.push(d);
        raw.push(a + d);
        for _ in 0..5 {
            status.push(query_status(&qmp).await);
        }
        let (a, d) = backend_attach_detach(&vm, &mouse).await;
        attach.push(a);
        detach.push(d);
        backend.push(a + d);
    }

    let base = percentiles(&mut status);
    println!("QMP round trips on one socket to qemu-system-x86_64 (q35, qemu-xhci, paused, TCG)");
    println!(
        "{:44} {:>7} {:>10} {:>10} {:>8} {:>8}",
        "operation", "samples", "p50", "p99", "p50 x", "p99 x"
    );
    report("query-status (baseline)", status.len(), base, base);
    for (name, samples) in [
        ("raw device_add (usb-host by id)", &mut raw_add),
        ("backend attach --by id", &mut attach),
        ("raw device_del + wait DEVICE_DELETED", &mut raw_del),
        ("backend detach", &mut detach),
        ("raw attach + detach", &mut raw),
        ("backend attach + detach", &mut backend),
    ] {
        let p = percentiles(samples);
        report(name, samples.len(), p, base);
    }
}

async fn query_status(qmp: &Qmp) -> Duration {
    let start = Instant::now();
    qmp.execute("query-status", None)
        .await
        .expect("query-status");
    start.elapsed()
}

/// (device_add, device_del until DEVICE_DELETED).
async fn raw_attach_detach(qmp: &Qmp) -> (Duration, Duration) {
    let start = Instant::now();
    let mut events = qmp.events();
    qmp.execute(
        "device_add",
        Some(json!({"driver": "usb-host", "id": "bench", "bus": "xhci.0",
                    "vendorid": 0x046d, "productid": 0xc016})),
    )
    .await
    .expect("device_add");
    let added = start.elapsed();
    let start = Instant::now();
    qmp.execute("device_del", Some(json!({"id": "bench"})))
        .await
        .expect("device_del");
    loop {
        let event = events.recv().await.expect("event");
        if event.name == "DEVICE_DELETED" && event.data["device"] == "bench" {
            break;
        }
    }
    (added, start.elapsed())
}

/// (attach, detach) through the backend.
async fn backend_attach_detach(
    vm: &QemuBackend,
    device: &usbroute::inventory::Device,
) -> (Duration, Duration) {
    let start = Instant::now();
    let attached = vm
        .attach_device(device, AttachMode::Id)
        .await
        .expect("attach");
    let added = start.elapsed();
    let start = Instant::now();
    vm.detach_id(&attached.device.id).await.expect("detach");
    (added, start.elapsed())
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

fn report(
    name: &str,
    n: usize,
    (p50, p99): (Duration, Duration),
    (b50, b99): (Duration, Duration),
) {
    let us = |d: Duration| format!("{:.1} us", d.as_secs_f64() * 1e6);
    println!(
        "{name:44} {n:>7} {:>10} {:>10} {:>7.1}x {:>7.1}x",
        us(p50),
        us(p99),
        p50.as_secs_f64() / b50.as_secs_f64(),
        p99.as_secs_f64() / b99.as_secs_f64()
    );
}
