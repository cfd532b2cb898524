//! A rule's `follow`: `usbroute serve` in the guest gives a keyboard to an inner QEMU by
//! id; the keyboard leaves and a device with other ids appears on the same port (a
//! re-enumeration, emulated by a Wacom tablet): within the window it goes to the same
//! VM and `why` names what it followed; after the window it stays on the host.

use super::daemon::{
    address_id, daemon_status, qom_attached, start_daemon, wait_hosts, wait_settled, CONFIG,
    CONTROL, PROBE,
};
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Context, Result};
use std::time::Duration;

/// The short window of the control: the swap must come after it has passed.
const SHORT: Duration = Duration::from_secs(3);

/// Swap within a long window (followed), then after a short one (not followed).
pub async fn run(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "fl-kbd", Ctrl::Xhci, "5");
    let wacom = UsbDevice::new(Kind::Wacom, "fl-wacom", Ctrl::Xhci, "5");
    let extra = format!("-qmp unix:{PROBE},server=on,wait=off");
    let inner = bed.start_inner_qemu("serve", "root", &extra).await?;
    // Long enough for an unplug and a plug on the slowest machine the bed allows.
    let long = bed.scaled(Duration::from_secs(30)).as_secs().max(30);
    write_config(bed, &inner.qmp, &format!("{long}s")).await?;
    let daemon = start_daemon(bed).await?;

    let name = bed.plug_unbound(&kbd).await?;
    let kbd_id = address_id(bed, &name).await?;
    wait_hosts(bed, "the keyboard the rule names by id", &[&kbd_id]).await?;
    bed.unplug(&kbd.id).await?;
    let tablet = bed.plug_unbound(&wacom).await?;
    ensure!(
        tablet == name,
        "the tablet is at {tablet}, the keyboard was at {name}"
    );
    let tablet_id = address_id(bed, &tablet).await?;
    wait_hosts(bed, "the tablet following the keyboard", &[&tablet_id]).await?;
    ensure!(
        qom_attached(bed, &tablet_id).await?,
        "{tablet_id} is in the inner QEMU but not attached"
    );
    let why = bed
        .guest_ok(&format!("usbroute --control {CONTROL} why port:{tablet}"))
        .await?;
    ensure!(
        why.contains("followed the device it gave the VM")
            && why.contains(&format!("port {name}, 0627:0001"))
            && why.contains("056a:0000"),
        "`why` for the tablet does not name the keyboard it followed:\n{why}"
    );
    let out = bed
        .guest_ok(&format!(
            "usbroute --control {CONTROL} why port:{tablet} --json"
        ))
        .await?;
    let json: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("why --json printed: {out}"))?;
    let followed = &json["devices"][0]["followed"];
    ensure!(
        followed["id"] == "0627:0001" && followed["port"] == name.as_str(),
        "`why --json` for the tablet does not name the keyboard it followed: {json}"
    );
    bed.unplug(&wacom.id).await?;
    wait_hosts(bed, "the tablet's usb-host to go", &[]).await?;

    // The control: the same swap once a short window has passed.
    write_config(bed, &inner.qmp, &format!("{}s", SHORT.as_secs())).await?;
    bed.guest_ok(&format!("usbroute --control {CONTROL} reload"))
        .await?;
    let name = bed.plug_unbound(&kbd).await?;
    let kbd_id = address_id(bed, &name).await?;
    wait_hosts(bed, "the keyboard again", &[&kbd_id]).await?;
    bed.unplug(&kbd.id).await?;
    let left = daemon_saw_leave(bed, &name).await?;
    wait_window_passed(bed, left).await?;
    let tablet = bed.plug_unbound(&wacom).await?;
    wait_settled(
        bed,
        "the daemon to decide about the late tablet",
        &[&tablet],
    )
    .await?;
    let status = daemon_status(bed).await?;
    let planned = status["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["port"] == tablet.as_str())
        .cloned()
        .unwrap_or_default();
    ensure!(
        planned["desired"] == "host" && planned["location"] == "host",
        "a tablet plugged after the window did not stay on the host: {planned}"
    );
    wait_hosts(bed, "the inner QEMU to hold nothing", &[]).await?;
    bed.guest_ok(&format!("kill -9 {daemon}; rm -f {CONTROL} {CONFIG}"))
        .await?;
    Ok(())
}

/// The daemon's config: one rule giving QEMU's HID devices (0627:0001) to the inner VM by
/// address, following them for `window`.
async fn write_config(bed: &mut Bed, qmp: &str, window: &str) -> Result<()> {
    let config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"inner\"\nqmp = \"{qmp}\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"id:0627:0001\"\nby = \"address\"\nfollow = \"{window}\"\n"
    );
    bed.guest_ok(&format!("cat > {CONFIG} <<'EOF'\n{config}EOF"))
        .await?;
    Ok(())
}

/// The guest's uptime once the daemon's status no longer lists `port`: the daemon saw the
/// device leave at or before it.
async fn daemon_saw_leave(bed: &mut Bed, port: &str) -> Result<f64> {
    let poll = bed.poll(
        &format!("the daemon to see {port} leave"),
        Duration::from_secs(10),
    );
    loop {
        let status = daemon_status(bed).await?;
        let listed = status["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["port"] == port);
        if !listed {
            poll.met(bed);
            return uptime(bed).await;
        }
        poll.again(bed, &status).await?;
    }
}

/// Wait until the guest's clock says [`SHORT`] (and a second for the daemon's own
/// reading of its clock) has passed since `left`.
async fn wait_window_passed(bed: &mut Bed, left: f64) -> Result<()> {
    let until = left + SHORT.as_secs_f64() + 1.0;
    bed.wait_guest(
        "the follow window to pass on the guest's clock",
        &format!("awk '{{ exit !($1 > {until}) }}' /proc/uptime"),
        Duration::from_secs(10),
    )
    .await?;
    Ok(())
}

/// The guest's uptime in seconds.
async fn uptime(bed: &mut Bed) -> Result<f64> {
    let out = bed.guest_ok("cat /proc/uptime").await?;
    let first = out.split_whitespace().next().unwrap_or_default();
    first
        .parse()
        .with_context(|| format!("/proc/uptime read {out:?}"))
}
