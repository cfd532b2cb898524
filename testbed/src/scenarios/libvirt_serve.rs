//! usbroute serve managing the libvirt domain, with the real libvirtd in the guest: a rule
//! gives QEMU's keyboards (0627:0001) to VM `lab` = domain `tb`. Plug -> our hostdev in the
//! live XML and QEMU attached; unplug -> removed; re-plug -> attached again; the domain
//! destroyed and started -> its device back; a device plugged while the domain is down ->
//! attached when it starts; the daemon SIGKILLed and restarted -> no duplicate; a hostdev
//! the user attached by hand -> listed as not ours and left alone; libvirtd restarted ->
//! usbroute reconnects and the next plug is attached. Then usbroute's plug -> attached
//! time over 20 plugs, beside the manual baseline of the same boot.

use super::daemon::{start_daemon, vm_devices_of, wait_settled, wait_vm, CONFIG, CONTROL};
use super::libvirt::{polls, qom_poll};
use crate::bed::Bed;
use crate::libvirt::{self, DOMAIN};
use crate::pace::{percentiles, stamps};
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{bail, ensure, Context, Result};
use std::time::{Duration, Instant};

/// The port the rule's keyboard is plugged into; the user's own tablet goes to another.
const PORT: &str = "5";
const HAND_PORT: &str = "6";
/// The user's own hostdev, attached with virsh.
const HAND_ALIAS: &str = "ua-hand-tablet";
/// The prefix of every alias usbroute gives (docs/libvirt.md).
const OURS: &str = "ua-usbroute-";
/// usbroute's VM name for the domain.
const VM: &str = "lab";
/// A plug's whole chain through the daemon (KVM base).
const CHAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything usbroute's half proves, on a running domain and libvirtd.
pub async fn run(bed: &mut Bed, plugs: usize) -> Result<()> {
    let config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"{VM}\"\nlibvirt = \"{DOMAIN}\"\n\n\
         [[rule]]\nvm = \"{VM}\"\nmatch = \"id:0627:0001\"\n"
    );
    libvirt::write_file(bed, CONFIG, &config).await?;
    let kbd = UsbDevice::new(Kind::Kbd, "lvs-kbd", Ctrl::Xhci, PORT);
    let tablet = UsbDevice::new(Kind::Wacom, "lvs-hand", Ctrl::Xhci, HAND_PORT);

    let daemon = start_daemon(bed).await?;
    wait_vm(bed, VM, true).await?;
    let name = bed.plug_unbound(&kbd).await?;
    let first = our_alias(bed, &name).await?;
    wait_ours(bed, "plug: the keyboard in the domain", &[&first]).await?;

    bed.unplug(&kbd.id).await?;
    wait_ours(bed, "unplug: our hostdev removed", &[]).await?;

    bed.plug_unbound(&kbd).await?;
    let second = our_alias(bed, &name).await?;
    ensure!(second != first, "the re-plug kept devnum: {second}");
    wait_ours(bed, "re-plug: attached again", &[&second]).await?;

    libvirt::destroy_domain(bed).await?;
    wait_vm(bed, VM, false).await?;
    libvirt::start_domain(bed).await?;
    wait_ours(
        bed,
        "domain destroyed and started: its device back",
        &[&second],
    )
    .await?;

    libvirt::destroy_domain(bed).await?;
    wait_vm(bed, VM, false).await?;
    bed.unplug(&kbd.id).await?;
    bed.plug_unbound(&kbd).await?;
    let third = our_alias(bed, &name).await?;
    libvirt::start_domain(bed).await?;
    wait_ours(
        bed,
        "plugged while the domain was down: attached at its start",
        &[&third],
    )
    .await?;

    // The user's own hostdev (a live one: it went with the domain's restarts above).
    let hand = bed.plug(&tablet).await?;
    let (bus, device) = bed.bus_device(&hand).await?;
    let file = "/tmp/libvirt-hand.xml";
    libvirt::write_file(bed, file, &libvirt::hostdev_xml(bus, device, HAND_ALIAS)).await?;
    libvirt::attach(bed, file).await?;
    hand_is_not_ours(bed).await?;

    bed.guest_ok(&format!("kill -9 {daemon}")).await?;
    let daemon = start_daemon(bed).await?;
    wait_settled(bed, "the restarted daemon to settle", &[&name]).await?;
    wait_ours(
        bed,
        "after a SIGKILL and restart: the one hostdev, no duplicate",
        &[&third],
    )
    .await?;
    hand_is_not_ours(bed).await?;

    libvirt::restart(bed).await?;
    wait_vm(bed, VM, true).await?;
    bed.unplug(&kbd.id).await?;
    wait_ours(bed, "after libvirtd's restart: the unplug seen", &[]).await?;
    bed.plug_unbound(&kbd).await?;
    let fourth = our_alias(bed, &name).await?;
    wait_ours(
        bed,
        "after libvirtd's restart: the next plug attached",
        &[&fourth],
    )
    .await?;
    bed.unplug(&kbd.id).await?;
    wait_ours(bed, "the keyboard gone before the timed plugs", &[]).await?;

    timed_plugs(bed, &kbd, &name, plugs).await?;
    hand_is_not_ours(bed).await?;

    // Stop the daemon before the runner unplugs, so it hands nothing to anyone meanwhile.
    bed.guest_ok(&format!("kill -9 {daemon}; rm -f {CONTROL} {CONFIG}"))
        .await?;
    libvirt::detach(bed, HAND_ALIAS).await?;
    bed.unplug(&tablet.id).await
}

/// The alias usbroute gives the guest's device `name` now (its address key).
async fn our_alias(bed: &mut Bed, name: &str) -> Result<String> {
    let (bus, device) = bed.bus_device(name).await?;
    Ok(format!("{OURS}addr-{bus}-{device}"))
}

/// Our aliases in the domain's live XML, in document order (a duplicate shows twice).
fn ours_in(xml: &str) -> Vec<String> {
    xml.split("<alias name='")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .filter(|alias| alias.starts_with(OURS))
        .map(str::to_string)
        .collect()
}

/// Wait until the live XML holds exactly `want` of ours, once each, and QEMU says each is
/// attached.
async fn wait_ours(bed: &mut Bed, what: &str, want: &[&str]) -> Result<()> {
    let poll = bed.poll(what, Duration::from_secs(20));
    loop {
        let have = ours_in(&libvirt::dumpxml(bed).await?);
        let mut attached =
            have.len() == want.len() && want.iter().all(|w| have.contains(&w.to_string()));
        for alias in want {
            if !attached {
                break;
            }
            attached = libvirt::qom_attached(bed, alias).await?;
        }
        if attached {
            poll.met(bed);
            return Ok(());
        }
        if let Err(e) = poll
            .again(bed, format!("ours {have:?}, want {want:?}"))
            .await
        {
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            return Err(e.context(format!("daemon log:\n{}", log.stdout)));
        }
    }
}

/// The user's hostdev is in the live XML, attached, and `vm devices --vm` lists it as
/// not ours.
async fn hand_is_not_ours(bed: &mut Bed) -> Result<()> {
    let listed = vm_devices_of(bed, VM).await?;
    let hand = listed
        .iter()
        .find(|d| d["id"] == HAND_ALIAS)
        .with_context(|| {
            format!("vm devices --vm {VM} lacks the user's {HAND_ALIAS}: {listed:?}")
        })?;
    ensure!(
        hand["ours"] == false,
        "the user's hostdev is listed as ours: {hand}"
    );
    ensure!(
        libvirt::qom_attached(bed, HAND_ALIAS).await?,
        "the user's hostdev {HAND_ALIAS} is no longer attached"
    );
    Ok(())
}

/// usbroute's plug -> attached: `plugs` times, outer device_add -> the guest shows the
/// device -> QEMU says our usb-host is attached, timed as the manual baseline is (one
/// guest script polling QEMU the same way); then unplug, untimed.
async fn timed_plugs(bed: &mut Bed, kbd: &UsbDevice, name: &str, plugs: usize) -> Result<()> {
    let mut totals = Vec::with_capacity(plugs);
    let mut attaches = Vec::with_capacity(plugs);
    for i in 1..=plugs {
        let started = Instant::now();
        bed.device_add(kbd, name).await?;
        let script = daemon_chain_script(bed, name);
        let out = bed.guest_with_timeout(&script, CHAIN_TIMEOUT * 2).await?;
        let total = started.elapsed();
        if out.rc != 0 {
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            bail!(
                "plug {i}: usbroute never attached it: {}\n{}",
                out.stderr.trim(),
                log.stdout
            );
        }
        let [seen, attached] = stamps(i, &out.stdout)?;
        totals.push(total);
        attaches.push(Duration::from_secs_f64((attached - seen).max(0.0)));
        bed.unplug(&kbd.id).await?;
        wait_ours(bed, "the timed keyboard's hostdev removed", &[]).await?;
    }
    println!(
        "   figure usbroute libvirt, plug -> attached: true ({plugs} plugs): {}; \
         of which the guest showing it -> attached: {}",
        percentiles(&mut totals),
        percentiles(&mut attaches)
    );
    Ok(())
}

/// The guest half of one timed plug through the daemon: wait for the device at `name`,
/// then poll QEMU (as the manual chain does) until our usb-host for it is attached.
fn daemon_chain_script(bed: &Bed, name: &str) -> String {
    let dev = format!("/sys/bus/usb/devices/{name}");
    format!(
        "{wait}; seen=$(now); alias={OURS}addr-$(cat {dev}/busnum)-$(cat {dev}/devnum); {poll}; echo $seen $(now)",
        wait = super::libvirt::wait_node_script(bed, name),
        poll = qom_poll(polls(bed, CHAIN_TIMEOUT)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_aliases_are_read_from_the_live_xml_and_a_duplicate_shows_twice() {
        let xml = "<domain><devices>\
            <hostdev><alias name='ua-usbroute-addr-1-5'/></hostdev>\
            <hostdev><alias name='ua-hand-tablet'/></hostdev>\
            <controller><alias name='usb'/></controller>\
            <hostdev><alias name='ua-usbroute-addr-1-5'/></hostdev>\
            </devices></domain>";

        assert_eq!(
            ours_in(xml),
            ["ua-usbroute-addr-1-5", "ua-usbroute-addr-1-5"]
        );
        assert!(ours_in("<domain/>").is_empty());
    }
}
