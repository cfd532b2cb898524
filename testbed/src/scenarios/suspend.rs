//! Suspend to RAM and resume with `usbroute serve` in the guest: three devices attached
//! to an inner QEMU (by address, by port, by id) are held by it again after the guest
//! slept in S3 and was woken by the outer QMP's `system_wakeup`, and the daemon said it
//! noticed the resume.
//!
//! What resume does here (docs/daemon.md, "Suspend and resume"): the guest's xHCI and
//! EHCI come back reset, the kernel reset-resumes every device (same devnum), drops the
//! inner QEMU's usbfs claims and hands the interfaces back to usbhid and usb-storage,
//! while QEMU still calls its usb-host devices `attached`. So "held again" is checked
//! as QEMU's `attached` and no guest driver but usbfs (QEMU's claim) on any interface.

use super::daemon::{
    address_id, qom_attached, start_daemon, usb_hosts, wait_hosts, wait_settled, CONFIG, CONTROL,
    PROBE,
};
use crate::bed::Bed;
use crate::usb::{Ctrl, Kind, UsbDevice};
use anyhow::{bail, ensure, Result};
use std::time::{Duration, Instant};
use usbroute::backend::qemu::qmp::Qmp;

/// What the guest may take to enter S3 and to come back (KVM base).
const SLEEP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the guest sleeps in S3 before it is woken.
const ASLEEP: Duration = Duration::from_secs(3);

/// Attach three ways, S3, wake, and see every device held by the inner QEMU again.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let kbd = UsbDevice::new(Kind::Kbd, "s3-kbd", Ctrl::Xhci, "1");
    let tablet = UsbDevice::new(Kind::Tablet, "s3-tab", Ctrl::Xhci, "4");
    let disk = UsbDevice::new(Kind::Storage, "s3-disk", Ctrl::Ehci, "1");
    let kbd_name = bed.plug(&kbd).await?;
    let tablet_name = bed.plug(&tablet).await?;
    let disk_name = bed.plug(&disk).await?;
    let extra = format!("-qmp unix:{PROBE},server=on,wait=off");
    let inner = bed.start_inner_qemu("serve", "root", &extra).await?;
    let config = format!(
        "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"inner\"\nqmp = \"{}\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"port:{kbd_name}\"\nby = \"address\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"port:{tablet_name}\"\nby = \"port\"\n\n\
         [[rule]]\nvm = \"inner\"\nmatch = \"id:46f4:0001\"\nby = \"id\"\n",
        inner.qmp
    );
    bed.guest_ok(&format!("cat > {CONFIG} <<'EOF'\n{config}EOF"))
        .await?;
    start_daemon(bed).await?;
    let by_address = address_id(bed, &kbd_name).await?;
    let held = [
        (by_address.as_str(), kbd_name.as_str()),
        (
            &format!("usbroute-port-{tablet_name}"),
            tablet_name.as_str(),
        ),
        ("usbroute-id-46f4-0001", disk_name.as_str()),
    ]
    .map(|(id, name)| (id.to_string(), name.to_string()));
    let ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
    wait_hosts(bed, "the three devices in the inner QEMU", &ids).await?;
    let ports = [kbd_name.as_str(), &tablet_name, &disk_name];
    wait_settled(bed, "the daemon to settle", &ports).await?;
    wait_held(bed, "the inner QEMU to hold every device before S3", &held).await?;

    suspend_and_wake(bed).await?;

    let logged = bed
        .wait_guest(
            "the daemon to log the resume",
            "grep -q 'host resumed after .* s asleep: resyncing' /tmp/serve.log",
            Duration::from_secs(10),
        )
        .await;
    if let Err(e) = logged {
        let kernel = bed.guest("dmesg | grep -i -E 'PM:|suspended for'").await?;
        bail!("{e:#}\nthe guest kernel on the sleep:\n{}", kernel.stdout);
    }
    wait_renewed(bed, &ids).await?;
    wait_settled(bed, "the daemon to settle after the resume", &ports).await?;
    wait_hosts(bed, "the same three devices in the inner QEMU", &ids).await?;
    wait_held(
        bed,
        "the inner QEMU to hold every device after the resume",
        &held,
    )
    .await?;
    // Stop the daemon before the runner unplugs, so it hands nothing to anyone meanwhile.
    bed.guest_ok("kill -9 $(pidof usbroute); true").await?;
    Ok(())
}

/// Put the guest in S3 and wake it with `system_wakeup` once the outer QEMU says it is
/// suspended. The guest's `echo mem` returns only after the resume, so it runs in the
/// foreground (the agent answers once the guest is back) while a task on the outer QMP
/// waits for the suspend and wakes it: the guest is never left asleep, whatever fails.
async fn suspend_and_wake(bed: &mut Bed) -> Result<()> {
    let mem_sleep = bed.guest_ok("cat /sys/power/mem_sleep").await?;
    ensure!(
        mem_sleep.contains("[deep]"),
        "the guest offers no S3 (mem_sleep: {}): the outer q35 needs -global ICH9-LPC.disable_s3=0",
        mem_sleep.trim()
    );
    let waker = tokio::spawn(wake_when_suspended(
        bed.qmp().clone(),
        bed.scaled(SLEEP_TIMEOUT),
    ));
    // pm_debug_messages: the kernel logs how long it measured the sleep.
    let slept = bed
        .guest_with_timeout(
            "echo 1 > /sys/power/pm_debug_messages; echo mem > /sys/power/state",
            SLEEP_TIMEOUT + ASLEEP,
        )
        .await;
    // The waker ends on its own: woken, or the guest never slept within its deadline.
    let woken = waker.await?;
    let slept = slept?;
    ensure!(
        slept.rc == 0,
        "echo mem > /sys/power/state failed (rc {}): {}",
        slept.rc,
        slept.stderr.trim()
    );
    let took = woken?;
    bed.record_wait(
        "the guest to enter S3 (then woken)",
        took,
        bed.scaled(SLEEP_TIMEOUT),
    );
    Ok(())
}

/// Poll the outer QEMU until the guest is suspended, then `system_wakeup` it; how long
/// the guest took to fall asleep. Fails when it did not within `deadline`.
async fn wake_when_suspended(qmp: Qmp, deadline: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let status = qmp.execute("query-status", None).await?;
        if status["status"] == "suspended" {
            let fell_asleep = started.elapsed();
            // The stimulus, not a wait for a result: a host sleeps for seconds at least,
            // and the guest kernel measures its sleep with the RTC, in whole seconds. A
            // wake-up within the same second is no sleep to it (nothing to notice).
            tokio::time::sleep(ASLEEP).await;
            qmp.execute("system_wakeup", None).await?;
            return Ok(fell_asleep);
        }
        if started.elapsed() > deadline {
            bail!("the guest did not enter S3 within {deadline:.1?} (status {status})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the daemon has attached each of `ids` again since it logged the resume:
/// QEMU kept listing them, so only the daemon's renewal gives them back.
async fn wait_renewed(bed: &mut Bed, ids: &[&str]) -> Result<()> {
    let script = ids
        .iter()
        .map(|id| {
            format!(
                "sed -n '/host resumed after/,$p' /tmp/serve.log | grep -q 'attach.* done.*id=\"{id}\"' || {{ echo 'not attached again: {id}' >&2; exit 1; }}; "
            )
        })
        .collect::<String>();
    bed.wait_guest(
        "the daemon to attach every device again after the resume",
        &script,
        Duration::from_secs(20),
    )
    .await?;
    Ok(())
}

/// Wait until the inner QEMU says each usb-host of `held` (id, guest name) is attached
/// and no guest driver holds any interface of its device (usbfs is QEMU's claim).
async fn wait_held(bed: &mut Bed, what: &str, held: &[(String, String)]) -> Result<()> {
    let poll = bed.poll(what, Duration::from_secs(10));
    loop {
        let mut wrong = Vec::new();
        for (id, name) in held {
            if !qom_attached(bed, id).await? {
                wrong.push(format!("{id} not attached"));
            }
            let drivers = bed
                .guest_ok(&format!(
                    "for i in /sys/bus/usb/devices/{name}:*; do d=$(basename \"$(readlink $i/driver)\"); \
                     case $d in ''|usbfs) ;; *) echo ${{i##*/}} $d;; esac; done"
                ))
                .await?;
            if !drivers.trim().is_empty() {
                wrong.push(format!("the guest's driver holds {}", drivers.trim()));
            }
        }
        if wrong.is_empty() {
            poll.met(bed);
            return Ok(());
        }
        if let Err(e) = poll.again(bed, wrong.join("; ")).await {
            let hosts = usb_hosts(bed).await?;
            let log = bed.guest("tail -n 30 /tmp/serve.log").await?;
            bail!(
                "{e:#}\ninner QEMU usb-host devices: {hosts:?}\ndaemon log:\n{}",
                log.stdout
            );
        }
    }
}
