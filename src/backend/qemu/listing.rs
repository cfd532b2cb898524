//! Every usb-host device of a VM, read back over QOM.
//!
//! Why not `info usb`: it keeps listing devices that are gone. The `attached` property is
//! what QEMU really has connected now.

use super::qom;
use crate::backend::qemu::qmp::{Qmp, QmpError};
use crate::backend::{AttachKey, HostMatch, VmUsbDevice};
use crate::inventory::HexId;
use serde_json::Value;

/// The usb-host properties read for each device.
const PROPERTIES: [&str; 6] = [
    "hostbus",
    "hostaddr",
    "hostport",
    "vendorid",
    "productid",
    "attached",
];

/// The most usb-host devices one listing reads. Each costs six `qom-get`s, so without a
/// cap a peer answering `qom-list` with a million children would make one listing send
/// millions of commands. QEMU's USB buses hold far fewer (an xHCI has at most 15 root
/// ports per speed; hubs add 7 or 15 each).
pub const MAX_USB_HOSTS: usize = 256;

/// Every usb-host device: those with an id (`/machine/peripheral`, listed by id) and those
/// without (`/machine/peripheral-anon`, listed by QOM path, which `device_del` accepts too),
/// sorted by id. Two round trips: both containers in one write, then every property of
/// every device in one write.
pub async fn usb_hosts(qmp: &Qmp) -> Result<Vec<VmUsbDevice>, QmpError> {
    const CONTAINERS: [(&str, bool); 2] = [
        ("/machine/peripheral", false),
        ("/machine/peripheral-anon", true),
    ];
    let lists = CONTAINERS
        .iter()
        .map(|(path, _)| ("qom-list", Some(qom::list_arguments(path))))
        .collect();
    let replies = qmp.execute_batch(lists, None).await;
    let mut found = Vec::new();
    for ((container, by_path), reply) in CONTAINERS.into_iter().zip(replies) {
        for child in qom::children_in(container, qom::properties(&reply?)) {
            if child.type_name == "usb-host" {
                let id = if by_path {
                    child.path.clone()
                } else {
                    child.name
                };
                found.push((id, child.path));
            }
        }
    }
    if found.len() > MAX_USB_HOSTS {
        return Err(QmpError::TooMany {
            what: "usb-host devices".into(),
            count: found.len(),
            limit: MAX_USB_HOSTS,
        });
    }
    let mut devices = read_all(qmp, found).await?;
    // QOM lists in no particular order; by id (devices without one last) reads well and
    // stays the same from run to run.
    devices.sort_by(|a, b| (a.id.starts_with('/'), &a.id).cmp(&(b.id.starts_with('/'), &b.id)));
    Ok(devices)
}

/// One usb-host device at `path`, its properties asked for in one write.
pub async fn read_one(qmp: &Qmp, id: String, path: String) -> Result<VmUsbDevice, QmpError> {
    let mut read = read_all(qmp, vec![(id, path)]).await?;
    Ok(read.pop().expect("one device read for one asked"))
}

/// The usb-host devices `(id, QOM path)`, every property of each asked for in one write.
async fn read_all(qmp: &Qmp, found: Vec<(String, String)>) -> Result<Vec<VmUsbDevice>, QmpError> {
    let gets = found
        .iter()
        .flat_map(|(_, path)| {
            PROPERTIES
                .iter()
                .map(|p| ("qom-get", Some(qom::get_arguments(path, p))))
        })
        .collect();
    let mut values = qmp.execute_batch(gets, None).await.into_iter();
    let mut devices = Vec::with_capacity(found.len());
    for (id, _) in found {
        let mut next = || values.next().expect("one reply per command sent");
        let [bus, address, port, vendor, product, attached] =
            [next()?, next()?, next()?, next()?, next()?, next()?];
        devices.push(device_from(
            id,
            [bus, address, port, vendor, product],
            &attached,
        ));
    }
    Ok(devices)
}

/// A usb-host device from its `PROPERTIES`' values (`attached` last).
fn device_from(
    id: String,
    [bus, address, port, vendor, product]: [Value; 5],
    attached: &Value,
) -> VmUsbDevice {
    let number = |v: &Value| v.as_u64().unwrap_or(0);
    let matcher = match_from_properties(
        number(&bus),
        number(&address),
        port.as_str().unwrap_or_default(),
        number(&vendor),
        number(&product),
    );
    VmUsbDevice {
        key: super::ids::key_of(&id),
        attached: attached.as_bool().unwrap_or(false),
        matcher,
        id,
    }
}

/// What a usb-host matches on, from its properties (0 and "" mean unset). A port wins over
/// an address, an address over ids: the most specific criterion is what the user meant.
pub fn match_from_properties(
    bus: u64,
    address: u64,
    port: &str,
    vendor: u64,
    product: u64,
) -> HostMatch {
    let bus8 = u8::try_from(bus).ok().filter(|b| *b > 0);
    match (
        bus8,
        port.is_empty(),
        u16::try_from(address).ok().filter(|a| *a > 0),
    ) {
        (Some(bus), false, _) => HostMatch::Port {
            bus,
            port: port.to_string(),
        },
        (Some(bus), true, Some(address)) => HostMatch::Address { bus, address },
        _ => match (u16::try_from(vendor), u16::try_from(product)) {
            (Ok(v), Ok(p)) if v != 0 || p != 0 => HostMatch::Id {
                vendor_id: HexId(v),
                product_id: HexId(p),
            },
            _ => HostMatch::Other {},
        },
    }
}

/// What a usb-host created for `key` matches on.
pub fn match_of_key(key: &AttachKey) -> HostMatch {
    key.host_match()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_from_properties_prefers_port_then_address_then_ids() {
        let port = match_from_properties(1, 5, "3.1", 0x46d, 0xc016);
        let address = match_from_properties(1, 5, "", 0x46d, 0xc016);
        let ids = match_from_properties(0, 0, "", 0x46d, 0xc016);
        let nothing = match_from_properties(0, 0, "", 0, 0);

        assert_eq!(
            port,
            HostMatch::Port {
                bus: 1,
                port: "3.1".into()
            }
        );
        assert_eq!(address, HostMatch::Address { bus: 1, address: 5 });
        assert_eq!(
            ids,
            HostMatch::Id {
                vendor_id: HexId(0x46d),
                product_id: HexId(0xc016)
            }
        );
        assert_eq!(nothing, HostMatch::Other {});
    }
}
