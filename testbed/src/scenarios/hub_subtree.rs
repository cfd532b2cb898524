//! A `hub:` rule in `usbroute serve`, on a real kernel: every non-hub device behind a
//! two-level hub chain goes to the inner QEMU (attached), a device plugged later behind
//! the inner hub goes too, no hub does, and `why` says so for the hubs and the devices.

use super::daemon::{
    address_id, qom_attached, start_daemon, usb_hosts, wait_hosts, wait_settled, CONFIG, CONTROL,
    PROBE,
};
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Result};

/// Hub chain with a device behind each level, the daemon with a `hub:` rule for the
/// outer hub, then a device plugged later behind the inner hub.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let outer = UsbDevice::new(Kind::Hub, "hs-hub1", Ctrl::Xhci, "5");
    let inner_hub = UsbDevice::new(Kind::Hub, "hs-hub2", Ctrl::Xhci, "5.1");
    let kbd = UsbDevice::new(Kind::Kbd, "hs-kbd", Ctrl::Xhci, "5.2");
    let tablet = UsbDevice::new(Kind::Tablet, "hs-tab", Ctrl::Xhci, "5.1.2");
    let mouse = UsbDevice::new(Kind::Mouse, "hs-mouse", Ctrl::Xhci, "5.1.3");
    let hub1 = bed.plug(&outer).await?;
    let hub2 = bed.plug(&inner_hub).await?;
    let kbd_name = bed.plug(&kbd).await?;
    let tablet_name = bed.plug(&tablet).await?;
    let hub_ids = [address_id(bed, &hub1).await?, address_id(bed, &hub2).await?];
    let kbd_id = address_id(bed, &kbd_name).await?;
    let tablet_id = address_id(bed, &tablet_name).await?;

    let extra = format!("-qmp unix:{PROBE},server=on,wait=off");
    let vm = bed.start_inner_qemu("serve", "root", &extra).await?;
    let config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"inner\"\nqmp = \"{}\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"hub:{hub1}\"\nby = \"address\"\n",
        vm.qmp
    );
    bed.guest_ok(&format!("cat > {CONFIG} <<'EOF'\n{config}EOF"))
        .await?;
    let daemon = start_daemon(bed).await?;

    // Present at start: the device behind each level goes, neither hub does.
    wait_hosts(
        bed,
        "the devices behind both hub levels",
        &[&kbd_id, &tablet_id],
    )
    .await?;
    wait_settled(
        bed,
        "the daemon to decide about both hubs",
        &[&hub1, &hub2, &kbd_name, &tablet_name],
    )
    .await?;
    let now = usb_hosts(bed).await?;
    ensure!(
        !hub_ids.iter().any(|h| now.contains(h)),
        "a hub went to the inner QEMU: {now:?}"
    );
    for id in [&kbd_id, &tablet_id] {
        ensure!(
            qom_attached(bed, id).await?,
            "{id} is in the inner QEMU but not attached"
        );
    }

    // Later: a device behind the inner hub goes too.
    let mouse_name = bed.plug_unbound(&mouse).await?;
    let mouse_id = address_id(bed, &mouse_name).await?;
    wait_hosts(
        bed,
        "the mouse plugged later behind the inner hub",
        &[&kbd_id, &tablet_id, &mouse_id],
    )
    .await?;
    ensure!(
        qom_attached(bed, &mouse_id).await?,
        "{mouse_id} is in the inner QEMU but not attached"
    );

    // `why`: each hub stays home and names the rule; the device is behind hub 1.
    for hub in [&hub1, &hub2] {
        let why = why(bed, hub).await?;
        ensure!(
            why.contains("hubs cannot be passed to a VM, so this hub stays on the host; rule 1 (")
                && why.contains("gives the devices behind it to VM inner"),
            "`why` for hub {hub} does not say it stays home and which rule gives its devices:\n{why}"
        );
    }
    let why_mouse = why(bed, &mouse_name).await?;
    ensure!(
        why_mouse.contains(&format!("the device is behind hub {hub1}")),
        "`why` for {mouse_name} does not say it is behind hub {hub1}:\n{why_mouse}"
    );

    // Stop the daemon before the runner unplugs, so it hands nothing to anyone meanwhile.
    bed.guest_ok(&format!("kill -9 {daemon}; rm -f {CONTROL} {CONFIG}"))
        .await?;
    Ok(())
}

/// `usbroute why port:NAME` from the daemon.
async fn why(bed: &mut Bed, name: &str) -> Result<String> {
    bed.guest_ok(&format!("usbroute --control {CONTROL} why port:{name}"))
        .await
}
