//! Plug -> attached on a real kernel, usbroute beside the floor and the usual ways, in one
//! boot: the outer QMP's `device_add` of a keyboard -> the guest kernel's `bind` -> the
//! method -> the inner QEMU's usb-host for it says `attached: true`. The methods:
//!
//! - `usbroute`: `usbroute serve` with a rule for the keyboard's port;
//! - `floor`: `usbroute-bench floor`, one prepared `device_add` per kernel `bind` on an
//!   open QMP connection, no decisions (`testbed/src/bin/usbroute-bench.rs`);
//! - `qemu_rescan`: QEMU's own: a usb-host by `hostbus` + `hostport` added beforehand;
//! - `udev_socat`: a udev rule running a shell script that pipes QMP into socat.
//!
//! The methods take turns in rounds, so a neighbour's build slowing the machine for a
//! while falls on all of them. The stopwatch (`usbroute-bench watch`) stamps the kernel's
//! events and QEMU's `attached` on the guest's clock; the host's `device_add` is put on
//! that clock through a virtio-serial port (best of several round trips). Then the storm
//! (`bench_storm.rs`). Figures go to stdout and to `target/bench/testbed.json`.

use super::bench_udev::write_udev_scripts;
use super::daemon::{probe_on, start_daemon, usb_hosts_on, wait_vm, CONFIG, CONTROL};
use crate::bed::Bed;
use crate::inner::InnerQemu;
use crate::machine::CLOCK_SOCKET;
use crate::pace::nearest_rank;
use crate::restore::BENCH_UDEV_RULE;
use crate::usb::{Ctrl, Kind, UsbDevice, XHCI_PCI};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The xHCI port the timed keyboard is plugged into.
const PORT: &str = "1";
/// The inner QEMU's monitors besides the attacher's: the stopwatch's and the bed's own.
const WATCH_QMP: &str = "/tmp/inner-bench-watch.qmp";
pub(super) const PROBE_QMP: &str = "/tmp/inner-bench-probe.qmp";
/// The stopwatch's files: the id the plug under test gets, and one line per plug.
const ID_FILE: &str = "/tmp/bench-id";
const PLUGS_FILE: &str = "/tmp/bench-plugs";
/// QEMU's usb-host for the rescan method.
const RESCAN_ID: &str = "rescan-kbd";
/// One plug's whole chain (KVM base): QEMU's rescan alone runs every 2 s.
const CHAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `scripts/testbed bench` asked for the full run (else the short one CI runs).
static FULL: AtomicBool = AtomicBool::new(false);

/// Make the next `bench` run the full one: 50 plugs per method, a 30 s storm.
pub fn run_full() {
    FULL.store(true, Ordering::Relaxed);
}

/// How much of it to run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Size {
    /// Rounds of every method in turn.
    rounds: usize,
    /// Plugs per method per round.
    plugs: usize,
    /// How long the storm lasts.
    pub storm: Duration,
}

impl Size {
    fn get() -> Size {
        if FULL.load(Ordering::Relaxed) {
            Size {
                rounds: 5,
                plugs: 10,
                storm: Duration::from_secs(30),
            }
        } else {
            Size {
                rounds: 1,
                plugs: 5,
                storm: Duration::from_secs(10),
            }
        }
    }
}

/// The ways a device gets from the kernel's `bind` into the inner QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Floor,
    Usbroute,
    QemuRescan,
    UdevSocat,
}

const METHODS: [Method; 4] = [
    Method::Floor,
    Method::Usbroute,
    Method::UdevSocat,
    Method::QemuRescan,
];

impl Method {
    /// Its name in the table and the JSON (a stable interface).
    fn name(self) -> &'static str {
        match self {
            Method::Floor => "floor",
            Method::Usbroute => "usbroute",
            Method::QemuRescan => "qemu_rescan",
            Method::UdevSocat => "udev_socat",
        }
    }

    /// The inner QEMU's id of the usb-host it gives the device (`{bus}`, `{dev}` filled
    /// in by the stopwatch).
    fn id_template(self) -> &'static str {
        match self {
            Method::Floor => "floor-{bus}-{dev}",
            Method::Usbroute => "usbroute-addr-{bus}-{dev}",
            Method::QemuRescan => RESCAN_ID,
            Method::UdevSocat => "udev-{bus}-{dev}",
        }
    }
}

/// A method's plugs: those it attached, and how many it never did.
#[derive(Debug, Default)]
struct Taken {
    samples: Vec<Sample>,
    missed: usize,
}

/// How one plug ended.
enum Plug {
    Attached(Sample),
    /// A baseline (QEMU's rescan, the udev script) never attached it: that is how those
    /// ways fail for real (the script does not retry a `device_add` QEMU refused), so it
    /// is counted, with QEMU's words, not taken for a broken bench.
    Missed(String),
}

impl Method {
    /// Whether a plug it never attaches is the method's own failure, counted in its
    /// figures (the baselines), rather than the scenario's (the floor and usbroute).
    fn may_miss(self) -> bool {
        matches!(self, Method::QemuRescan | Method::UdevSocat)
    }

    /// The guest log that says why one of its plugs never attached, best first.
    fn logs(self) -> &'static str {
        match self {
            Method::Floor => "/tmp/bench-floor.log /tmp/inner-bench.log",
            Method::Usbroute => "/tmp/serve.log /tmp/inner-bench.log",
            Method::QemuRescan => "/tmp/inner-bench.log",
            Method::UdevSocat => "/tmp/bench-udev.log /tmp/inner-bench.log",
        }
    }
}

/// One timed plug, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The outer `device_add` sent -> `attached: true`.
    total: f64,
    /// The guest kernel's `bind` -> `attached: true` (the method's own part).
    from_bind: f64,
}

/// The scenario: the four methods timed, the table and JSON, then the storm.
pub async fn run(bed: &mut Bed) -> Result<()> {
    let size = Size::get();
    let extra = format!(
        "-qmp unix:{WATCH_QMP},server=on,wait=off -qmp unix:{PROBE_QMP},server=on,wait=off"
    );
    let inner = bed.start_inner_qemu("bench", "root", &extra).await?;
    let kbd = UsbDevice::new(Kind::Kbd, "bench-kbd", Ctrl::Xhci, PORT);
    // The port's kernel name, the same for every plug: learnt from one plug.
    let name = bed.plug(&kbd).await?;
    bed.unplug(&kbd.id).await?;
    let bus = name.split('-').next().unwrap_or_default().to_string();
    write_udev_scripts(bed, &inner).await?;
    bed.guest_ok(&format!(
        "usbroute-bench watch --qmp {WATCH_QMP} --id-file {ID_FILE} --out {PLUGS_FILE} \
         --timeout {:.0} >/tmp/bench-watch.log 2>&1 </dev/null &",
        bed.scaled(CHAIN_TIMEOUT).as_secs_f64()
    ))
    .await?;
    let mut clock = GuestClock::connect(bed).await?;

    let mut samples: Vec<(Method, Taken)> =
        METHODS.iter().map(|m| (*m, Taken::default())).collect();
    let mut done = 0;
    for _ in 0..size.rounds {
        for (method, taken) in samples.iter_mut() {
            let attacher = start(bed, *method, &inner, &bus).await?;
            let offset = clock.offset(bed).await?;
            for _ in 0..size.plugs {
                done += 1;
                match timed_plug(bed, *method, &kbd, &name, (&clock, offset), done).await? {
                    Plug::Attached(sample) => taken.samples.push(sample),
                    Plug::Missed(why) => {
                        println!("   {}: plug {done} never attached: {why}", method.name());
                        taken.missed += 1;
                    }
                }
            }
            stop(bed, *method, attacher).await?;
        }
    }
    bed.guest_ok("killall usbroute-bench; true").await?;
    if let Some((method, _)) = samples.iter().find(|(_, t)| t.samples.is_empty()) {
        anyhow::bail!(
            "{} attached none of its {} plugs: the bench's set-up for it is broken",
            method.name(),
            size.rounds * size.plugs
        );
    }
    let json = report(&samples);
    super::bench_storm::run(bed, &inner, size, json).await
}

/// The host's way to the stopwatch's clock (the outer QEMU's virtserialport).
struct GuestClock {
    reader: BufReader<UnixStream>,
    /// The host's zero: guest time = host seconds since `epoch` + offset.
    epoch: Instant,
    /// The last request's letter (1 = `a`).
    asked: u8,
}

impl GuestClock {
    /// Connect, and wait until the stopwatch answers.
    async fn connect(bed: &mut Bed) -> Result<GuestClock> {
        let path = bed.config().run_dir.join(CLOCK_SOCKET);
        let stream = UnixStream::connect(&path)
            .await
            .with_context(|| format!("connecting to the guest clock {}", path.display()))?;
        let mut clock = GuestClock {
            reader: BufReader::new(stream),
            epoch: Instant::now(),
            asked: 0,
        };
        let poll = bed.poll("the stopwatch to answer on the clock port", CHAIN_TIMEOUT);
        loop {
            let asked = tokio::time::timeout(Duration::from_millis(500), clock.ask()).await;
            if let Ok(answer) = asked {
                answer?;
                poll.met(bed);
                return Ok(clock);
            }
            if let Err(e) = poll.again(bed, "no answer").await {
                let log = bed.guest("cat /tmp/bench-watch.log").await?;
                return Err(e.context(format!("stopwatch log: {}", log.stdout)));
            }
        }
    }

    /// One round trip: (host seconds sent, guest seconds, host seconds received). Each
    /// request is a letter the answer repeats, so the answer to one given up on earlier
    /// is never taken for this one's.
    async fn ask(&mut self) -> Result<(f64, f64, f64)> {
        self.asked = self.asked % 26 + 1;
        let tag = char::from(b'a' + self.asked - 1);
        let sent = self.epoch.elapsed().as_secs_f64();
        self.reader.get_mut().write_all(&[tag as u8]).await?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).await? == 0 {
                anyhow::bail!("the guest clock closed");
            }
            let got = self.epoch.elapsed().as_secs_f64();
            if let Some(time) = line.trim().strip_prefix(&format!("{tag} ")) {
                let guest: f64 = time
                    .parse()
                    .with_context(|| format!("the guest clock said {line:?}"))?;
                return Ok((sent, guest, got));
            }
        }
    }

    /// Guest seconds minus host seconds, from the quickest of 16 round trips (the guest
    /// read its clock within that round trip: the error is at most half of it).
    async fn offset(&mut self, bed: &Bed) -> Result<f64> {
        let limit = bed.scaled(Duration::from_secs(2));
        let mut best: Option<(f64, f64)> = None;
        for _ in 0..16 {
            let (sent, guest, got) = tokio::time::timeout(limit, self.ask())
                .await
                .context("the guest clock stopped answering")??;
            let rtt = got - sent;
            if best.is_none_or(|(r, _)| rtt < r) {
                best = Some((rtt, guest - (sent + rtt / 2.0)));
            }
        }
        let (rtt, offset) = best.context("no clock sample")?;
        println!("   clock: best round trip {:.2} ms", rtt * 1e3);
        Ok(offset)
    }
}

/// Make `method` the one that attaches: start its attacher; what `stop` needs.
async fn start(bed: &mut Bed, method: Method, inner: &InnerQemu, bus: &str) -> Result<String> {
    bed.guest_ok(&format!("echo '{}' > {ID_FILE}", method.id_template()))
        .await?;
    match method {
        Method::Floor => {
            let pid = bed
                .guest_ok(&format!(
                    "usbroute-bench floor --qmp {} >/tmp/bench-floor.log 2>&1 </dev/null & echo $!",
                    inner.qmp
                ))
                .await?;
            bed.wait_guest(
                "the floor attacher to listen",
                "grep -q ready /tmp/bench-floor.log",
                Duration::from_secs(5),
            )
            .await?;
            Ok(pid.trim().to_string())
        }
        Method::Usbroute => {
            let config = format!(
                "control_socket = \"{CONTROL}\"\n\n[[vm]]\nname = \"inner\"\nqmp = \"{}\"\n\n\
                 [[rule]]\nvm = \"inner\"\nmatch = \"port:{XHCI_PCI}/{PORT}\"\n",
                inner.qmp
            );
            bed.guest_ok(&format!("cat > {CONFIG} <<'EOF'\n{config}EOF"))
                .await?;
            let pid = start_daemon(bed).await?;
            wait_vm(bed, "inner", true).await?;
            Ok(pid)
        }
        Method::UdevSocat => {
            let rule = "SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_device\", ACTION==\"bind\", RUN+=\"/tmp/bench-attach.sh\"\n\
                        SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_device\", ACTION==\"remove\", RUN+=\"/tmp/bench-detach.sh\"\n";
            bed.guest_ok(&format!(
                "mkdir -p /etc/udev/rules.d && cat > {BENCH_UDEV_RULE} <<'EOF' && udevadm control --reload\n{rule}EOF\n"
            ))
            .await?;
            Ok(String::new())
        }
        Method::QemuRescan => {
            let args = json!({"driver": "usb-host", "id": RESCAN_ID, "bus": "xhci.0",
                              "hostbus": bus.parse::<u32>()?, "hostport": PORT});
            probe(bed, "device_add", args).await?;
            Ok(String::new())
        }
    }
}

/// Stop `method`'s attacher; the inner QEMU is left with no usb-host.
async fn stop(bed: &mut Bed, method: Method, attacher: String) -> Result<()> {
    match method {
        Method::Floor => bed.guest_ok(&format!("kill {attacher}")).await.map(drop)?,
        Method::Usbroute => {
            // Where its time goes, for whoever reads the figures: QEMU refusing a
            // device_add by bus and address it has not heard of yet (then retried).
            let refused = bed
                .guest_ok(&format!(
                    "kill -9 {attacher}; grep -c 'failed to find host usb device' /tmp/serve.log; \
                     mv /tmp/serve.log /tmp/bench-serve.log; rm -f {CONTROL} {CONFIG}"
                ))
                .await
                .unwrap_or_default();
            println!(
                "   usbroute: {} attach(es) refused by QEMU with \"failed to find host usb \
                 device\" and retried this round",
                refused.trim()
            );
        }
        Method::UdevSocat => {
            bed.guest_ok(&format!(
                "rm -f {BENCH_UDEV_RULE}; udevadm control --reload"
            ))
            .await?;
        }
        Method::QemuRescan => {
            probe(bed, "device_del", json!({"id": RESCAN_ID})).await?;
        }
    }
    wait_clean(bed, method).await
}

/// One plug: `device_add` sent (put on the guest's clock by `clock` and `offset`) -> the
/// stopwatch's line for it; then unplugged and the inner QEMU back to rest.
async fn timed_plug(
    bed: &mut Bed,
    method: Method,
    kbd: &UsbDevice,
    name: &str,
    clock: (&GuestClock, f64),
    nth: usize,
) -> Result<Plug> {
    let sent = clock.0.epoch.elapsed().as_secs_f64() + clock.1;
    bed.device_add(kbd, name).await?;
    let line = bed
        .wait_guest(
            &format!("the stopwatch's line for plug {nth} ({})", method.name()),
            &format!("[ \"$(wc -l < {PLUGS_FILE})\" -ge {nth} ] 2>/dev/null && sed -n {nth}p {PLUGS_FILE}"),
            CHAIN_TIMEOUT * 2,
        )
        .await;
    let fields: Vec<String> = match &line {
        Ok(line) => line.split_whitespace().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    };
    let (bind, attached) = match &fields[..] {
        [_, _, _, bind, attached] if attached != "timeout" => (bind, attached),
        _ => {
            // The method's own log first: a long tail of the others could hide it.
            let logs = bed
                .guest(&format!("tail -n 6 {} 2>/dev/null", method.logs()))
                .await?;
            let why = match line {
                Ok(line) => anyhow::anyhow!("the stopwatch wrote {line:?}"),
                Err(e) => e,
            };
            if !method.may_miss() {
                return Err(why.context(format!(
                    "plug {nth} ({}) never attached; logs:\n{}",
                    method.name(),
                    logs.stdout
                )));
            }
            bed.unplug(&kbd.id).await?;
            wait_clean(bed, method).await?;
            return Ok(Plug::Missed(format!("{why:#}; logs:\n{}", logs.stdout)));
        }
    };
    let (bind, attached): (f64, f64) = (bind.parse()?, attached.parse()?);
    bed.unplug(&kbd.id).await?;
    wait_clean(bed, method).await?;
    Ok(Plug::Attached(Sample {
        total: (attached - sent) * 1e3,
        from_bind: (attached - bind) * 1e3,
    }))
}

/// Wait until the inner QEMU holds nothing for `method`: no usb-host but the rescan one,
/// which is not attached; and no socat of the udev rule still holds the monitor.
async fn wait_clean(bed: &mut Bed, method: Method) -> Result<()> {
    let what = format!("the inner QEMU at rest after a {} plug", method.name());
    let poll = bed.poll(&what, CHAIN_TIMEOUT);
    loop {
        let hosts = usb_hosts_on(bed, PROBE_QMP).await?;
        let mut clean = hosts.iter().all(|h| h == RESCAN_ID);
        if clean && !hosts.is_empty() {
            let path = format!("/machine/peripheral/{RESCAN_ID}");
            clean = probe(
                bed,
                "qom-get",
                json!({"path": path, "property": "attached"}),
            )
            .await?
                == false;
        }
        if clean && method == Method::UdevSocat {
            clean = bed.guest("! pidof socat").await?.rc == 0;
        }
        if clean {
            poll.met(bed);
            return Ok(());
        }
        poll.again(bed, format!("{hosts:?}")).await?;
    }
}

async fn probe(bed: &mut Bed, command: &str, arguments: Value) -> Result<Value> {
    probe_on(bed, PROBE_QMP, command, arguments).await
}

/// p50 and p99 (nearest rank) of `values`, in their unit.
fn p50_p99(values: &[f64]) -> (f64, f64) {
    let mut sorted: Vec<Duration> = values
        .iter()
        .map(|v| Duration::from_secs_f64(v.max(0.0) / 1e3))
        .collect();
    sorted.sort();
    let ms = |q| nearest_rank(&sorted, q).as_secs_f64() * 1e3;
    (ms(0.50), ms(0.99))
}

/// Print the table (ratios to the floor's p50) and return the JSON figures.
fn report(samples: &[(Method, Taken)]) -> Value {
    let floor = samples
        .iter()
        .find(|(m, _)| *m == Method::Floor)
        .map(|(_, t)| p50_p99(&t.samples.iter().map(|s| s.total).collect::<Vec<_>>()).0)
        .unwrap_or(f64::NAN);
    println!(
        "   figure bench, outer device_add -> inner QEMU attached: true (same boot, ms):\n   \
         {:<12} {:>4} {:>6} {:>9} {:>9} {:>9}   {:>14} {:>14}",
        "method", "n", "missed", "p50", "p99", "p50/floor", "bind->att p50", "bind->att p99"
    );
    let mut json = json!({});
    for (method, taken) in samples {
        let (p50, p99) = p50_p99(&taken.samples.iter().map(|s| s.total).collect::<Vec<_>>());
        let (b50, b99) = p50_p99(
            &taken
                .samples
                .iter()
                .map(|s| s.from_bind)
                .collect::<Vec<_>>(),
        );
        println!(
            "   {:<12} {:>4} {:>6} {p50:>9.1} {p99:>9.1} {:>8.2}x   {b50:>14.1} {b99:>14.1}",
            method.name(),
            taken.samples.len(),
            taken.missed,
            p50 / floor
        );
        json[method.name()] = json!({
            "p50_ms": round(p50), "p99_ms": round(p99), "n": taken.samples.len(),
            "missed": taken.missed,
            "bind_to_attached_p50_ms": round(b50), "bind_to_attached_p99_ms": round(b99),
        });
    }
    json
}

/// To the microsecond: the JSON says no more than was measured.
fn round(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p50_and_p99_are_nearest_rank_in_milliseconds() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();

        assert_eq!(p50_p99(&values), (10.0, 20.0));
    }
}
