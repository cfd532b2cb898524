//! KVM or TCG: probe whether this host's KVM can really boot the guest kernel.
//!
//! `/dev/kvm` existing proves nothing: on these machines it is PVM, `-cpu host` stops at
//! once with "KVM internal error" and a Debian kernel never gets past decompression.
//! The probe boots the real guest kernel under KVM without an initramfs: a working KVM
//! reaches "Kernel panic ... VFS: Unable to mount root fs" in a second or two; anything
//! else (an error, QEMU exiting, silence for PROBE_TIMEOUT) means TCG. The verdict is
//! cached, keyed by the host kernel, the QEMU binary and the guest kernel.

use anyhow::{Context, Result};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// How long a KVM boot may take to reach the root-mount panic.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The accelerator the outer QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation, `-cpu host`.
    Kvm,
    /// Emulation, `-cpu max`, multi-threaded.
    Tcg,
}

impl Accel {
    /// QEMU arguments selecting it.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// The chosen accelerator and why.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// What to run with.
    pub accel: Accel,
    /// One line for the report.
    pub reason: String,
}

/// Decide between KVM and TCG for `kernel`, using and refreshing the cache file.
pub async fn choose(kernel: &Path, cache: &Path) -> Result<Verdict> {
    let kvm = Path::new("/dev/kvm");
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm)
        .is_err()
    {
        return Ok(Verdict {
            accel: Accel::Tcg,
            reason: "TCG: /dev/kvm missing or not openable read-write".into(),
        });
    }
    let key = cache_key(kernel)?;
    if let Ok(text) = std::fs::read_to_string(cache) {
        if let Some((cached_key, verdict)) = text.split_once('\n') {
            if cached_key == key {
                return Ok(parse_cached(verdict.trim()));
            }
        }
    }
    let verdict = probe(kernel).await?;
    let accel = match verdict.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    std::fs::write(cache, format!("{key}\n{accel} {}\n", verdict.reason))
        .with_context(|| format!("writing the KVM verdict cache {}", cache.display()))?;
    Ok(verdict)
}

fn parse_cached(line: &str) -> Verdict {
    let (accel, reason) = line.split_once(' ').unwrap_or((line, ""));
    Verdict {
        accel: if accel == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        },
        reason: format!("{reason} (cached verdict)"),
    }
}

/// Host kernel + QEMU binary (size and mtime) + guest kernel name.
fn cache_key(kernel: &Path) -> Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu = std::fs::metadata("/usr/bin/qemu-system-x86_64")
        .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
        .unwrap_or_default();
    let kernel = kernel
        .canonicalize()
        .unwrap_or_else(|_| kernel.to_path_buf());
    let guest = kernel.file_name().unwrap_or_default().to_string_lossy();
    Ok(format!("host={} qemu={qemu} guest={guest}", host.trim()))
}

async fn probe(kernel: &Path) -> Result<Verdict> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(Accel::Kvm.qemu_args())
        .args(["-m", "256", "-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu-system-x86_64 for the KVM probe")?;
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, async {
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let line = tokio::select! {
                l = out.next_line(), if out_open => l.ok().flatten().or_else(|| { out_open = false; None }),
                l = err.next_line(), if err_open => l.ok().flatten().or_else(|| { err_open = false; None }),
            };
            let Some(line) = line else { continue };
            if line.contains("Kernel panic") || line.contains("Unable to mount root") {
                return Ok(());
            }
            let qemu_error = line.contains("qemu-system-x86_64:") && !line.contains("warning");
            if line.contains("KVM internal error") || qemu_error {
                return Err(line);
            }
        }
        Err("QEMU exited without booting the kernel".to_string())
    })
    .await;
    let _ = child.kill().await;
    let secs = started.elapsed().as_secs_f64();
    Ok(match outcome {
        Ok(Ok(())) => Verdict {
            accel: Accel::Kvm,
            reason: format!("KVM: the guest kernel booted under KVM in {secs:.1} s"),
        },
        Ok(Err(why)) => Verdict {
            accel: Accel::Tcg,
            reason: format!("TCG: KVM cannot run the guest kernel ({why}; probe {secs:.1} s)"),
        },
        Err(_) => Verdict {
            accel: Accel::Tcg,
            reason: format!("TCG: the guest kernel made no progress under KVM in {secs:.0} s"),
        },
    })
}
