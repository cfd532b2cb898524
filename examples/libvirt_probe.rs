//! Exercise the native libvirt client against a REAL daemon, by hand (not in CI: it needs
//! libvirt's daemon running as root and a defined QEMU domain):
//!
//! ```text
//! apt-get install -t bookworm-backports libvirt-daemon-driver-qemu libvirt-clients
//! libvirtd &   # or virtqemud; virtlogd too, for QEMU's log
//! virsh define tiny.xml && virsh start tiny   # TCG, no disk, a qemu-xhci controller
//! cargo run --example libvirt_probe -- tiny [qemu:///system] [--idle] [--wait-close]
//! ```
//!
//! tiny.xml: `<domain type='qemu'><name>tiny</name><memory unit='MiB'>64</memory>
//! <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
//! <emulator>/usr/bin/qemu-system-x86_64</emulator><controller type='usb' model='qemu-xhci'/>
//! </devices></domain>`.
//!
//! It looks up an unknown domain (None) and the named one, times DOMAIN_GET_STATE (p50 of
//! 100) and makes 50 at once, reads the live XML, attaches a USB host device that does not
//! exist (libvirt's error), attaches a USB tablet with a `ua-` alias and detaches it by
//! alias (the DEVICE_REMOVED event), destroys and starts the domain through `virsh` to see
//! the lifecycle events and the error of an attach to a stopped domain. `--idle` then
//! waits 40 s without a call (past the daemon's 5 s x 5 keepalive window) and calls again;
//! `--wait-close` then waits up to 120 s for the connection to close (stop the daemon
//! meanwhile) and shows that a call after it fails.
//! `RUST_LOG=usbroute=trace` shows every packet's size.

use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;
use usbroute::backend::libvirt::rpc::{Connection, DomainEvent, LibvirtUri, Lifecycle};

const TABLET: &str = "<input type='tablet' bus='usb'><alias name='ua-probe-tablet'/></input>";
const MISSING_USB: &str = "<hostdev mode='subsystem' type='usb' managed='yes'><source>\
    <vendor id='0xdead'/><product id='0xbeef'/></source><alias name='ua-id-dead-beef'/></hostdev>";

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match probe().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("libvirt_probe: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn probe() -> Result<(), Box<dyn std::error::Error>> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::ERROR));
    tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .finish()
        .with(filter)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("ua-probe", String::as_str);
    let uri_text = args
        .get(1)
        .filter(|a| !a.starts_with("--"))
        .map_or("qemu:///system", String::as_str);
    let uri = LibvirtUri::parse(uri_text)?;

    let started = Instant::now();
    let (conn, mut events) = Connection::open(&uri).await?;
    println!(
        "open: {} in {:?}",
        conn.socket().display(),
        started.elapsed()
    );

    println!(
        "lookup unknown: {:?}",
        conn.lookup_domain("ua-no-such-domain").await?
    );
    let dom = conn
        .lookup_domain(name)
        .await?
        .ok_or("no such domain: define it first")?;
    println!("lookup {name}: id {} uuid {:02x?}", dom.id, &dom.uuid[..4]);
    println!("running: {}", conn.is_running(&dom).await?);

    let mut rtts = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        conn.is_running(&dom).await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    println!("DOMAIN_GET_STATE p50 {:?} p99 {:?}", rtts[50], rtts[98]);

    // Concurrent calls on one connection, matched by serial.
    let t = Instant::now();
    let calls = (0..50).map(|_| conn.is_running(&dom));
    let all = futures_util::future::join_all(calls).await;
    let ok = all.iter().filter(|r| matches!(r, Ok(true))).count();
    println!(
        "50 concurrent GET_STATE: {ok} answered running in {:?}",
        t.elapsed()
    );

    let xml = conn.domain_xml(&dom).await?;
    println!(
        "live XML: {} bytes, has qemu-xhci: {}",
        xml.len(),
        xml.contains("qemu-xhci")
    );

    match conn.attach_device_live(&dom, MISSING_USB).await {
        Ok(()) => println!("attach of a missing USB device: unexpectedly OK"),
        Err(e) => println!(
            "attach of a missing USB device: {e} (code {:?})",
            e.libvirt_code()
        ),
    }

    conn.attach_device_live(&dom, TABLET).await?;
    println!(
        "attached the tablet: in live XML: {}",
        conn.domain_xml(&dom).await?.contains("ua-probe-tablet")
    );
    let t = Instant::now();
    conn.detach_device_alias_live(&dom, "ua-probe-tablet")
        .await?;
    let removed = wait_for(
        &mut events,
        |e| matches!(e, DomainEvent::DeviceRemoved { alias, .. } if alias == "ua-probe-tablet"),
    )
    .await;
    println!(
        "detach by alias: DeviceRemoved {removed} after {:?}",
        t.elapsed()
    );

    virsh(&["destroy", name]);
    let stopped = wait_for(&mut events, |e| lifecycle_is(e, Lifecycle::Stopped)).await;
    println!(
        "destroy: Stopped event {stopped}, running now: {}",
        conn.is_running(&dom).await?
    );
    match conn.attach_device_live(&dom, TABLET).await {
        Ok(()) => println!("attach to a stopped domain: unexpectedly OK"),
        Err(e) => println!(
            "attach to a stopped domain: {e} (code {:?})",
            e.libvirt_code()
        ),
    }
    virsh(&["start", name]);
    let started_ev = wait_for(&mut events, |e| lifecycle_is(e, Lifecycle::Started)).await;
    println!(
        "start: Started event {started_ev}, running now: {}",
        conn.is_running(&dom).await?
    );

    if args.iter().any(|a| a == "--idle") {
        tokio::time::sleep(Duration::from_secs(40)).await;
        println!(
            "after 40 s idle: running {:?}",
            conn.is_running(&dom).await.map_err(|e| e.to_string())
        );
    }
    if args.iter().any(|a| a == "--wait-close") {
        println!("waiting for the connection to close: stop the daemon now");
        let closed = timeout(Duration::from_secs(120), conn.closed())
            .await
            .is_ok();
        println!(
            "closed: {closed}; a call now: {:?}",
            conn.is_running(&dom).await.map_err(|e| e.to_string())
        );
    }
    Ok(())
}

fn lifecycle_is(e: &DomainEvent, want: Lifecycle) -> bool {
    matches!(e, DomainEvent::Lifecycle { event, .. } if *event == want)
}

/// Wait up to 20 s for an event matching `want`, printing every event seen.
async fn wait_for(
    events: &mut UnboundedReceiver<DomainEvent>,
    want: impl Fn(&DomainEvent) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.recv()).await {
        println!("  event: {e:?}");
        if want(&e) {
            return true;
        }
    }
    false
}

fn virsh(args: &[&str]) {
    let status = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .status();
    println!(
        "virsh {}: {:?}",
        args.join(" "),
        status.map(|s| s.success())
    );
}
