//! Inner QEMUs: started in the guest, and talked to with usbroute's own QMP client
//! (`usbroute vm qmp`), which reads until the reply with its command's id arrives or the
//! deadline passes, never for a fixed window.

use crate::bed::Bed;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// What an inner QEMU may take to answer its first command (KVM base): with a
/// `vfio-pci` device it answers only once the device is realized, after QEMU has tried
/// (and failed) to reset it.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// What one QMP exchange with an inner QEMU may take (KVM base).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

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

impl Bed {
    /// Start an inner QEMU in the guest (in the background, QMP at
    /// `/tmp/inner-<name>.qmp`, log at `/tmp/inner-<name>.log`), run as `user`
    /// (`root` or an unprivileged name from the guest's /etc/passwd), and wait until it
    /// answers a QMP command: ready, not merely listening.
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
        let inner = InnerQemu {
            name: name.to_string(),
            qmp,
            log,
            pid: pid.trim().to_string(),
        };
        let what = format!("inner QEMU {name} to answer QMP on {}", inner.qmp);
        let started = std::time::Instant::now();
        let deadline = self.scaled(READY_TIMEOUT);
        let ready = self
            .qmp_in_guest(&inner.qmp, "query-status", None, READY_TIMEOUT, true)
            .await;
        self.record_wait(&what, started.elapsed(), deadline);
        match ready {
            Ok(reply) if reply.get("return").is_some() => Ok(inner),
            outcome => {
                let why = match outcome {
                    Ok(reply) => reply.to_string(),
                    Err(e) => format!("{e:#}"),
                };
                let out = self.guest(&format!("cat {}", inner.log)).await?;
                bail!(
                    "waiting for {what}: {why}\ninner QEMU {name} ({}): {}{}",
                    inner.log,
                    out.stdout,
                    out.stderr
                );
            }
        }
    }

    /// Send one QMP command (`{"execute": ..., "arguments": ...}`) to an inner QEMU; its
    /// reply as QMP would give it: `{"return": ...}` or `{"error": {"desc": ...}}`.
    pub async fn inner_qmp(&mut self, inner: &InnerQemu, command: &Value) -> Result<Value> {
        let execute = command["execute"]
            .as_str()
            .with_context(|| format!("a QMP command needs \"execute\": {command}"))?;
        let arguments = command.get("arguments").cloned();
        self.qmp_in_guest(&inner.qmp, execute, arguments, QMP_TIMEOUT, false)
            .await
            .with_context(|| format!("inner QEMU {}", inner.name))
    }

    /// One QMP exchange on the guest's monitor `socket` with `usbroute vm qmp`, at most
    /// `timeout` (a KVM base, scaled); with `wait`, a socket that is not there yet is
    /// retried until then. QEMU's refusal comes back as `{"error": ...}`, not as `Err`.
    pub async fn qmp_in_guest(
        &mut self,
        socket: &str,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
        wait: bool,
    ) -> Result<Value> {
        let deadline = self.scaled(timeout);
        let arguments = arguments
            .map(|a| format!(" '{}'", a.to_string().replace('\'', "'\\''")))
            .unwrap_or_default();
        let script = format!(
            "usbroute vm qmp --timeout {:.1}{} --qmp {socket} {command}{arguments}",
            deadline.as_secs_f64(),
            if wait { " --wait" } else { "" },
        );
        // The guest-side limit must outlast usbroute's own deadline, so its message (what
        // it waited for) is what a failure shows.
        let out = self.guest_with_timeout(&script, timeout * 2).await?;
        if out.rc == 0 {
            let value: Value = serde_json::from_str(out.stdout.trim())
                .with_context(|| format!("`{script}` printed: {}", out.stdout.trim()))?;
            return Ok(json!({ "return": value }));
        }
        Ok(json!({ "error": { "desc": out.stderr.trim(), "rc": out.rc } }))
    }
}
