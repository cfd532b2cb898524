//! A real `qemu-system-x86_64` for tests: small (`-nodefaults`, TCG, little memory),
//! paused (`-S`) unless asked, with a QMP socket in a temp dir, and killed when dropped.

#![allow(dead_code)] // each test binary uses a different part of this

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The QEMU binary the tests run.
pub const QEMU: &str = "qemu-system-x86_64";

/// The command every test QEMU starts from: no default devices, no display, TCG, paused
/// (`-S`), a QMP server on each of `qmp`, then `args`.
pub fn qemu_command(qmp: &[&Path], args: &[&str]) -> Command {
    let mut command = Command::new(QEMU);
    command.args(["-nodefaults", "-display", "none", "-accel", "tcg", "-S"]);
    for socket in qmp {
        command
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()));
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

fn cannot_start(e: std::io::Error) -> ! {
    panic!(
        "cannot start {QEMU}: {e}; install it: apt-get install -t bookworm-backports \
         qemu-system-x86 (see ../shared/notes/test-bed.md)"
    )
}

/// A QEMU serving QMP on sockets the caller chose, started without waiting for them: for
/// tests of a socket appearing, and of a VM restarted on the same socket. Killed on drop.
pub struct QemuAt(Child);

impl QemuAt {
    /// Start it; see [`qemu_command`].
    pub fn spawn(qmp: &[&Path], args: &[&str]) -> Self {
        QemuAt(
            qemu_command(qmp, args)
                .spawn()
                .unwrap_or_else(|e| cannot_start(e)),
        )
    }

    /// Kill and reap it now (a VM that dies).
    pub fn kill(mut self) {
        self.0.kill().expect("kill QEMU");
        self.0.wait().expect("reap QEMU");
    }
}

impl Drop for QemuAt {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running QEMU; killed (and reaped) on drop.
pub struct QemuGuard {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl QemuGuard {
    /// `-machine none`: no PCI, no USB; the fastest QEMU there is, for QMP-only tests.
    pub fn machine_none() -> Self {
        Self::start(&["-machine", "none"])
    }

    /// A q35 PC (PCI, so USB controllers can be added) plus `extra` arguments.
    pub fn q35(extra: &[&str]) -> Self {
        let mut args = vec!["-machine", "q35", "-m", "64"];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// Start QEMU with `args` after the common ones; waits until its QMP socket accepts.
    pub fn start(args: &[&str]) -> Self {
        Self::start_as(None, args)
    }

    /// Like [`QemuGuard::start`], as user and group `uid` (`None`: as ourselves), e.g.
    /// 65534 (nobody) for a QEMU that cannot open /dev/bus/usb.
    pub fn start_as(uid: Option<u32>, args: &[&str]) -> Self {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("temp dir");
        // QEMU creates its socket here, possibly as another user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod temp dir");
        let socket = dir.path().join("qmp.sock");
        let mut command = qemu_command(&[&socket], args);
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        let child =
            command
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| match (e.kind(), uid) {
                    (std::io::ErrorKind::PermissionDenied, Some(uid)) => {
                        panic!("cannot start {QEMU} as uid {uid}: {e}; run this test as root")
                    }
                    _ => cannot_start(e),
                });
        let mut guard = QemuGuard {
            child,
            socket,
            _dir: dir,
        };
        guard.wait_for_socket();
        guard
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                panic!("{QEMU} exited ({status}) before its QMP socket was ready: {stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "{QEMU} did not open its QMP socket within 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The QMP socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send `signal` to QEMU (SIGSTOP to make it hang, SIGKILL to kill it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("signal QEMU");
    }

    /// Kill QEMU now and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A host USB device as the inventory would describe it (this host has none of its own):
/// at `port` (`1-3.1`), address `address`, ids `vendor:product`, `speed` Mb/s.
pub fn host_device(
    port: &str,
    address: u16,
    vendor: u16,
    product: u16,
    speed: f64,
) -> usbroute::inventory::Device {
    use usbroute::inventory::{Device, HexId, PortPath, Speed};
    let port: PortPath = port.parse().expect("port path");
    Device {
        sysfs_path: format!("/sys/bus/usb/devices/{port}"),
        address: Some(address),
        vendor_id: Some(HexId(vendor)),
        product_id: Some(HexId(product)),
        manufacturer: Some("Test".into()),
        product: Some("Gadget".into()),
        speed_mbps: Some(Speed(speed)),
        ..Device::at(port)
    }
}

/// The ids of every device in `/machine/peripheral` (what `-device ... id=` and
/// `device_add` created), sorted.
pub async fn peripheral_ids(qmp: &usbroute::backend::qemu::qmp::Qmp) -> Vec<String> {
    let mut ids: Vec<String> = usbroute::backend::qemu::qom::children(qmp, "/machine/peripheral")
        .await
        .expect("qom-list")
        .into_iter()
        .map(|c| c.name)
        .collect();
    ids.sort();
    ids
}

/// A root whose /dev/bus/usb has a node for bus 1 address 2 (a plain file: QEMU itself
/// looks the device up through libusb, which finds nothing on this host).
pub fn root_with_node() -> (tempfile::TempDir, usbroute::sysfs::SysfsRoot) {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = dir.path().join("dev/bus/usb/001/002");
    std::fs::create_dir_all(node.parent().unwrap()).expect("mkdir");
    std::fs::write(&node, b"").expect("node");
    let root = usbroute::sysfs::SysfsRoot::new(dir.path());
    (dir, root)
}
