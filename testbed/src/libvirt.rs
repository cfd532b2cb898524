//! A real libvirt in the guest: libvirtd (Debian ships no virtqemud; the monolithic daemon
//! with only the QEMU driver in the image) and `virsh`, driven through the agent.
//!
//! The guest's configs are `testbed/guest/libvirtd.conf` and `qemu.conf` (root only, no
//! cgroups, namespaces, security driver or virtlogd). QEMU's capabilities are probed on
//! the first connection after a boot and cached in `/var/cache/libvirt/qemu/`, which
//! [`stop`] and the reset keep: later starts in the same boot are warm. The cache cannot
//! be made at image build: libvirt checks it against the QEMU binary's ctime, which is
//! the time the initramfs was unpacked.
//!
//! The agent runs `sh` scripts, not argument vectors: every argument is single-quoted
//! ([`quote`]) and files (XML) are written from base64 ([`write_file`]), so no device or
//! XML string is ever parsed by the shell.

use crate::agent::{base64_encode, GuestOutput};
use crate::bed::Bed;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The connection URI every `virsh` uses.
pub const URI: &str = "qemu:///system";
/// The test domain's name.
pub const DOMAIN: &str = "tb";
/// libvirtd's own log (warnings and errors), shown when a step fails.
const DAEMON_LOG: &str = "/var/log/libvirt/libvirtd.log";
/// Where libvirtd's stdout and stderr go.
const DAEMON_OUT: &str = "/var/log/libvirt/libvirtd.out";
/// The pid file libvirtd writes (and locks) itself.
const DAEMON_PID: &str = "/run/libvirtd.pid";

/// libvirtd answering `virsh version` (KVM base): the first start after a boot probes
/// QEMU's capabilities (3.5 s under TCG on the reference machine).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// One `virsh` command (KVM base): `start` runs QEMU up to its first instruction.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(10);
/// A process exiting after a signal, a device leaving the live XML (KVM base).
const GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// The test domain: TCG, no disk, no network, no balloon, a qemu-xhci for hostdevs, the
/// least RAM SeaBIOS runs in. With no boot device it idles in the BIOS, which is all a
/// USB hostdev needs.
const DOMAIN_XML: &str = "<domain type='qemu'>
  <name>tb</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <memballoon model='none'/>
  </devices>
</domain>
";

/// `arg` single-quoted for `sh`: the only character that needs care is `'` itself.
pub fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// The `<hostdev>` a person writes by hand to give a VM the USB device at `bus`/`device`,
/// with a user alias (libvirt requires `ua-`; it becomes QEMU's device id).
pub fn hostdev_xml(bus: u32, device: u32, alias: &str) -> String {
    format!(
        "<hostdev mode='subsystem' type='usb'><source><address bus='{bus}' device='{device}'/>\
         </source><alias name='{alias}'/></hostdev>\n"
    )
}

/// Write `contents` to `path` in the guest (through base64: nothing in it reaches `sh`).
pub async fn write_file(bed: &mut Bed, path: &str, contents: &str) -> Result<()> {
    let encoded = base64_encode(contents.as_bytes());
    bed.guest_ok(&format!(
        "printf %s {encoded} | base64 -d > {}",
        quote(path)
    ))
    .await?;
    Ok(())
}

/// Run `virsh -c qemu:///system ARGS...` in the guest (a KVM-base limit, scaled).
pub async fn virsh(bed: &mut Bed, args: &[&str]) -> Result<GuestOutput> {
    let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
    bed.guest_with_timeout(&format!("virsh -c {URI} {}", args.join(" ")), VIRSH_TIMEOUT)
        .await
}

/// [`virsh`] that must succeed: its stdout, or an error with virsh's message and the tail
/// of libvirtd's log.
pub async fn virsh_ok(bed: &mut Bed, args: &[&str]) -> Result<String> {
    let out = virsh(bed, args).await?;
    if out.rc != 0 {
        let log = daemon_log(bed).await;
        bail!(
            "virsh {} failed (rc {}): {}\n{log}",
            args.join(" "),
            out.rc,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// The last lines of libvirtd's log and output, for a failure message.
pub async fn daemon_log(bed: &mut Bed) -> String {
    match bed
        .guest(&format!("tail -n 20 {DAEMON_LOG} {DAEMON_OUT} 2>&1"))
        .await
    {
        Ok(out) => format!("libvirtd's log:\n{}", out.stdout.trim_end()),
        Err(e) => format!("(libvirtd's log could not be read: {e:#})"),
    }
}

/// Start libvirtd and wait until `virsh version` answers; how long that took (the first
/// start after a boot includes QEMU's capability probe).
pub async fn start(bed: &mut Bed) -> Result<Duration> {
    let started = Instant::now();
    bed.guest_ok(&format!("libvirtd >{DAEMON_OUT} 2>&1 </dev/null &"))
        .await?;
    let ready = bed
        .wait_guest(
            "libvirtd to answer `virsh version`",
            &format!("virsh -c {URI} version"),
            START_TIMEOUT,
        )
        .await;
    if let Err(e) = ready {
        let log = daemon_log(bed).await;
        return Err(e.context(log));
    }
    Ok(started.elapsed())
}

/// Kill libvirtd (SIGTERM, as a service manager stops it) and wait until it has exited:
/// a client connected to it sees its connection closed. Domains keep running.
pub async fn kill_daemon(bed: &mut Bed) -> Result<()> {
    bed.guest_ok(&format!("kill $(cat {DAEMON_PID})")).await?;
    bed.wait_guest(
        "libvirtd to exit",
        "! pidof libvirtd >/dev/null",
        GONE_TIMEOUT,
    )
    .await?;
    Ok(())
}

/// Restart libvirtd: [`kill_daemon`], then [`start`]; how long the start took.
pub async fn restart(bed: &mut Bed) -> Result<Duration> {
    kill_daemon(bed).await?;
    start(bed).await
}

/// Define the test domain ([`DOMAIN`]) and start it; how long `virsh start` took.
pub async fn define_and_start(bed: &mut Bed) -> Result<Duration> {
    write_file(bed, "/tmp/libvirt-domain.xml", DOMAIN_XML).await?;
    virsh_ok(bed, &["define", "/tmp/libvirt-domain.xml"]).await?;
    start_domain(bed).await
}

/// `virsh start` the test domain; how long it took (QEMU started and running).
pub async fn start_domain(bed: &mut Bed) -> Result<Duration> {
    let started = Instant::now();
    virsh_ok(bed, &["start", DOMAIN]).await?;
    let took = started.elapsed();
    let state = virsh_ok(bed, &["domstate", DOMAIN]).await?;
    ensure!(
        state.trim() == "running",
        "domain {DOMAIN} is '{}' after virsh start",
        state.trim()
    );
    Ok(took)
}

/// `virsh destroy` the test domain (its QEMU is killed; the definition stays).
pub async fn destroy_domain(bed: &mut Bed) -> Result<()> {
    virsh_ok(bed, &["destroy", DOMAIN]).await?;
    Ok(())
}

/// `virsh attach-device DOMAIN FILE --live`: a hostdev XML file already in the guest.
pub async fn attach(bed: &mut Bed, file: &str) -> Result<()> {
    virsh_ok(bed, &["attach-device", DOMAIN, file, "--live"]).await?;
    Ok(())
}

/// `virsh detach-device-alias DOMAIN ALIAS --live`, then wait until the live XML no
/// longer has the alias (libvirt finishes the detach when QEMU reports DEVICE_DELETED).
pub async fn detach(bed: &mut Bed, alias: &str) -> Result<()> {
    virsh_ok(bed, &["detach-device-alias", DOMAIN, alias, "--live"]).await?;
    let script = format!(
        "! virsh -c {URI} dumpxml {DOMAIN} | grep -q {}",
        quote(&format!("<alias name='{alias}'/>"))
    );
    bed.wait_guest(
        &format!("{alias} to leave {DOMAIN}'s live XML"),
        &script,
        GONE_TIMEOUT,
    )
    .await?;
    Ok(())
}

/// The domain's live XML (`virsh dumpxml`).
pub async fn dumpxml(bed: &mut Bed) -> Result<String> {
    virsh_ok(bed, &["dumpxml", DOMAIN]).await
}

/// What QEMU itself says of its usb-host `alias` (QEMU's device id): whether it is
/// attached to a host device (`qom-get .../attached` through `virsh qemu-monitor-command`).
pub async fn qom_attached(bed: &mut Bed, alias: &str) -> Result<bool> {
    let command = serde_json::json!({
        "execute": "qom-get",
        "arguments": {"path": format!("/machine/peripheral/{alias}"), "property": "attached"},
    })
    .to_string();
    let out = virsh_ok(bed, &["qemu-monitor-command", DOMAIN, &command]).await?;
    let reply: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("qemu-monitor-command qom-get {alias} printed: {out}"))?;
    match reply.get("return") {
        Some(Value::Bool(attached)) => Ok(*attached),
        _ => bail!("QEMU's answer to qom-get {alias}.attached: {reply}"),
    }
}

/// Stop everything: the domain's QEMU (destroyed, undefined), libvirtd, and their state,
/// keeping the capability cache warm for the next start in this boot. The reset does the
/// same for a scenario that failed half-way.
pub async fn stop(bed: &mut Bed) -> Result<()> {
    // Either may fail when the domain is not running or not defined: the checks below
    // are what matters.
    virsh(bed, &["destroy", DOMAIN]).await?;
    virsh(bed, &["undefine", DOMAIN]).await?;
    // `virsh destroy` returns once the domain's QEMU has exited; inner QEMUs a scenario
    // runs beside the domain are none of this function's business.
    bed.guest_ok("killall libvirtd 2>/dev/null; true").await?;
    bed.wait_guest(
        "libvirtd to exit",
        "! pidof libvirtd >/dev/null",
        GONE_TIMEOUT,
    )
    .await?;
    bed.guest_ok(&format!("rm -rf {STATE}")).await?;
    Ok(())
}

/// libvirt's state in the guest apart from the capability cache: what [`stop`] and the
/// reset remove.
pub const STATE: &str = "/run/libvirt /run/libvirtd.pid /var/lib/libvirt/qemu/* \
                         /etc/libvirt/qemu/*.xml /etc/libvirt/qemu/autostart \
                         /var/log/libvirt/qemu/* /var/log/libvirt/libvirtd.*";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_argument_reaches_sh_unchanged_whatever_it_holds() {
        let arg = r#"<alias name='ua-x'/> $(reboot) "; `id` \ *"#;

        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote(arg)))
            .output()
            .expect("sh runs");

        assert_eq!(String::from_utf8_lossy(&out.stdout), arg);
    }

    #[test]
    fn the_hand_written_hostdev_names_bus_device_and_alias() {
        let xml = hostdev_xml(1, 12, "ua-manual-3");

        assert!(xml.contains("<address bus='1' device='12'/>"), "{xml}");
        assert!(xml.contains("<alias name='ua-manual-3'/>"), "{xml}");
    }
}
