//! QEMU's device ids for our usb-host devices: the [`AttachKey`] written as an id when
//! attaching and detaching, and read back from an id when listing. The id is derived from
//! the key alone, so a restarted daemon recognises its devices from the listing, and an id
//! not of this form is the user's own device.

use crate::backend::{AttachKey, AttachMode};
use crate::inventory::Device;

/// Every id usbroute gives a device starts with this (QEMU ids must start with a letter).
pub const OUR_ID_PREFIX: &str = "usbroute-";

/// The device id of `key`: `usbroute-addr-1-5`, `usbroute-port-1-3.4.2`,
/// `usbroute-id-046d-c016` (a letter first, then only `[A-Za-z0-9._-]`, as QEMU requires).
pub fn device_id(key: &AttachKey) -> String {
    match key {
        AttachKey::Address { bus, address } => format!("{OUR_ID_PREFIX}addr-{bus}-{address}"),
        AttachKey::Port(port) => format!("{OUR_ID_PREFIX}port-{port}"),
        AttachKey::Id {
            vendor_id,
            product_id,
        } => format!("{OUR_ID_PREFIX}id-{vendor_id}-{product_id}"),
    }
}

/// The key an id of ours stands for; `None` for anyone else's id (only the canonical
/// spelling [`device_id`] writes counts as ours).
pub fn key_of(id: &str) -> Option<AttachKey> {
    let rest = id.strip_prefix(OUR_ID_PREFIX)?;
    let (kind, key) = rest.split_once('-')?;
    let canonical = |k: AttachKey| (device_id(&k) == id).then_some(k);
    match kind {
        "addr" => {
            let (bus, address) = key.split_once('-')?;
            canonical(AttachKey::Address {
                bus: bus.parse().ok()?,
                address: address.parse().ok()?,
            })
        }
        "port" => canonical(AttachKey::Port(key.parse().ok()?)),
        "id" => {
            let (v, p) = key.split_once('-')?;
            canonical(AttachKey::Id {
                vendor_id: v.parse().ok()?,
                product_id: p.parse().ok()?,
            })
        }
        _ => None,
    }
}

/// The id usbroute gives `device` attached by `mode`; `None` when the device lacks that
/// key (see [`AttachKey::of`]).
pub fn usbroute_device_id(mode: AttachMode, device: &Device) -> Option<String> {
    AttachKey::of(mode, device).map(|k| device_id(&k))
}
