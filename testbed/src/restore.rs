//! Putting the machine back between scenarios, so a failure is charged to the scenario
//! that caused it and never to the next one.
//!
//! [`Bed::reset`] stops what scenarios start in the guest (inner QEMUs, usbroute
//! daemons, libvirtd and its domains), unplugs what the bed plugged, puts every USB controller back on its own
//! driver (unbinding it from vfio-pci or whatever a scenario left it on), drops
//! usbroute's records, and then verifies the result. What it cannot restore, a reboot
//! does (see the runner).

use crate::bed::Bed;
use crate::usb::{EHCI_PCI, UHCI_PCI, XHCI_PCI};
use anyhow::{bail, Result};
use std::time::Duration;

/// Every USB controller of the guest and its own driver, in the order to bind them back
/// (an EHCI before its UHCI companions, as the kernel prefers).
const CONTROLLERS: [(&str, &str); 5] = [
    (XHCI_PCI, "xhci_hcd"),
    (EHCI_PCI, "ehci-pci"),
    (UHCI_PCI[0], "uhci_hcd"),
    (UHCI_PCI[1], "uhci_hcd"),
    (UHCI_PCI[2], "uhci_hcd"),
];

/// Where usbroute keeps records a scenario may leave behind (vfio binds, routing state).
const USBROUTE_STATE: &str = "/run/usbroute /var/lib/usbroute";

/// The processes scenarios start in the guest (inner QEMUs and libvirt's domains, usbroute,
/// libvirtd; the `bench` scenario's guest program and the socat its udev rule runs), killed
/// and waited for between them.
/// Busybox `killall` and `pidof`: the guest's busybox (Debian's busybox-static) has no
/// `pkill` or `pgrep`, and a `! pgrep` that is not found passes.
const GUEST_PROCESSES: &str = "qemu-system-x86_64 usbroute libvirtd usbroute-bench socat";

/// The udev rule the `bench` scenario installs (its udev_socat method), removed with it.
pub const BENCH_UDEV_RULE: &str = "/etc/udev/rules.d/99-usbroute-bench.rules";

/// The guest's PS/2 keyboard (q35's i8042), which a scenario may unbind.
const SERIO: &str = "/sys/bus/serio/devices/serio0";

impl Bed {
    /// Put the machine back to bare controllers and verify it. `Ok` lists what had to be
    /// undone that a scenario should have undone itself (a controller left on vfio-pci);
    /// `Err` means the machine could not be restored (reboot it).
    pub async fn reset(&mut self) -> Result<Vec<String>> {
        if self.config().xen.is_some() {
            return crate::xen::reset(self).await;
        }
        if let Some(why) = self.broken() {
            bail!("the guest is unusable: {why}");
        }
        let mut undone = Vec::new();
        if self.wake_if_suspended().await? {
            undone.push("the guest was left suspended (woken with system_wakeup)".into());
        }
        self.stop_guest_processes().await?;
        self.unplug_all().await?;
        for (pci, own) in CONTROLLERS {
            if let Some(was) = self.rebind(pci, own).await? {
                undone.push(format!("{pci} was left on {was}"));
            }
        }
        // The PS/2 keyboard: vfio-rollback lets it go for a while.
        // libvirt's state goes too (not its capability cache: the next start stays warm).
        self.guest_ok(&format!(
            "rm -rf {USBROUTE_STATE} {} /tmp/inner-* /tmp/serve* /tmp/libvirt-* /tmp/bench-*; \
             [ -e {BENCH_UDEV_RULE} ] && rm -f {BENCH_UDEV_RULE} && udevadm control --reload; \
             [ -e {SERIO}/driver ] || echo -n serio0 > /sys/bus/serio/drivers/atkbd/bind; true",
            crate::libvirt::STATE
        ))
        .await?;
        self.verify_bare().await?;
        Ok(undone)
    }

    /// Wake a guest a scenario left in S3 (its agent answers nothing while asleep, so the
    /// rest of the reset would time out and charge the next scenario a reboot); whether
    /// it had to.
    async fn wake_if_suspended(&mut self) -> Result<bool> {
        let status = self.qmp.execute("query-status", None).await?;
        if status["status"] != "suspended" {
            return Ok(false);
        }
        self.qmp.execute("system_wakeup", None).await?;
        let poll = self.poll("the guest left in S3 to run again", Duration::from_secs(15));
        loop {
            let status = self.qmp.execute("query-status", None).await?;
            if status["status"] == "running" {
                poll.met(self);
                return Ok(true);
            }
            poll.again(self, &status).await?;
        }
    }

    /// Kill every inner QEMU and usbroute process, and wait until they are gone (a QEMU
    /// holding a device or a vfio group lets go only when it has exited).
    async fn stop_guest_processes(&mut self) -> Result<()> {
        self.guest_ok(&format!("killall -9 {GUEST_PROCESSES} 2>/dev/null; true"))
            .await?;
        self.wait_guest(
            "inner QEMUs and usbroute processes to exit",
            &format!("! pidof {GUEST_PROCESSES} >/dev/null"),
            Duration::from_secs(10),
        )
        .await?;
        Ok(())
    }

    /// Bind `pci` back to `own` if it is on another driver (or none), clearing any
    /// driver_override; the driver it was on, if it had to be moved.
    async fn rebind(&mut self, pci: &str, own: &str) -> Result<Option<String>> {
        let dev = format!("/sys/bus/pci/devices/{pci}");
        let now = self
            .guest_ok(&format!(
                "d=$(readlink {dev}/driver) && basename \"$d\" || echo none; cat {dev}/driver_override"
            ))
            .await?;
        let mut lines = now.lines();
        let driver = lines.next().unwrap_or("none").trim().to_string();
        let over = lines.next().unwrap_or("(null)").trim().to_string();
        if driver == own && over == "(null)" {
            return Ok(None);
        }
        self.guest_ok(&format!(
            "[ -e {dev}/driver ] && echo -n {pci} > {dev}/driver/unbind; \
             echo > {dev}/driver_override; echo -n {pci} > /sys/bus/pci/drivers_probe; true"
        ))
        .await?;
        self.wait_guest(
            &format!("{pci} to be back on {own}"),
            &format!("[ \"$(basename \"$(readlink {dev}/driver)\")\" = {own} ]"),
            Duration::from_secs(10),
        )
        .await?;
        Ok(Some(if over == "(null)" {
            driver
        } else {
            format!("{driver} (driver_override {over})")
        }))
    }

    /// The machine as a scenario may expect it: every controller on its own driver with
    /// no override, no inner QEMU or usbroute running, no USB device but root hubs.
    async fn verify_bare(&mut self) -> Result<()> {
        let mut script: String = CONTROLLERS
            .iter()
            .map(|(pci, own)| {
                let dev = format!("/sys/bus/pci/devices/{pci}");
                format!(
                    "d=$(basename \"$(readlink {dev}/driver)\"); o=$(cat {dev}/driver_override); \
                     [ \"$d\" = {own} ] && [ \"$o\" = '(null)' ] || echo \"{pci} is on '$d' (override $o), not {own}\"; "
                )
            })
            .collect();
        script.push_str(&format!(
            "[ -e {SERIO}/driver ] || echo 'the PS/2 keyboard serio0 has no driver'; "
        ));
        script.push_str(&format!(
            "for p in {GUEST_PROCESSES}; do pidof $p >/dev/null && echo \"$p is still running\"; done; "
        ));
        script.push_str(
            "for d in /sys/bus/usb/devices/*-*; do \
               case ${d##*/} in *:*) ;; *) [ -e \"$d\" ] && echo \"USB device ${d##*/} is still there\";; esac; \
             done; true",
        );
        let wrong = self
            .wait_guest(
                "the machine to be back to bare controllers",
                &format!("out=$({script}); [ -z \"$out\" ] || {{ echo \"$out\" >&2; exit 1; }}"),
                Duration::from_secs(10),
            )
            .await;
        match wrong {
            Ok(_) => Ok(()),
            Err(e) => bail!("the machine is not back to bare controllers: {e:#}"),
        }
    }
}
