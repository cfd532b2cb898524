//! The `usb-host` device usbroute gives QEMU for a host device: which key it is attached
//! by, and the id and match properties that key means.
//!
//! One source for both forms QEMU takes: `device_add` arguments over QMP (`usbroute
//! attach`, the daemon) and a `-device` argument for a command line (`usbroute emit`), so
//! a VM started with the emitted line holds exactly what the daemon would have attached
//! and the daemon recognises it as its own.

use super::AttachRequest;
use crate::backend::{AttachKey, AttachMode};
use crate::inventory::{ClassTriple, Device};
use serde_json::{json, Value};

/// One match property's value, typed so each form can write it the way QEMU reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PropertyValue {
    /// A number (`hostbus`, `hostaddr`).
    Number(u64),
    /// A 16-bit id (`vendorid`, `productid`): over QMP a JSON integer (QEMU refuses
    /// strings), on a command line `0x046d` so people recognise it.
    Id16(u16),
    /// Text (`hostport`).
    Text(String),
}

/// The properties that tell QEMU which host device `key` means, in the order QEMU
/// documents them.
fn match_properties(key: &AttachKey) -> Vec<(&'static str, PropertyValue)> {
    use PropertyValue::{Id16, Number, Text};
    match key {
        AttachKey::Address { bus, address } => vec![
            ("hostbus", Number(u64::from(*bus))),
            ("hostaddr", Number(u64::from(*address))),
        ],
        AttachKey::Port(port) => vec![
            ("hostbus", Number(u64::from(port.bus))),
            ("hostport", Text(port.chain())),
        ],
        AttachKey::Id {
            vendor_id,
            product_id,
        } => vec![
            ("vendorid", Id16(vendor_id.0)),
            ("productid", Id16(product_id.0)),
        ],
    }
}

/// The `device_add` arguments for a usb-host device keyed on `key`, on VM bus `bus`.
pub fn device_add_arguments(key: &AttachKey, bus: &str) -> Value {
    let mut arguments = json!({"driver": "usb-host", "id": super::ids::device_id(key), "bus": bus});
    for (name, value) in match_properties(key) {
        arguments[name] = match value {
            PropertyValue::Number(n) => json!(n),
            PropertyValue::Id16(id) => json!(id),
            PropertyValue::Text(text) => json!(text),
        };
    }
    arguments
}

/// The same device as the value of a QEMU `-device` option:
/// `usb-host,id=usbroute-port-1-3,bus=xhci.0,hostbus=1,hostport=3`. Every value is a
/// number, a port chain or one of our ids, none of which can hold the `,` QEMU's option
/// syntax would need doubled.
pub fn device_option(key: &AttachKey, bus: &str) -> String {
    let mut option = format!("usb-host,id={},bus={bus}", super::ids::device_id(key));
    for (name, value) in match_properties(key) {
        let value = match value {
            PropertyValue::Number(n) => n.to_string(),
            PropertyValue::Id16(id) => format!("{id:#06x}"),
            PropertyValue::Text(text) => text,
        };
        option.push_str(&format!(",{name}={value}"));
    }
    option
}

/// What attaching `device` by `mode` asks QEMU for; `Err` says why it cannot be attached
/// that way (a hub, or the mode's key unreadable), and what to do instead.
pub fn request_for(device: &Device, mode: AttachMode) -> Result<AttachRequest, String> {
    let what = super::QemuBackend::describe(device);
    let is_hub = device.hub
        || device
            .class
            .is_some_and(|c| c.class == ClassTriple::HUB_CLASS);
    if is_hub {
        return Err(format!(
            "{what} is a hub: QEMU cannot pass a hub to a VM (usb-host skips hubs); pass \
             the devices behind it (selector hub:{}) or the whole controller \
             (usbroute controller)",
            device.port
        ));
    }
    let key = AttachKey::of(mode, device).ok_or_else(|| {
        format!(
            "{what}: its {} could not be read from sysfs, so it cannot be attached by \
             that; try another --by",
            if mode == AttachMode::Address {
                "device address"
            } else {
                "vendor or product id"
            }
        )
    })?;
    Ok(AttachRequest {
        key,
        // By port, whatever is plugged there next is attached, at whatever speed: only
        // a bus that takes every speed (xHCI) is safe.
        speed: if mode == AttachMode::Port {
            None
        } else {
            device.speed_mbps
        },
        what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::HexId;

    fn keys() -> [AttachKey; 3] {
        [
            AttachKey::Address { bus: 1, address: 5 },
            AttachKey::Port("1-3.4.2".parse().unwrap()),
            AttachKey::Id {
                vendor_id: HexId(0x046d),
                product_id: HexId(0xc016),
            },
        ]
    }

    #[test]
    fn device_add_arguments_carry_the_id_bus_and_typed_match_properties() {
        let [address, port, id] = keys();

        assert_eq!(
            [
                device_add_arguments(&address, "xhci.0"),
                device_add_arguments(&port, "xhci.0"),
                device_add_arguments(&id, "xhci.0"),
            ],
            [
                json!({"driver": "usb-host", "id": "usbroute-addr-1-5", "bus": "xhci.0",
                       "hostbus": 1, "hostaddr": 5}),
                json!({"driver": "usb-host", "id": "usbroute-port-1-3.4.2", "bus": "xhci.0",
                       "hostbus": 1, "hostport": "3.4.2"}),
                json!({"driver": "usb-host", "id": "usbroute-id-046d-c016", "bus": "xhci.0",
                       "vendorid": 0x046d, "productid": 0xc016}),
            ]
        );
    }

    #[test]
    fn device_option_writes_the_same_properties_for_a_command_line() {
        let [address, port, id] = keys();

        assert_eq!(
            [
                device_option(&address, "xhci.0"),
                device_option(&port, "xhci.0"),
                device_option(&id, "xhci.0"),
            ],
            [
                "usb-host,id=usbroute-addr-1-5,bus=xhci.0,hostbus=1,hostaddr=5",
                "usb-host,id=usbroute-port-1-3.4.2,bus=xhci.0,hostbus=1,hostport=3.4.2",
                "usb-host,id=usbroute-id-046d-c016,bus=xhci.0,vendorid=0x046d,productid=0xc016",
            ]
        );
    }
}
