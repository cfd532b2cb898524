//! The peers the daemon bench drives: a paused QEMU, `usbroute serve` as a process, the
//! control socket by hand, and latency percentiles.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `usbroute serve` as a process (the release binary). Killed on drop.
pub struct Daemon(pub Child);

impl Daemon {
    pub fn start(config: &Path, sysfs: &Path, control: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_usbroute"))
            .args(["serve", "--config"])
            .arg(config)
            .arg("--sysfs-root")
            .arg(sysfs)
            .arg("--control")
            .arg(control)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(20), || {
            UnixStream::connect(control).is_ok()
        });
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for(within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "waited {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request line to the control socket, its reply line.
pub fn control_line(control: &Path, request: &str) -> String {
    let Ok(mut stream) = UnixStream::connect(control) else {
        return String::new();
    };
    let _ = stream.write_all(format!("{request}\n").as_bytes());
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    line
}

pub fn status(control: &Path) -> serde_json::Value {
    serde_json::from_str(&control_line(control, "{\"request\":\"status\"}")).unwrap_or_default()
}

/// A paused QEMU with an xHCI controller, serving QMP. Killed on drop.
pub struct Qemu {
    pub child: Child,
    pub qmp: PathBuf,
}

impl Qemu {
    pub fn start(qmp: &Path) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-S",
                "-m",
                "64",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-device", "qemu-xhci,id=xhci", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(qmp).is_err() {
            assert!(
                Instant::now() < deadline,
                "QEMU's QMP socket did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qemu {
            child,
            qmp: qmp.to_path_buf(),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Negotiate on `stream`, run each command and wait for its reply (events are skipped).
pub fn qmp_commands(stream: UnixStream, commands: impl Iterator<Item = String>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    for cmd in std::iter::once("{\"execute\":\"qmp_capabilities\"}".to_string()).chain(commands) {
        writer.write_all(cmd.as_bytes()).unwrap();
        writer.write_all(b"\n").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
    }
}

/// Latency samples with their percentiles.
pub struct Percentiles(pub Vec<Duration>);

impl Percentiles {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Percentiles(samples)
    }
    pub fn at(&self, q: f64) -> f64 {
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i].as_secs_f64() * 1e6
    }
    pub fn p50(&self) -> f64 {
        self.at(0.50)
    }
    pub fn line(&self, name: &str) -> String {
        format!(
            "{name:<52} p50 {:>9.1} µs   p99 {:>9.1} µs   (n={})",
            self.p50(),
            self.at(0.99),
            self.0.len()
        )
    }
}
