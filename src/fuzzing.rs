//! One entry point per parser of outside input, for the libFuzzer targets in `fuzz/` and
//! for `tests/quick/fuzz_seeds.rs`, which replays the committed seed corpora under `cargo test`.
//!
//! Each function takes the raw bytes an attacker or a faulty peer could send, runs them
//! through the same code the daemon runs, and panics when an invariant breaks: beyond
//! "no panic", what parses must re-display and re-parse to the same value, errors must
//! stay short (they quote their input), and limits must hold. The targets live in the
//! main crate so that a parser's change that breaks a target fails `cargo build`, not
//! only the fuzz build. Not a stable interface: hidden from the docs.

use crate::backend::qemu::qmp::reader::{parse_message, Line, LineReader, Message};
use crate::backend::qemu::qmp::Qmp;
use crate::config::{Config, ConfigError};
use crate::daemon::mounts::mounted_devices;
use crate::daemon::Request;
use crate::events::{classify, Received, UEvent};
use crate::hostblock::{parse_mountinfo, parse_mounts, unescape_mount_field};
use crate::inventory::{pci, usb, ControllerKind, Device, HexId, PciAddress, PortPath, Speed};
use crate::selector::Selector;
use crate::toggle::lines::{self, LineSplitter};
use crate::toggle::protocol::{self, is_profile_name, parse_line, ParseError, Reply};

/// A target's entry point: any bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target: its name (the `fuzz/fuzz_targets/NAME.rs` and `fuzz/seeds/NAME/` it
/// owns) and its entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("uevent", uevent),
    ("selector", selector),
    ("config", config),
    ("qmp_stream", qmp_stream),
    ("control_request", control_request),
    ("toggle_line", toggle_line),
    ("mountinfo", mountinfo),
    ("sysfs_attribute", sysfs_attribute),
    ("domain_xml", domain_xml),
    ("xen", xen),
    ("libvirt_rpc", libvirt_rpc),
];

/// Longest error message that quotes its input: parsers must cut what they show. QMP
/// shows 200 characters Debug-escaped, up to 10 bytes each (`\u{10ffff}`), plus words.
const MAX_QUOTING_MESSAGE: usize = 4096;

/// A kernel uevent datagram, through the same check the netlink socket applies.
pub fn uevent(data: &[u8]) {
    let direct = UEvent::parse(data);
    match classify(Some(0), Some(0), false, data) {
        Received::Event(event) => {
            assert_eq!(Ok(&event), direct.as_ref(), "classify and parse disagree");
            assert!(
                event.devpath.starts_with('/'),
                "devpath {:?}",
                event.devpath
            );
            assert!(!event.kernel_name().contains('/'));
            assert!(!event.action.as_str().is_empty());
            assert_eq!(
                event.env.get("ACTION").map_or(event.action.as_str(), |a| a),
                event.action.as_str()
            );
            let _ = event.trigger();
        }
        Received::Rejected { reason } => {
            assert!(direct.is_err(), "classify rejected what parse accepted");
            assert!(
                reason.len() <= MAX_QUOTING_MESSAGE,
                "{} bytes of reason",
                reason.len()
            );
        }
        Received::Resync { .. } => panic!("a whole datagram from the kernel asked for a resync"),
    }
}

/// A selector as typed on the command line, in a config `match` or a control request.
pub fn selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Selector>() {
        Ok(parsed) => {
            assert!(!parsed.terms.is_empty());
            assert_round_trip(&parsed);
            let device = Device::at("1-1".parse().expect("a port path"));
            let _ = (parsed.matches(&device), parsed.explain(&device));
            let _ = parsed.provably_disjoint(&parsed);
        }
        Err(e) => assert!(
            e.part.len() <= text.len(),
            "error part longer than the input"
        ),
    }
}

/// A selector shown the way usbroute shows it must read back as the same selector.
fn assert_round_trip(parsed: &Selector) {
    let shown = parsed.to_string();
    match shown.parse::<Selector>() {
        Ok(again) => assert_eq!(&again, parsed, "{shown:?} re-parses differently"),
        Err(e) => panic!("{shown:?}, displayed from a parsed selector, does not parse: {e}"),
    }
}

/// The whole config file, `[routing]` and `[toggle]` included.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, None) {
        Ok(config) => {
            for rule in &config.rules {
                assert_round_trip(&rule.selector);
                assert!(rule.line >= 1);
            }
            for vm in &config.vms {
                assert_eq!(config.vm(&vm.name), Some(vm), "VM names must be unique");
            }
            // The loader places [routing]/[toggle] problems in the file: none may be left.
            let left = crate::config::check_routing_config(&config);
            assert!(
                left.is_empty(),
                "a loaded config still has problems: {left:?}"
            );
            let again = Config::parse(text, None).expect("a config that loaded once loads again");
            assert_eq!(again, config);
        }
        Err(ConfigError::Invalid { problems }) => {
            assert!(!problems.is_empty(), "an invalid config must say why");
            let lines = text.split('\n').count();
            for p in &problems {
                assert!(p.line >= 1 && p.line <= lines, "line {} of {lines}", p.line);
                assert!(p.column >= 1, "column {}", p.column);
            }
        }
        Err(other) => panic!("parsing text gave a non-parse error: {other}"),
    }
}

/// What a QEMU (or something pretending to be one) sends on its QMP socket. The first
/// byte sets how much the reader reads at a time, so lines also arrive split across reads.
pub fn qmp_stream(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let capacity = 1 + usize::from(first % 64);
    // A runtime per input: dropping it drops the reader task a failed handshake leaves
    // behind, so one input's tasks never leak into the next (or into the leak checker).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    rt.block_on(read_every_line(stream, capacity));
    rt.block_on(handshake(stream));
}

/// The line reader against a model: the lines are the `\n`-separated pieces, their line
/// ends stripped, the last unterminated piece is the partial; each line is classified.
async fn read_every_line(stream: &[u8], capacity: usize) {
    let mut reader = LineReader::with_chunk(stream, capacity);
    let mut expected = stream.split(|b| *b == b'\n');
    loop {
        let piece = expected
            .next()
            .expect("the reader returned more lines than there are");
        match reader.read_line().await {
            Ok(Line::Complete(line)) => {
                let mut want = piece;
                while let Some(rest) = want.strip_suffix(b"\r") {
                    want = rest;
                }
                assert_eq!(line, want);
                assert!(line.len() <= crate::backend::qemu::qmp::reader::MAX_LINE);
                check_message(&line);
            }
            Ok(Line::End { partial }) => {
                assert_eq!(partial, piece);
                assert!(expected.next().is_none(), "the reader stopped early");
                return;
            }
            Err(e) => {
                assert!(
                    piece.len() > crate::backend::qemu::qmp::reader::MAX_LINE,
                    "refused a short line: {e}"
                );
                return;
            }
        }
    }
}

fn check_message(line: &[u8]) {
    match parse_message(line) {
        Ok(Message::Greeting(_) | Message::Reply { .. }) => {}
        Ok(Message::Event(event)) => assert!(event.raw.get("event").is_some()),
        Err(garbage) => {
            assert!(
                garbage.len() <= MAX_QUOTING_MESSAGE,
                "{} bytes of description",
                garbage.len()
            );
        }
    }
}

/// The whole client over a peer that sends `stream` and hangs up: greeting, capability
/// negotiation and a command must end (no hang) whatever arrives.
async fn handshake(stream: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let (ours, mut theirs) = tokio::io::duplex(stream.len().max(1));
    theirs
        .write_all(stream)
        .await
        .expect("the duplex holds the whole stream");
    drop(theirs);
    if let Ok(qmp) = Qmp::from_stream(ours).await {
        let _ = qmp.execute("query-status", None).await;
    }
}

/// One control-socket request line, as `usbroute serve` decodes it.
pub fn control_request(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let encoded = serde_json::to_vec(&request).expect("a request always encodes");
    let decoded: Request = serde_json::from_slice(&encoded).expect("an encoded request decodes");
    assert_eq!(decoded, request);
    if let Request::Routing { line } = &request {
        toggle_line(line.as_bytes());
    }
}

/// What a guest's serial link or a network client sends the toggle service: the
/// stream is cut into lines as the server cuts it, each line is parsed, and the whole
/// input is also taken as one line and as a reply line (`usbroute toggle` reads those).
pub fn toggle_line(data: &[u8]) {
    let mut splitter = LineSplitter::default();
    let mut pieces = data.split(|b| *b == b'\n');
    let mut piece = pieces.next().unwrap_or_default();
    // The longest line kept: the limit, and the CR of a CRLF.
    let kept = protocol::MAX_LINE + 1;
    for &byte in data {
        match splitter.push(byte) {
            Some(lines::Line::Complete(line)) => {
                assert_eq!(line, piece);
                assert!(line.len() <= kept);
                check_toggle_line(&line);
            }
            Some(lines::Line::TooLong) => assert!(piece.len() > kept),
            None => {}
        }
        if byte == b'\n' {
            piece = pieces.next().unwrap_or_default();
        }
    }
    let rest = splitter.finish();
    assert_eq!(
        rest.as_deref(),
        (!piece.is_empty() && piece.len() <= kept).then_some(piece)
    );
    check_toggle_line(data);
    if let Some(reply) = std::str::from_utf8(data).ok().and_then(Reply::parse) {
        let shown = reply.to_string();
        if !matches!(&reply, Reply::Err(reason) if reason.contains(['\r', '\n'])) {
            assert_eq!(
                Reply::parse(&shown),
                Some(reply),
                "{shown:?} reads back differently"
            );
        }
    }
}

/// One line through the toggle parser: only well-formed names and secrets come out, and
/// the error reply to anything else is one line.
fn check_toggle_line(line: &[u8]) {
    match parse_line(line) {
        Ok(Some(protocol::Request::Profile(name))) => assert!(is_profile_name(&name)),
        Ok(Some(protocol::Request::Auth(secret))) => {
            assert!(!secret.is_empty() && secret.bytes().all(|b| b.is_ascii_graphic()))
        }
        Ok(Some(_)) | Ok(None) => {}
        Err(ParseError::TooLong) => assert!(line.len() > protocol::MAX_LINE),
        Err(e) => {
            let reply = Reply::Err(e.to_string()).to_string();
            assert!(
                !reply.contains(['\n', '\r']),
                "a reply is one line: {reply:?}"
            );
        }
    }
    if let Ok(Some(_)) = parse_line(line) {
        assert!(line.len() <= protocol::MAX_LINE + 2);
    }
}

/// A `/proc/self/mountinfo` or `/proc/self/mounts` text.
pub fn mountinfo(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for device in mounted_devices(&text) {
        assert!(
            !device.starts_with("0:"),
            "anonymous device {device} counted as a disk"
        );
        assert!(text.contains(device.as_str()));
    }
    let lines = text.lines().count();
    for mounts in [parse_mountinfo(&text), parse_mounts(&text)] {
        assert!(
            mounts.len() <= lines,
            "{} mounts from {lines} lines",
            mounts.len()
        );
        for mount in mounts {
            assert!(!mount.source.is_empty() && !mount.fstype.is_empty());
            assert!(!mount.point.is_empty());
        }
    }
    for field in text.split_whitespace() {
        let unescaped = unescape_mount_field(field);
        // An escape is 4 bytes for one; a lossy replacement is 3 bytes for one.
        assert!(unescaped.len() <= 3 * field.len());
        if !field.contains('\\') {
            assert_eq!(unescaped, field);
        }
    }
}

/// One sysfs attribute value as the inventory reads it (lossy UTF-8, trailing newlines
/// and NULs cut), through every attribute parser: ids, classes, speeds, numbers, paths.
pub fn sysfs_attribute(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let value = raw.trim_end_matches(['\n', '\0']);
    if let Some(id) = pci::parse_hex_id(value) {
        assert_eq!(pci::parse_hex_id(&id.to_string()), Some(id));
    }
    if let Ok(id) = value.parse::<HexId>() {
        assert_eq!(id.to_string().parse::<HexId>(), Ok(id));
    }
    if let Some(class) = pci::parse_hex_u32(value) {
        assert_eq!(pci::parse_hex_u32(&format!("{class:#08x}")), Some(class));
        let _ = ControllerKind::from_pci_class(class).map(|k| k.to_string());
    }
    if let Some(byte) = usb::parse_hex_u8(value) {
        assert_eq!(usb::parse_hex_u8(&format!("{byte:02x}")), Some(byte));
    }
    if let Some(speed) = usb::parse_speed(value).flatten() {
        assert!(speed.0.is_finite() && speed.0 > 0.0, "speed {}", speed.0);
        assert_eq!(
            usb::parse_speed(&speed.to_string()),
            Some(Some(Speed(speed.0)))
        );
    }
    if let Some(n) = usb::parse_decimal::<u16>(value) {
        assert_eq!(usb::parse_decimal::<u16>(&n.to_string()), Some(n));
    }
    if let Some(n) = crate::inventory::parse_decimal_u8(value) {
        assert!(
            value.bytes().all(|b| b.is_ascii_digit()),
            "{value:?} read as {n}"
        );
    }
    if let Ok(pci) = value.parse::<PciAddress>() {
        assert_eq!(pci.to_string().parse::<PciAddress>(), Ok(pci));
    }
    if let Ok(port) = value.parse::<PortPath>() {
        assert_eq!(port.to_string().parse::<PortPath>().as_ref(), Ok(&port));
        let _ = (port.parent(), port.chain());
    }
    let _ = crate::vfio::group::parse_override(Some(value.to_string()));
}

/// A libvirt domain XML (`virsh dumpxml`), as the libvirt backend lists it: UTF-8 text
/// through `backend::libvirt::domain_xml`.
pub fn domain_xml(data: &[u8]) {
    use crate::backend::libvirt::{alias, domain_xml};
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    match domain_xml::usb_hostdevs(xml) {
        Ok(hostdevs) => {
            assert!(hostdevs.len() <= xml.matches("hostdev").count());
            for hostdev in hostdevs {
                let device = hostdev.to_vm_device();
                // Ours only by an alias we would write for that very key.
                if let Some(key) = &device.key {
                    assert_eq!(alias::alias_of(key).as_deref(), Some(device.id.as_str()));
                }
                assert!(
                    device.id.chars().all(|c| !c.is_control()),
                    "{:?}",
                    device.id
                );
            }
        }
        // The message itself (the reader's error is its source) stays short.
        Err(e) => assert!(e.to_string().len() <= MAX_QUOTING_MESSAGE),
    }
}

/// What Xen's tools say of a domain's USB: `xl usb-list` output, or (input starting with
/// `/`) xenstore nodes as `PATH=VALUE` lines, judged against an empty host and one that
/// has a device at every busid.
pub fn xen(data: &[u8]) {
    use crate::backend::xen::{usb_list, xenstore};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !text.starts_with('/') {
        match usb_list::parse_usb_list(text) {
            Ok(controllers) => {
                assert!(controllers.len() <= usb_list::MAX_CONTROLLERS);
                for c in &controllers {
                    assert!(c.listed.len() <= usize::from(c.ports));
                    assert!(c.listed.iter().all(|p| p.port >= 1 && p.port <= c.ports));
                }
            }
            Err(e) => assert!(e.to_string().len() <= MAX_QUOTING_MESSAGE),
        }
        return;
    }
    let nodes: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let ports = xenstore::domain_ports(1, nodes);
    for mark in ports.marks.values() {
        assert_eq!(xenstore::Mark::parse(&mark.value()).as_ref(), Some(mark));
    }
    let everywhere: std::collections::BTreeMap<PortPath, u16> = ports
        .ports
        .values()
        .filter_map(|v| match v {
            xenstore::PortValue::Busid(b) => Some((b.clone(), 2)),
            _ => None,
        })
        .collect();
    for host in [Default::default(), everywhere] {
        let reports = xenstore::judge(&ports, &host);
        assert_eq!(reports.len(), ports.ports.len());
        let listed = xenstore::listing(&reports, &host);
        assert!(listed.len() <= reports.len());
    }
}

/// Bytes as libvirt's daemon would send them: split into packets (a bad length or header
/// ends it, as it ends the connection), each payload read as a reply, an error and an
/// event. Nothing may panic, a packet's payload is never over the message cap, and a
/// string decoded from a payload is never longer than the payload.
pub fn libvirt_rpc(data: &[u8]) {
    use crate::backend::libvirt::rpc::{packet, procedures as p};
    let mut buf = data.to_vec();
    while let Ok(Some(packet)) = packet::take_packet(&mut buf) {
        let payload = &packet.payload;
        assert!(payload.len() + packet::LEN_SIZE + packet::HEADER_SIZE <= packet::MESSAGE_MAX);
        if let Ok(e) = p::remote_error(payload) {
            assert!(e.message.map_or(0, |m| m.len()) <= payload.len());
        }
        let _ = p::event(packet.header.procedure, payload);
        let _ = p::auth_list_ret(payload);
        let _ = p::domain_ret(payload);
        if let Ok(s) = p::string_ret(payload, "xml", usize::MAX) {
            assert!(s.len() <= payload.len());
        }
    }
}
