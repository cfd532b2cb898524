//! The `bench` scenario's storm: 16 devices on the xHCI (six on root ports, ten behind
//! two hubs) plugged and unplugged in a fixed pseudo-random order as fast as the outer
//! QMP takes the commands, while `usbroute serve` places them by port rules on two inner
//! QEMUs (a, b) or leaves them on the host. Then the check: once the guest and the daemon
//! have caught up, every device still plugged is attached in the VM its rule names and
//! nowhere else, every unplugged one is in no VM. A misplaced device fails it.

use super::bench::{Size, PROBE_QMP};
use super::daemon::{daemon_status, probe_on, start_daemon, usb_hosts_on, CONFIG, CONTROL};
use crate::bed::{Bed, Plugged};
use crate::inner::InnerQemu;
use crate::usb::{Ctrl, Kind, UsbDevice, XHCI_PCI};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The second inner QEMU's own monitor, for the check (paused: by-address attaches need
/// no running guest, and it costs the machine nothing).
const B_PROBE_QMP: &str = "/tmp/inner-bench-b-probe.qmp";
/// What the guest and the daemon may take to catch up after the storm (KVM base).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a device belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    A,
    B,
    Host,
}

/// Every stormed device's xHCI port and where the rules put it: each VM gets root ports
/// and ports behind a hub, and four stay on the host.
const PORTS: [(&str, Place); 16] = [
    ("1", Place::A),
    ("2", Place::A),
    ("3", Place::A),
    ("4", Place::B),
    ("5", Place::B),
    ("6", Place::Host),
    ("7.1", Place::A),
    ("7.2", Place::A),
    ("7.3", Place::A),
    ("7.4", Place::A),
    ("7.5", Place::B),
    ("7.6", Place::B),
    ("7.7", Place::B),
    ("7.8", Place::Host),
    ("8.1", Place::Host),
    ("8.2", Place::Host),
];

/// Write the methods' figures, storm, check, and write them again with the storm's.
pub async fn run(bed: &mut Bed, a: &InnerQemu, size: Size, mut figures: Value) -> Result<()> {
    write_json(bed, &figures)?;
    bed.start_inner_qemu(
        "bench-b",
        "root",
        &format!("-S -qmp unix:{B_PROBE_QMP},server=on,wait=off"),
    )
    .await?;
    let hub = bed
        .plug(&UsbDevice::new(Kind::Hub, "storm-hub7", Ctrl::Xhci, "7"))
        .await?;
    bed.plug(&UsbDevice::new(Kind::Hub, "storm-hub8", Ctrl::Xhci, "8"))
        .await?;
    let bus = hub.split('-').next().unwrap_or_default().to_string();
    let kinds = [Kind::Kbd, Kind::Mouse, Kind::Tablet];
    let devices: Vec<(UsbDevice, Place)> = PORTS
        .iter()
        .enumerate()
        .map(|(i, (port, place))| {
            let id = format!("storm-{}", port.replace('.', "-"));
            (UsbDevice::new(kinds[i % 3], &id, Ctrl::Xhci, port), *place)
        })
        .collect();
    let mut config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"a\"\nqmp = \"{}\"\n\n\
         [[vm]]\nname = \"b\"\nqmp = \"/tmp/inner-bench-b.qmp\"\n",
        a.qmp
    );
    for (port, place) in PORTS {
        let vm = match place {
            Place::A => "a",
            Place::B => "b",
            Place::Host => continue,
        };
        config.push_str(&format!(
            "\n[[rule]]\nvm = \"{vm}\"\nmatch = \"port:{XHCI_PCI}/{port}\"\n"
        ));
    }
    bed.guest_ok(&format!("cat > {CONFIG} <<'EOF'\n{config}EOF"))
        .await?;
    let daemon = start_daemon(bed).await?;
    wait_vms_up(bed).await?;

    let (plugged, ops, refused) = storm(bed, &devices, size.storm).await?;
    let kept: Vec<(UsbDevice, Place)> = devices
        .iter()
        .zip(&plugged)
        .filter(|(_, p)| **p)
        .map(|(d, _)| d.clone())
        .collect();
    // The reset unplugs what is left, whatever the check says.
    for (dev, _) in &kept {
        bed.plugged.push(Plugged {
            dev: dev.clone(),
            guest_name: Some(format!("{bus}-{}", dev.port)),
        });
    }
    let started = Instant::now();
    check(bed, &bus, &devices, &plugged).await?;
    let settled = started.elapsed();
    println!(
        "   figure bench storm: {ops} plugs and unplugs of 16 devices in {:.0} s \
         ({:.0}/s, {refused} refused by QEMU), {} left plugged; every device where the \
         rules say {:.1} s after the last",
        size.storm.as_secs_f64(),
        ops as f64 / size.storm.as_secs_f64(),
        kept.len(),
        settled.as_secs_f64()
    );
    bed.guest_ok(&format!("kill -9 {daemon}; rm -f {CONTROL} {CONFIG}"))
        .await?;
    figures["storm"] = json!({
        "seconds": size.storm.as_secs_f64(), "ops": ops, "refused": refused,
        "devices": PORTS.len(), "plugged_at_end": kept.len(),
        "settled_ms": settled.as_millis() as u64,
    });
    write_json(bed, &figures)
}

/// Toggle devices in a fixed pseudo-random order for `length`, each command sent when
/// QEMU answered the last; which devices are plugged at the end, how many commands QEMU
/// took and refused (a device_add of a device whose deletion is still under way). Then
/// wait until the outer QEMU has finished deleting the unplugged ones.
async fn storm(
    bed: &mut Bed,
    devices: &[(UsbDevice, Place)],
    length: Duration,
) -> Result<(Vec<bool>, u64, u64)> {
    let mut plugged = vec![false; devices.len()];
    let (mut ops, mut refused) = (0u64, 0u64);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let started = Instant::now();
    while started.elapsed() < length {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let k = (state >> 33) as usize % devices.len();
        let dev = &devices[k].0;
        let sent = if plugged[k] {
            bed.qmp()
                .execute("device_del", Some(json!({ "id": dev.id })))
                .await
        } else {
            bed.qmp()
                .execute("device_add", Some(dev.device_add_args(None)))
                .await
        };
        match sent {
            Ok(_) => {
                plugged[k] = !plugged[k];
                ops += 1;
            }
            Err(_) => refused += 1,
        }
    }
    let poll = bed.poll(
        "the outer QEMU to finish the storm's unplugs",
        Duration::from_secs(10),
    );
    loop {
        let listed = bed
            .qmp()
            .execute("qom-list", Some(json!({"path": "/machine/peripheral"})))
            .await?;
        let present = |id: &str| {
            listed
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p["name"] == id))
        };
        let lingering: Vec<&str> = devices
            .iter()
            .zip(&plugged)
            .filter(|((d, _), p)| !**p && present(&d.id))
            .map(|((d, _), _)| d.id.as_str())
            .collect();
        if lingering.is_empty() {
            poll.met(bed);
            return Ok((plugged, ops, refused));
        }
        poll.again(bed, format!("still there: {lingering:?}"))
            .await?;
    }
}

/// Wait until the guest shows exactly the plugged devices and each VM holds exactly the
/// plugged devices its rules give it, each attached; fail naming what is misplaced.
async fn check(
    bed: &mut Bed,
    bus: &str,
    devices: &[(UsbDevice, Place)],
    plugged: &[bool],
) -> Result<()> {
    let names: Vec<String> = devices
        .iter()
        .map(|(d, _)| format!("{bus}-{}", d.port))
        .collect();
    let script: String = names
        .iter()
        .map(|n| {
            let dev = format!("/sys/bus/usb/devices/{n}");
            format!("[ -e {dev}/devnum ] && echo {n} $(cat {dev}/busnum {dev}/devnum); ")
        })
        .chain(["true".to_string()])
        .collect();
    let poll = bed.poll("every stormed device where the rules say", SETTLE_TIMEOUT);
    loop {
        let seen = bed.guest_ok(&script).await?;
        let mut want_a = Vec::new();
        let mut want_b = Vec::new();
        let mut guest_wrong = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let line = seen.lines().find(|l| l.split(' ').next() == Some(name));
            match (line, plugged[i]) {
                (Some(line), true) => {
                    let f: Vec<&str> = line.split(' ').collect();
                    let id = format!("usbroute-addr-{}-{}", f[1], f[2]);
                    match devices[i].1 {
                        Place::A => want_a.push(id),
                        Place::B => want_b.push(id),
                        Place::Host => {}
                    }
                }
                (None, true) => guest_wrong.push(format!("{name} not in the guest yet")),
                (Some(_), false) => guest_wrong.push(format!("{name} still in the guest")),
                (None, false) => {}
            }
        }
        want_a.sort();
        want_b.sort();
        let have_a = usb_hosts_on(bed, PROBE_QMP).await?;
        let have_b = usb_hosts_on(bed, B_PROBE_QMP).await?;
        let mut placed = guest_wrong.is_empty() && have_a == want_a && have_b == want_b;
        let mut detached = Vec::new();
        if placed {
            for (socket, ids) in [(PROBE_QMP, &have_a), (B_PROBE_QMP, &have_b)] {
                for id in ids {
                    let path = format!("/machine/peripheral/{id}");
                    let on = probe_on(
                        bed,
                        socket,
                        "qom-get",
                        json!({"path": path, "property": "attached"}),
                    )
                    .await?;
                    if on != true {
                        detached.push(id.clone());
                    }
                }
            }
            placed = detached.is_empty();
        }
        if placed {
            poll.met(bed);
            return Ok(());
        }
        let seen = format!(
            "guest: {guest_wrong:?}; VM a has {have_a:?}, its rules want {want_a:?}; \
             VM b has {have_b:?}, its rules want {want_b:?}; not attached: {detached:?}"
        );
        if let Err(e) = poll.again(bed, &seen).await {
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            return Err(e.context(format!("daemon log:\n{}", log.stdout)));
        }
    }
}

/// Wait until the daemon sees every VM up.
async fn wait_vms_up(bed: &mut Bed) -> Result<()> {
    let poll = bed.poll("the daemon to see VMs a and b up", Duration::from_secs(30));
    loop {
        let status = daemon_status(bed).await?;
        let vms = status["vms"].as_array().cloned().unwrap_or_default();
        if vms.len() == 2 && vms.iter().all(|v| v["up"] == true) {
            poll.met(bed);
            return Ok(());
        }
        poll.again(bed, &status["vms"]).await?;
    }
}

/// `target/bench/testbed.json` on the host (beside the bed's `target/testbed/`).
fn write_json(bed: &Bed, figures: &Value) -> Result<()> {
    let target = bed
        .share()
        .parent()
        .and_then(|p| p.parent())
        .context("the share is not under target/testbed/")?;
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("testbed.json");
    std::fs::write(&path, serde_json::to_string_pretty(figures)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("   figures written to {}", path.display());
    Ok(())
}
