//! One fixture for the tests that run `usbroute serve` as a process: start it with a
//! config, a sysfs root and a control socket, wait until `status` answers, run CLI
//! commands and raw requests against its socket, read or wait for its log, stop it
//! (SIGTERM), kill it (SIGKILL), and always kill it on drop.
//!
//! Deadlines are scaled by `USBROUTE_TEST_TIME_SCALE` (a factor, 1 unless set) for slow
//! machines; waits poll a condition and never sleep for a result.

#![allow(dead_code)] // each test binary uses a different part of this

use assert_cmd::cargo::CommandCargoExt;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the daemon may take to answer `status` after it was started.
pub const STARTUP: Duration = Duration::from_secs(20);

/// `within`, scaled by `USBROUTE_TEST_TIME_SCALE` for slow machines.
pub fn scaled(within: Duration) -> Duration {
    let factor = std::env::var("USBROUTE_TEST_TIME_SCALE")
        .ok()
        .and_then(|f| f.parse::<f64>().ok())
        .filter(|f| *f >= 1.0)
        .unwrap_or(1.0);
    within.mul_f64(factor)
}

/// Poll `ok` until it holds; panics naming `what` after `within` (scaled).
pub fn wait_until(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let within = scaled(within);
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `usbroute --control CONTROL`, to add arguments to.
pub fn command(control: &Path) -> Command {
    let mut command = Command::cargo_bin("usbroute").expect("the usbroute binary");
    command.arg("--control").arg(control);
    command
}

/// `usbroute --control CONTROL ARGS` that must succeed: its stdout.
pub fn cli(control: &Path, args: &[&str]) -> String {
    let out = command(control).args(args).output().expect("run usbroute");
    assert!(
        out.status.success(),
        "usbroute {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 stdout")
}

/// `usbroute --control CONTROL ARGS` that must fail: its stderr.
pub fn cli_fails(control: &Path, args: &[&str]) -> String {
    let out = command(control).args(args).output().expect("run usbroute");
    assert!(!out.status.success(), "usbroute {args:?} succeeded");
    String::from_utf8(out.stderr).expect("UTF-8 stderr")
}

/// How to start `usbroute serve`: `Serve::at(control)`, then what it needs.
pub struct ServeCommand {
    control: PathBuf,
    config: Option<PathBuf>,
    sysfs: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    log: bool,
}

impl ServeCommand {
    /// Read this config file (`--config`).
    pub fn config(mut self, path: impl AsRef<Path>) -> Self {
        self.config = Some(path.as_ref().to_path_buf());
        self
    }

    /// Read sysfs (and /dev, /etc) under this root (`--sysfs-root`).
    pub fn sysfs_root(mut self, path: impl AsRef<Path>) -> Self {
        self.sysfs = Some(path.as_ref().to_path_buf());
        self
    }

    /// More arguments after `serve` (`-v`, `--dry-run`, ...).
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Set (`Some`) or remove (`None`) an environment variable of the daemon.
    pub fn env(mut self, key: &str, value: Option<&std::ffi::OsStr>) -> Self {
        self.env.push((key.into(), value.map(|v| v.to_os_string())));
        self
    }

    /// Collect the daemon's stderr (its log) for [`Serve::log`]; otherwise it goes to the
    /// test's stderr.
    pub fn log(mut self) -> Self {
        self.log = true;
        self
    }

    /// Start it, without waiting for anything.
    pub fn spawn(self) -> Serve {
        let mut command = Command::cargo_bin("usbroute").expect("the usbroute binary");
        command.arg("serve").args(&self.args);
        command.arg("--control").arg(&self.control);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        if let Some(sysfs) = &self.sysfs {
            command.arg("--sysfs-root").arg(sysfs);
        }
        for (key, value) in &self.env {
            match value {
                Some(v) => command.env(key, v),
                None => command.env_remove(key),
            };
        }
        command.stdin(Stdio::null()).stdout(Stdio::null());
        if self.log {
            command.stderr(Stdio::piped());
        }
        let mut child = command.spawn().expect("start usbroute serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|stderr| {
            let lines = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().expect("log").push(line);
                }
            })
        });
        Serve {
            child,
            control: self.control,
            log,
            reader,
        }
    }

    /// Start it and wait until `status` answers on its control socket.
    pub fn start(self) -> Serve {
        let serve = self.spawn();
        serve.wait_until(STARTUP, "the daemon to answer status", || {
            serve.status_answers()
        });
        serve
    }
}

/// A running `usbroute serve`; killed on drop.
pub struct Serve {
    /// The daemon process.
    pub child: Child,
    control: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Serve {
    /// A daemon to start with its control socket at `control`.
    pub fn at(control: impl AsRef<Path>) -> ServeCommand {
        ServeCommand {
            control: control.as_ref().to_path_buf(),
            config: None,
            sysfs: None,
            args: vec![],
            env: vec![],
            log: false,
        }
    }

    /// The control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// Poll `ok` until it holds; after `within` (scaled) panic naming `what`, with the log
    /// when it is collected.
    pub fn wait_until(&self, within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
        let within = scaled(within);
        let deadline = Instant::now() + within;
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn status_answers(&self) -> bool {
        let Ok(stream) = UnixStream::connect(&self.control) else {
            return false;
        };
        let reply = request_on(&stream, r#"{"request":"status"}"#);
        reply.is_some_and(|r| r["reply"] == "status")
    }

    /// `usbroute --control SOCKET`, to add arguments to.
    pub fn command(&self) -> Command {
        command(&self.control)
    }

    /// `usbroute --control SOCKET ARGS`, whatever it gives.
    pub fn cli_output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run usbroute")
    }

    /// `usbroute --control SOCKET ARGS` that must succeed: its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(&self.control, args)
    }

    /// `usbroute --control SOCKET ARGS` that must fail: its stderr.
    pub fn cli_fails(&self, args: &[&str]) -> String {
        cli_fails(&self.control, args)
    }

    /// `status --json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["status", "--json"])).expect("status JSON")
    }

    /// One raw request line to the control socket, its reply.
    pub fn request(&self, request: &str) -> serde_json::Value {
        let stream = UnixStream::connect(&self.control).expect("connect to the control socket");
        request_on(&stream, request).expect("a reply line")
    }

    /// The log so far (collected only when started with [`ServeCommand::log`]).
    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Has the daemon logged a line containing `text`?
    pub fn logged(&self, text: &str) -> bool {
        let lines = self.log.lock().expect("log");
        lines.iter().any(|l| l.contains(text))
    }

    /// Send `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the daemon");
    }

    /// SIGTERM, wait for the exit, and all it logged.
    pub fn stop(&mut self) -> String {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("reap the daemon");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("log reader");
        }
        self.log()
    }

    /// SIGKILL now, and reap it (a daemon that crashes).
    pub fn kill(mut self) {
        self.child.kill().expect("kill the daemon");
        self.child.wait().expect("reap the daemon");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `request` and a newline on `stream`, read one reply line (10 s at most).
fn request_on(stream: &UnixStream, request: &str) -> Option<serde_json::Value> {
    stream
        .set_read_timeout(Some(scaled(Duration::from_secs(10))))
        .ok()?;
    let mut writer = stream;
    writer.write_all(format!("{request}\n").as_bytes()).ok()?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}
