//! `usbroute serve` in the guest, on a real kernel: a keyboard plugged is attached to an
//! inner QEMU by address once the kernel says `bind`; unplugged, its usb-host goes;
//! re-plugged (new devnum), it is attached again; the daemon killed with SIGKILL and
//! started again changes nothing; a device plugged before the VM starts is attached when
//! it starts; a hub a rule names is never passed, and `why` says so.

use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Result};
use std::time::Duration;

/// The inner QEMU's second monitor, for looking while the daemon holds the first.
const PROBE: &str = "/tmp/inner-serve-probe.qmp";
const CONFIG: &str = "/tmp/serve.toml";
const CONTROL: &str = "/tmp/serve.sock";

/// Plug, unplug, re-plug, device before VM, hub refused, daemon SIGKILL + restart.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "sv-kbd", Ctrl::Xhci, "7");
    let early = UsbDevice::new(Kind::Tablet, "sv-tab", Ctrl::Xhci, "8");
    // Present before the VM starts: attached when it comes up.
    let early_name = bed.plug(&early).await?;
    let extra = format!("-qmp unix:{PROBE},server=on,wait=off");
    let inner = bed.start_inner_qemu("serve", "root", &extra).await?;
    let config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"inner\"\nqmp = \"{}\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"id:0627:0001\"\nby = \"address\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"id:0409:55aa\"\n",
        inner.qmp
    );
    bed.guest_ok(&format!("cat > {CONFIG} <<'EOF'\n{config}EOF"))
        .await?;
    let daemon = start_daemon(bed).await?;
    let early_id = address_id(bed, &early_name).await?;
    wait_hosts(bed, "the tablet plugged before the VM", &[&early_id]).await?;

    let name = bed.plug_unbound(&kbd).await?;
    let first = address_id(bed, &name).await?;
    wait_hosts(bed, "the plugged keyboard", &[&early_id, &first]).await?;
    let attached = qom_attached(bed, &first).await?;
    ensure!(attached, "{first} is in the inner QEMU but not attached");

    // A rule names the hub: it stays on the host, and `why` says hubs cannot be passed.
    let hub = UsbDevice::new(Kind::Hub, "sv-hub", Ctrl::Xhci, "6");
    let hub_name = bed.plug(&hub).await?;
    tokio::time::sleep(bed.scaled(Duration::from_secs(2))).await;
    let have = usb_hosts(bed).await?;
    let mut want = vec![early_id.clone(), first.clone()];
    want.sort();
    ensure!(have == want, "a hub rule changed the inner QEMU: {have:?}");
    let why = bed
        .guest_ok(&format!("usbroute --control {CONTROL} why port:{hub_name}"))
        .await?;
    ensure!(
        why.contains("hubs cannot be passed"),
        "`why` for the hub does not say hubs cannot be passed:\n{why}"
    );
    bed.unplug(&hub.id).await?;

    bed.unplug(&kbd.id).await?;
    wait_hosts(bed, "the unplugged keyboard's usb-host to go", &[&early_id]).await?;

    let again = bed.plug_unbound(&kbd).await?;
    let second = address_id(bed, &again).await?;
    ensure!(second != first, "re-plug kept the address: {second}");
    wait_hosts(bed, "the re-plugged keyboard", &[&early_id, &second]).await?;

    bed.guest_ok(&format!("kill -9 {daemon}")).await?;
    let before = usb_hosts(bed).await?;
    let restarted = start_daemon(bed).await?;
    // Give the restarted daemon time to connect, list and (wrongly) act.
    tokio::time::sleep(bed.scaled(Duration::from_secs(3))).await;
    let after = usb_hosts(bed).await?;
    ensure!(
        before == after,
        "daemon restart changed the usb-host set: {before:?} -> {after:?}"
    );
    // Stop the daemon before the runner unplugs, so it hands nothing to anyone meanwhile.
    bed.guest_ok(&format!("kill -9 {restarted}; rm -f {CONTROL} {CONFIG}"))
        .await?;
    Ok(())
}

/// Start the daemon in the background; its pid.
async fn start_daemon(bed: &mut Bed) -> Result<String> {
    let pid = bed
        .guest_ok(&format!(
            "usbroute serve -v --config {CONFIG} >>/tmp/serve.log 2>&1 </dev/null & echo $!"
        ))
        .await?;
    bed.wait_guest(
        "the daemon's control socket",
        &format!("test -S {CONTROL}"),
        Duration::from_secs(10),
    )
    .await?;
    Ok(pid.trim().to_string())
}

/// `usbroute-addr-BUS-DEV` of the guest device `name`.
async fn address_id(bed: &mut Bed, name: &str) -> Result<String> {
    let nums = bed
        .guest_ok(&format!(
            "cat /sys/bus/usb/devices/{name}/busnum /sys/bus/usb/devices/{name}/devnum"
        ))
        .await?;
    let nums: Vec<u32> = nums
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(nums.len() == 2, "busnum/devnum of {name}");
    Ok(format!("usbroute-addr-{}-{}", nums[0], nums[1]))
}

/// A QMP command on the probe monitor; the reply line.
fn probe_script(command: &str) -> String {
    format!(
        "printf '%s\\n%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{command}' | \
         socat -t 2 - UNIX-CONNECT:{PROBE} | tail -n +3 | grep -v '\"event\"' | head -1"
    )
}

/// The usb-host ids of the inner QEMU, sorted.
async fn usb_hosts(bed: &mut Bed) -> Result<Vec<String>> {
    let out = bed
        .guest_ok(&probe_script(
            r#"{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}"#,
        ))
        .await?;
    let reply: serde_json::Value = serde_json::from_str(out.trim())?;
    let mut ids: Vec<String> = reply["return"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "child<usb-host>")
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    Ok(ids)
}

async fn qom_attached(bed: &mut Bed, id: &str) -> Result<bool> {
    let out = bed
        .guest_ok(&probe_script(&format!(
            r#"{{"execute":"qom-get","arguments":{{"path":"/machine/peripheral/{id}","property":"attached"}}}}"#
        )))
        .await?;
    let reply: serde_json::Value = serde_json::from_str(out.trim())?;
    Ok(reply["return"] == true)
}

/// Wait until the inner QEMU has exactly `want` (in any order).
async fn wait_hosts(bed: &mut Bed, what: &str, want: &[&str]) -> Result<()> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let deadline = std::time::Instant::now() + bed.scaled(Duration::from_secs(10));
    loop {
        let have = usb_hosts(bed).await?;
        if have == want {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            anyhow::bail!(
                "waiting for {what}: the inner QEMU has {have:?}, want {want:?}\ndaemon log:\n{}",
                log.stdout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
