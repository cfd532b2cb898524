//! usbroute serve in dom0 managing the PV domU through its Xen backend: a rule gives QEMU's
//! keyboards (0627:0001) to VM `lab` = domain `domu`, by address. Plug -> the domU's own
//! /sys/bus/usb has it; unplug -> gone and the qusb port empty; re-plug (new devnum) ->
//! attached again; the domain destroyed and created -> its device back; plugged while the
//! domain is down -> attached when it is created; the daemon SIGKILLed and restarted ->
//! no duplicate, and a port a removal during the restart left stale is cleared so the next
//! plug attaches; a device the user attached with `xl` -> listed as not ours and left
//! alone; a hub a rule names -> refused, `why` saying so. Then usbroute's plug -> visible in
//! the domU over 20 plugs, beside the floor of `xen-manual`.

use super::daemon::{daemon_status, start_daemon, vm_devices_of, wait_vm, CONFIG, CONTROL};
use crate::bed::Bed;
use crate::pace::percentiles;
use crate::usb::{Ctrl, Kind, UsbDevice};
use crate::xen::{self, DOMID_FILE, QUSB_BACKEND};
use anyhow::{bail, ensure, Result};
use std::time::{Duration, Instant};

/// usb-kbd's ids, which the rule names.
const KBD: &str = "0627:0001";
/// The Wacom tablet the user attaches by hand.
const WACOM: &str = "056a:0000";
/// usbroute's VM name for the domU.
const VM: &str = "lab";
/// How many plugs are timed.
const PLUGS: usize = 20;
/// One plug's whole chain through the daemon (KVM base).
const CHAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the "Done when" asks of the live backend, on the real Xen.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"{VM}\"\nxen = \"{}\"\n\n\
         [[rule]]\nvm = \"{VM}\"\nmatch = \"id:{KBD}\"\n\n\
         [[rule]]\nvm = \"{VM}\"\nmatch = \"id:0409:55aa\"\n",
        xen::DOMU
    );
    crate::libvirt::write_file(bed, CONFIG, &config).await?;
    let kbd = UsbDevice::new(Kind::Kbd, "xs-kbd", Ctrl::Xhci, "1");
    let daemon = start_daemon(bed).await?;
    wait_vm(bed, VM, true).await?;

    let name = bed.plug_unbound(&kbd).await?;
    xen::wait_domu(bed, KBD, true).await?;
    ensure!(
        ours(bed).await?.len() == 1,
        "usbroute does not list the keyboard as ours"
    );

    bed.unplug(&kbd.id).await?;
    xen::wait_domu(bed, KBD, false).await?;
    wait_ports_empty(bed, "unplug: the port free").await?;

    bed.plug_unbound(&kbd).await?;
    xen::wait_domu(bed, KBD, true).await?;

    xen::destroy_domu(bed).await?;
    wait_vm(bed, VM, false).await?;
    xen::create_domu(bed).await?;
    xen::wait_domu(bed, KBD, true).await?;

    xen::destroy_domu(bed).await?;
    wait_vm(bed, VM, false).await?;
    bed.unplug(&kbd.id).await?;
    bed.plug_unbound(&kbd).await?;
    xen::create_domu(bed).await?;
    xen::wait_domu(bed, KBD, true).await?;

    // SIGKILL and restart: the same one device, not attached twice.
    bed.guest_ok(&format!("kill -9 {daemon}")).await?;
    let daemon = start_daemon(bed).await?;
    wait_vm(bed, VM, true).await?;
    let listed = ours(bed).await?;
    ensure!(
        listed.len() == 1,
        "after a restart usbroute lists {listed:?} as ours"
    );
    let seen = xen::domu_usb(bed).await?;
    ensure!(
        seen.iter().filter(|d| d.id == KBD).count() == 1,
        "after a restart the domU shows the keyboard {} times",
        seen.iter().filter(|d| d.id == KBD).count()
    );

    // A removal while the daemon is down leaves the port stale; the restarted daemon
    // clears it and the next plug attaches.
    bed.guest_ok(&format!("kill -9 {daemon}")).await?;
    bed.unplug(&kbd.id).await?;
    xen::wait_domu(bed, KBD, false).await?;
    let daemon = start_daemon(bed).await?;
    wait_ports_empty(bed, "the stale port cleared by the restarted daemon").await?;
    bed.plug_unbound(&kbd).await?;
    xen::wait_domu(bed, KBD, true).await?;

    hand_attached_is_not_ours(bed).await?;
    hub_refused(bed).await?;

    bed.unplug(&kbd.id).await?;
    xen::wait_domu(bed, KBD, false).await?;
    timed_plugs(bed, &kbd, &name, PLUGS).await?;

    // Stop the daemon before the reset unplugs, so it hands nothing to anyone meanwhile.
    bed.guest_ok(&format!("kill -9 {daemon}; rm -f {CONTROL} {CONFIG}"))
        .await?;
    emitted_lines_create(bed).await
}

/// `vm devices --vm lab --json`: the entries usbroute says are ours.
async fn ours(bed: &mut Bed) -> Result<Vec<serde_json::Value>> {
    Ok(vm_devices_of(bed, VM)
        .await?
        .into_iter()
        .filter(|d| d["ours"] == true)
        .collect())
}

/// Wait until every port of the domU's controller 0 is empty in xenstore.
async fn wait_ports_empty(bed: &mut Bed, what: &str) -> Result<()> {
    let script = format!(
        "D=$(cat {DOMID_FILE}) || exit 1; for p in $(seq 1 8); do \
           [ -z \"$(xenstore-read {QUSB_BACKEND}/$D/0/port/$p)\" ] || exit 1; done"
    );
    bed.wait_guest(what, &script, Duration::from_secs(10))
        .await?;
    Ok(())
}

/// A tablet the user attaches with `xl usbdev-attach`: usbroute lists it as not ours and
/// leaves it in the domU; the user detaches it again.
async fn hand_attached_is_not_ours(bed: &mut Bed) -> Result<()> {
    let tablet = UsbDevice::new(Kind::Wacom, "xs-hand", Ctrl::Xhci, "2");
    let name = bed.plug(&tablet).await?;
    let (bus, addr) = bed.bus_device(&name).await?;
    xen::usbdev_attach(bed, bus, addr).await?;
    xen::wait_domu(bed, WACOM, true).await?;
    let poll = bed.poll(
        "usbroute to list the user's tablet",
        Duration::from_secs(10),
    );
    let hand = loop {
        let listed = vm_devices_of(bed, VM).await?;
        if let Some(hand) = listed
            .iter()
            .find(|d| d["address"] == addr && d["bus"] == bus)
        {
            poll.met(bed);
            break hand.clone();
        }
        poll.again(bed, serde_json::Value::Array(listed)).await?;
    };
    ensure!(
        hand["ours"] == false,
        "the user's tablet is listed as ours: {hand}"
    );
    let seen = xen::domu_usb(bed).await?;
    ensure!(
        seen.iter().any(|d| d.id == WACOM),
        "usbroute took the user's tablet out of the domU"
    );
    let port = user_port(bed, &name).await?;
    xen::detach_and_wait(bed, 0, port, WACOM).await?;
    bed.unplug(&tablet.id).await
}

/// The domU port whose node holds dom0's busid `name`.
async fn user_port(bed: &mut Bed, name: &str) -> Result<u32> {
    for port in 1..=8 {
        let node = xen::port_node(bed, 0, port).await?;
        if xen::xenstore_read(bed, &node).await? == name {
            return Ok(port);
        }
    }
    bail!("no port of the domU's controller holds {name}")
}

/// A hub a rule names stays in dom0, and `why` says hubs are not passed.
async fn hub_refused(bed: &mut Bed) -> Result<()> {
    let hub = UsbDevice::new(Kind::Hub, "xs-hub", Ctrl::Xhci, "3");
    let name = bed.plug(&hub).await?;
    let why = bed
        .guest_ok(&format!("usbroute --control {CONTROL} why port:{name}"))
        .await?;
    ensure!(
        why.contains("hubs cannot be passed to a VM"),
        "`why` for the hub does not say it is one:\n{why}"
    );
    let seen = xen::domu_usb(bed).await?;
    ensure!(
        !seen.iter().any(|d| d.id == "0409:55aa"),
        "the hub reached the domU"
    );
    let status = daemon_status(bed).await?;
    let planned = status["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["port"] == name.as_str())
        .cloned()
        .unwrap_or_default();
    ensure!(
        planned["desired"] == "host",
        "the hub is not kept home: {planned}"
    );
    bed.unplug(&hub.id).await
}

/// usbroute's plug -> visible in the domU: `plugs` times, outer device_add -> the domU's
/// report lists the keyboard, timed as `xen-manual`'s floor is (one dom0 script polling
/// the same report); then unplug, untimed.
async fn timed_plugs(bed: &mut Bed, kbd: &UsbDevice, name: &str, plugs: usize) -> Result<()> {
    let polls = (bed.scaled(CHAIN_TIMEOUT).as_millis() / 20).max(1);
    let dev = format!("/sys/bus/usb/devices/{name}");
    let script = format!(
        "now() {{ cut -d' ' -f1 /proc/uptime; }}; D=$(cat {DOMID_FILE}) || exit 1; \
         n=0; until [ -e {dev}/devnum ]; do n=$((n+1)); \
           [ $n -gt {polls} ] && {{ echo '{name} never appeared in dom0' >&2; exit 1; }}; sleep 0.02; done; \
         seen=$(now); \
         n=0; until xenstore-read /local/domain/$D/data/testbed-usb | grep -q ' {KBD} '; do n=$((n+1)); \
           [ $n -gt {polls} ] && {{ echo 'the domU never showed {KBD}' >&2; exit 1; }}; sleep 0.02; done; \
         echo $seen $(now)"
    );
    let mut totals = Vec::with_capacity(plugs);
    let mut to_domu = Vec::with_capacity(plugs);
    for i in 1..=plugs {
        let started = Instant::now();
        bed.device_add(kbd, name).await?;
        let out = bed.guest_with_timeout(&script, CHAIN_TIMEOUT * 2).await?;
        let total = started.elapsed();
        if out.rc != 0 {
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            bail!(
                "plug {i}: usbroute never gave it to the domU: {}\n{}",
                out.stderr.trim(),
                log.stdout
            );
        }
        let [seen, visible] = crate::pace::stamps(i, &out.stdout)?;
        totals.push(total);
        to_domu.push(Duration::from_secs_f64((visible - seen).max(0.0)));
        bed.unplug(&kbd.id).await?;
        xen::wait_domu(bed, KBD, false).await?;
        wait_ports_empty(bed, "the timed keyboard's port free").await?;
    }
    println!(
        "   figure usbroute xen, plug -> visible in the domU ({plugs} plugs): {}; \
         of which seen in dom0 -> in the domU: {}",
        percentiles(&mut totals),
        percentiles(&mut to_domu)
    );
    Ok(())
}

/// `usbroute emit --for xl` of a plugged keyboard: its lines, in place of the domU's own
/// `usbctrl=` line, are accepted by `xl create`, and the domU has the keyboard from its
/// start. The daemon is not running: libxl attaches it. Ends with the domU created again
/// from its own config.
async fn emitted_lines_create(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "xs-emit", Ctrl::Xhci, "4");
    let name = bed.plug(&kbd).await?;
    let lines = bed
        .guest_ok(&format!("usbroute emit port:{name} --for xl"))
        .await?;
    ensure!(
        lines.contains("usbctrl=") && lines.contains("usbdev="),
        "emit --for xl printed no usbctrl=/usbdev= lines:\n{lines}"
    );
    let cfg = "/tmp/domu-emitted.cfg";
    crate::libvirt::write_file(bed, "/tmp/emitted.lines", &lines).await?;
    bed.guest_ok(&format!(
        "grep -v '^usbctrl' {} > {cfg} && cat /tmp/emitted.lines >> {cfg}",
        xen::DOMU_CFG
    ))
    .await?;
    xen::create_domu_from(bed, cfg).await?;
    xen::wait_domu(bed, KBD, true).await?;
    xen::destroy_domu(bed).await?;
    bed.unplug(&kbd.id).await?;
    xen::create_domu(bed).await?;
    Ok(())
}
