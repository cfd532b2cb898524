//! `xl usb-list DOMAIN` read into controllers and ports.
//!
//! What xl 4.17 prints (tools/xl/xl_usb.c, `main_usblist`), one block per controller, the
//! header repeated before each:
//!
//! ```text
//! Devid  Type         BE  state usb-ver ports
//! 0      qusb         0   4     2       8
//!   Port 1: Bus 001 Device 002
//!   Port 2:
//! ```
//!
//! Bus and device are printed `%03x`: zero-padded **hexadecimal** (device 10 is `00a`),
//! so they are read as hex and held as plain numbers. A port whose xenstore node keeps the
//! busid of a device that is gone (a surprise removal) is printed empty: this listing
//! cannot tell a stale port from a free one; [`super::xenstore`] can.
//!
//! The text comes from another program: it is bounded ([`MAX_USB_LIST_BYTES`], at most
//! [`MAX_CONTROLLERS`] controllers of at most [`MAX_PORTS`] ports) and never panics; an
//! unexpected line is an error naming its number.

use serde::Serialize;

/// The most text read from one `xl usb-list` (8 controllers of 31 ports take ~9 KiB).
pub const MAX_USB_LIST_BYTES: usize = 64 * 1024;
/// The most controllers one domain's listing may hold.
pub const MAX_CONTROLLERS: usize = 64;
/// The most ports of one controller (libxl's limit, `USB_MAXCHILDREN`).
pub const MAX_PORTS: u8 = 31;
/// The xenbus state of a controller whose backend and frontend are connected.
pub const STATE_CONNECTED: u32 = 4;

/// A host device as xl names it: bus and device address, as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HostAddr {
    /// Host bus.
    pub bus: u8,
    /// Device address (devnum) on that bus.
    pub address: u16,
}

/// One port of a controller, as `usb-list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListedPort {
    /// Port number, from 1.
    pub port: u8,
    /// The host device attached there; `None` when xl shows it empty (free, or stale).
    pub device: Option<HostAddr>,
}

/// One USB controller of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsbCtrl {
    /// Its devid (`controller=` of `xl usbdev-attach`).
    pub devid: u32,
    /// Its type as xl prints it (`qusb`, `pv`, `devicemodel`), at most 16 bytes.
    pub kind: String,
    /// The backend domain.
    pub backend: u32,
    /// Xenbus state: [`STATE_CONNECTED`] when usable; 1 while the backend is not up.
    pub state: u32,
    /// USB version (1, 2 or 3).
    pub version: u32,
    /// Number of ports it has.
    pub ports: u8,
    /// The ports xl listed, in order.
    pub listed: Vec<ListedPort>,
}

impl UsbCtrl {
    /// Backend and frontend connected: a device attached here reaches the guest.
    pub fn is_connected(&self) -> bool {
        self.state == STATE_CONNECTED
    }
}

/// `xl usb-list` printed something this reader does not take.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsbListError {
    /// More than [`MAX_USB_LIST_BYTES`].
    #[error("xl usb-list printed {bytes} bytes, more than the {MAX_USB_LIST_BYTES} a domain's USB listing can take; is this xl's output?")]
    TooLong {
        /// How much it printed.
        bytes: usize,
    },
    /// A line that is neither a header, a controller nor a port.
    #[error("xl usb-list line {line}: {problem} in `{text}`; expected `Devid Type BE state usb-ver ports`, a controller row or `  Port N: [Bus B Device D]` (a newer xl? please report it)")]
    Line {
        /// Line number, from 1.
        line: usize,
        /// The line, cut to 80 characters.
        text: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// The controllers and ports in `text`, the output of `xl usb-list DOMAIN`.
pub fn parse_usb_list(text: &str) -> Result<Vec<UsbCtrl>, UsbListError> {
    if text.len() > MAX_USB_LIST_BYTES {
        return Err(UsbListError::TooLong { bytes: text.len() });
    }
    let mut controllers: Vec<UsbCtrl> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let bad = |problem| UsbListError::Line {
            line: index + 1,
            text: line.chars().take(80).collect(),
            problem,
        };
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("Devid") {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("Port ") {
            let ctrl = controllers
                .last_mut()
                .ok_or_else(|| bad("a port before any controller"))?;
            let port = parse_port(rest).ok_or_else(|| bad("an unreadable port"))?;
            if port.port == 0 || port.port > ctrl.ports {
                return Err(bad("a port number outside the controller's ports"));
            }
            if ctrl.listed.iter().any(|p| p.port == port.port) {
                return Err(bad("a port listed twice"));
            }
            ctrl.listed.push(port);
            continue;
        }
        if controllers.len() == MAX_CONTROLLERS {
            return Err(bad("more controllers than a domain can have"));
        }
        controllers.push(parse_controller(trimmed).ok_or_else(|| bad("an unreadable row"))?);
    }
    Ok(controllers)
}

/// A controller row: `0  qusb  0  4  2  8`.
fn parse_controller(row: &str) -> Option<UsbCtrl> {
    let fields: Vec<&str> = row.split_whitespace().collect();
    let [devid, kind, backend, state, version, ports] = fields.as_slice() else {
        return None;
    };
    let kind_ok = kind.len() <= 16 && kind.bytes().all(|b| b.is_ascii_alphanumeric());
    let ports = decimal(ports)?;
    if !kind_ok || ports > u32::from(MAX_PORTS) {
        return None;
    }
    Some(UsbCtrl {
        devid: decimal(devid)?,
        kind: (*kind).to_string(),
        backend: decimal(backend)?,
        state: decimal(state)?,
        version: decimal(version)?,
        ports: u8::try_from(ports).ok()?,
        listed: Vec::new(),
    })
}

/// After `Port `: `1:` or `1: Bus 001 Device 002`.
fn parse_port(rest: &str) -> Option<ListedPort> {
    let (number, device) = rest.split_once(':')?;
    let port = u8::try_from(decimal(number)?).ok()?;
    let words: Vec<&str> = device.split_whitespace().collect();
    let device = match words.as_slice() {
        [] => None,
        ["Bus", bus, "Device", address] => Some(HostAddr {
            bus: u8::try_from(hex(bus)?).ok()?,
            address: u16::try_from(hex(address)?).ok()?,
        }),
        _ => return None,
    };
    Some(ListedPort { port, device })
}

/// Decimal digits only, at most 10.
fn decimal(s: &str) -> Option<u32> {
    (!s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Hex digits only (xl's `%03x`), at most 8.
fn hex(s: &str) -> Option<u32> {
    (!s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded on the Xen test bed (../shared/notes/xen.md, "What xl prints"): a PV domU
    /// with `usbctrl=["type=qusb,version=2,ports=8"]` and a keyboard at port 1.
    const RECORDED_ONE_DEVICE: &str = "Devid  Type         BE  state usb-ver ports\n\
        0      qusb         0   4     2       8    \n  Port 1: Bus 001 Device 002\n  Port 2:\n  Port 3:\n\
        \x20 Port 4:\n  Port 5:\n  Port 6:\n  Port 7:\n  Port 8:\n";

    fn addr(bus: u8, address: u16) -> Option<HostAddr> {
        Some(HostAddr { bus, address })
    }

    #[test]
    fn recording_with_a_keyboard_on_port_1_reads_as_one_connected_qusb_controller() {
        let ctrls = parse_usb_list(RECORDED_ONE_DEVICE).unwrap();

        assert_eq!(ctrls.len(), 1);
        let c = &ctrls[0];
        assert_eq!((c.devid, c.kind.as_str(), c.backend), (0, "qusb", 0));
        assert_eq!((c.state, c.version, c.ports), (4, 2, 8));
        assert!(c.is_connected());
        assert_eq!(c.listed[0].device, addr(1, 2));
        assert_eq!(c.listed.len(), 8);
        assert!(c.listed[1..].iter().all(|p| p.device.is_none()));
    }

    #[test]
    fn several_controllers_each_after_its_own_header() {
        // Not recorded: shaped after xl's source and the note's scenario step 7 (controllers
        // hot-added, a `pv` one left in state 1).
        let text = "Devid  Type         BE  state usb-ver ports\n0      qusb         0   4     2       2    \n\
            \x20 Port 1:\n  Port 2: Bus 003 Device 002\n\
            Devid  Type         BE  state usb-ver ports\n1      qusb         0   4     2       4    \n\
            \x20 Port 1:\n  Port 2:\n  Port 3:\n  Port 4:\n\
            Devid  Type         BE  state usb-ver ports\n3      pv           0   1     2       4    \n\
            \x20 Port 1:\n  Port 2:\n  Port 3:\n  Port 4:\n";

        let ctrls = parse_usb_list(text).unwrap();

        let summary: Vec<(u32, &str, bool)> = ctrls
            .iter()
            .map(|c| (c.devid, c.kind.as_str(), c.is_connected()))
            .collect();
        assert_eq!(
            summary,
            [(0, "qusb", true), (1, "qusb", true), (3, "pv", false)]
        );
        assert_eq!(ctrls[0].listed[1].device, addr(3, 2));
    }

    #[test]
    fn bus_and_device_are_read_as_hex_because_xl_prints_them_with_percent_03x() {
        let text =
            "Devid Type BE state usb-ver ports\n0 qusb 0 4 2 2\n  Port 1: Bus 00a Device 010\n";

        let ctrls = parse_usb_list(text).unwrap();

        assert_eq!(ctrls[0].listed[0].device, addr(10, 16));
    }

    #[test]
    fn a_domain_without_a_controller_lists_nothing() {
        assert_eq!(parse_usb_list(""), Ok(Vec::new()));
    }

    #[test]
    fn a_port_beyond_the_controllers_ports_is_refused_naming_the_line() {
        let text = "Devid Type BE state usb-ver ports\n0 qusb 0 4 2 2\n  Port 3:\n";

        let err = parse_usb_list(text).unwrap_err();

        assert!(
            err.to_string()
                .starts_with("xl usb-list line 3: a port number outside"),
            "{err}"
        );
    }

    #[test]
    fn a_port_before_any_controller_is_refused() {
        let err = parse_usb_list("  Port 1: Bus 001 Device 002\n").unwrap_err();

        assert!(matches!(err, UsbListError::Line { line: 1, .. }), "{err}");
    }

    #[test]
    fn a_device_number_too_big_for_usb_is_refused_not_wrapped() {
        let text =
            "Devid Type BE state usb-ver ports\n0 qusb 0 4 2 2\n  Port 1: Bus 100 Device 002\n";

        assert!(parse_usb_list(text).is_err());
    }

    #[test]
    fn more_ports_than_libxl_allows_are_refused() {
        assert!(parse_usb_list("0 qusb 0 4 2 32\n").is_err());
    }

    #[test]
    fn an_oversized_listing_is_refused_before_reading() {
        let text = "\n".repeat(MAX_USB_LIST_BYTES + 1);

        let err = parse_usb_list(&text).unwrap_err();

        assert_eq!(
            err,
            UsbListError::TooLong {
                bytes: MAX_USB_LIST_BYTES + 1
            }
        );
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_read_or_refused_without_a_panic(text in "(Devid|Port|Bus|Device| |:|\n|[0-9a-f]{1,4}|qusb){0,40}") {
            let _ = parse_usb_list(&text);
        }
    }
}
