//! Real Xen PVUSB by hand, the way an administrator does it, on the Xen machine: a
//! keyboard plugged into dom0 goes to the PV domU with `xl usbdev-attach` and comes back
//! with `xl usbdev-detach`; a surprise removal leaves the qusb port holding the vanished
//! device's busid (what a manager must clear); then the floor usbroute's Xen backend is
//! measured against: plug -> `xl usbdev-attach` typed at once -> visible in the domU,
//! over 20 plugs.
//!
//! Along the way it saves what the real `xl usb-list`, `xl list` and `xenstore-ls` of the
//! qusb backend print with no device, one attached, and after the surprise removal, under
//! `<run dir>/fixtures/` (copied by hand to tests/fixtures/xen/ for the backend's tests).

use crate::bed::Bed;
use crate::pace::{percentiles, stamps};
use crate::usb::{Ctrl, Kind, UsbDevice};
use crate::xen::{self, DOMID_FILE, DOMU, QUSB_BACKEND};
use anyhow::{bail, ensure, Context, Result};
use std::time::{Duration, Instant};

/// The xHCI port every keyboard of this scenario is plugged into.
const PORT: &str = "1";
/// usb-kbd's ids.
const KBD: &str = "0627:0001";
/// How many plugs the floor times.
const FLOOR_PLUGS: usize = 20;
/// One plug's whole chain (KVM base): enumeration in dom0, xl usbdev-attach, the domU's
/// frontend enumerating it.
const CHAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Attach and detach by hand, the surprise removal, the floor.
pub async fn run(bed: &mut Bed) -> Result<()> {
    record(bed, "none").await?;
    let kbd = UsbDevice::new(Kind::Kbd, "xen-kbd", Ctrl::Xhci, PORT);
    let name = bed.plug(&kbd).await?;
    attach_detach(bed, &name).await?;
    surprise_removal(bed, &kbd, &name).await?;
    floor(bed, &kbd, &name, FLOOR_PLUGS).await
}

/// `xl usbdev-attach` by dom0's bus and device numbers: the domU binds usbhid and
/// `xl usb-list` shows it on port 1; `xl usbdev-detach`: gone from the domU, dom0's
/// usbhid has it again.
async fn attach_detach(bed: &mut Bed, name: &str) -> Result<()> {
    let (bus, addr) = bed.bus_device(name).await?;
    xen::usbdev_attach(bed, bus, addr).await?;
    let seen = xen::wait_domu(bed, KBD, true).await?;
    let kbd = seen
        .iter()
        .find(|d| d.id == KBD)
        .context("the domU lost the keyboard")?;
    ensure!(
        kbd.drivers.iter().any(|d| d == "usbhid"),
        "the domU's keyboard {kbd} is not on usbhid"
    );
    let list = xen::usb_list(bed).await?;
    // xl prints both numbers as %03x (see src/backend/xen/usb_list.rs).
    ensure!(
        list.contains(&format!("Port 1: Bus {bus:03x} Device {addr:03x}")),
        "xl usb-list {DOMU} does not show bus {bus} device {addr} on port 1:\n{list}"
    );
    record(bed, "attached").await?;
    xen::usbdev_detach(bed, 0, 1).await?;
    xen::wait_domu(bed, KBD, false).await?;
    bed.wait_guest(
        &format!("dom0's usbhid to take {name} back"),
        &format!(
            "[ \"$(basename \"$(readlink /sys/bus/usb/devices/{name}:1.0/driver)\")\" = usbhid ]"
        ),
        Duration::from_secs(10),
    )
    .await?;
    Ok(())
}

/// Attach, then unplug from the outer QEMU: the domU loses it, `xl usb-list` shows port 1
/// empty, yet its xenstore node still holds the busid (every later attach would be
/// refused); clearing the node is the recovery.
async fn surprise_removal(bed: &mut Bed, kbd: &UsbDevice, name: &str) -> Result<()> {
    let (bus, addr) = bed.bus_device(name).await?;
    xen::usbdev_attach(bed, bus, addr).await?;
    xen::wait_domu(bed, KBD, true).await?;
    bed.unplug(&kbd.id).await?;
    xen::wait_domu(bed, KBD, false).await?;
    let node = xen::port_node(bed, 0, 1).await?;
    let held = xen::xenstore_read(bed, &node).await?;
    ensure!(
        held == name,
        "after a surprise removal {node} holds '{held}', not the vanished {name}"
    );
    let list = xen::usb_list(bed).await?;
    ensure!(
        !list.contains("Port 1: Bus"),
        "xl usb-list shows a device on port 1 after it vanished:\n{list}"
    );
    record(bed, "surprise-removed").await?;
    xen::xenstore_write(bed, &node, "").await
}

/// The floor: `plugs` times, `device_add` a keyboard and time it to the domU showing it,
/// with dom0 running `xl usbdev-attach` as soon as the device is there, all in one dom0
/// script (no agent round trips in between); then detach and unplug, untimed. Prints
/// p50 and p99 of the whole and of its parts.
async fn floor(bed: &mut Bed, kbd: &UsbDevice, name: &str, plugs: usize) -> Result<()> {
    let mut totals = Vec::with_capacity(plugs);
    let mut attaches = Vec::with_capacity(plugs);
    let mut to_domu = Vec::with_capacity(plugs);
    let script = chain_script(bed, name);
    for i in 1..=plugs {
        let started = Instant::now();
        bed.device_add(kbd, name).await?;
        let out = bed.guest_with_timeout(&script, CHAIN_TIMEOUT * 2).await?;
        let total = started.elapsed();
        if out.rc != 0 {
            let console = xen::domu_console(bed).await;
            bail!(
                "plug {i}: the manual chain failed (rc {}): {}\ndomU console:\n{console}",
                out.rc,
                out.stderr.trim()
            );
        }
        let [seen, attached, visible] = stamps(i, &out.stdout)?;
        totals.push(total);
        attaches.push(Duration::from_secs_f64((attached - seen).max(0.0)));
        to_domu.push(Duration::from_secs_f64((visible - attached).max(0.0)));
        xen::detach_and_wait(bed, 0, 1, KBD).await?;
        bed.unplug(&kbd.id).await?;
    }
    println!(
        "   figure manual xen, plug -> visible in the domU ({plugs} plugs): {}; \
         of which xl usbdev-attach: {}; attach returned -> in the domU: {}",
        percentiles(&mut totals),
        percentiles(&mut attaches),
        percentiles(&mut to_domu)
    );
    Ok(())
}

/// The dom0 half of one timed plug: wait for the kernel to show the device at `name`
/// (sysfs and its /dev/bus/usb node), `xl usbdev-attach` it by bus and device number,
/// poll the domU's report until it lists the keyboard. Prints three /proc/uptime stamps:
/// seen in dom0, attach returned, visible in the domU.
fn chain_script(bed: &Bed, name: &str) -> String {
    // Polled every 20 ms, so many times within the (scaled) deadline.
    let polls = (bed.scaled(CHAIN_TIMEOUT).as_millis() / 20).max(1);
    let dev = format!("/sys/bus/usb/devices/{name}");
    format!(
        "now() {{ cut -d' ' -f1 /proc/uptime; }}; D=$(cat {DOMID_FILE}) || exit 1; \
         node() {{ [ -e {dev}/devnum ] && printf /dev/bus/usb/%03d/%03d $(cat {dev}/busnum {dev}/devnum); }}; \
         n=0; until node >/dev/null && [ -e \"$(node)\" ]; do n=$((n+1)); \
           [ $n -gt {polls} ] && {{ echo '{name} never appeared in dom0' >&2; exit 1; }}; sleep 0.02; done; \
         seen=$(now); \
         xl usbdev-attach {DOMU} hostbus=$(cat {dev}/busnum) hostaddr=$(cat {dev}/devnum) || exit 1; \
         attached=$(now); \
         n=0; until xenstore-read /local/domain/$D/data/testbed-usb | grep -q ' {KBD} '; do n=$((n+1)); \
           [ $n -gt {polls} ] && {{ echo 'the domU never showed {KBD}' >&2; exit 1; }}; sleep 0.02; done; \
         echo $seen $attached $(now)"
    )
}

/// Save what `xl usb-list`, `xl list` and `xenstore-ls` of the qusb backend print now as
/// `<run dir>/fixtures/<label>.{usb-list,xl-list,xenstore-ls}.txt`.
async fn record(bed: &mut Bed, label: &str) -> Result<()> {
    let dir = bed.config().run_dir.join("fixtures");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (what, script) in [
        ("usb-list", format!("xl usb-list {DOMU}")),
        ("xl-list", "xl list".to_string()),
        ("xenstore-ls", format!("xenstore-ls {QUSB_BACKEND}")),
    ] {
        let out = bed.guest_ok(&script).await?;
        let file = dir.join(format!("{label}.{what}.txt"));
        std::fs::write(&file, out).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}
