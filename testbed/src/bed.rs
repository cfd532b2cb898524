//! `Bed`: what a scenario gets: a booted guest, the outer QMP, and helpers.

use crate::accel::Accel;
use crate::agent::{Agent, GuestOutput};
use crate::machine::{Machine, MachineConfig};
use crate::pace::{Pace, Wait, WaitLog, CALIBRATION_SCRIPT};
use crate::usb::{Kind, UsbDevice};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::time::{Duration, Instant};
use usbroute::backend::qemu::qmp::Qmp;

/// What a guest command may take by default (KVM base; see [`Pace`]).
const GUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// What an outer QMP command may take (KVM base).
const QMP_TIMEOUT: Duration = Duration::from_secs(8);
/// What the guest's boot may take, QEMU start to the agent's READY (KVM base).
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for the Xen machine: Xen, then dom0 as its PV guest (31-37 s under TCG on an
/// idle machine, 92 s once on a loaded one, against the plain guest's 5-8 s).
const XEN_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a condition is polled.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A booted guest with its outer QEMU.
pub struct Bed {
    pub(crate) machine: Machine,
    pub(crate) qmp: Qmp,
    pub(crate) agent: Agent,
    pub(crate) plugged: Vec<Plugged>,
    next_node: u32,
    pub(crate) broken: Option<String>,
    config: MachineConfig,
    pace: Pace,
    waits: WaitLog,
    /// How long the boot took (QEMU start to agent ready).
    pub boot_time: Duration,
    /// On the Xen machine, how long creating the domU took (`xl create` to its first
    /// report in xenstore); `None` on the plain guest.
    pub domu_time: Option<Duration>,
}

impl Bed {
    /// Start the outer QEMU, wait for the guest agent, and time the guest's speed
    /// (every later deadline is scaled by it: see [`Pace`]).
    pub async fn boot(cfg: &MachineConfig) -> Result<Bed> {
        let mut bed = Self::boot_with(cfg, Pace::uncalibrated(cfg.accel)).await?;
        bed.pace = bed.calibrate().await?;
        bed.start_domu().await?;
        Ok(bed)
    }

    /// On the Xen machine, create the domU every `xen-*` scenario shares (after the
    /// calibration: its deadlines are scaled).
    async fn start_domu(&mut self) -> Result<()> {
        if self.config.xen.is_some() {
            let took = crate::xen::create_domu(self)
                .await
                .with_context(|| format!("creating the domU\n{}", self.failure_log()))?;
            self.domu_time = Some(took);
        }
        Ok(())
    }

    /// Boot with a known pace (a reboot keeps the first boot's measurement).
    async fn boot_with(cfg: &MachineConfig, pace: Pace) -> Result<Bed> {
        let started = Instant::now();
        let mut machine = Machine::start(cfg, pace.deadline(Duration::from_secs(3))).await?;
        let connected = async {
            // The pace's deadline for the greeting too: QEMU greets once its main loop
            // runs, which on a loaded machine may be later than a plain connect's 5 s.
            let qmp =
                Qmp::connect_with_timeout(&machine.qmp_socket, pace.deadline(QMP_TIMEOUT)).await?;
            let mut agent = Agent::connect(&machine.agent_socket).await?;
            let boot_timeout = match cfg.xen {
                None => BOOT_TIMEOUT,
                Some(_) => XEN_BOOT_TIMEOUT,
            };
            agent.wait_ready(pace.deadline(boot_timeout)).await?;
            anyhow::Ok((qmp, agent))
        }
        .await;
        let (qmp, agent) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                let log = machine.failure_log(60);
                machine.stop().await;
                bail!("the guest did not boot: {e:#}\n{log}");
            }
        };
        let mut bed = Bed {
            machine,
            qmp,
            agent,
            plugged: Vec::new(),
            next_node: 0,
            broken: None,
            config: cfg.clone(),
            pace,
            waits: WaitLog::default(),
            boot_time: started.elapsed(),
            domu_time: None,
        };
        bed.guest_ok(
            "test -x /bin/usbroute || { echo 'no /bin/usbroute in the guest: scripts/testbed appends it to the initramfs' >&2; exit 1; }",
        )
        .await?;
        Ok(bed)
    }

    /// Time [`CALIBRATION_SCRIPT`] in the guest: the best of three runs, less the agent's
    /// round trip for an empty script.
    async fn calibrate(&mut self) -> Result<Pace> {
        let started = Instant::now();
        self.guest_ok("true").await?;
        let round_trip = started.elapsed();
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            self.guest_ok(CALIBRATION_SCRIPT).await?;
            best = best.min(started.elapsed());
        }
        Ok(Pace::measured(
            self.config.accel,
            best.saturating_sub(round_trip),
        ))
    }

    /// Power the guest off and boot it again from scratch, keeping the measured pace:
    /// for when a scenario left the machine in a state [`Bed::reset`] cannot undo.
    pub async fn reboot(&mut self) -> Result<()> {
        self.machine.stop().await;
        let fresh = Self::boot_with(&self.config, self.pace).await?;
        let waits = std::mem::take(&mut self.waits);
        *self = fresh;
        self.waits = waits;
        self.start_domu().await
    }

    /// The guest's measured speed.
    pub fn pace(&self) -> Pace {
        self.pace
    }

    /// The waits recorded since the last call (one scenario's).
    pub fn take_waits(&mut self) -> Vec<Wait> {
        self.waits.take()
    }

    /// KVM or TCG.
    pub fn accel(&self) -> Accel {
        self.config.accel
    }

    /// `kvm_timeout` (what a step needs under KVM on an idle machine) scaled for this
    /// guest's accelerator and measured speed.
    pub fn scaled(&self, kvm_timeout: Duration) -> Duration {
        self.pace.deadline(kvm_timeout)
    }

    /// The host directory the guest sees as `/host`.
    pub fn share(&self) -> &std::path::Path {
        &self.config.share
    }

    /// Run a `sh` script in the guest (the default limit, scaled). A non-zero rc is not
    /// an error here.
    pub async fn guest(&mut self, script: &str) -> Result<GuestOutput> {
        self.guest_with_timeout(script, GUEST_TIMEOUT).await
    }

    /// Run a `sh` script in the guest with a time limit (a KVM base, scaled).
    pub async fn guest_with_timeout(
        &mut self,
        script: &str,
        kvm_timeout: Duration,
    ) -> Result<GuestOutput> {
        if let Some(why) = &self.broken {
            bail!("the guest is unusable: {why}");
        }
        let timeout = self.scaled(kvm_timeout);
        // The guest kills the script at `timeout`; its reply may take a while on top.
        let reply_margin = self.scaled(Duration::from_secs(4));
        match self.agent.run(script, timeout, reply_margin).await {
            Ok(out) => Ok(out),
            Err(e) => {
                self.broken = Some(format!("{e:#}"));
                Err(e.context(format!("running in the guest: {script}")))
            }
        }
    }

    /// Run a script in the guest; its stdout, or an error with rc and stderr.
    pub async fn guest_ok(&mut self, script: &str) -> Result<String> {
        let out = self.guest(script).await?;
        if out.rc != 0 {
            bail!(
                "guest command failed (rc {}): {script}\nstderr: {}\nstdout: {}",
                out.rc,
                out.stderr.trim(),
                out.stdout.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Poll a guest script until it exits 0, at most `timeout` (a KVM base, scaled); the
    /// stdout of the run that succeeded.
    pub async fn wait_guest(
        &mut self,
        what: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = self.scaled(timeout);
        let started = Instant::now();
        loop {
            let out = self.guest(script).await?;
            if out.rc == 0 {
                self.waits.record(what, started.elapsed(), deadline);
                return Ok(out.stdout);
            }
            if started.elapsed() > deadline {
                self.waits.record(what, started.elapsed(), deadline);
                bail!(
                    "timed out after {deadline:.1?} waiting for {what} (last rc {}: {})",
                    out.rc,
                    out.stderr.trim()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Start polling a condition the caller checks itself, at most `timeout` (a KVM
    /// base, scaled): call [`Poll::again`] after each miss and [`Poll::met`] on success.
    pub fn poll(&self, what: &str, timeout: Duration) -> Poll {
        Poll {
            what: what.to_string(),
            started: Instant::now(),
            deadline: self.scaled(timeout),
        }
    }

    /// Record a wait done elsewhere (an event awaited with a deadline).
    pub(crate) fn record_wait(&mut self, what: &str, took: Duration, deadline: Duration) {
        self.waits.record(what, took, deadline);
    }

    /// The outer QEMU's QMP.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// Plug an emulated device through the outer QMP (storage gets a fresh block node)
    /// and wait until the guest kernel lists it in sysfs.
    pub async fn plug(&mut self, dev: &UsbDevice) -> Result<String> {
        let name = self.plug_unbound(dev).await?;
        self.wait_bound(dev, &name).await?;
        Ok(name)
    }

    /// [`plug`](Self::plug) without waiting for the guest's drivers: for a device that
    /// something in the guest (`usbroute serve`) hands to an inner QEMU as soon as the
    /// kernel announces it, so the guest's own drivers may never (stay) bound.
    pub async fn plug_unbound(&mut self, dev: &UsbDevice) -> Result<String> {
        let drive = if dev.kind == Kind::Storage {
            self.next_node += 1;
            let node = format!("{}-disk{}", dev.id, self.next_node);
            self.qmp
                .execute(
                    "blockdev-add",
                    Some(json!({"driver": "null-co", "node-name": node,
                                "size": 64u64 << 20, "read-zeroes": true})),
                )
                .await?;
            Some(node)
        } else {
            None
        };
        self.qmp
            .execute("device_add", Some(dev.device_add_args(drive.as_deref())))
            .await
            .with_context(|| {
                format!(
                    "plugging {} ({}) at {}",
                    dev.id,
                    dev.kind.driver(),
                    dev.port
                )
            })?;
        // Tracked before the guest sees it, so cleanup unplugs it even if it never shows.
        self.plugged.push(Plugged {
            dev: dev.clone(),
            guest_name: None,
        });
        let name = self.guest_name(dev).await?;
        if let Some(p) = self.plugged.iter_mut().find(|p| p.dev.id == dev.id) {
            p.guest_name = Some(name.clone());
        }
        Ok(name)
    }

    /// `device_add` through the outer QMP and return at once, the device tracked (as
    /// `name`, its port's kernel name, learnt from an earlier plug there) so the reset
    /// unplugs it if a later step fails: for a timed chain that waits for the device in
    /// the guest itself, without the bed's round trips in between.
    pub async fn device_add(&mut self, dev: &UsbDevice, name: &str) -> Result<()> {
        self.qmp
            .execute("device_add", Some(dev.device_add_args(None)))
            .await
            .with_context(|| format!("plugging {} at {}", dev.id, dev.port))?;
        self.plugged.push(Plugged {
            dev: dev.clone(),
            guest_name: Some(name.to_string()),
        });
        Ok(())
    }

    /// Wait until every interface of `name` has a driver and, for storage, its disk
    /// exists (usb-storage scans a second after binding), for a hub its ports are
    /// powered: what a listing taken right after `plug` should already show, and what a
    /// device plugged behind it needs.
    async fn wait_bound(&mut self, dev: &UsbDevice, name: &str) -> Result<()> {
        let ready = match dev.kind {
            Kind::Storage => format!("ls -d /sys/bus/usb/devices/{name}/{name}:*/host*/target*/*/block/* >/dev/null 2>&1 || exit 1; "),
            // A hub is ready for devices behind it once the kernel has powered its ports
            // (`disable` reads 0): a device QEMU attaches to a port the hub driver is still
            // activating was once never enumerated (1 run in 9).
            Kind::Hub => format!(
                "ls -d /sys/bus/usb/devices/{name}:1.0/{name}-port1 >/dev/null 2>&1 || exit 1; \
                 for p in /sys/bus/usb/devices/{name}:1.0/{name}-port*; do \
                   [ \"$(cat $p/disable 2>/dev/null)\" = 0 ] || exit 1; done; "
            ),
            _ => String::new(),
        };
        let script = format!(
            "ls -d /sys/bus/usb/devices/{name}:* >/dev/null 2>&1 || exit 1; \
             for i in /sys/bus/usb/devices/{name}:*; do [ -e \"$i/driver\" ] || exit 1; done; {ready}"
        );
        self.wait_guest(
            &format!("{} ({name}) to be bound to its drivers", dev.id),
            &script,
            Duration::from_secs(10),
        )
        .await?;
        Ok(())
    }

    /// Wait until the guest shows `dev`; its kernel name (`1-2.3.1`).
    pub async fn guest_name(&mut self, dev: &UsbDevice) -> Result<String> {
        let e = dev.expected();
        // The bus number depends on probe order: find the root hub by controller and speed.
        let script = format!(
            "for hub in /sys/bus/pci/devices/{ctrl}/usb*; do \
               [ \"$(cat $hub/speed)\" = {speed} ] || continue; \
               name=$(cat $hub/busnum)-{chain}; \
               [ -e /sys/bus/usb/devices/$name/idVendor ] && {{ echo $name; exit 0; }}; \
             done; exit 1",
            ctrl = e.controller,
            speed = e.root_hub.speed(),
            chain = e.chain()
        );
        let what = format!(
            "{} to appear in the guest at {} port {}",
            dev.id,
            e.controller,
            e.chain()
        );
        let name = self
            .wait_guest(&what, &script, Duration::from_secs(10))
            .await?;
        Ok(name.trim().to_string())
    }

    /// The bus and device numbers of the guest's USB device `name`.
    pub async fn bus_device(&mut self, name: &str) -> Result<(u32, u32)> {
        let out = self
            .guest_ok(&format!(
                "cat /sys/bus/usb/devices/{name}/busnum /sys/bus/usb/devices/{name}/devnum"
            ))
            .await?;
        let mut numbers = out.split_whitespace().map(str::parse::<u32>);
        match (numbers.next(), numbers.next()) {
            (Some(Ok(bus)), Some(Ok(device))) => Ok((bus, device)),
            _ => bail!("busnum and devnum of {name} read: {out}"),
        }
    }

    /// Unplug a device (device_del), wait for DEVICE_DELETED and, for a device this bed
    /// plugged, until the guest kernel has dropped it too (so the next plug at the same
    /// port cannot be mistaken for the old one).
    pub async fn unplug(&mut self, id: &str) -> Result<()> {
        let mut events = self.qmp.events();
        self.qmp
            .execute("device_del", Some(json!({ "id": id })))
            .await
            .with_context(|| format!("unplugging {id}"))?;
        let deadline = self.scaled(Duration::from_secs(10));
        let started = Instant::now();
        let deleted = tokio::time::timeout(deadline, async {
            loop {
                let ev = events.recv().await?;
                if ev.name == "DEVICE_DELETED" && ev.data["device"] == id {
                    return anyhow::Ok(());
                }
            }
        })
        .await;
        let what = format!("DEVICE_DELETED of {id}");
        self.record_wait(&what, started.elapsed(), deadline);
        deleted.map_err(|_| anyhow!("no {what} within {deadline:.1?}"))??;
        let name = self
            .plugged
            .iter()
            .find(|p| p.dev.id == id)
            .and_then(|p| p.guest_name.clone());
        self.plugged.retain(|p| p.dev.id != id);
        if let Some(name) = name {
            self.wait_guest(
                &format!("{id} ({name}) to leave the guest"),
                &format!("! test -e /sys/bus/usb/devices/{name}"),
                Duration::from_secs(10),
            )
            .await?;
        }
        Ok(())
    }

    /// Unplug everything plugged through this bed, devices behind hubs first.
    pub async fn unplug_all(&mut self) -> Result<()> {
        while let Some(p) = self.plugged.last().cloned() {
            self.unplug(&p.dev.id).await?;
        }
        Ok(())
    }

    /// Devices plugged through this bed and still present, with their kernel names.
    pub fn plugged(&self) -> &[Plugged] {
        &self.plugged
    }

    /// How this machine was booted: a scenario that needs a different machine (no
    /// IOMMU, say) can boot its own from a copy, with its own `run_dir`.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// `Some(reason)` when the guest can no longer be driven.
    pub fn broken(&mut self) -> Option<String> {
        if let Some(status) = self.machine.exited() {
            return Some(format!("the outer QEMU exited ({status})"));
        }
        self.broken.clone()
    }

    /// The console and QEMU logs for a failure report.
    pub fn failure_log(&self) -> String {
        self.machine.failure_log(60)
    }

    /// Power off (kill the outer QEMU).
    pub async fn shutdown(mut self) {
        self.machine.stop().await;
    }
}

/// A device plugged through the bed.
#[derive(Debug, Clone)]
pub struct Plugged {
    /// What and where.
    pub dev: UsbDevice,
    /// Its kernel name once the guest showed it.
    pub guest_name: Option<String>,
}

/// A condition being polled (see [`Bed::poll`]).
#[derive(Debug)]
pub struct Poll {
    what: String,
    started: Instant,
    deadline: Duration,
}

impl Poll {
    /// The condition holds: record how long it took.
    pub fn met(self, bed: &mut Bed) {
        bed.record_wait(&self.what, self.started.elapsed(), self.deadline);
    }

    /// The condition does not hold yet: wait a little, or fail naming the condition and,
    /// from `last`, what was seen instead, once the deadline has passed.
    pub async fn again(&self, bed: &mut Bed, last: impl std::fmt::Display) -> Result<()> {
        if self.started.elapsed() > self.deadline {
            bed.record_wait(&self.what, self.started.elapsed(), self.deadline);
            bail!(
                "timed out after {:.1?} waiting for {}; last seen: {last}",
                self.deadline,
                self.what
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
        Ok(())
    }
}
