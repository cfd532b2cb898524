//! `Bed`: what a scenario gets: a booted guest, the outer QMP, and helpers.

use crate::accel::Accel;
use crate::agent::{Agent, GuestOutput};
use crate::machine::{Machine, MachineConfig};
use crate::usb::{Kind, UsbDevice, EHCI_PCI, UHCI_PCI, XHCI_PCI};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::future::Future;
use std::time::{Duration, Instant};
use usbroute::qmp::Qmp;

/// Default time a guest command may take.
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A booted guest with its outer QEMU.
pub struct Bed {
    machine: Machine,
    qmp: Qmp,
    agent: Agent,
    plugged: Vec<Plugged>,
    next_node: u32,
    broken: Option<String>,
    config: MachineConfig,
    /// How long the boot took (QEMU start to agent ready).
    pub boot_time: Duration,
}

impl Bed {
    /// Start the outer QEMU and wait for the guest agent.
    pub async fn boot(cfg: &MachineConfig) -> Result<Bed> {
        let started = Instant::now();
        let mut machine = Machine::start(cfg).await?;
        let connected = async {
            // TCG guests answer slowly while the host is loaded: allow more than the default.
            let qmp = Qmp::connect(&machine.qmp_socket)
                .await?
                .with_timeout(Duration::from_secs(30));
            let mut agent = Agent::connect(&machine.agent_socket).await?;
            agent
                .wait_ready(Duration::from_secs(30) * cfg.accel.slowness())
                .await?;
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
            boot_time: started.elapsed(),
        };
        bed.guest_ok(
            "test -x /bin/usbroute || { echo 'no /bin/usbroute in the guest: scripts/testbed appends it to the initramfs' >&2; exit 1; }",
        )
        .await?;
        Ok(bed)
    }

    /// KVM or TCG.
    pub fn accel(&self) -> Accel {
        self.config.accel
    }

    /// `timeout` scaled for the accelerator (TCG runs the guest several times slower).
    pub fn scaled(&self, kvm_timeout: Duration) -> Duration {
        kvm_timeout * self.config.accel.slowness()
    }

    /// The host directory the guest sees as `/host`.
    pub fn share(&self) -> &std::path::Path {
        &self.config.share
    }

    /// Run a `sh` script in the guest (60 s limit). A non-zero rc is not an error here.
    pub async fn guest(&mut self, script: &str) -> Result<GuestOutput> {
        self.guest_with_timeout(script, GUEST_TIMEOUT).await
    }

    /// Run a `sh` script in the guest with a time limit.
    pub async fn guest_with_timeout(
        &mut self,
        script: &str,
        timeout: Duration,
    ) -> Result<GuestOutput> {
        if let Some(why) = &self.broken {
            bail!("the guest is unusable: {why}");
        }
        match self.agent.run(script, timeout).await {
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

    /// Poll a guest script until it exits 0, at most `timeout` (scaled for TCG); the
    /// stdout of the run that succeeded.
    pub async fn wait_guest(
        &mut self,
        what: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<String> {
        let timeout = self.scaled(timeout);
        let started = Instant::now();
        loop {
            let out = self.guest(script).await?;
            if out.rc == 0 {
                return Ok(out.stdout);
            }
            if started.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what} (last rc {}: {})",
                    out.rc,
                    out.stderr.trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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

    /// Wait until every interface of `name` has a driver and, for storage, its disk
    /// exists (usb-storage scans a second after binding): what a listing taken right
    /// after `plug` should already show.
    async fn wait_bound(&mut self, dev: &UsbDevice, name: &str) -> Result<()> {
        let disk = if dev.kind == Kind::Storage {
            format!("ls -d /sys/bus/usb/devices/{name}/{name}:*/host*/target*/*/block/* >/dev/null 2>&1 || exit 1; ")
        } else {
            String::new()
        };
        let script = format!(
            "ls -d /sys/bus/usb/devices/{name}:* >/dev/null 2>&1 || exit 1; \
             for i in /sys/bus/usb/devices/{name}:*; do [ -e \"$i/driver\" ] || exit 1; done; {disk}"
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
        tokio::time::timeout(deadline, async {
            loop {
                let ev = events.recv().await?;
                if ev.name == "DEVICE_DELETED" && ev.data["device"] == id {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .map_err(|_| anyhow!("{id}: no DEVICE_DELETED within {deadline:?}"))??;
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

    /// Start an inner QEMU in the guest (in the background, QMP at
    /// `/tmp/inner-<name>.qmp`, log at `/tmp/inner-<name>.log`), run as `user`
    /// (`root` or an unprivileged name from the guest's /etc/passwd) and wait for its QMP.
    pub async fn start_inner_qemu(
        &mut self,
        name: &str,
        user: &str,
        extra: &str,
    ) -> Result<InnerQemu> {
        let qmp = format!("/tmp/inner-{name}.qmp");
        let log = format!("/tmp/inner-{name}.log");
        let cmd = format!(
            "qemu-system-x86_64 -M q35 -accel tcg -m 128 -nodefaults -display none \
             -device qemu-xhci,id=xhci -qmp unix:{qmp},server=on,wait=off {extra}"
        );
        let launch = if user == "root" {
            cmd
        } else {
            format!("su -s /bin/sh {user} -c '{cmd}'")
        };
        let pid = self
            .guest_ok(&format!(
                "rm -f {qmp}; {launch} >{log} 2>&1 </dev/null & echo $!"
            ))
            .await?;
        let ready = self
            .wait_guest(
                &format!("inner QEMU {name} to open {qmp}"),
                &format!("test -S {qmp}"),
                Duration::from_secs(15),
            )
            .await;
        if let Err(e) = ready {
            let out = self.guest(&format!("cat {log}")).await?;
            bail!(
                "{e:#}\ninner QEMU {name} ({log}): {}{}",
                out.stdout,
                out.stderr
            );
        }
        Ok(InnerQemu {
            name: name.to_string(),
            qmp,
            log,
            pid: pid.trim().to_string(),
        })
    }

    /// Send one QMP command to an inner QEMU (through socat in the guest); the reply line.
    pub async fn inner_qmp(&mut self, inner: &InnerQemu, command: &Value) -> Result<Value> {
        let out = self
            .guest_ok(&format!(
                "printf '%s\\n%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{}' | \
                 socat -t 2 - UNIX-CONNECT:{} | tail -n +3 | grep -v '\"event\"' | head -1",
                command.to_string().replace('\'', "'\\''"),
                inner.qmp
            ))
            .await?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("inner QEMU {} replied: {}", inner.name, out.trim()))
    }

    /// Between scenarios: unplug what the bed plugged, kill every inner QEMU and every
    /// usbroute process (a daemon a scenario started) in the guest.
    /// Fails if a scenario left a USB controller on another driver (vfio-pci, none):
    /// the next scenario would not start from the same machine.
    pub async fn reset(&mut self) -> Result<()> {
        self.unplug_all().await?;
        self.guest_ok("pkill -9 qemu-system-x86_64; pkill -9 usbroute; rm -f /tmp/inner-*; true")
            .await?;
        let drivers = [
            (XHCI_PCI, "xhci_hcd"),
            (EHCI_PCI, "ehci-pci"),
            (UHCI_PCI[0], "uhci_hcd"),
            (UHCI_PCI[1], "uhci_hcd"),
            (UHCI_PCI[2], "uhci_hcd"),
        ];
        let script: String = drivers
            .iter()
            .map(|(pci, want)| {
                format!(
                    "d=$(basename \"$(readlink /sys/bus/pci/devices/{pci}/driver)\"); \
                     [ \"$d\" = {want} ] || echo \"{pci} is bound to '$d', not {want}\"; "
                )
            })
            .collect();
        let wrong = self.guest_ok(&script).await?;
        if !wrong.trim().is_empty() {
            bail!(
                "the scenario did not restore the controllers: {}",
                wrong.trim()
            );
        }
        Ok(())
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

/// An inner QEMU running in the guest.
#[derive(Debug, Clone)]
pub struct InnerQemu {
    /// Its name (in socket and log paths).
    pub name: String,
    /// QMP socket path in the guest.
    pub qmp: String,
    /// Log path in the guest.
    pub log: String,
    /// Its pid in the guest.
    pub pid: String,
}

/// Poll `check` until it returns `true`, at most `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let started = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
