//! The outer QEMU: the guest machine with USB controllers, its sockets and console.

use crate::accel::Accel;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Where the guest's pieces are and how to boot it.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Guest kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// Guest initramfs (uncompressed cpio).
    pub initrd: PathBuf,
    /// Host directory the guest mounts at `/host` over 9p (holds `usbroute`).
    pub share: PathBuf,
    /// Sockets, console log and QEMU's own output go here.
    pub run_dir: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// Emulate an Intel IOMMU (VT-d); without it the guest has no IOMMU groups.
    pub iommu: bool,
    /// Boot Xen with `kernel` as its dom0 instead of a plain guest (the `xen-*` scenarios).
    pub xen: Option<XenBoot>,
}

/// The Xen machine's own pieces (testbed/xen/prepare builds them): the hypervisor is the
/// multiboot kernel, the guest kernel and this initramfs its dom0.
#[derive(Debug, Clone)]
pub struct XenBoot {
    /// Xen itself, the uncompressed 32-bit multiboot ELF.
    pub hypervisor: PathBuf,
    /// dom0's initramfs (uncompressed cpio, usbroute appended).
    pub dom0_initrd: PathBuf,
}

/// How long a killed leftover QEMU may take to disappear (it is not our child, so it
/// cannot be reaped; a zombie counts as gone once its parent reaps it).
const LEFTOVER_EXIT: Duration = Duration::from_secs(10);

/// A running outer QEMU (killed when dropped).
pub struct Machine {
    child: Child,
    /// QMP socket.
    pub qmp_socket: PathBuf,
    /// Agent (virtio-serial) socket.
    pub agent_socket: PathBuf,
    /// The guest's serial console, as a file.
    pub console_log: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
}

impl Machine {
    /// Start QEMU and wait until its sockets exist, at most `deadline`.
    pub async fn start(cfg: &MachineConfig, deadline: Duration) -> Result<Machine> {
        std::fs::create_dir_all(&cfg.run_dir)
            .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
        let qmp_socket = cfg.run_dir.join("qmp.sock");
        let agent_socket = cfg.run_dir.join("agent.sock");
        let console_log = cfg.run_dir.join("console.log");
        let qemu_log = cfg.run_dir.join("qemu.log");
        let pid_file = cfg.run_dir.join("qemu.pid");
        stop_leftover(&pid_file, &qmp_socket);
        for stale in [&qmp_socket, &agent_socket, &console_log] {
            let _ = std::fs::remove_file(stale);
        }
        let log = std::fs::File::create(&qemu_log)
            .with_context(|| format!("creating {}", qemu_log.display()))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "q35", "-smp", "2", "-nodefaults"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-pidfile")
            .arg(&pid_file)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()))
            // A second monitor for people: QEMU serves one client per monitor and the
            // bed holds the first, so `scripts/testbed shell` users talk to this one.
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                cfg.run_dir.join("qmp-shell.sock").display()
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_socket.display()
            ));
        match &cfg.xen {
            None => plain_args(&mut cmd, cfg, &console_log),
            Some(xen) => xen_args(&mut cmd, cfg, xen, &console_log)?,
        }
        cmd.args(usb_controllers())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let mut machine = Machine {
            child,
            qmp_socket,
            agent_socket,
            console_log,
            qemu_log,
        };
        let started = std::time::Instant::now();
        loop {
            if machine.qmp_socket.exists() && machine.agent_socket.exists() {
                return Ok(machine);
            }
            if let Some(status) = machine.child.try_wait()? {
                bail!(
                    "the outer QEMU exited at start ({status}):\n{}",
                    tail(&machine.qemu_log, 20)
                );
            }
            if started.elapsed() > deadline {
                bail!(
                    "the outer QEMU did not create its sockets within {deadline:.1?}:\n{}",
                    tail(&machine.qemu_log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` once QEMU has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stop QEMU (kill; the guest holds nothing worth a clean shutdown).
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }

    /// The end of the console log and QEMU's own output, for a failure report.
    pub fn failure_log(&self, lines: usize) -> String {
        format!(
            "--- guest console ({}), last {lines} lines ---\n{}\n--- outer QEMU output ({}) ---\n{}",
            self.console_log.display(),
            tail(&self.console_log, lines),
            self.qemu_log.display(),
            tail(&self.qemu_log, 20)
        )
    }
}

/// The guest clock's socket in the run directory (see `plain_args`).
pub const CLOCK_SOCKET: &str = "clock.sock";

/// The plain guest: the kernel boots directly, the agent on a virtio-serial port, the
/// share over 9p, an IOMMU when asked.
fn plain_args(cmd: &mut Command, cfg: &MachineConfig, console_log: &Path) {
    cmd.args(["-m", "1024"])
        // S3 (suspend to RAM) for the `suspend` scenario: q35 hides it unless asked
        // (QEMU's ICH9 defaults to disable_s3=1). It only adds the _S3 state to
        // the ACPI tables; the guest uses it only when told to (`echo mem`).
        .args(["-global", "ICH9-LPC.disable_s3=0"])
        .args(cfg.accel.qemu_args());
    // no_timer_check: under TCG on a loaded host the IO-APIC timer check can fail and
    // panic the boot ("timer doesn't work through Interrupt-remapped IO-APIC").
    // usbcore.autosuspend=-1: an idle emulated hub is runtime-suspended after 2 s, and a
    // device QEMU then attaches behind it was sometimes never seen (no remote wakeup
    // through the emulated hub); scenarios test usbroute, not USB power management.
    let mut append =
        String::from("console=ttyS0 panic=-1 quiet no_timer_check usbcore.autosuspend=-1");
    if cfg.iommu {
        cmd.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
        append.push_str(" intel_iommu=on");
    }
    cmd.arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .args(agent_port())
        // The `bench` scenario's clock: its guest program answers the time here, so the
        // host's `device_add` and the guest's stamps share one clock (a port of its own:
        // the agent's round trip forks a shell and is too slow for that).
        .arg("-chardev")
        .arg(format!(
            "socket,id=clock,path={},server=on,wait=off",
            cfg.run_dir.join(CLOCK_SOCKET).display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=clock,name=org.usbroute.clock",
        ])
        .arg("-fsdev")
        .arg(format!(
            "local,id=hostfs,path={},security_model=none",
            cfg.share.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=hostfs,mount_tag=host"]);
}

/// The Xen machine: Xen as the multiboot kernel, the guest kernel and the dom0 image as
/// its modules; COM1 is Xen's and dom0's console (hvc0), the agent on virtio-serial as in
/// the plain guest (a PV dom0's virtio rings go through the DMA API). Always TCG,
/// with XSAVE hidden: with it, dom0's processes crashed at random once a domU ran (GPFs
/// on TLS reads, xl's lock assertion). dom0 reads no 9p share: usbroute is in its image.
fn xen_args(
    cmd: &mut Command,
    cfg: &MachineConfig,
    xen: &XenBoot,
    console_log: &Path,
) -> Result<()> {
    // QEMU splits -initrd at commas (one module each) and a module's path from its
    // command line at the first space.
    for path in [&cfg.kernel, &xen.dom0_initrd] {
        let text = path.to_string_lossy();
        if text.contains([',', ' ']) {
            bail!("{text}: a path with a comma or space cannot be a multiboot module; move the checkout");
        }
    }
    cmd.args([
        "-m",
        "2048",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max,-xsave",
    ])
    .arg("-kernel")
    .arg(&xen.hypervisor)
    .args([
        "-append",
        "dom0_mem=1024M,max:1024M dom0_max_vcpus=2 console=com1 com1=115200,8n1 noreboot",
    ])
    .arg("-initrd")
    .arg(format!(
        "{} console=hvc0 panic=-1 quiet no_timer_check usbcore.autosuspend=-1,{}",
        cfg.kernel.display(),
        xen.dom0_initrd.display()
    ))
    .arg("-serial")
    .arg(format!("file:{}", console_log.display()))
    .args(agent_port());
    Ok(())
}

/// The agent's virtio-serial port, named for the guest (or dom0) to find it.
fn agent_port() -> [&'static str; 4] {
    [
        "-device",
        "virtio-serial-pci,id=vser",
        "-device",
        "virtserialport,chardev=agent,name=org.usbroute.agent",
    ]
}

/// xHCI at 00:03.0; EHCI at 00:1d.7 with UHCI companions 00:1d.0-2 (two ports each).
fn usb_controllers() -> Vec<&'static str> {
    [
        "qemu-xhci,id=xhci,p2=8,p3=8,addr=03.0",
        "ich9-usb-ehci1,id=ehci,addr=1d.7,multifunction=on",
        "ich9-usb-uhci1,id=uhci1,masterbus=ehci.0,firstport=0,addr=1d.0,multifunction=on",
        "ich9-usb-uhci2,id=uhci2,masterbus=ehci.0,firstport=2,addr=1d.1,multifunction=on",
        "ich9-usb-uhci3,id=uhci3,masterbus=ehci.0,firstport=4,addr=1d.2,multifunction=on",
    ]
    .into_iter()
    .flat_map(|d| ["-device", d])
    .collect()
}

/// Kill the outer QEMU a previous run left behind (the harness was interrupted before it
/// could), found by its pid file and recognised by its QMP socket path on its command
/// line, so an unrelated process that reused the pid is never touched.
fn stop_leftover(pid_file: &Path, qmp_socket: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(&*qmp_socket.to_string_lossy());
    if ours {
        eprintln!("stopping the outer QEMU a previous run left behind (pid {pid})");
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        // Gone when signal 0 finds no such process; its sockets are then free to reuse.
        let started = std::time::Instant::now();
        while nix::sys::signal::kill(pid, None).is_ok() && started.elapsed() < LEFTOVER_EXIT {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The last `n` lines of a text file (lossy), or a note that it is unreadable.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}
