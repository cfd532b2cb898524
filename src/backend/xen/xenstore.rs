//! The xenstore side of a domain's USB ports, as pure functions over `(path, value)`
//! pairs: libxl's port nodes, our marks beside them, and what each port is to usbroute.
//!
//! libxl keeps one node per port of each controller,
//! `/local/domain/0/backend/qusb/<domid>/<ctrl>/port/<n>`, holding the busid of the host
//! device attached there (`1-1`, the kernel's port path) or nothing. A device removed while
//! attached leaves its busid behind; `xl usb-list` then shows the port empty but every
//! `xl usbdev-attach` on the host fails ("cannot determine if device is assigned"), until
//! the node is emptied. Only xenstore tells a stale port from a free one.
//!
//! Ours: when usbroute attaches, it writes a mark beside the port,
//! `/local/domain/0/backend/qusb/<domid>/<ctrl>/usbroute/<n>` = `KEY BUSID BUS:ADDR`
//! (`usbroute-addr-1-5 1-1 1:5`; the key is spelled as [`ids::device_id`] spells it, so
//! status and logs name a Xen device as a QEMU one). A port is ours while its busid equals
//! the mark's; the plug is live while the host has a device at that busid with the mark's
//! address. The mark lives in the controller's backend directory, which libxl removes
//! with the controller or the domain, so no mark outlives what it describes and no state
//! file can disagree with xenstore.

use super::usb_list::HostAddr;
use crate::backend::qemu::ids;
use crate::backend::{AttachKey, HostMatch, VmUsbDevice};
use crate::inventory::{PortPath, Snapshot};
use serde::Serialize;
use std::collections::BTreeMap;

/// Where every backend of dom0 lives.
pub const BACKEND_ROOT: &str = "/local/domain/0/backend";
/// The backend type of QEMU's PVUSB (`type=qusb`, also what `type=auto` gives a PV domU).
pub const QUSB: &str = "qusb";
/// The directory beside `port` that holds our marks.
pub const MARK_DIR: &str = "usbroute";
/// The most nodes read for one domain (31 ports × 64 controllers × 2, with room).
pub const MAX_NODES: usize = 8192;
/// The longest path or value considered; longer ones are skipped as not libxl's or ours.
pub const MAX_NODE_BYTES: usize = 256;

/// A port node's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "busid", rename_all = "lowercase")]
pub enum PortValue {
    /// Empty: free.
    Empty,
    /// A host device's busid (`1-1`).
    Busid(PortPath),
    /// Something that is not a busid: never free, never ours.
    Unreadable(String),
}

/// Our mark beside a port: what we attached there, and which plug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mark {
    /// The attach key the engine knows the device by.
    pub key: AttachKey,
    /// The busid we attached.
    pub busid: PortPath,
    /// Bus and address of the plug we attached (a re-plug at the busid gets a new address).
    pub plug: HostAddr,
}

impl Mark {
    /// The mark's value: `usbroute-addr-1-5 1-1 1:5`.
    pub fn value(&self) -> String {
        let HostAddr { bus, address } = self.plug;
        format!(
            "{} {} {bus}:{address}",
            ids::device_id(&self.key),
            self.busid
        )
    }

    /// Reads [`Self::value`] back; `None` for anything else.
    pub fn parse(value: &str) -> Option<Mark> {
        let [key, busid, plug] = value.split(' ').collect::<Vec<_>>()[..] else {
            return None;
        };
        let (bus, address) = plug.split_once(':')?;
        let mark = Mark {
            key: ids::key_of(key)?,
            busid: busid.parse().ok()?,
            plug: HostAddr {
                bus: crate::inventory::parse_decimal_u8(bus)?,
                address: (address.len() <= 5 && address.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| address.parse().ok())??,
            },
        };
        (mark.value() == value).then_some(mark)
    }
}

/// Controller and port: where a device sits in a domain.
pub type Slot = (u32, u8);

/// One domain's ports and marks, read from xenstore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainPorts {
    /// Every port node, by controller and port.
    pub ports: BTreeMap<Slot, PortValue>,
    /// Our marks, by controller and port (an unreadable mark counts as none).
    pub marks: BTreeMap<Slot, Mark>,
}

/// The path of port `port` of controller `ctrl` of domain `domid`.
pub fn port_path(domid: u32, ctrl: u32, port: u8) -> String {
    format!("{BACKEND_ROOT}/{QUSB}/{domid}/{ctrl}/port/{port}")
}

/// The path of our mark beside that port.
pub fn mark_path(domid: u32, ctrl: u32, port: u8) -> String {
    format!("{BACKEND_ROOT}/{QUSB}/{domid}/{ctrl}/{MARK_DIR}/{port}")
}

/// Domain `domid`'s ports and marks among `nodes` (paths with their values, as read under
/// [`BACKEND_ROOT`]`/qusb/<domid>`). Other domains, other backends and other nodes are
/// skipped; so is anything past [`MAX_NODES`] or longer than [`MAX_NODE_BYTES`].
pub fn domain_ports<'a>(
    domid: u32,
    nodes: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> DomainPorts {
    let prefix = format!("{BACKEND_ROOT}/{QUSB}/{domid}/");
    let mut read = DomainPorts::default();
    for (path, value) in nodes.into_iter().take(MAX_NODES) {
        if path.len() > MAX_NODE_BYTES || value.len() > MAX_NODE_BYTES {
            continue;
        }
        let Some(rest) = path.strip_prefix(&prefix) else {
            continue;
        };
        let [ctrl, dir, port] = rest.split('/').collect::<Vec<_>>()[..] else {
            continue;
        };
        let (Some(ctrl), Some(port)) = (number(ctrl), number(port)) else {
            continue;
        };
        let Ok(port) = u8::try_from(port) else {
            continue;
        };
        match dir {
            "port" => {
                let value = match value {
                    "" => PortValue::Empty,
                    v => v
                        .parse()
                        .map_or_else(|_| PortValue::Unreadable(v.to_string()), PortValue::Busid),
                };
                read.ports.insert((ctrl, port), value);
            }
            MARK_DIR => {
                if let Some(mark) = Mark::parse(value) {
                    read.marks.insert((ctrl, port), mark);
                }
            }
            _ => {}
        }
    }
    read
}

/// Decimal without leading zeros (xenstore keys are written by `%d`).
pub(super) fn number(s: &str) -> Option<u32> {
    let ok = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    (ok && (s == "0" || !s.starts_with('0')))
        .then(|| s.parse().ok())
        .flatten()
}

/// How to empty a stale port of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clearing {
    /// `xl usbdev-detach DOMAIN CTRL PORT`: another device sits at the busid now (a
    /// re-plug), which QEMU may have opened; libxl detaches it and rebinds its drivers.
    Detach,
    /// Write `""` to the port node: nothing is at the busid, and xl would answer
    /// "Unknown device at controller C port P".
    WriteEmpty,
}

/// What one port is to usbroute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "port_is", rename_all = "kebab-case")]
pub enum PortVerdict {
    /// Empty: an attach may use it.
    Free,
    /// Ours, holding the plug we attached.
    Ours {
        /// Our mark.
        mark: Mark,
    },
    /// Ours, but the plug we attached is gone (removed while the daemon was away, or
    /// re-plugged with a new address): to be emptied, then its mark removed.
    StaleOurs {
        /// Our mark.
        mark: Mark,
        /// How.
        clearing: Clearing,
    },
    /// Someone else's (attached with xl by hand): left alone.
    NotOurs {
        /// What the node holds.
        value: PortValue,
        /// The host has a device at that busid; `false`: a stale port of theirs, which
        /// makes every `xl usbdev-attach` fail until they empty it.
        present: bool,
    },
}

/// One port's verdict, and whether a mark there has outlived what it marked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortReport {
    /// Controller.
    pub ctrl: u32,
    /// Port.
    pub port: u8,
    /// What it is to us.
    #[serde(flatten)]
    pub verdict: PortVerdict,
    /// A mark of ours is there but does not describe the port (its busid differs or the
    /// port is empty): remove it.
    pub leftover_mark: bool,
}

/// The address of the device at each busid on the host now.
pub fn addresses(snapshot: &Snapshot) -> BTreeMap<PortPath, u16> {
    snapshot
        .devices
        .iter()
        .filter_map(|d| Some((d.port.clone(), d.address?)))
        .collect()
}

/// Every port of the domain judged against the host's devices (`host`: busid → address,
/// [`addresses`]): what is ours, what is stale and how to clear it, what to leave alone.
/// The same answer after a restart as before it: it reads only xenstore and the host.
pub fn judge(ports: &DomainPorts, host: &BTreeMap<PortPath, u16>) -> Vec<PortReport> {
    ports
        .ports
        .iter()
        .map(|(&(ctrl, port), value)| {
            let mark = ports.marks.get(&(ctrl, port));
            let ours = mark.filter(|m| matches!(value, PortValue::Busid(b) if *b == m.busid));
            let verdict = match (value, ours) {
                (PortValue::Empty, _) => PortVerdict::Free,
                (PortValue::Busid(_), Some(mark)) => match host.get(&mark.busid) {
                    Some(&a) if a == mark.plug.address && mark.busid.bus == mark.plug.bus => {
                        PortVerdict::Ours { mark: mark.clone() }
                    }
                    now => PortVerdict::StaleOurs {
                        mark: mark.clone(),
                        clearing: if now.is_some() {
                            Clearing::Detach
                        } else {
                            Clearing::WriteEmpty
                        },
                    },
                },
                (value, _) => PortVerdict::NotOurs {
                    present: matches!(value, PortValue::Busid(b) if host.contains_key(b)),
                    value: value.clone(),
                },
            };
            PortReport {
                ctrl,
                port,
                leftover_mark: mark.is_some() && ours.is_none(),
                verdict,
            }
        })
        .collect()
}

/// The domain's USB devices as the engine lists them: ours by their key (a stale one as
/// not attached, so the engine detaches it), the user's as `xen-CTRL-PORT` with no key.
pub fn listing(reports: &[PortReport], host: &BTreeMap<PortPath, u16>) -> Vec<VmUsbDevice> {
    reports
        .iter()
        .filter_map(|r| {
            let (attached, key, matcher) = match &r.verdict {
                PortVerdict::Free => return None,
                PortVerdict::Ours { mark } => (true, Some(mark.key.clone()), plug_match(mark)),
                PortVerdict::StaleOurs { mark, .. } => {
                    (false, Some(mark.key.clone()), plug_match(mark))
                }
                PortVerdict::NotOurs { value, present } => {
                    let matcher = match value {
                        PortValue::Busid(b) => host.get(b).map(|&address| HostMatch::Address {
                            bus: b.bus,
                            address,
                        }),
                        _ => None,
                    };
                    (*present, None, matcher.unwrap_or(HostMatch::Other {}))
                }
            };
            let id = key
                .as_ref()
                .map_or_else(|| format!("xen-{}-{}", r.ctrl, r.port), ids::device_id);
            Some(VmUsbDevice {
                id,
                attached,
                key,
                matcher,
            })
        })
        .collect()
}

fn plug_match(mark: &Mark) -> HostMatch {
    HostMatch::Address {
        bus: mark.plug.bus,
        address: mark.plug.address,
    }
}

#[cfg(test)]
#[path = "xenstore_tests.rs"]
mod tests;
