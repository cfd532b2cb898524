//! The live domain XML (`virsh dumpxml`, `virDomainGetXMLDesc`) read into the backend's
//! listing: every `<hostdev mode='subsystem' type='usb'>` under `<domain><devices>`, with
//! its alias and what its `<source>` names, ours when the alias is one
//! [`super::alias::key_of`] reads back.
//!
//! The XML comes from outside (a libvirt daemon, or anything answering in its place), so
//! it is bounded ([`MAX_DOMAIN_XML`]), read as a stream without recursion, and nothing in
//! it can panic the reader. Everything else is passed over: PCI, SCSI and mdev hostdevs,
//! `<interface type='hostdev'>`, `<redirdev>`, the guest-side `<address type='usb'>` of a
//! hostdev, and look-alikes inside `<metadata>` or in another namespace.

use super::alias;
use crate::backend::{HostMatch, VmUsbDevice};
use crate::inventory::text;
use crate::inventory::HexId;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// The most bytes of domain XML read. A domain with dozens of devices is tens of KiB; a
/// larger answer is not libvirt's, and reading it would only cost memory.
pub const MAX_DOMAIN_XML: usize = 4 << 20;

/// A domain XML that cannot be listed.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    /// Over [`MAX_DOMAIN_XML`].
    #[error(
        "the domain XML is {bytes} bytes, more than the {limit} usbroute reads; check what \
         `virsh dumpxml DOMAIN` prints"
    )]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Not well-formed XML.
    #[error("the domain XML is not well-formed at byte {position}; check what `virsh dumpxml DOMAIN` prints")]
    Malformed {
        /// Where the reader stopped.
        position: u64,
        /// The XML reader's error.
        #[source]
        source: quick_xml::Error,
    },
    /// Well-formed, but its root is not `<domain>`.
    #[error("the XML's root element is <{root}>, not <domain>: not a libvirt domain description")]
    NotADomain {
        /// The root element's name (escaped and capped for showing).
        root: String,
    },
}

/// One USB hostdev of the domain, as its XML says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsbHostdev {
    /// `<alias name=...>`: libvirt's (`hostdev0`), a user's (`ua-...`) or ours; `None`
    /// when it has none (an inactive definition). Control characters escaped, capped.
    pub alias: Option<String>,
    /// `<source><address bus=...>`, as libvirt reads numbers (decimal, `0x` hex, leading
    /// `0` octal); `None` when absent or not a number.
    pub bus: Option<u64>,
    /// `<source><address device=...>`.
    pub device: Option<u64>,
    /// `<source><vendor id=...>`.
    pub vendor: Option<u64>,
    /// `<source><product id=...>`.
    pub product: Option<u64>,
}

impl UsbHostdev {
    /// What it matches on. An address when the source names one (libvirt then matches on
    /// it, with vendor and product only checked), else vendor and product; `Other` when
    /// neither is complete or a number is out of USB's range.
    pub fn matcher(&self) -> HostMatch {
        let in_range = |n: Option<u64>| n.and_then(|n| u16::try_from(n).ok());
        match (self.bus, self.device, self.vendor, self.product) {
            (Some(bus), Some(device), _, _) => match (u8::try_from(bus), u16::try_from(device)) {
                (Ok(bus), Ok(address)) => HostMatch::Address { bus, address },
                _ => HostMatch::Other {},
            },
            (_, _, vendor, product) => match (in_range(vendor), in_range(product)) {
                (Some(v), Some(p)) => HostMatch::Id {
                    vendor_id: HexId(v),
                    product_id: HexId(p),
                },
                _ => HostMatch::Other {},
            },
        }
    }

    /// As the engine sees it: ours by alias; its id the alias (empty without one). A
    /// hostdev in the live XML is attached: libvirt drops it from the live definition
    /// only once QEMU confirmed its removal.
    pub fn to_vm_device(&self) -> VmUsbDevice {
        let id = self.alias.clone().unwrap_or_default();
        VmUsbDevice {
            key: alias::key_of(&id),
            id,
            attached: true,
            matcher: self.matcher(),
        }
    }
}

/// Where the reader is, as far as the listing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Domain,
    Devices,
    /// A `<hostdev>` directly in `<devices>`; `true` when it is a USB subsystem one.
    Hostdev(bool),
    /// Its `<source>`.
    Source,
    /// Anything else: nothing below it counts.
    Elsewhere,
}

/// Every USB hostdev in `xml`, in document order.
pub fn usb_hostdevs(xml: &str) -> Result<Vec<UsbHostdev>, DomainXmlError> {
    if xml.len() > MAX_DOMAIN_XML {
        return Err(DomainXmlError::TooLarge {
            bytes: xml.len(),
            limit: MAX_DOMAIN_XML,
        });
    }
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut open: Vec<Place> = Vec::new();
    let mut current: Option<UsbHostdev> = None;
    let mut found = Vec::new();
    loop {
        let event = reader
            .read_event()
            .map_err(|source| DomainXmlError::Malformed {
                position: reader.error_position(),
                source,
            })?;
        let position = reader.buffer_position();
        match event {
            Event::Start(e) => {
                open.push(enter(&e, open.last().copied(), &mut current, position)?);
            }
            Event::Empty(e) => {
                let place = enter(&e, open.last().copied(), &mut current, position)?;
                leave(place, &mut current, &mut found);
            }
            Event::End(_) => {
                if let Some(place) = open.pop() {
                    leave(place, &mut current, &mut found);
                }
            }
            Event::Eof => break,
            // Text, CDATA, comments, processing instructions, the declaration and a
            // DOCTYPE say nothing about hostdevs.
            _ => {}
        }
    }
    Ok(found)
}

/// The place element `e` opens under `parent`, reading what it says into `current`;
/// `position` is where the reader is, for an attribute that is not well-formed.
fn enter(
    e: &BytesStart<'_>,
    parent: Option<Place>,
    current: &mut Option<UsbHostdev>,
    position: u64,
) -> Result<Place, DomainXmlError> {
    let attribute = |name: &[u8]| {
        read_attribute(e, name).map_err(|source| DomainXmlError::Malformed { position, source })
    };
    // The qualified name: libvirt's own elements have no prefix, so `<app:hostdev>` in
    // someone's metadata namespace is not one.
    let name = e.name();
    let name = name.as_ref();
    let place = match (parent, name) {
        (None, b"domain") => Place::Domain,
        (None, _) => {
            let root = String::from_utf8_lossy(name);
            return Err(DomainXmlError::NotADomain {
                root: text::printable(&root).into_owned(),
            });
        }
        (Some(Place::Domain), b"devices") => Place::Devices,
        (Some(Place::Devices), b"hostdev") => {
            let usb = attribute(b"mode")?.as_deref() == Some("subsystem")
                && attribute(b"type")?.as_deref() == Some("usb");
            if usb {
                *current = Some(UsbHostdev::default());
            }
            Place::Hostdev(usb)
        }
        (Some(Place::Hostdev(true)), b"source") => Place::Source,
        (Some(Place::Hostdev(true)), b"alias") => {
            if let (Some(hostdev), Some(alias)) = (current.as_mut(), attribute(b"name")?) {
                hostdev.alias = Some(kept(&alias));
            }
            Place::Elsewhere
        }
        (Some(Place::Source), b"address") => {
            if let Some(hostdev) = current.as_mut() {
                hostdev.bus = number(attribute(b"bus")?.as_deref());
                hostdev.device = number(attribute(b"device")?.as_deref());
            }
            Place::Elsewhere
        }
        (Some(Place::Source), b"vendor" | b"product") => {
            if let Some(hostdev) = current.as_mut() {
                let id = number(attribute(b"id")?.as_deref());
                match name {
                    b"vendor" => hostdev.vendor = id,
                    _ => hostdev.product = id,
                }
            }
            Place::Elsewhere
        }
        _ => Place::Elsewhere,
    };
    Ok(place)
}

/// An element at `place` closed: a USB hostdev is complete.
fn leave(place: Place, current: &mut Option<UsbHostdev>, found: &mut Vec<UsbHostdev>) {
    if place == Place::Hostdev(true) {
        found.extend(current.take());
    }
}

/// The value of attribute `name` (unprefixed), entities resolved; `None` when absent.
fn read_attribute(e: &BytesStart<'_>, name: &[u8]) -> Result<Option<String>, quick_xml::Error> {
    for attr in e.attributes() {
        let attr = attr.map_err(quick_xml::Error::from)?;
        if attr.key.as_ref() == name {
            return Ok(Some(attr.unescape_value()?.into_owned()));
        }
    }
    Ok(None)
}

/// An alias as kept: control characters escaped, at most [`text::MAX_KEPT`] characters.
fn kept(alias: &str) -> String {
    text::escaped(&text::capped(alias, text::MAX_KEPT)).into_owned()
}

/// A number as libvirt reads one (`strtoul` with base 0, surrounding whitespace allowed):
/// `5`, `0x1f`, `017` (octal). `None` for anything else.
fn number(value: Option<&str>) -> Option<u64> {
    let value = value?.trim();
    let (digits, radix) = if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        (hex, 16)
    } else if value.len() > 1 && value.starts_with('0') {
        (&value[1..], 8)
    } else {
        (value, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
#[path = "domain_xml_tests.rs"]
mod tests;
