//! The scale part: `vms` paused QEMUs and `vms` × `per_vm` devices of a synthetic host
//! (`usbroute::inventory::synth`), each VM's devices behind one hub that a rule gives it
//! by port. Timed: `usbroute serve` from its start to every device attached (counted
//! from its own log lines saying an attach is done), against a bare client sending the same
//! `device_add`s (one connection per VM, all VMs in parallel).

use super::peers::{device_add_by_port, device_del, done, wait_at_rest, Daemon, Qemu, Qmp};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use usbroute::inventory::synth::{PciFunction, SysfsBuilder, UsbDevice};

/// What the scale part measured.
pub struct ScaleFigures {
    pub placed: Duration,
    pub bare: Duration,
    pub rss_kib: u64,
    /// Of `rss_kib`, the anonymous part (heap, stacks).
    pub anon_kib: u64,
    pub vms: usize,
    pub devices: usize,
}

/// One VM's share: its QEMU, and the (bus, port) of each of its devices.
struct Vm {
    qemu: Qemu,
    devices: Vec<(u8, String)>,
}

/// Buses of the synthetic host: 8 root ports each, one hub (one VM) per port.
const PORTS_PER_BUS: usize = 8;

fn device(port: &str, devnum: u16, class: u8, product: u16) -> UsbDevice<'_> {
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

/// The host under `dir/sysfs` and the config `dir/usbroute.toml`: VM i gets the devices
/// behind hub `B-P` (`match = "hub:B-P"`, by port). Returns the config's path and, per
/// VM, its devices' (bus, port chain within the bus).
fn fixture(dir: &Path, vms: usize, per_vm: usize) -> (PathBuf, Vec<Vec<(u8, String)>>) {
    assert!(per_vm < 16, "a hub of the synthetic host has 15 ports");
    let b = SysfsBuilder::new(dir.join("sysfs"));
    let mut config = String::new();
    let mut devices = Vec::new();
    for bus in 1..=vms.div_ceil(PORTS_PER_BUS) {
        let pci = format!("0000:00:{:02x}.0", bus + 3);
        b.pci(&PciFunction::qemu_xhci(&pci, Some(bus as u32)))
            .unwrap();
        b.bus(&pci, bus as u8, "480", "2.00", PORTS_PER_BUS as u8)
            .unwrap();
        for port in 1..=PORTS_PER_BUS.min(vms - (bus - 1) * PORTS_PER_BUS) {
            let vm = (bus - 1) * PORTS_PER_BUS + port - 1;
            let hub = format!("{bus}-{port}");
            let hub_devnum = (port * (per_vm + 1)) as u16;
            b.device(&device(&hub, hub_devnum, 9, 1)).unwrap();
            let mut mine = Vec::new();
            for leaf in 1..=per_vm {
                let name = format!("{hub}.{leaf}");
                let devnum = hub_devnum + leaf as u16;
                b.device(&device(&name, devnum, 0, 0x1000 + leaf as u16))
                    .unwrap();
                mine.push((bus as u8, format!("{port}.{leaf}")));
            }
            devices.push(mine);
            config.push_str(&format!(
                "[[vm]]\nname = \"vm{vm}\"\nqmp = \"{}\"\n\n[[rule]]\nvm = \"vm{vm}\"\nmatch = \"hub:{hub}\"\nby = \"port\"\n\n",
                qmp(dir, vm).display()
            ));
        }
    }
    let path = dir.join("usbroute.toml");
    std::fs::write(&path, config).unwrap();
    (path, devices)
}

fn qmp(dir: &Path, vm: usize) -> PathBuf {
    dir.join(format!("vm{vm}.qmp"))
}

/// Run the scale part: the bare client first (its devices removed again), then the
/// daemon (`binary`) on the same QEMUs.
pub fn run(binary: &Path, vms: usize, per_vm: usize) -> ScaleFigures {
    let dir = tempfile::tempdir().unwrap();
    let (config, devices) = fixture(dir.path(), vms, per_vm);
    let qemus: Vec<Qemu> = (0..vms).map(|i| Qemu::spawn(&qmp(dir.path(), i))).collect();
    for q in &qemus {
        q.wait_ready();
    }
    let vms_: Vec<Vm> = qemus
        .into_iter()
        .zip(devices)
        .map(|(qemu, devices)| Vm { qemu, devices })
        .collect();
    let bare = bare_client(&vms_);
    let total: usize = vms_.iter().map(|v| v.devices.len()).sum();

    let control = dir.path().join("control.sock");
    let sysfs = dir.path().join("sysfs");
    let uevents = dir.path().join("uevents.sock");
    let start = Instant::now();
    let mut daemon = Daemon::spawn(
        binary,
        &control,
        &[
            "--config".as_ref(),
            config.as_os_str(),
            "--sysfs-root".as_ref(),
            sysfs.as_os_str(),
            "--uevent-socket".as_ref(),
            uevents.as_os_str(),
        ],
    );
    let mut attached = 0;
    let done = daemon.wait_line(Duration::from_secs(600), |line| {
        attached += usize::from(done(line, "attach", None));
        attached == total
    });
    let placed = done - start;
    wait_at_rest(&control);
    let (rss_kib, anon_kib) = (daemon.rss_kib(), daemon.anon_kib());
    if let Some(pid_file) = std::env::var_os("USBROUTE_BENCH_HOLD") {
        // For a look at the daemon at rest (its /proc/PID/smaps): its pid in the file,
        // and the daemon kept until the file is deleted.
        std::fs::write(&pid_file, daemon.child.id().to_string()).unwrap();
        while Path::new(&pid_file).exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(daemon);
    drop(vms_);
    ScaleFigures {
        placed,
        bare,
        rss_kib,
        anon_kib,
        vms,
        devices: total,
    }
}

/// The floor at scale: one thread per VM connects, negotiates and sends that VM's
/// `device_add`s one after another, all VMs at once; the time until the last reply.
/// Its devices are then deleted again (not timed), leaving the VMs as they were.
fn bare_client(vms: &[Vm]) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for vm in vms {
            s.spawn(move || {
                let mut qmp = Qmp::connect(&vm.qemu.qmp);
                for (bus, port) in &vm.devices {
                    qmp.ok(&device_add_by_port(&bare_id(*bus, port), *bus, port));
                }
            });
        }
    });
    let took = start.elapsed();
    std::thread::scope(|s| {
        for vm in vms {
            s.spawn(move || {
                let mut qmp = Qmp::connect(&vm.qemu.qmp);
                for (bus, port) in &vm.devices {
                    qmp.ok(&device_del(&bare_id(*bus, port)));
                }
            });
        }
    });
    took
}

fn bare_id(bus: u8, port: &str) -> String {
    format!("bare-{bus}-{port}")
}
