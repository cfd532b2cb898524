//! The Xen machine: what `xen-*` scenarios use besides [`Bed`].
//!
//! On the Xen machine the bed's guest is dom0 (a PV guest of Xen 4.17): `bed.guest_ok`
//! runs a script there, `bed.plug` puts a device on dom0's controllers. Beside it runs one
//! PV domU, `domu`, with a qusb PVUSB controller (ports 1-8), served by the xenpv
//! qemu-system-xen 7.2 libxl starts for it. The domU publishes the USB devices it sees in
//! xenstore (testbed/xen/domu-init), which is how [`domu_usb`] asks it.
//!
//! Everything here runs in dom0 through the agent: `xl` and `xenstore-*` are dom0's.

use crate::agent::GuestOutput;
use crate::bed::Bed;
use crate::libvirt::quote;
use anyhow::{bail, ensure, Context, Result};
use std::fmt;
use std::time::{Duration, Instant};

/// The domU's name.
pub const DOMU: &str = "domu";
/// Its config in dom0 (testbed/xen/domu.cfg).
pub const DOMU_CFG: &str = "/var/lib/testbed-xen/domu.cfg";
/// Its console, as xenconsoled logs it in dom0 (for failure reports).
pub const DOMU_CONSOLE: &str = "/var/log/xen/console/guest-domu.log";
/// Where dom0 keeps the domU's current domid (written by [`create_domu`]), so a dom0
/// script can say `D=$(cat /run/testbed-domid)`.
pub const DOMID_FILE: &str = "/run/testbed-domid";
/// The backend's xenstore directory for qusb controllers (`<domid>/<ctrl>/port/<n>`).
pub const QUSB_BACKEND: &str = "/local/domain/0/backend/qusb";

/// `xl create` until the domU's first report (KVM base): 11-15 s for xl and 20-23 s for
/// the domU's boot under TCG on an idle machine.
const CREATE_TIMEOUT: Duration = Duration::from_secs(20);
/// A device reaching or leaving the domU after `xl usbdev-attach`/`-detach` (KVM base;
/// 0.2-3.3 s under TCG).
const DOMU_USB_TIMEOUT: Duration = Duration::from_secs(8);
/// One `xl` command (KVM base; usbdev-attach 0.6-0.9 s, destroy 1-4 s under TCG).
const XL_TIMEOUT: Duration = Duration::from_secs(10);

/// A USB device as the domU's sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomuDevice {
    /// Kernel name in the domU (`1-1`, `usb1` for the root hub).
    pub busid: String,
    /// `vid:pid`, lowercase hex.
    pub id: String,
    /// Drivers of its interfaces (empty while none is bound).
    pub drivers: Vec<String>,
}

impl fmt::Display for DomuDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} [{}]", self.busid, self.id, self.drivers.join(","))
    }
}

/// Parse the domU's `data/testbed-usb`: `BUSID VID:PID DRIVERS;...`, DRIVERS comma
/// separated or `-`. Anything else is an error: the value comes from the domU.
pub fn parse_domu_usb(text: &str) -> Result<Vec<DomuDevice>> {
    text.split(';')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let fields: Vec<&str> = entry.split(' ').collect();
            let [busid, id, drivers] = fields[..] else {
                bail!("the domU's USB report has a malformed entry '{entry}'");
            };
            let drivers = match drivers {
                "-" => Vec::new(),
                list => list.split(',').map(String::from).collect(),
            };
            Ok(DomuDevice {
                busid: busid.into(),
                id: id.into(),
                drivers,
            })
        })
        .collect()
}

/// Run `xl` with these arguments in dom0 (each quoted: they reach xl as given).
pub async fn xl(bed: &mut Bed, args: &[&str]) -> Result<GuestOutput> {
    let line: Vec<String> = args.iter().map(|a| quote(a)).collect();
    bed.guest_with_timeout(&format!("xl {}", line.join(" ")), XL_TIMEOUT)
        .await
}

/// [`xl`], failing on a non-zero exit with xl's own message; its stdout.
pub async fn xl_ok(bed: &mut Bed, args: &[&str]) -> Result<String> {
    let out = xl(bed, args).await?;
    ensure!(
        out.rc == 0,
        "xl {} failed (rc {}): {}",
        args.join(" "),
        out.rc,
        out.stderr.trim()
    );
    Ok(out.stdout)
}

/// `xenstore-read PATH` in dom0 (an error when the node does not exist).
pub async fn xenstore_read(bed: &mut Bed, path: &str) -> Result<String> {
    let out = bed
        .guest_ok(&format!("xenstore-read {}", quote(path)))
        .await?;
    Ok(out.trim_end_matches('\n').to_string())
}

/// `xenstore-write PATH VALUE` in dom0.
pub async fn xenstore_write(bed: &mut Bed, path: &str, value: &str) -> Result<()> {
    bed.guest_ok(&format!("xenstore-write {} {}", quote(path), quote(value)))
        .await?;
    Ok(())
}

/// The domU's current domid.
pub async fn domid(bed: &mut Bed) -> Result<u32> {
    let text = bed.guest_ok(&format!("cat {DOMID_FILE}")).await?;
    text.trim()
        .parse()
        .with_context(|| format!("{DOMID_FILE} holds '{}', not a domid", text.trim()))
}

/// The qusb port node of controller `ctrl`, port `port` of the domU: the busid of the
/// device on it, or empty.
pub async fn port_node(bed: &mut Bed, ctrl: u32, port: u32) -> Result<String> {
    let d = domid(bed).await?;
    Ok(format!("{QUSB_BACKEND}/{d}/{ctrl}/port/{port}"))
}

/// `xl create` the domU and wait until it reports its USB view; how long that took.
/// Any domU of that name is destroyed first.
pub async fn create_domu(bed: &mut Bed) -> Result<Duration> {
    create_domu_from(bed, DOMU_CFG).await
}

/// [`create_domu`] from another config in dom0 (one that names the same domU).
pub async fn create_domu_from(bed: &mut Bed, cfg: &str) -> Result<Duration> {
    destroy_domu(bed).await?;
    let started = Instant::now();
    bed.guest_with_timeout(
        &format!("rm -f {DOMU_CONSOLE}; xl create -q {cfg} && xl domid {DOMU} > {DOMID_FILE}"),
        CREATE_TIMEOUT,
    )
    .await
    .and_then(|out| {
        ensure!(
            out.rc == 0,
            "xl create {cfg} failed (rc {}): {}",
            out.rc,
            out.stderr.trim()
        );
        Ok(())
    })?;
    let d = domid(bed).await?;
    // Ready once it wrote its first report, and its controller is connected (state 4).
    let ready = format!(
        "xenstore-read /local/domain/{d}/data/testbed-seq >/dev/null 2>&1 && \
         [ \"$(xenstore-read {QUSB_BACKEND}/{d}/0/state)\" = 4 ]"
    );
    let waited = bed
        .wait_guest(
            "the domU to boot and report its USB view",
            &ready,
            CREATE_TIMEOUT,
        )
        .await;
    if let Err(e) = waited {
        let console = domu_console(bed).await;
        return Err(e.context(format!("domU console:\n{console}")));
    }
    Ok(started.elapsed())
}

/// Destroy the domU if it exists, and forget its domid.
pub async fn destroy_domu(bed: &mut Bed) -> Result<()> {
    bed.guest_with_timeout(
        &format!("rm -f {DOMID_FILE}; ! xl domid {DOMU} >/dev/null 2>&1 || xl destroy {DOMU}"),
        XL_TIMEOUT,
    )
    .await
    .and_then(|out| {
        ensure!(
            out.rc == 0,
            "xl destroy {DOMU} failed (rc {}): {}",
            out.rc,
            out.stderr.trim()
        );
        Ok(())
    })
}

/// The end of the domU's console (its init's marks, kernel warnings).
pub async fn domu_console(bed: &mut Bed) -> String {
    match bed.guest(&format!("tail -n 30 {DOMU_CONSOLE}")).await {
        Ok(out) => out.stdout,
        Err(e) => format!("(unreadable: {e:#})"),
    }
}

/// The USB devices the domU sees now (root hubs included).
pub async fn domu_usb(bed: &mut Bed) -> Result<Vec<DomuDevice>> {
    // One agent round trip: dom0's own domid file names the domU's report.
    let text = bed
        .guest_ok(&format!(
            "xenstore-read /local/domain/$(cat {DOMID_FILE})/data/testbed-usb"
        ))
        .await?;
    parse_domu_usb(text.trim_end_matches('\n'))
}

/// Wait until the domU shows a device `id` (`vid:pid`) with its drivers bound
/// (`present`), or none with that id (`!present`); what it then shows.
pub async fn wait_domu(bed: &mut Bed, id: &str, present: bool) -> Result<Vec<DomuDevice>> {
    let what = if present {
        format!("{id} to appear in the domU with its drivers bound")
    } else {
        format!("{id} to leave the domU")
    };
    let poll = bed.poll(&what, DOMU_USB_TIMEOUT);
    loop {
        let seen = domu_usb(bed).await?;
        let there = seen.iter().any(|d| d.id == id && !d.drivers.is_empty());
        let gone = !seen.iter().any(|d| d.id == id);
        if (present && there) || (!present && gone) {
            poll.met(bed);
            return Ok(seen);
        }
        let shown: Vec<String> = seen.iter().map(ToString::to_string).collect();
        poll.again(bed, shown.join("; ")).await?;
    }
}

/// `xl usbdev-attach domu hostbus=BUS hostaddr=ADDR` (decimal, as dom0's sysfs says).
pub async fn usbdev_attach(bed: &mut Bed, bus: u32, addr: u32) -> Result<()> {
    xl_ok(
        bed,
        &[
            "usbdev-attach",
            DOMU,
            &format!("hostbus={bus}"),
            &format!("hostaddr={addr}"),
        ],
    )
    .await?;
    Ok(())
}

/// `xl usbdev-detach domu CTRL PORT`.
pub async fn usbdev_detach(bed: &mut Bed, ctrl: u32, port: u32) -> Result<()> {
    xl_ok(
        bed,
        &["usbdev-detach", DOMU, &ctrl.to_string(), &port.to_string()],
    )
    .await?;
    Ok(())
}

/// `xl usbdev-detach domu CTRL PORT`, then wait until the domU no longer shows a device
/// `id` (`vid:pid`), both in one dom0 script: no agent round trips in between.
pub async fn detach_and_wait(bed: &mut Bed, ctrl: u32, port: u32, id: &str) -> Result<()> {
    // Polled every 50 ms, so many times within the (scaled) deadline.
    let polls = (bed.scaled(DOMU_USB_TIMEOUT).as_millis() / 50).max(1);
    let out = bed
        .guest_with_timeout(
            &format!(
                "xl usbdev-detach {DOMU} {ctrl} {port} || exit 1; n=0; \
                 while xenstore-read /local/domain/$(cat {DOMID_FILE})/data/testbed-usb | grep -q ' {id} '; do \
                   n=$((n+1)); [ $n -gt {polls} ] && {{ echo 'the domU still shows {id}' >&2; exit 1; }}; sleep 0.05; done"
            ),
            XL_TIMEOUT + DOMU_USB_TIMEOUT,
        )
        .await?;
    ensure!(
        out.rc == 0,
        "detaching controller {ctrl} port {port} ({id}) from the domU failed (rc {}): {}",
        out.rc,
        out.stderr.trim()
    );
    Ok(())
}

/// `xl usb-list domu`.
pub async fn usb_list(bed: &mut Bed) -> Result<String> {
    xl_ok(bed, &["usb-list", DOMU]).await
}

/// Put the Xen machine back between scenarios: stop usbroute, empty every port of the
/// domU's controller (`xl usbdev-detach`, or clearing a port a surprise removal left
/// holding a vanished device's busid), unplug what the bed plugged, and verify: the domU
/// runs with controller 0 alone and connected, sees no device but its root hub, and dom0
/// has no USB device but root hubs. A domU that is gone or has other controllers is
/// created again. `Ok` lists what had to be undone.
pub(crate) async fn reset(bed: &mut Bed) -> Result<Vec<String>> {
    if let Some(why) = bed.broken() {
        bail!("dom0 is unusable: {why}");
    }
    let mut undone = Vec::new();
    bed.guest_ok("killall -9 usbroute 2>/dev/null; true")
        .await?;
    bed.wait_guest(
        "usbroute processes to exit",
        "! pidof usbroute >/dev/null",
        Duration::from_secs(10),
    )
    .await?;
    let healthy = bed
        .guest(&format!(
            "D=$(cat {DOMID_FILE}) && xl domid {DOMU} 2>/dev/null | grep -qx \"$D\" && \
             [ \"$(xenstore-list {QUSB_BACKEND}/$D | tr '\\n' ' ')\" = '0 ' ]"
        ))
        .await?;
    if healthy.rc != 0 {
        undone.push("the domU was gone or had other USB controllers: created again".into());
        create_domu(bed).await?;
    }
    let d = domid(bed).await?;
    for port in 1..=8 {
        let node = format!("{QUSB_BACKEND}/{d}/0/port/{port}");
        let busid = xenstore_read(bed, &node).await?;
        if busid.is_empty() {
            continue;
        }
        if xl(bed, &["usbdev-detach", DOMU, "0", &port.to_string()])
            .await?
            .rc
            == 0
        {
            undone.push(format!("port {port} of the domU held {busid} (detached)"));
        } else {
            xenstore_write(bed, &node, "").await?;
            undone.push(format!(
                "port {port} of the domU held a vanished {busid} (cleared)"
            ));
        }
    }
    bed.unplug_all().await?;
    let verify = format!(
        "for p in $(seq 1 8); do b=$(xenstore-read {QUSB_BACKEND}/{d}/0/port/$p); \
           [ -z \"$b\" ] || echo \"domU port $p holds $b\"; done; \
         for d in /sys/bus/usb/devices/*-*; do case ${{d##*/}} in *:*) ;; *) [ -e \"$d\" ] && echo \"USB device ${{d##*/}} is still in dom0\";; esac; done; \
         xenstore-read /local/domain/{d}/data/testbed-usb | tr ';' '\\n' | grep -v '^usb' | grep . | sed 's/^/the domU still sees /'; true"
    );
    let wrong = bed
        .wait_guest(
            "the Xen machine to be back to an empty domU controller",
            &format!("out=$({verify}); [ -z \"$out\" ] || {{ echo \"$out\" >&2; exit 1; }}"),
            DOMU_USB_TIMEOUT,
        )
        .await;
    if let Err(e) = wrong {
        bail!("the Xen machine is not back to an empty domU controller: {e:#}");
    }
    Ok(undone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domu_report_lists_busid_id_and_drivers() {
        let seen =
            parse_domu_usb("usb1 1d6b:0002 hub;1-1 0627:0001 usbhid,usbhid;1-2 46f4:0001 -;")
                .unwrap();

        assert_eq!(
            seen.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "usb1 1d6b:0002 [hub]",
                "1-1 0627:0001 [usbhid,usbhid]",
                "1-2 46f4:0001 []"
            ]
        );
    }

    #[test]
    fn an_empty_domu_report_is_no_devices() {
        assert_eq!(parse_domu_usb("").unwrap(), []);
    }

    #[test]
    fn a_malformed_domu_report_is_refused_naming_the_entry() {
        let err = parse_domu_usb("usb1 1d6b:0002 hub;1-1 0627:0001").unwrap_err();

        assert!(err.to_string().contains("'1-1 0627:0001'"), "{err}");
    }
}
