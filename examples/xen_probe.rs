//! Exercise the Xen backend against a REAL Xen, by hand, in dom0 (not in CI: it needs
//! xenstored, xl and a PV domU created with `usbctrl=["type=qusb,version=2,ports=8"]`):
//!
//! ```text
//! cargo run --example xen_probe -- DOMAIN [--attach BUS:ADDR] [--detach BUS:ADDR] [--watch SECONDS]
//! ```
//!
//! It finds the domain's id, prints its qusb controllers and every port judged (free, ours,
//! ours but stale, someone else's) and the listing the engine would see; `--attach` attaches
//! the host device at BUS:ADDR (decimal, as `lsusb` prints them) the way the daemon would
//! (mark, `xl usbdev-attach`, port node confirmed) and times it; `--detach` detaches our
//! device for that address (xl, or the port node emptied when the device is gone);
//! `--watch` then prints the driver's presence events (up, gone, held) for that long:
//! destroy and create the domain meanwhile, or restart xenstored.

use std::time::{Duration, Instant};
use usbroute::backend::xen::client::{candidate_sockets, pick_socket, Xenstore, DEFAULT_TIMEOUT};
use usbroute::backend::xen::vm::XenVm;
use usbroute::backend::xen::xl::Xl;
use usbroute::backend::xen::{store, xenstore};
use usbroute::backend::{AttachKey, AttachMode, PresenceEvent, VmBackend, VmTarget};
use usbroute::sysfs::SysfsRoot;

type Failed = Box<dyn std::error::Error>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match probe().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xen_probe: {}", usbroute::error_chain::one_line(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `BUS:ADDR` in decimal.
fn bus_addr(s: &str) -> Result<(u8, u16), Failed> {
    let (bus, addr) = s.split_once(':').ok_or("expected BUS:ADDR, e.g. 1:5")?;
    Ok((bus.parse()?, addr.parse()?))
}

async fn probe() -> Result<(), Failed> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let domain = args
        .first()
        .ok_or("usage: xen_probe DOMAIN [--attach B:A] [--detach B:A] [--watch S]")?;
    let option = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let root = SysfsRoot::default();
    let (xs, _events) =
        Xenstore::connect(&pick_socket(&candidate_sockets()), DEFAULT_TIMEOUT).await?;
    let started = Instant::now();
    let domid = store::domain_id(&xs, domain, None)
        .await?
        .ok_or("no running domain of that name")?;
    println!(
        "domain {domain} is {domid} (found in {:?})",
        started.elapsed()
    );
    let (ctrls, ports) = store::snapshot(&xs, domid).await?;
    for c in &ctrls {
        println!(
            "controller {}: state {} usb-ver {} ports {}",
            c.devid, c.state, c.version, c.ports
        );
    }
    let host = xenstore::addresses(&usbroute::inventory::scan(&root));
    for r in xenstore::judge(&ports, &host) {
        println!("  {}.{}: {}", r.ctrl, r.port, serde_json::to_string(&r)?);
    }
    let vm = XenVm::new(
        domain,
        domain,
        domid,
        xs.clone(),
        Xl::default(),
        root.clone(),
    );
    if let Some(which) = option("--attach") {
        let (bus, address) = bus_addr(which)?;
        let snapshot = usbroute::inventory::scan(&root);
        let device = snapshot
            .devices
            .iter()
            .find(|d| d.bus == bus && d.address == Some(address))
            .ok_or("no host device at that bus and address")?;
        let started = Instant::now();
        let attached = vm.attach(device, AttachMode::Address).await?;
        println!("attached {} in {:?}", attached.id, started.elapsed());
    }
    if let Some(which) = option("--detach") {
        let (bus, address) = bus_addr(which)?;
        let started = Instant::now();
        vm.detach(&AttachKey::Address { bus, address }).await?;
        println!("detached in {:?}", started.elapsed());
    }
    for d in vm.list().await? {
        println!("listed: {}", serde_json::to_string(&d)?);
    }
    if let Some(seconds) = option("--watch") {
        let driver = usbroute::backend::xen::driver(root);
        let target = VmTarget::Xen {
            domain: domain.clone(),
        };
        let mut stream = driver.watch(domain, &target)?;
        let until = tokio::time::Instant::now() + Duration::from_secs(seconds.parse()?);
        while let Ok(Some(event)) = tokio::time::timeout_at(until, stream.next()).await {
            match event {
                PresenceEvent::Up(b) => println!(
                    "{:?} up: {} devices",
                    started.elapsed(),
                    b.list().await?.len()
                ),
                PresenceEvent::Gone { reason } => {
                    println!("{:?} gone: {reason}", started.elapsed())
                }
                PresenceEvent::Held(why) => println!("{:?} held: {why:?}", started.elapsed()),
            }
        }
    }
    Ok(())
}
