//! Device ids usbroute gives the usb-host devices it creates: deterministic, valid as QEMU
//! ids, and readable back, so a restarted usbroute recomputes the same id and a listing
//! tells usbroute's devices from the user's own.
//!
//! `usbroute-addr-3-5` (bus 3, address 5), `usbroute-port-1-3.4.2` (the kernel's name of
//! the port), `usbroute-id-046d-c016`.

use crate::backend::{AttachMode, HostMatch};
use crate::inventory::{Device, HexId, PortPath};

/// Every device id usbroute gives a VM starts with this; ids without it are the user's.
pub const ID_PREFIX: &str = "usbroute-";

/// What a VM device attached `mode`-wise to `device` matches on; `None` when the device
/// lacks what that mode needs (its address or ids could not be read).
pub fn match_for(mode: AttachMode, device: &Device) -> Option<HostMatch> {
    Some(match mode {
        AttachMode::Address => HostMatch::Address {
            bus: device.bus,
            address: device.address?,
        },
        AttachMode::Port => HostMatch::Port {
            bus: device.port.bus,
            port: device.port.chain(),
        },
        AttachMode::Id => HostMatch::Id {
            vendor_id: device.vendor_id?,
            product_id: device.product_id?,
        },
    })
}

/// The mode a match stands for (`None` for [`HostMatch::Other`]).
pub fn mode_of(matcher: &HostMatch) -> Option<AttachMode> {
    match matcher {
        HostMatch::Address { .. } => Some(AttachMode::Address),
        HostMatch::Port { .. } => Some(AttachMode::Port),
        HostMatch::Id { .. } => Some(AttachMode::Id),
        HostMatch::Other {} => None,
    }
}

/// The id of a usb-host device with this match (a letter first, then only letters,
/// digits, `-` and `.`, as QEMU requires); `None` for [`HostMatch::Other`].
pub fn id_of_match(matcher: &HostMatch) -> Option<String> {
    Some(match matcher {
        HostMatch::Address { bus, address } => format!("{ID_PREFIX}addr-{bus}-{address}"),
        HostMatch::Port { bus, port } => format!("{ID_PREFIX}port-{bus}-{port}"),
        HostMatch::Id {
            vendor_id,
            product_id,
        } => format!("{ID_PREFIX}id-{vendor_id}-{product_id}"),
        HostMatch::Other {} => return None,
    })
}

/// The id usbroute gives `device` attached `mode`-wise. The same device and mode give
/// the same id on every run. `None` when the device lacks what the mode needs.
pub fn device_id(mode: AttachMode, device: &Device) -> Option<String> {
    id_of_match(&match_for(mode, device)?)
}

/// The inverse of [`device_id`]: what an id of ours matches on; `None` for any other id
/// (the user's own devices). Only the exact spelling usbroute produces counts.
pub fn parse_device_id(id: &str) -> Option<HostMatch> {
    let rest = id.strip_prefix(ID_PREFIX)?;
    let (kind, value) = rest.split_once('-')?;
    let parsed = match kind {
        "addr" => {
            let (bus, address) = value.split_once('-')?;
            HostMatch::Address {
                bus: bus.parse().ok()?,
                address: address.parse().ok()?,
            }
        }
        "port" => {
            let port: PortPath = value.parse().ok()?;
            HostMatch::Port {
                bus: port.bus,
                port: port.chain(),
            }
        }
        "id" => {
            let (vendor, product) = value.split_once('-')?;
            HostMatch::Id {
                vendor_id: vendor.parse::<HexId>().ok()?,
                product_id: product.parse::<HexId>().ok()?,
            }
        }
        _ => return None,
    };
    // `usbroute-addr-03-5` parses, but is not how we spell it: not ours.
    (id_of_match(&parsed).as_deref() == Some(id)).then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_of_each_match_reads_back() {
        let matches = [
            HostMatch::Address {
                bus: 3,
                address: 17,
            },
            HostMatch::Port {
                bus: 1,
                port: "3.4.2".into(),
            },
            HostMatch::Id {
                vendor_id: HexId(0x046d),
                product_id: HexId(0xc016),
            },
        ];

        let ids: Vec<String> = matches.iter().map(|m| id_of_match(m).unwrap()).collect();

        assert_eq!(
            ids,
            [
                "usbroute-addr-3-17",
                "usbroute-port-1-3.4.2",
                "usbroute-id-046d-c016"
            ]
        );
        let back: Vec<HostMatch> = ids.iter().map(|i| parse_device_id(i).unwrap()).collect();
        assert_eq!(back, matches);
    }

    #[test]
    fn parse_device_id_of_user_ids_is_none() {
        let ids = [
            "hostdev0",
            "usbroute-",
            "usbroute-addr-03-5",
            "usbroute-addr-+3-5",
            "usbroute-id-46d-c016",
            "usbroute-id-046D-c016",
            "usbroute-port-1-0",
            "usbroute-other-1",
        ];

        let parsed: Vec<Option<HostMatch>> = ids.iter().map(|i| parse_device_id(i)).collect();

        assert!(parsed.iter().all(Option::is_none), "{parsed:?}");
    }
}
