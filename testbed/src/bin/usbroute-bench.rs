//! The guest half of the test bed's `bench` scenario (docs/testbed.md), built for the
//! guest like usbroute is and appended to its image by `scripts/testbed`:
//!
//! - `floor`: the minimal event-driven attacher, the floor usbroute is measured against.
//!   It holds one QMP connection open and, for every kernel `bind` of a USB device, sends
//!   one prepared `device_add usb-host` of the device node it opened and passed (and on
//!   `remove` a prepared `device_del`; see [`floor`] for why a passed file and not bus and
//!   address). No rules, no listing, no confirmation: nothing but the event and the
//!   command.
//! - `watch`: the stopwatch. It stamps the kernel's `add` and `bind` of every USB device,
//!   then polls the inner QEMU (on a monitor of its own) until the usb-host the method
//!   under test gives that device says `attached: true`, and appends one line per plug
//!   to a file. It also answers the host's clock requests on a virtio-serial port, so
//!   the host can put its own `device_add` on the same clock.
//!
//! Times are seconds on the watcher's own monotonic clock (its start is 0).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::socket::{
    bind, recv, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage, MsgFlags,
    NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The minimal attacher: one prepared device_add per kernel `bind`.
    Floor {
        /// The inner QEMU's QMP socket (held for the whole run).
        #[arg(long)]
        qmp: PathBuf,
        /// The inner QEMU's USB bus to attach on.
        #[arg(long, default_value = "xhci.0")]
        bus: String,
    },
    /// The stopwatch: kernel add/bind stamps, inner QEMU `attached: true` stamps.
    Watch {
        /// A QMP socket of the inner QEMU no one else uses.
        #[arg(long)]
        qmp: PathBuf,
        /// A file holding the inner QEMU's device id the plug under test gets, read at
        /// each `bind`: `{bus}` and `{dev}` stand for the device's numbers.
        #[arg(long)]
        id_file: PathBuf,
        /// Where each plug's line is appended: `BUS DEV ADD BIND ATTACHED` (or
        /// `timeout` in place of ATTACHED).
        #[arg(long)]
        out: PathBuf,
        /// The virtio-serial port name the host asks the time on.
        #[arg(long, default_value = "org.usbroute.clock")]
        clock_port: String,
        /// How long one device may take from `bind` to attached, in seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Floor { qmp, bus } => floor(&qmp, &bus),
        Cmd::Watch {
            qmp,
            id_file,
            out,
            clock_port,
            timeout,
        } => watch(&qmp, &id_file, &out, &clock_port, timeout),
    }
}

/// One kernel uevent of a USB device (`DEVTYPE=usb_device`), its numbers parsed.
struct UsbEvent {
    action: String,
    bus: u32,
    dev: u32,
}

/// A netlink socket subscribed to the kernel's uevents.
fn uevent_socket() -> Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )
    .context("opening a netlink uevent socket")?;
    // A burst of uevents (a hub and its devices) must not overflow it.
    let _ = setsockopt(&fd, sockopt::RcvBufForce, &(1 << 20));
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1)).context("binding to the kernel's uevents")?;
    Ok(fd)
}

/// The next uevent of a USB device (interfaces, hubs' ports and others skipped).
fn next_usb_event(fd: &OwnedFd, buf: &mut [u8]) -> Result<UsbEvent> {
    loop {
        let n = recv(fd.as_raw_fd(), buf, MsgFlags::empty()).context("reading a uevent")?;
        let mut action = None;
        let (mut devtype, mut bus, mut dev) = (false, None, None);
        for field in buf[..n].split(|b| *b == 0) {
            let field = String::from_utf8_lossy(field);
            if let Some(v) = field.strip_prefix("ACTION=") {
                action = Some(v.to_string());
            } else if field == "DEVTYPE=usb_device" {
                devtype = true;
            } else if let Some(v) = field.strip_prefix("BUSNUM=") {
                bus = v.parse().ok();
            } else if let Some(v) = field.strip_prefix("DEVNUM=") {
                dev = v.parse().ok();
            }
        }
        if let (Some(action), true, Some(bus), Some(dev)) = (action, devtype, bus, dev) {
            return Ok(UsbEvent { action, bus, dev });
        }
    }
}

/// A QMP connection past its greeting and `qmp_capabilities`.
fn qmp_connect(path: &PathBuf) -> Result<(UnixStream, BufReader<UnixStream>)> {
    let stream =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.contains("\"QMP\"") {
        bail!("{} greeted with {line:?}, not QMP", path.display());
    }
    let mut stream = stream;
    writeln!(stream, r#"{{"execute":"qmp_capabilities"}}"#)?;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("{} closed during qmp_capabilities", path.display());
        }
        if line.contains("\"return\"") {
            return Ok((stream, reader));
        }
        if line.contains("\"error\"") {
            bail!("qmp_capabilities on {}: {line}", path.display());
        }
    }
}

/// The floor: no decision, prepared commands per event. Replies are copied to stdout by
/// a thread (a log, and so the socket's buffer never fills).
///
/// On `bind` it opens the device node and hands it to QEMU (`add-fd` with the file over
/// SCM_RIGHTS, then `device_add` with `hostdevice=/dev/fdset/N`, sent back to back):
/// a `device_add` by `hostbus`+`hostaddr` at the kernel's `bind` fails now and then with
/// "failed to find host usb device" (3 plugs of 7 in the test bed), because QEMU's libusb
/// learns of a device only from udevd's rebroadcast, which comes later; an open file
/// needs no lookup. On `remove`, `device_del` and `remove-fd`.
fn floor(qmp: &PathBuf, qemu_bus: &str) -> Result<()> {
    let (mut stream, mut reader) = qmp_connect(qmp)?;
    reader.get_ref().set_read_timeout(None)?;
    std::thread::spawn(move || {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            print!("{line}");
            line.clear();
        }
    });
    let fd = uevent_socket()?;
    // The bench waits for this before it plugs anything.
    println!("ready");
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let ev = next_usb_event(&fd, &mut buf)?;
        let (b, d) = (ev.bus, ev.dev);
        let [add_fd, add, remove] = floor_commands(qemu_bus, b, d);
        match ev.action.as_str() {
            "bind" => {
                let node = format!("/dev/bus/usb/{b:03}/{d:03}");
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&node)
                    .with_context(|| format!("opening {node}"))?;
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(add_fd.as_bytes())],
                    &[ControlMessage::ScmRights(&[file.as_raw_fd()])],
                    MsgFlags::empty(),
                    None,
                )
                .context("sending add-fd")?;
                stream.write_all(add.as_bytes())?;
            }
            "remove" => stream.write_all(remove.as_bytes())?,
            _ => {}
        }
    }
}

/// The floor's prepared commands for the device at bus `b`, address `d`, each a QMP line:
/// `add-fd` (sent with the open node), `device_add` of it, and what undoes both. One
/// fdset per plug: a devnum never repeats within a bench.
fn floor_commands(qemu_bus: &str, b: u32, d: u32) -> [String; 3] {
    let set = u64::from(b) * 1000 + u64::from(d);
    let id = format!("floor-{b}-{d}");
    [
        format!(r#"{{"execute":"add-fd","arguments":{{"fdset-id":{set}}}}}"#) + "\r\n",
        format!(
            r#"{{"execute":"device_add","arguments":{{"driver":"usb-host","bus":"{qemu_bus}","hostdevice":"/dev/fdset/{set}","id":"{id}"}}}}"#
        ) + "\r\n",
        format!(r#"{{"execute":"device_del","arguments":{{"id":"{id}"}}}}"#)
            + "\r\n"
            + &format!(r#"{{"execute":"remove-fd","arguments":{{"fdset-id":{set}}}}}"#)
            + "\r\n",
    ]
}

/// The stopwatch (see the file's header).
fn watch(qmp: &PathBuf, id_file: &PathBuf, out: &PathBuf, port: &str, timeout: f64) -> Result<()> {
    let epoch = Instant::now();
    let clock = clock_device(port)?;
    std::thread::spawn(move || serve_clock(clock, epoch));
    let (mut stream, mut reader) = qmp_connect(qmp)?;
    let (tx, rx) = mpsc::channel();
    let fd = uevent_socket()?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(ev) = next_usb_event(&fd, &mut buf) {
            if tx.send((ev, epoch.elapsed().as_secs_f64())).is_err() {
                break;
            }
        }
    });
    let mut added: Vec<(u32, u32, f64)> = Vec::new();
    let mut seq = 0u64;
    for (ev, at) in rx {
        match ev.action.as_str() {
            "add" => added.push((ev.bus, ev.dev, at)),
            "bind" => {
                let add = added
                    .iter()
                    .rfind(|(b, d, _)| (*b, *d) == (ev.bus, ev.dev))
                    .map_or("-".to_string(), |a| format!("{:.6}", a.2));
                let template = std::fs::read_to_string(id_file)
                    .with_context(|| format!("reading {}", id_file.display()))?;
                let id = template
                    .trim()
                    .replace("{bus}", &ev.bus.to_string())
                    .replace("{dev}", &ev.dev.to_string());
                let until = Instant::now() + Duration::from_secs_f64(timeout);
                let attached = loop {
                    seq += 1;
                    if attached(&mut stream, &mut reader, &id, seq)? {
                        break format!("{:.6}", epoch.elapsed().as_secs_f64());
                    }
                    if Instant::now() > until {
                        break "timeout".to_string();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                };
                let line = format!("{} {} {add} {at:.6} {attached}\n", ev.bus, ev.dev);
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(out)
                    .and_then(|mut f| f.write_all(line.as_bytes()))
                    .with_context(|| format!("appending to {}", out.display()))?;
            }
            _ => {}
        }
    }
    bail!("the uevent reader stopped")
}

/// Whether QEMU's `/machine/peripheral/ID` says `attached: true` (a missing device is
/// not attached).
fn attached(
    stream: &mut UnixStream,
    reader: &mut BufReader<UnixStream>,
    id: &str,
    seq: u64,
) -> Result<bool> {
    writeln!(
        stream,
        r#"{{"execute":"qom-get","arguments":{{"path":"/machine/peripheral/{id}","property":"attached"}},"id":{seq}}}"#
    )?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the inner QEMU closed the watch monitor");
        }
        let reply: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("the watch monitor sent {line:?}"))?;
        if reply["id"] == seq {
            return Ok(reply["return"] == true);
        }
    }
}

/// The guest's end of the virtio-serial port named `name`.
fn clock_device(name: &str) -> Result<std::fs::File> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let named = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if named.trim() == name {
            let dev = PathBuf::from("/dev").join(entry.file_name());
            return std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .with_context(|| format!("opening {}", dev.display()));
        }
    }
    bail!("no virtio-serial port named {name} (the outer QEMU's virtserialport)")
}

/// Answer every byte the host sends with that byte and the watcher's time, one line each
/// (the byte tells the host which request a late answer was for).
fn serve_clock(mut port: std::fs::File, epoch: Instant) {
    let mut byte = [0u8; 1];
    loop {
        match port.read(&mut byte) {
            Ok(1) => {
                let now = format!(
                    "{} {:.6}\n",
                    char::from(byte[0]),
                    epoch.elapsed().as_secs_f64()
                );
                if port.write_all(now.as_bytes()).is_err() {
                    return;
                }
            }
            // The host is not connected (end of file): wait for it.
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floors_commands_are_qmp_lines_naming_one_fdset_and_one_id_per_plug() {
        let [add_fd, add, remove] = floor_commands("xhci.0", 1, 12);

        let parse = |text: &str| -> Vec<serde_json::Value> {
            assert!(text.ends_with("\r\n"), "{text:?}");
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (add_fd, add, remove) = (parse(&add_fd), parse(&add), parse(&remove));
        assert_eq!(add_fd[0]["arguments"]["fdset-id"], 1012);
        assert_eq!(add[0]["arguments"]["hostdevice"], "/dev/fdset/1012");
        assert_eq!(add[0]["arguments"]["id"], "floor-1-12");
        assert_eq!(add[0]["arguments"]["bus"], "xhci.0");
        assert_eq!(remove[0]["execute"], "device_del");
        assert_eq!(remove[0]["arguments"]["id"], "floor-1-12");
        assert_eq!(remove[1]["arguments"]["fdset-id"], 1012);
    }
}
