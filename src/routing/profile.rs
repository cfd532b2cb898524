//! Pure: a routing profile from the config → the register values to write and the
//! ports that move. No I/O; everything it needs comes in as arguments.

use super::chipset::Chipset;
use super::detect::Registers;
use super::{ProfileConfig, RoutingError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// Where a USB 2.0 port is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// The xHCI (bit set).
    Xhci,
    /// An EHCI (bit clear).
    Ehci,
}

impl Route {
    /// The route a bit value means.
    pub fn of_bit(mask: u16, bit: u8) -> Self {
        if mask & (1 << bit) != 0 {
            Self::Xhci
        } else {
            Self::Ehci
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xhci => "xhci",
            Self::Ehci => "ehci",
        })
    }
}

/// A USB 2.0 port named as users name it: EHCI number and port (`ehci2:3`; serialised
/// that way too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EhciPort {
    /// EHCI number (1 or 2).
    pub ehci: u8,
    /// Port on it, from 1.
    pub port: u8,
}

impl fmt::Display for EhciPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ehci{}:{}", self.ehci, self.port)
    }
}

impl Serialize for EhciPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl EhciPort {
    /// Parse `ehciN:P`; `None` if the text has another shape (then it may be a label).
    pub fn parse(s: &str) -> Option<Self> {
        let (e, p) = s.strip_prefix("ehci")?.split_once(':')?;
        let digits = |t: &str| {
            (!t.is_empty() && t.len() <= 2 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u8>().ok())
                .flatten()
        };
        Some(Self {
            ehci: digits(e)?,
            port: digits(p)?,
        })
    }

    /// Its XUSB2PR bit on `chipset`, `None` if the chipset has no such port.
    pub fn bit(&self, chipset: &Chipset) -> Option<u8> {
        let e = chipset.ehci_number(self.ehci)?;
        (self.port >= 1 && self.port <= e.ports).then(|| e.first_bit + self.port - 1)
    }

    /// The port of XUSB2PR bit `bit`.
    pub fn of_bit(chipset: &Chipset, bit: u8) -> Option<Self> {
        chipset
            .ehci_port_of(bit)
            .map(|(ehci, port)| Self { ehci, port })
    }
}

/// The label of the port with bit `bit`, if the user gave it one.
pub fn label_of(labels: &BTreeMap<String, String>, chipset: &Chipset, bit: u8) -> Option<String> {
    labels
        .iter()
        .find(|(_, spec)| EhciPort::parse(spec).and_then(|p| p.bit(chipset)) == Some(bit))
        .map(|(label, _)| label.clone())
}

/// One port that changes controller when a plan is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortMove {
    /// XUSB2PR bit.
    pub bit: u8,
    /// The port as `ehciN:P`.
    pub port: EhciPort,
    /// The user's label for it.
    pub label: Option<String>,
    /// Where it goes.
    pub to: Route,
}

/// What applying a profile writes, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Profile name.
    pub profile: String,
    /// New XUSB2PR (the 16 bits at 0xD0).
    pub xusb2pr: u16,
    /// New USB3_PSSEN (0xD8); equal to the current value when nothing changes there.
    pub usb3_pssen: u32,
    /// Ports that change controller.
    pub moves: Vec<PortMove>,
    /// Bits set that XUSB2PRM does not allow (need force).
    pub forbidden: u16,
    /// Things the user should know (SuperSpeed lanes turned off, ports that cannot move).
    pub warnings: Vec<String>,
}

/// Parse a raw mask: `0x3fff`, `3fff` is not accepted (ambiguous), decimal `16383` is.
pub fn parse_mask(text: &str) -> Option<u16> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Resolve a port name (a label or `ehciN:P`) to its bit.
pub fn resolve_port(
    spec: &str,
    labels: &BTreeMap<String, String>,
    chipset: &Chipset,
) -> Result<u8, String> {
    let port = match EhciPort::parse(spec) {
        Some(p) => p,
        None => {
            let target = labels.get(spec).ok_or_else(|| {
                format!("`{spec}` is neither a label in [routing.labels] nor a port like ehci1:3 (run `usbroute ports map` to label ports)")
            })?;
            EhciPort::parse(target).ok_or_else(|| {
                format!("label `{spec}` points at `{target}`, which is not a port like ehci1:3")
            })?
        }
    };
    port.bit(chipset)
        .ok_or_else(|| format!("{chipset} has no port {port} (`{spec}`)"))
}

/// Compute what applying `profile` (named `name`) does to the current `regs`.
pub fn plan(
    name: &str,
    profile: &ProfileConfig,
    labels: &BTreeMap<String, String>,
    chipset: &Chipset,
    regs: &Registers,
) -> Result<Plan, RoutingError> {
    let bad = |reason: String| RoutingError::BadProfile {
        profile: name.to_string(),
        reason,
    };
    let ports = chipset.port_bits();
    let prm = regs.xusb2prm & ports;
    let mut warnings = Vec::new();
    let wanted = match (&profile.mask, profile.ehci.is_empty()) {
        (Some(_), false) => {
            return Err(bad(
                "has both `mask` and `ehci`; keep one (mask: bit set = xHCI; ehci: ports to EHCI)"
                    .into(),
            ))
        }
        (Some(text), true) => {
            let mask = parse_mask(text).ok_or_else(|| {
                bad(format!(
                    "mask `{text}` is not a 16-bit number such as 0x3fff"
                ))
            })?;
            if mask & !ports != 0 {
                return Err(bad(format!(
                    "mask 0x{mask:04x} sets bits beyond the {} ports of {chipset} (valid bits: 0x{ports:04x})",
                    chipset.high_speed_ports()
                )));
            }
            mask
        }
        (None, _) => {
            let mut to_ehci = 0u16;
            for spec in &profile.ehci {
                let bit = resolve_port(spec, labels, chipset).map_err(&bad)?;
                if prm & (1 << bit) == 0 {
                    warnings.push(format!(
                        "{} (`{spec}`) cannot be switched (XUSB2PRM 0x{prm:04x}); it stays on EHCI",
                        EhciPort::of_bit(chipset, bit).expect("bit from a port")
                    ));
                }
                to_ehci |= 1 << bit;
            }
            prm & !to_ehci
        }
    };
    let forbidden = wanted & !prm;
    if forbidden != 0 {
        warnings.push(format!(
            "port(s) {} are not switchable per XUSB2PRM 0x{prm:04x}; the firmware may not expect them on xHCI",
            describe_bits(chipset, forbidden)
        ));
    }
    let usb3_pssen = superspeed_for(
        chipset,
        regs,
        wanted,
        prm | forbidden,
        labels,
        &mut warnings,
    );
    let current = regs.xusb2pr & ports;
    let moves = (0..chipset.high_speed_ports())
        .filter(|bit| (current ^ wanted) & (1 << bit) != 0)
        .map(|bit| PortMove {
            bit,
            port: EhciPort::of_bit(chipset, bit).expect("bit within the chipset"),
            label: label_of(labels, chipset, bit),
            to: Route::of_bit(wanted, bit),
        })
        .collect();
    Ok(Plan {
        profile: name.to_string(),
        // Bits beyond the chipset's ports keep whatever the register holds.
        xusb2pr: (regs.xusb2pr & !ports) | wanted,
        usb3_pssen,
        moves,
        forbidden,
        warnings,
    })
}

/// USB3_PSSEN for a routing: a SuperSpeed lane whose USB 2.0 partner this routing sends
/// to EHCI is turned off (a device would otherwise stay on the xHCI at SuperSpeed, or
/// flap between the two); a partner on xHCI gets the firmware default back (USB3PRM).
/// Partners this routing does not switch (`switched` clear) keep their lane as it is.
fn superspeed_for(
    chipset: &Chipset,
    regs: &Registers,
    xusb2pr: u16,
    switched: u16,
    labels: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> u32 {
    let mut pssen = regs.usb3_pssen;
    for ss in 0..chipset.superspeed_ports {
        let Some(bit) = chipset.superspeed_partner(ss) else {
            continue;
        };
        if switched & (1 << bit) == 0 {
            continue;
        }
        let ss_bit = 1u32 << ss;
        if Route::of_bit(xusb2pr, bit) == Route::Ehci {
            if pssen & ss_bit != 0 {
                let port = EhciPort::of_bit(chipset, bit).expect("partner bit is a port");
                let label = label_of(labels, chipset, bit)
                    .map(|l| format!(" \"{l}\""))
                    .unwrap_or_default();
                warnings.push(format!(
                    "{port}{label} goes to EHCI: its SuperSpeed lane (USB3 port {}) is switched off too, so USB 3 devices there run at USB 2 speed",
                    ss + 1
                ));
            }
            pssen &= !ss_bit;
        } else {
            pssen = (pssen & !ss_bit) | (regs.usb3prm & ss_bit);
        }
    }
    pssen
}

/// `ehci1:3, ehci2:1` for the bits set in `bits`.
pub fn describe_bits(chipset: &Chipset, bits: u16) -> String {
    (0..16u8)
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| match EhciPort::of_bit(chipset, b) {
            Some(p) => p.to_string(),
            None => format!("bit {b}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
