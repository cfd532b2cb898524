//! `usbroute serve` in the guest, on a real kernel: a keyboard plugged is attached to an
//! inner QEMU by address once the kernel says `bind`; unplugged, its usb-host goes;
//! re-plugged (new devnum), it is attached again; the daemon killed with SIGKILL and
//! started again changes nothing; a device plugged before the VM starts is attached when
//! it starts; a hub a rule names is never passed, and `why` says so.

use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// The inner QEMU's second monitor, for looking while the daemon holds the first.
pub(super) const PROBE: &str = "/tmp/inner-serve-probe.qmp";
pub(super) const CONFIG: &str = "/tmp/serve.toml";
pub(super) const CONTROL: &str = "/tmp/serve.sock";

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
    // At the default verbosity the daemon says what it decided for the plug.
    let said = bed.guest_ok("cat /tmp/serve.log").await?;
    ensure!(
        said.contains(&format!("device {name} 0627:0001"))
            && said.contains("goes to VM inner")
            && !said.contains('\u{1b}'),
        "the daemon's log does not say (in plain text) where {name} goes:\n{said}"
    );

    // A rule names the hub: it stays on the host, and `why` says hubs cannot be passed.
    let hub = UsbDevice::new(Kind::Hub, "sv-hub", Ctrl::Xhci, "6");
    let hub_name = bed.plug(&hub).await?;
    // The daemon has decided about the hub once its status plans the hub and has nothing
    // in flight; only then does an unchanged inner QEMU prove the hub was not passed.
    wait_settled(bed, "the daemon to decide about the hub", &[&hub_name]).await?;
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
    // The restarted daemon has connected, listed the VM (its status shows what it found
    // there), planned both devices and has nothing in flight: anything it would (wrongly)
    // change, it has changed by then.
    wait_settled(
        bed,
        "the restarted daemon to list the VM and settle",
        &[&early_name, &again],
    )
    .await?;
    let listed = daemon_status(bed).await?;
    let mut held = vm_devices(&listed);
    held.sort();
    ensure!(
        held == before,
        "the restarted daemon lists {held:?} in the VM, QEMU had {before:?}"
    );
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
pub(super) async fn start_daemon(bed: &mut Bed) -> Result<String> {
    let pid = bed
        .guest_ok(&format!(
            "usbroute serve --config {CONFIG} >>/tmp/serve.log 2>&1 </dev/null & echo $!"
        ))
        .await?;
    // Answering, not merely listening: a daemon killed earlier leaves its socket file.
    let answering = bed
        .wait_guest(
            "the daemon to answer on its control socket",
            &format!("usbroute --control {CONTROL} status >/dev/null"),
            Duration::from_secs(10),
        )
        .await;
    if let Err(e) = answering {
        let log = bed.guest("tail -n 20 /tmp/serve.log").await?;
        return Err(e.context(format!("daemon log:\n{}", log.stdout)));
    }
    Ok(pid.trim().to_string())
}

/// `usbroute-addr-BUS-DEV` of the guest device `name`.
pub(super) async fn address_id(bed: &mut Bed, name: &str) -> Result<String> {
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

/// `usbroute status --json` from the daemon.
pub(super) async fn daemon_status(bed: &mut Bed) -> Result<Value> {
    let out = bed
        .guest_ok(&format!("usbroute --control {CONTROL} status --json"))
        .await?;
    serde_json::from_str(&out).with_context(|| format!("status --json printed: {out}"))
}

/// The usbroute devices the daemon's status lists in the (only) VM.
fn vm_devices(status: &Value) -> Vec<String> {
    status["vms"][0]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(str::to_string))
        .collect()
}

/// Wait until the daemon's status has a decision for each of `ports`, the VM is up,
/// and the daemon is at rest (nothing planned left undone, nothing in flight).
pub(super) async fn wait_settled(bed: &mut Bed, what: &str, ports: &[&str]) -> Result<()> {
    let poll = bed.poll(what, Duration::from_secs(10));
    loop {
        let status = daemon_status(bed).await?;
        let devices = status["devices"].as_array().cloned().unwrap_or_default();
        let planned = ports.iter().all(|p| {
            devices
                .iter()
                .any(|d| d["port"] == *p && d["desired"].is_string())
        });
        if planned && status["at_rest"] == true && status["vms"][0]["up"] == true {
            poll.met(bed);
            return Ok(());
        }
        poll.again(bed, &status).await?;
    }
}

/// A QMP command on the probe monitor (the daemon holds the VM's first one).
async fn probe(bed: &mut Bed, command: &str, arguments: Value) -> Result<Value> {
    probe_on(bed, PROBE, command, arguments).await
}

/// A QMP command on the guest monitor `socket` of an inner QEMU; its `return`.
pub(super) async fn probe_on(
    bed: &mut Bed,
    socket: &str,
    command: &str,
    arguments: Value,
) -> Result<Value> {
    let reply = bed
        .qmp_in_guest(
            socket,
            command,
            Some(arguments),
            Duration::from_secs(10),
            false,
        )
        .await?;
    reply
        .get("return")
        .cloned()
        .with_context(|| format!("{command} on the monitor {socket}: {reply}"))
}

/// The usb-host ids of the inner QEMU, sorted.
pub(super) async fn usb_hosts(bed: &mut Bed) -> Result<Vec<String>> {
    usb_hosts_on(bed, PROBE).await
}

/// The usb-host ids of the inner QEMU whose monitor `socket` is, sorted.
pub(super) async fn usb_hosts_on(bed: &mut Bed, socket: &str) -> Result<Vec<String>> {
    let listed = probe_on(
        bed,
        socket,
        "qom-list",
        json!({"path": "/machine/peripheral"}),
    )
    .await?;
    let mut ids: Vec<String> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "child<usb-host>")
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Whether the inner QEMU says its usb-host `id` is attached to a host device.
pub(super) async fn qom_attached(bed: &mut Bed, id: &str) -> Result<bool> {
    let path = format!("/machine/peripheral/{id}");
    let attached = probe(
        bed,
        "qom-get",
        json!({"path": path, "property": "attached"}),
    )
    .await?;
    Ok(attached == true)
}

/// Wait until the inner QEMU has exactly `want` (in any order).
pub(super) async fn wait_hosts(bed: &mut Bed, what: &str, want: &[&str]) -> Result<()> {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let poll = bed.poll(what, Duration::from_secs(10));
    loop {
        let have = usb_hosts(bed).await?;
        if have == want {
            poll.met(bed);
            return Ok(());
        }
        if let Err(e) = poll.again(bed, format!("{have:?}, want {want:?}")).await {
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            return Err(e.context(format!("daemon log:\n{}", log.stdout)));
        }
    }
}

/// Wait until the daemon's status says its (only) VM `vm` is `up`, or down.
pub(super) async fn wait_vm(bed: &mut Bed, vm: &str, up: bool) -> Result<()> {
    let what = format!(
        "the daemon to see VM {vm} {}",
        if up { "up" } else { "down" }
    );
    let poll = bed.poll(&what, Duration::from_secs(30));
    loop {
        let status = daemon_status(bed).await?;
        if status["vms"][0]["up"] == up {
            poll.met(bed);
            return Ok(());
        }
        if let Err(e) = poll.again(bed, &status["vms"]).await {
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            return Err(e.context(format!("daemon log:\n{}", log.stdout)));
        }
    }
}

/// `usbroute vm devices --vm VM --json` through the daemon: every device it lists.
pub(super) async fn vm_devices_of(bed: &mut Bed, vm: &str) -> Result<Vec<Value>> {
    let out = bed
        .guest_ok(&format!(
            "usbroute --control {CONTROL} vm devices --vm {vm} --json"
        ))
        .await?;
    let listed: Value =
        serde_json::from_str(&out).with_context(|| format!("vm devices --json printed: {out}"))?;
    Ok(listed.as_array().cloned().unwrap_or_default())
}
