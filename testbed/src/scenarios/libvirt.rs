//! libvirt's own way of giving a guest USB device to a domain, with a real libvirtd in the
//! guest: `virsh attach-device --live` of a hand-written `<hostdev>` puts it in the live
//! XML and QEMU says `attached`; `detach-device-alias` takes it out. A libvirtd restart
//! closes a connected client's connection and leaves the domain running. Then the manual
//! baseline: plug -> `virsh attach-device` -> QEMU `attached: true`, timed over 20 plugs,
//! for usbroute's own figures to stand beside.
//!
//! The parts are functions so usbroute's half of the scenario can reuse them.

use crate::bed::Bed;
use crate::libvirt::{self, quote, DOMAIN, URI};
use crate::pace::{percentiles, stamps};
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{bail, ensure, Result};
use std::time::{Duration, Instant};

/// The port every keyboard of this scenario is plugged into.
const PORT: &str = "5";
/// How many plugs the manual baseline times.
const BASELINE_PLUGS: usize = 20;
/// A plug's whole manual chain (KVM base): enumeration, attach-device, QEMU attaching.
const CHAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the event client's output goes.
const EVENTS_OUT: &str = "/tmp/libvirt-events.out";

/// Start libvirt and the domain, attach and detach one keyboard by hand, restart
/// libvirtd under a connected client, time the manual baseline, stop everything.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let events = start_with_events(bed).await?;
    manual_attach_detach(bed).await?;
    restart_closes_connection(bed, &events).await?;
    baseline(bed, BASELINE_PLUGS).await?;
    super::libvirt_serve::run(bed, BASELINE_PLUGS).await?;
    libvirt::stop(bed).await
}

/// A `virsh event --loop` client started before the domain: it saw the domain start, so
/// it is connected.
pub struct EventClient {
    /// Its pid in the guest.
    pub pid: String,
}

/// Start libvirtd, a connected event client, and the test domain; print what the starts
/// took.
pub async fn start_with_events(bed: &mut Bed) -> Result<EventClient> {
    let daemon = libvirt::start(bed).await?;
    let pid = bed
        .guest_ok(&format!(
            "virsh -c {URI} event --all --loop >{EVENTS_OUT} 2>&1 </dev/null & echo $!"
        ))
        .await?;
    let domain = libvirt::define_and_start(bed).await?;
    bed.wait_guest(
        "the event client to see the domain start",
        &format!("grep -q \"'lifecycle' for domain '{DOMAIN}': Started\" {EVENTS_OUT}"),
        Duration::from_secs(5),
    )
    .await?;
    println!(
        "   figure libvirtd start with QEMU's capability probe {:.2} s; domain start {:.2} s",
        daemon.as_secs_f64(),
        domain.as_secs_f64()
    );
    Ok(EventClient {
        pid: pid.trim().to_string(),
    })
}

/// Plug a keyboard, give it to the domain with `virsh attach-device --live`, check the
/// live XML and QEMU, detach it by alias, unplug it.
pub async fn manual_attach_detach(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "lv-kbd", Ctrl::Xhci, PORT);
    let name = bed.plug(&kbd).await?;
    let (bus, device) = bed.bus_device(&name).await?;
    let alias = "ua-manual-1";
    let file = "/tmp/libvirt-hostdev.xml";
    libvirt::write_file(bed, file, &libvirt::hostdev_xml(bus, device, alias)).await?;
    libvirt::attach(bed, file).await?;

    let live = libvirt::dumpxml(bed).await?;
    ensure!(
        live.contains(&format!("<alias name='{alias}'/>"))
            && live.contains(&format!("<address bus='{bus}' device='{device}'/>")),
        "the live XML lacks hostdev {alias} at {bus}/{device}:\n{live}"
    );
    ensure!(
        libvirt::qom_attached(bed, alias).await?,
        "QEMU says its usb-host {alias} is not attached"
    );
    libvirt::detach(bed, alias).await?;
    bed.unplug(&kbd.id).await
}

/// Restart libvirtd: the connected event client must see its connection closed, and the
/// domain must still run when libvirtd is back.
pub async fn restart_closes_connection(bed: &mut Bed, events: &EventClient) -> Result<()> {
    libvirt::kill_daemon(bed).await?;
    let pid = &events.pid;
    bed.wait_guest(
        "the event client to end when libvirtd went",
        &format!("! [ -e /proc/{pid} ]"),
        Duration::from_secs(5),
    )
    .await?;
    let said = bed.guest_ok(&format!("cat {EVENTS_OUT}")).await?;
    ensure!(
        said.contains(&format!("Disconnected from {URI} due to end of file")),
        "the event client did not report its connection closed by the restart:\n{said}"
    );
    let warm = libvirt::start(bed).await?;
    let state = libvirt::virsh_ok(bed, &["domstate", DOMAIN]).await?;
    ensure!(
        state.trim() == "running",
        "domain {DOMAIN} is '{}' after a libvirtd restart",
        state.trim()
    );
    println!(
        "   figure libvirtd restart (warm capability cache) {:.2} s",
        warm.as_secs_f64()
    );
    Ok(())
}

/// The manual baseline: `plugs` times, plug a keyboard and time device_add sent ->
/// the guest kernel shows it -> `virsh attach-device` of a hostdev file done -> QEMU
/// says `attached: true`, all in one guest script (no agent round trips in between);
/// then detach and unplug, untimed. Prints p50 and p99.
pub async fn baseline(bed: &mut Bed, plugs: usize) -> Result<()> {
    let mut totals = Vec::with_capacity(plugs);
    let mut attaches = Vec::with_capacity(plugs);
    let kbd = UsbDevice::new(Kind::Kbd, "lv-base", Ctrl::Xhci, PORT);
    // The kernel name of that port (the same for every plug); learnt from one plug.
    let name = bed.plug(&kbd).await?;
    bed.unplug(&kbd.id).await?;
    for i in 1..=plugs {
        let alias = format!("ua-manual-{i}");
        let started = Instant::now();
        bed.device_add(&kbd, &name).await?;
        let script = chain_script(bed, &name, &alias);
        let out = bed.guest_with_timeout(&script, CHAIN_TIMEOUT * 2).await?;
        let total = started.elapsed();
        if out.rc != 0 {
            let log = libvirt::daemon_log(bed).await;
            bail!(
                "plug {i}: the manual chain failed (rc {}): {}\n{log}",
                out.rc,
                out.stderr.trim()
            );
        }
        let [seen, attached] = stamps(i, &out.stdout)?;
        totals.push(total);
        attaches.push(Duration::from_secs_f64((attached - seen).max(0.0)));
        libvirt::detach(bed, &alias).await?;
        bed.unplug(&kbd.id).await?;
    }
    println!(
        "   figure manual libvirt, plug -> attached: true ({plugs} plugs): {}; \
         of which the guest showing it -> attached: {}",
        percentiles(&mut totals),
        percentiles(&mut attaches)
    );
    Ok(())
}

/// The guest half of one timed plug: wait for the kernel to show the device at `name`
/// (sysfs and its /dev/bus/usb node), write the hostdev file with its bus and device
/// numbers, `virsh attach-device`, poll QEMU until its usb-host says attached. Prints
/// two /proc/uptime stamps: the device seen, QEMU attached.
fn chain_script(bed: &Bed, name: &str, alias: &str) -> String {
    let dev = format!("/sys/bus/usb/devices/{name}");
    let file = "/tmp/libvirt-hostdev.xml";
    format!(
        "{wait}; seen=$(now); alias={alias_q}; \
         printf \"<hostdev mode='subsystem' type='usb'><source><address bus='%d' device='%d'/></source><alias name='%s'/></hostdev>\\n\" \
           $(cat {dev}/busnum {dev}/devnum) \"$alias\" > {file}; \
         virsh -c {URI} attach-device {DOMAIN} {file} --live >/dev/null || exit 1; \
         {poll}; echo $seen $(now)",
        wait = wait_node_script(bed, name),
        alias_q = quote(alias),
        poll = qom_poll(polls(bed, CHAIN_TIMEOUT)),
    )
}

/// How many 20 ms polls fit in `timeout` (KVM base, scaled): the count a chain script
/// gives up after.
pub(super) fn polls(bed: &Bed, timeout: Duration) -> u128 {
    (bed.scaled(timeout).as_millis() / 20).max(1)
}

/// The start of a timed chain in the guest: defines `now` (the uptime stamp) and waits,
/// polling every 20 ms, until the device at `name` is in sysfs with its /dev/bus/usb node.
pub(super) fn wait_node_script(bed: &Bed, name: &str) -> String {
    let dev = format!("/sys/bus/usb/devices/{name}");
    format!(
        "now() {{ cut -d' ' -f1 /proc/uptime; }}; \
         node() {{ [ -e {dev}/devnum ] && printf /dev/bus/usb/%03d/%03d $(cat {dev}/busnum {dev}/devnum); }}; \
         n=0; until node >/dev/null && [ -e \"$(node)\" ]; do n=$((n+1)); \
           [ $n -gt {polls} ] && {{ echo '{name} never appeared' >&2; exit 1; }}; sleep 0.02; done",
        polls = polls(bed, CHAIN_TIMEOUT),
    )
}

/// Poll QEMU through libvirt every 20 ms, at most `polls` times, until its usb-host
/// `$alias` (a shell variable the script set: an alias of digits, letters and dashes)
/// says attached.
pub(super) fn qom_poll(polls: u128) -> String {
    format!(
        "n=0; until virsh -c {URI} qemu-monitor-command {DOMAIN} \
           \"{{\\\"execute\\\":\\\"qom-get\\\",\\\"arguments\\\":{{\\\"path\\\":\\\"/machine/peripheral/$alias\\\",\\\"property\\\":\\\"attached\\\"}}}}\" \
           | grep -qE '\"return\": ?true'; do n=$((n+1)); \
           [ $n -gt {polls} ] && {{ echo \"QEMU never said $alias is attached\" >&2; exit 1; }}; sleep 0.02; done"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qom_poll_sends_qemu_valid_json_naming_the_alias_and_stops_on_true() {
        // A stand-in `virsh` shows the command it was given (on stderr) and answers
        // `true`: the real sh expands the script exactly as the guest's will.
        let script = format!(
            "virsh() {{ printf '%s' \"$5\" >&2; echo '{{\"return\": true}}'; }}; \
             alias=ua-usbroute-addr-1-5; {}",
            qom_poll(3)
        );

        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();

        assert!(out.status.success(), "{out:?}");
        let sent: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
        assert_eq!(sent["execute"], "qom-get");
        assert_eq!(
            sent["arguments"]["path"],
            "/machine/peripheral/ua-usbroute-addr-1-5"
        );
        assert_eq!(sent["arguments"]["property"], "attached");
    }
}
