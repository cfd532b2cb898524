//! The peers the daemon bench drives: paused QEMUs, `usbroute serve` as a process with
//! its log read line by line as it comes, the control socket and QMP by hand, and
//! latency percentiles.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// `usbroute serve` as a process, its stderr (the log, at
/// the default verbosity) read by a thread that stamps each line as it arrives. Killed on
/// drop.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    /// Every line read so far, for the message of a wait that failed.
    seen: Vec<String>,
}

impl Daemon {
    /// Start `BINARY serve --control CONTROL` with `args` (config, sysfs root, ...),
    /// without waiting for anything.
    pub fn spawn(binary: &Path, control: &Path, args: &[&std::ffi::OsStr]) -> Daemon {
        let mut child = Command::new(binary)
            .arg("serve")
            .args(args)
            .arg("--control")
            .arg(control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start usbroute serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Start it and wait until its control socket answers `status`.
    pub fn start(binary: &Path, control: &Path, args: &[&std::ffi::OsStr]) -> Daemon {
        let daemon = Daemon::spawn(binary, control, args);
        wait_for(
            Duration::from_secs(30),
            "the daemon to answer status",
            || status(control).get("vms").is_some(),
        );
        daemon
    }

    /// Read the log until a line satisfies `want`; when it arrived. Panics with the log
    /// after `within`.
    pub fn wait_line(&mut self, within: Duration, want: impl FnMut(&str) -> bool) -> Instant {
        self.wait_stamped(within, want).0
    }

    /// [`Daemon::wait_line`], with the time the daemon itself stamped on the line (when
    /// it logged it, to the microsecond: before the pipe and this process's reader).
    pub fn wait_stamped(
        &mut self,
        within: Duration,
        mut want: impl FnMut(&str) -> bool,
    ) -> (Instant, SystemTime) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    let hit = want(&line);
                    let stamp = hit.then(|| log_stamp(&line));
                    self.seen.push(line);
                    if let Some(stamp) = stamp {
                        let stamp = stamp
                            .unwrap_or_else(|| panic!("no timestamp on {:?}", self.seen.last()));
                        return (at, stamp);
                    }
                }
                Err(_) => panic!(
                    "waited {within:?} for a line of the daemon's log; it said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The daemon's resident set, kB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// Of its resident set, the anonymous part (heap, stacks), kB; the rest is the
    /// binary's and libraries' pages.
    pub fn anon_kib(&self) -> u64 {
        status_kib(self.child.id(), "RssAnon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Where the time goes: `USBROUTE_BENCH_LOG=FILE RUST_LOG=usbroute=debug` keeps
        // every daemon's log (timestamped to the microsecond) in FILE.
        if let Some(path) = std::env::var_os("USBROUTE_BENCH_LOG") {
            self.seen
                .extend(self.lines.try_iter().map(|(_, line)| line));
            let mut text = self.seen.join("\n");
            text.push('\n');
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
            if let Err(e) = appended {
                eprintln!("cannot keep the daemon's log in {path:?}: {e}");
            }
        }
    }
}

/// The time at the start of a line of the daemon's log (`2026-12-02T05:27:55.930953Z`,
/// UTC, as tracing's default timer writes it).
pub fn log_stamp(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let (hms, micros) = time.split_once('.')?;
    let mut hms = hms.splitn(3, ':').map(str::parse::<u64>);
    let (h, min, sec) = (hms.next()?.ok()?, hms.next()?.ok()?, hms.next()?.ok()?);
    let nanos = format!("{micros:0<9}").parse::<u32>().ok()?;
    // Days since 1970-01-01 of a civil date (the proleptic Gregorian calendar).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// The `usbroute` binary built with this bench.
pub fn usbroute() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_usbroute"))
}

/// Whether `line` of the daemon's log says an action `verb` (`attach`, `detach`) is done
/// for the device QEMU calls `id` (`None`: any device): `INFO attach 1-2.1 (label) by
/// Port done vm="serve" id="usbroute-port-1-2.1"`, logged when the VM confirmed it.
pub fn done(line: &str, verb: &str, id: Option<&str>) -> bool {
    line.contains(&format!("INFO {verb} "))
        && line.contains(" done ")
        && id.map_or(true, |id| line.contains(&format!("id=\"{id}\"")))
}

/// `VmRSS` of a process, kB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `RssAnon`, `RssFile`), 0 if unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// Poll `ok` every 20 ms until it holds; panics naming `what` after `within`.
pub fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
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

/// Wait until the daemon at `control` says it is at rest (its steady state: what it
/// holds then is what it keeps).
pub fn wait_at_rest(control: &Path) {
    wait_for(Duration::from_secs(60), "the daemon to be at rest", || {
        status(control)["at_rest"] == true
    });
}

/// A small paused QEMU (`-S`, 32 MiB, no default devices) with one xHCI controller
/// (`xhci.0`), serving QMP. Killed on drop.
pub struct Qemu {
    pub child: Child,
    pub qmp: PathBuf,
}

impl Qemu {
    /// Start it and wait for its QMP socket.
    pub fn start(qmp: &Path) -> Qemu {
        let qemu = Qemu::spawn(qmp);
        qemu.wait_ready();
        qemu
    }

    /// Start it without waiting (start many, then [`Qemu::wait_ready`] each).
    pub fn spawn(qmp: &Path) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-S", "-m", "32"])
            .args(["-nodefaults", "-display", "none"])
            .args(["-device", "qemu-xhci,id=xhci", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
        Qemu {
            child,
            qmp: qmp.to_path_buf(),
        }
    }

    /// Wait until its QMP socket accepts.
    pub fn wait_ready(&self) {
        wait_for(Duration::from_secs(60), "QEMU's QMP socket", || {
            UnixStream::connect(&self.qmp).is_ok()
        });
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A negotiated QMP connection, read line by line.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
    /// Events read while waiting for replies, not yet asked for.
    events: Vec<String>,
}

impl Qmp {
    /// Connect, read the greeting, negotiate.
    pub fn connect(qmp: &Path) -> Qmp {
        let stream = UnixStream::connect(qmp).expect("connect to QMP");
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            line: String::new(),
            events: Vec::new(),
        };
        // The greeting carries no "return": the first command's wait skips it.
        qmp.command("{\"execute\":\"qmp_capabilities\"}");
        qmp
    }

    /// Send one command (a JSON object on one line) and return its reply line (events
    /// before it are skipped).
    pub fn command(&mut self, command: &str) -> &str {
        self.writer.write_all(command.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        loop {
            self.line.clear();
            let n = self.reader.read_line(&mut self.line).unwrap();
            assert!(n > 0, "QEMU closed the QMP connection");
            if self.line.contains("\"return\"") || self.line.contains("\"error\"") {
                return &self.line;
            }
            if self.line.contains("\"event\"") {
                self.events.push(self.line.clone());
            }
        }
    }

    /// Wait for the event `name` (one already read counts), at most `within`.
    pub fn wait_event(&mut self, name: &str, within: Duration) {
        let wanted = format!("\"event\": \"{name}\"");
        if let Some(at) = self.events.iter().position(|e| e.contains(&wanted)) {
            self.events.remove(at);
            return;
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(within))
            .unwrap();
        loop {
            self.line.clear();
            let n = self
                .reader
                .read_line(&mut self.line)
                .unwrap_or_else(|e| panic!("no {name} within {within:?}: {e}"));
            assert!(n > 0, "QEMU closed the QMP connection");
            if self.line.contains(&wanted) {
                break;
            }
        }
        self.reader.get_ref().set_read_timeout(None).unwrap();
    }

    /// [`Qmp::command`] that must succeed.
    pub fn ok(&mut self, command: &str) {
        let reply = self.command(command);
        assert!(reply.contains("\"return\""), "{command}: {reply}");
    }
}

/// `device_add` of a usb-host by port on `xhci.0`: what the daemon sends for a rule `by =
/// "port"` (QEMU waits for such a device; it needs none on this host).
pub fn device_add_by_port(id: &str, bus: u8, port: &str) -> String {
    format!(
        "{{\"execute\":\"device_add\",\"arguments\":{{\"driver\":\"usb-host\",\"bus\":\"xhci.0\",\"hostbus\":{bus},\"hostport\":\"{port}\",\"id\":\"{id}\"}}}}"
    )
}

pub fn device_del(id: &str) -> String {
    format!("{{\"execute\":\"device_del\",\"arguments\":{{\"id\":\"{id}\"}}}}")
}

/// Latency samples with their percentiles.
pub struct Percentiles(pub Vec<Duration>);

impl Percentiles {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Percentiles(samples)
    }

    /// The `q` quantile (nearest rank), µs.
    pub fn at(&self, q: f64) -> f64 {
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i].as_secs_f64() * 1e6
    }

    pub fn p50(&self) -> f64 {
        self.at(0.50)
    }

    pub fn p99(&self) -> f64 {
        self.at(0.99)
    }

    /// `{"p50_us", "p99_us", "n"}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "p50_us": self.p50().round() as u64,
            "p99_us": self.p99().round() as u64,
            "n": self.0.len(),
        })
    }
}
