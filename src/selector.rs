//! Selectors: the one grammar for naming devices, used by the CLI, the config file and the
//! toggle service. Parsing and matching are pure.
//!
//! Forms: `port:1-3.4.2`, `port:0000:00:14.0/3.4.2` (the controller and the port chain below
//! its root hub: no bus number; `00:14.0/3.4.2`, `platform:vhci_hcd.0/1`, `ss3` for a USB 3
//! port without a USB 2 twin), `id:046d:c016` (`*` per half), `addr:3.5` / `addr:3:5`
//! (decimal, `003.005` too), `serial:ABC`, `class:03`, `iface:03:01:*`,
//! `controller:0000:00:14.0`, `hub:1-3`, `hub:0000:00:14.0/3`; bare `1-3.4.2`, `046d:c016`,
//! `3.5`; `,` joins terms with AND.
//!
//! A controller-anchored port names a socket: a USB 3 device and a USB 2 device plugged
//! into the same socket get the same name (the USB 2 side's numbering, see
//! `inventory::PhysicalPort`), so `port:0000:00:14.0/3` matches either speed there. The
//! bus-numbered `port:1-3` stays literal: it names a port of one bus, so one speed.
//!
//! Serials may contain `:` freely (`serial:` takes the rest of its term). A serial holding a
//! `,`, a `"`, a `\` or leading/trailing spaces is written in double quotes, with `\"` and
//! `\\` as the only escapes: `serial:"AB,12"`. [`Selector`]'s `Display` quotes exactly when
//! needed, so printing and parsing again always gives the same selector.

use crate::inventory::{Device, PciAddress, PhysicalPort, PortPath};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One byte that may be a wildcard (`*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern<T> {
    /// Matches anything.
    Any,
    /// Matches exactly this value.
    Exact(T),
}

impl<T: PartialEq> Pattern<T> {
    /// Does `value` fit? `Any` fits an unknown value too.
    pub fn accepts(&self, value: Option<T>) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(want) => value.as_ref() == Some(want),
        }
    }
}

/// One term of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Term {
    /// `port:1-3.4.2`: the device at this physical place.
    Port(PortPath),
    /// `port:0000:00:14.0/3.4.2`: the device at this physical place, named by its
    /// controller instead of a bus number (which can change between boots).
    PhysicalPort(PhysicalPort),
    /// `id:vvvv:pppp`: vendor and product, each half may be `*`.
    Id {
        /// Vendor id pattern.
        vendor: Pattern<u16>,
        /// Product id pattern.
        product: Pattern<u16>,
    },
    /// `addr:B.D`: bus number and device address (one plug of one device).
    Addr {
        /// Bus number.
        bus: u8,
        /// Device address (devnum).
        address: u16,
    },
    /// `serial:S`: the device's serial string, exactly.
    Serial(String),
    /// `class:cc`: the device class or any interface's class.
    Class(u8),
    /// `iface:cc:ss:pp`: some interface with this class triple (`*` per part).
    Iface {
        /// Interface class.
        class: Pattern<u8>,
        /// Interface subclass.
        subclass: Pattern<u8>,
        /// Interface protocol.
        protocol: Pattern<u8>,
    },
    /// `controller:PCI`: every device on this host controller.
    Controller(PciAddress),
    /// `hub:1-3`: every device behind this hub's ports, at any depth.
    Hub(PortPath),
    /// `hub:0000:00:14.0/3`: every device behind the hub in this socket, at any depth,
    /// either speed (a USB 3 hub's two halves sit in one socket).
    PhysicalHub(PhysicalPort),
}

/// Terms joined with AND; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    /// The terms, in the order written.
    pub terms: Vec<Term>,
}

/// Why a selector did not parse: names the part and shows the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad selector part `{part}`: {reason}\n{FORMS}")]
pub struct SelectorError {
    /// The offending part (one term of a `,` list).
    pub part: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The accepted forms, shown with every parse error.
pub const FORMS: &str = "accepted forms: port:1-3.4.2 | port:0000:00:14.0/3.4.2 (port:00:14.0/3, port:platform:vhci_hcd.0/1) | id:046d:c016 (id:046d:*) | addr:3.5 (addr:3:5, addr:003.005) | serial:ABC (serial:\"A,B\") | class:03 | iface:03:01:* | controller:0000:00:14.0 | hub:1-3 (hub:0000:00:14.0/3) | bare 1-3.4.2, 046d:c016, 3.5; join with `,` for AND";

/// Highest USB device address (USB 2.0 §9.4.6: 7 bits, 0 is the default address).
const MAX_USB_ADDRESS: u16 = 127;

impl Selector {
    /// Does this device match every term?
    pub fn matches(&self, device: &Device) -> bool {
        self.terms.iter().all(|t| t.matches(device))
    }

    /// For each term that does not match `device`, the term and why not (empty: it matches).
    pub fn explain(&self, device: &Device) -> Vec<(&Term, String)> {
        self.terms
            .iter()
            .filter_map(|t| t.mismatch(device).map(|why| (t, why)))
            .collect()
    }

    /// `true` when no device can match both selectors, judged from the terms alone (two
    /// different ports, ids, addresses, serials or controllers, a port outside a hub...).
    /// `false` means "they might overlap": the config loader uses it to reject ties.
    pub fn provably_disjoint(&self, other: &Selector) -> bool {
        self.terms
            .iter()
            .any(|a| other.terms.iter().any(|b| a.excludes(b) || b.excludes(a)))
    }
}

impl Term {
    /// `true` when no device can satisfy both `self` and `other` (checked one way round).
    fn excludes(&self, other: &Term) -> bool {
        let differ = |a: &Pattern<u16>, b: &Pattern<u16>| matches!((a, b), (Pattern::Exact(x), Pattern::Exact(y)) if x != y);
        let nested = |a: &PortPath, b: &PortPath| a == b || a.is_behind(b) || b.is_behind(a);
        match (self, other) {
            (Term::Port(a), Term::Port(b)) => a != b,
            (Term::PhysicalPort(a), Term::PhysicalPort(b)) => a != b,
            (Term::PhysicalPort(p), Term::PhysicalHub(h)) => !p.is_behind(h),
            (Term::PhysicalHub(a), Term::PhysicalHub(b)) => {
                !(a == b || a.is_behind(b) || b.is_behind(a))
            }
            (Term::Port(p), Term::Hub(h)) => !p.is_behind(h),
            (Term::Port(p), Term::Addr { bus, .. }) => p.bus != *bus,
            (Term::Hub(a), Term::Hub(b)) => !nested(a, b),
            (Term::Hub(h), Term::Addr { bus, .. }) => h.bus != *bus,
            (
                Term::Addr { bus, address },
                Term::Addr {
                    bus: b2,
                    address: a2,
                },
            ) => (bus, address) != (b2, a2),
            (
                Term::Id { vendor, product },
                Term::Id {
                    vendor: v2,
                    product: p2,
                },
            ) => differ(vendor, v2) || differ(product, p2),
            (Term::Serial(a), Term::Serial(b)) => a != b,
            (Term::Controller(a), Term::Controller(b)) => a != b,
            _ => false,
        }
    }

    /// Does this device satisfy this term?
    pub fn matches(&self, device: &Device) -> bool {
        // Checked without building the reason: matching runs rules × devices per round.
        let iface = |class: &Pattern<u8>, subclass: &Pattern<u8>, protocol: &Pattern<u8>| {
            device.interfaces.iter().filter_map(|i| i.class).any(|t| {
                class.accepts(Some(t.class))
                    && subclass.accepts(Some(t.subclass))
                    && protocol.accepts(Some(t.protocol))
            })
        };
        match self {
            Term::Port(p) => device.port == *p,
            Term::PhysicalPort(p) => device.physical_port.as_ref() == Some(p),
            Term::Id { vendor, product } => {
                vendor.accepts(device.vendor_id.map(|h| h.0))
                    && product.accepts(device.product_id.map(|h| h.0))
            }
            Term::Addr { bus, address } => device.bus == *bus && device.address == Some(*address),
            Term::Serial(s) => device.serial.as_deref() == Some(s.as_str()),
            Term::Class(c) => {
                device.class.is_some_and(|t| t.class == *c)
                    || device
                        .interfaces
                        .iter()
                        .any(|i| i.class.is_some_and(|t| t.class == *c))
            }
            Term::Iface {
                class,
                subclass,
                protocol,
            } => iface(class, subclass, protocol),
            Term::Controller(pci) => device.controller == Some(*pci),
            Term::Hub(hub) => device.port.is_behind(hub),
            Term::PhysicalHub(hub) => device
                .physical_port
                .as_ref()
                .is_some_and(|p| p.is_behind(hub)),
        }
    }

    /// `None` when `device` satisfies the term, else why not in a few words.
    pub fn mismatch(&self, device: &Device) -> Option<String> {
        if self.matches(device) {
            return None;
        }
        let unknown = || "unknown".to_string();
        match self {
            Term::Port(p) => (device.port != *p).then(|| format!("port is {}", device.port)),
            Term::PhysicalPort(_) => Some(device.physical_port.as_ref().map_or_else(
                || "the device's controller is not known".into(),
                |p| format!("physical port is {p}"),
            )),
            Term::Id { vendor, product } => {
                let v = device.vendor_id.map(|h| h.0);
                let p = device.product_id.map(|h| h.0);
                (!(vendor.accepts(v) && product.accepts(p))).then(|| {
                    let show = |x: Option<u16>| x.map_or("????".into(), |x| format!("{x:04x}"));
                    format!("id is {}:{}", show(v), show(p))
                })
            }
            Term::Addr { bus, address } => (device.bus != *bus || device.address != Some(*address))
                .then(|| {
                    let addr = device.address.map_or_else(unknown, |a| a.to_string());
                    format!("address is {}.{addr}", device.bus)
                }),
            Term::Serial(s) => (device.serial.as_deref() != Some(s.as_str())).then(|| {
                device
                    .serial
                    .as_ref()
                    .map_or("device has no serial".into(), |s| {
                        format!("serial is {}", quote_serial(s))
                    })
            }),
            Term::Class(c) => {
                let device_class = device.class.map(|t| t.class);
                let mut classes: Vec<u8> = device_class.into_iter().collect();
                classes.extend(
                    device
                        .interfaces
                        .iter()
                        .filter_map(|i| i.class.map(|t| t.class)),
                );
                (!classes.contains(c)).then(|| {
                    let list: Vec<String> = classes.iter().map(|c| format!("{c:02x}")).collect();
                    format!("classes are [{}]", list.join(", "))
                })
            }
            Term::Iface {
                class,
                subclass,
                protocol,
            } => {
                let fits = device.interfaces.iter().filter_map(|i| i.class).any(|t| {
                    class.accepts(Some(t.class))
                        && subclass.accepts(Some(t.subclass))
                        && protocol.accepts(Some(t.protocol))
                });
                (!fits).then(|| {
                    let list: Vec<String> = device
                        .interfaces
                        .iter()
                        .filter_map(|i| i.class)
                        .map(|t| format!("{:02x}:{:02x}:{:02x}", t.class, t.subclass, t.protocol))
                        .collect();
                    format!("interfaces are [{}]", list.join(", "))
                })
            }
            Term::Controller(pci) => (device.controller != Some(*pci)).then(|| {
                device
                    .controller
                    .map_or("device is not on a PCI controller".into(), |c| {
                        format!("controller is {c}")
                    })
            }),
            Term::Hub(hub) => (!device.port.is_behind(hub))
                .then(|| format!("{} is not behind hub {hub}", device.port)),
            Term::PhysicalHub(hub) => Some(device.physical_port.as_ref().map_or_else(
                || "the device's controller is not known".into(),
                |p| format!("{p} is not behind hub {hub}"),
            )),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(err(s, "the selector is empty"));
        }
        let terms = split_terms(s)?
            .into_iter()
            .map(|part| parse_term(part.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Selector { terms })
    }
}

impl FromStr for Term {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_term(s.trim())
    }
}

fn err(part: &str, reason: impl Into<String>) -> SelectorError {
    SelectorError {
        part: part.to_string(),
        reason: reason.into(),
    }
}

/// Split at every `,` outside double quotes; a quote opened and never closed is an error.
fn split_terms(s: &str) -> Result<Vec<&str>, SelectorError> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err(err(
            &s[start..],
            "a double quote is never closed (write serial:\"A,B\", with \\\" for a quote inside)",
        ));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_term(part: &str) -> Result<Term, SelectorError> {
    if part.is_empty() {
        return Err(err(
            part,
            "empty term (two commas in a row, or a trailing comma)",
        ));
    }
    let Some((kind, value)) = part.split_once(':') else {
        return parse_bare(part);
    };
    let bad = |reason: String| err(part, reason);
    match kind.to_ascii_lowercase().as_str() {
        "port" if value.contains('/') => value
            .trim()
            .parse()
            .map(Term::PhysicalPort)
            .map_err(|e: crate::inventory::BadPhysicalPort| bad(e.to_string())),
        "port" => parse_port(value).map(Term::Port).map_err(bad),
        "hub" if value.contains('/') => value
            .trim()
            .parse()
            .map(Term::PhysicalHub)
            .map_err(|e: crate::inventory::BadPhysicalPort| bad(e.to_string())),
        "hub" => parse_port(value).map(Term::Hub).map_err(bad),
        "id" => parse_id(value).map_err(bad),
        "addr" => parse_addr(value, &[".", ":"]).map_err(bad),
        "serial" => parse_serial(value.trim()).map(Term::Serial).map_err(bad),
        "class" => parse_hex_u8(value)
            .map(Term::Class)
            .ok_or_else(|| bad(format!("class `{value}` is not a hex byte such as 03 or ff"))),
        "iface" => parse_iface(value).map_err(bad),
        "controller" => value
            .parse::<PciAddress>()
            .map(Term::Controller)
            .map_err(|e| bad(e.to_string())),
        // `046d:c016` has no kind word: its first half is hex.
        _ if parse_id(part).is_ok() => parse_id(part).map_err(bad),
        _ if part.parse::<PciAddress>().is_ok() => Err(bad(format!(
            "this looks like a PCI address: write controller:{part}"
        ))),
        _ => Err(bad(format!(
            "`{kind}` is not a selector kind (port, id, addr, serial, class, iface, controller, hub)"
        ))),
    }
}

/// Bare forms: a `-` means a port path, a `.` between digits an address.
fn parse_bare(part: &str) -> Result<Term, SelectorError> {
    if part.contains('-') {
        return parse_port(part).map(Term::Port).map_err(|r| err(part, r));
    }
    if part.contains('.') {
        return parse_addr(part, &["."]).map_err(|r| err(part, r));
    }
    Err(err(
        part,
        "not a port path (1-3.4.2), an id (046d:c016) or an address (3.5); name the kind, e.g. serial:ABC",
    ))
}

fn parse_port(value: &str) -> Result<PortPath, String> {
    value.trim().parse::<PortPath>().map_err(|e| e.to_string())
}

fn parse_id(value: &str) -> Result<Term, String> {
    let bad =
        || format!("`{value}` is not an id (VVVV:PPPP in hex, `*` for any half, e.g. 046d:c016)");
    let (v, p) = value.split_once(':').ok_or_else(bad)?;
    let half = |h: &str| match h.trim() {
        "*" => Some(Pattern::Any),
        h if (1..=4).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u16::from_str_radix(h, 16).ok().map(Pattern::Exact)
        }
        _ => None,
    };
    Ok(Term::Id {
        vendor: half(v).ok_or_else(bad)?,
        product: half(p).ok_or_else(bad)?,
    })
}

/// `B.D` (or `B:D` after `addr:`), decimal even with leading zeros: `003.005` is bus 3.
fn parse_addr(value: &str, separators: &[&str]) -> Result<Term, String> {
    let value = value.trim();
    let split = separators.iter().find_map(|sep| value.split_once(sep));
    let (b, a) = split
        .ok_or_else(|| format!("`{value}` is not BUS.ADDRESS in decimal (3.5, 3:5 or 003.005)"))?;
    let bus = parse_decimal(b)
        .filter(|b| (1..=255).contains(b))
        .ok_or_else(|| format!("bus `{b}` is not a decimal number from 1 to 255"))?;
    let address = parse_decimal(a)
        .filter(|a| (1..=u32::from(MAX_USB_ADDRESS)).contains(a))
        .ok_or_else(|| format!("address `{a}` is not a decimal number from 1 to 127"))?;
    Ok(Term::Addr {
        bus: bus as u8,
        address: address as u16,
    })
}

/// Decimal digits only; leading zeros are decimal (lsusb prints `003`), never octal.
fn parse_decimal(s: &str) -> Option<u32> {
    let digits = s.trim_start_matches('0');
    let all_digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match digits {
        _ if !all_digits || digits.len() > 9 => None,
        "" => Some(0),
        d => d.parse().ok(),
    }
}

fn parse_hex_u8(s: &str) -> Option<u8> {
    let s = s.trim();
    ((1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u8::from_str_radix(s, 16).ok())
        .flatten()
}

/// `cc`, `cc:ss` or `cc:ss:pp`; missing parts are `*`.
fn parse_iface(value: &str) -> Result<Term, String> {
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() > 3 {
        return Err(format!(
            "`{value}` has more than three parts (class:subclass:protocol)"
        ));
    }
    let mut pats = [Pattern::Any; 3];
    for (slot, p) in pats.iter_mut().zip(&parts) {
        *slot = match p.trim() {
            "*" => Pattern::Any,
            p => Pattern::Exact(parse_hex_u8(p).ok_or_else(|| {
                format!("`{p}` is not a hex byte or `*` (interface class:subclass:protocol, e.g. 03:01:*)")
            })?),
        };
    }
    let [class, subclass, protocol] = pats;
    Ok(Term::Iface {
        class,
        subclass,
        protocol,
    })
}

fn parse_serial(value: &str) -> Result<String, String> {
    let Some(inner) = value.strip_prefix('"') else {
        if value.is_empty() {
            return Err(
                "the serial is empty (a device without a serial cannot be selected by serial)"
                    .into(),
            );
        }
        if value.contains(['"', '\\']) {
            return Err("a serial holding `\"` or `\\` must be quoted: serial:\"A\\\"B\"".into());
        }
        return Ok(value.to_string());
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return Err("in a quoted serial only \\\" and \\\\ are escapes".into()),
            },
            '"' if chars.as_str().is_empty() => {
                return match out.is_empty() {
                    true => Err("the serial is empty".into()),
                    false => Ok(out),
                }
            }
            '"' => return Err("text after the closing quote of the serial".into()),
            c => out.push(c),
        }
    }
    Err("the quoted serial has no closing quote".into())
}

/// A serial as the grammar wants it: bare when that parses back the same, else quoted.
fn quote_serial(s: &str) -> String {
    let plain = !s.is_empty() && s.trim() == s && !s.contains([',', '"', '\\']);
    if plain {
        return s.to_string();
    }
    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

impl fmt::Display for Pattern<u8> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(v) => write!(f, "{v:02x}"),
        }
    }
}

impl fmt::Display for Pattern<u16> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(v) => write!(f, "{v:04x}"),
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Port(p) => write!(f, "port:{p}"),
            Term::PhysicalPort(p) => write!(f, "port:{p}"),
            Term::Id { vendor, product } => write!(f, "id:{vendor}:{product}"),
            Term::Addr { bus, address } => write!(f, "addr:{bus}.{address}"),
            Term::Serial(s) => write!(f, "serial:{}", quote_serial(s)),
            Term::Class(c) => write!(f, "class:{c:02x}"),
            Term::Iface {
                class,
                subclass,
                protocol,
            } => write!(f, "iface:{class}:{subclass}:{protocol}"),
            Term::Controller(pci) => write!(f, "controller:{pci}"),
            Term::Hub(p) => write!(f, "hub:{p}"),
            Term::PhysicalHub(p) => write!(f, "hub:{p}"),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, term) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{term}")?;
        }
        Ok(())
    }
}

impl Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
