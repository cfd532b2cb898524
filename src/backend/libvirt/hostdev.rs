//! The `<hostdev>` usbroute gives a libvirt domain for one of its attach keys, in the
//! shape libvirt documents (formatdomain.html, "USB / PCI / SCSI devices"):
//!
//! ```xml
//! <hostdev mode='subsystem' type='usb'>
//!   <source startupPolicy='optional'>
//!     <address bus='1' device='5'/>
//!   </source>
//!   <alias name='ua-usbroute-addr-1-5'/>
//! </hostdev>
//! ```
//!
//! One source for both uses: the live attach (`virsh attach-device --live`, the daemon)
//! and the static form for the domain's configuration (`usbroute emit --for libvirt`),
//! so a domain started with the emitted XML holds exactly what the daemon would have
//! attached, under the alias the daemon recognises.

use super::alias;
use crate::backend::AttachKey;
use quick_xml::escape::escape;

/// Which of the two uses the XML is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// A live attach: the device is on the host now; no `startupPolicy`.
    Live,
    /// The domain's configuration (`virsh attach-device --config`, or pasted into the
    /// domain XML): `startupPolicy='optional'`, so the domain starts without the device
    /// when it is absent, instead of refusing to start.
    Config,
}

/// What cannot be written as a libvirt `<hostdev>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostdevError {
    /// A port key: libvirt has no host-port form.
    #[error(
        "libvirt cannot match a host port: its <hostdev> names a USB device by bus and \
         device number or by vendor and product id; use --by address (exactly this plug) \
         or --by id (any device of this kind), or a QEMU VM for by-port passthrough"
    )]
    NoHostPort,
}

/// The `<hostdev>` element for `key`, two-space indented, ending in a newline. Every
/// attribute value is escaped (ours are numbers and aliases, but the writer does not
/// rely on that).
pub fn hostdev_xml(key: &AttachKey, form: Form) -> Result<String, HostdevError> {
    let alias = alias::alias_of(key).ok_or(HostdevError::NoHostPort)?;
    let matcher = match key {
        AttachKey::Address { bus, address } => format!(
            "    <address bus='{}' device='{}'/>\n",
            attr(&bus.to_string()),
            attr(&address.to_string())
        ),
        AttachKey::Id {
            vendor_id,
            product_id,
        } => format!(
            "    <vendor id='{}'/>\n    <product id='{}'/>\n",
            attr(&format!("{:#06x}", vendor_id.0)),
            attr(&format!("{:#06x}", product_id.0))
        ),
        AttachKey::Port(_) => return Err(HostdevError::NoHostPort),
    };
    let policy = match form {
        Form::Live => "",
        Form::Config => " startupPolicy='optional'",
    };
    Ok(format!(
        "<hostdev mode='subsystem' type='usb'>\n  <source{policy}>\n{matcher}  </source>\n  \
         <alias name='{}'/>\n</hostdev>\n",
        attr(&alias)
    ))
}

/// An attribute value escaped for single quotes (and everything else XML reserves).
fn attr(value: &str) -> std::borrow::Cow<'_, str> {
    escape(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::HexId;

    #[test]
    fn a_live_hostdev_by_address_names_bus_device_and_our_alias() {
        let key = AttachKey::Address { bus: 1, address: 5 };

        assert_eq!(
            hostdev_xml(&key, Form::Live).unwrap(),
            "<hostdev mode='subsystem' type='usb'>\n  <source>\n    \
             <address bus='1' device='5'/>\n  </source>\n  \
             <alias name='ua-usbroute-addr-1-5'/>\n</hostdev>\n"
        );
    }

    #[test]
    fn a_config_hostdev_by_id_is_optional_at_startup_with_hex_ids() {
        let key = AttachKey::Id {
            vendor_id: HexId(0x046d),
            product_id: HexId(0xc016),
        };

        assert_eq!(
            hostdev_xml(&key, Form::Config).unwrap(),
            "<hostdev mode='subsystem' type='usb'>\n  <source startupPolicy='optional'>\n    \
             <vendor id='0x046d'/>\n    <product id='0xc016'/>\n  </source>\n  \
             <alias name='ua-usbroute-id-046d-c016'/>\n</hostdev>\n"
        );
    }

    #[test]
    fn a_port_key_is_refused_naming_what_libvirt_can_match_instead() {
        let key = AttachKey::Port("1-3.4".parse().unwrap());

        let err = hostdev_xml(&key, Form::Config).unwrap_err();

        assert!(err.to_string().contains("use --by address"), "{err}");
    }

    #[test]
    fn the_modes_libvirt_offers_are_exactly_those_with_a_hostdev_form() {
        let keys = [
            AttachKey::Address { bus: 1, address: 5 },
            AttachKey::Port("1-3".parse().unwrap()),
            AttachKey::Id {
                vendor_id: HexId(1),
                product_id: HexId(2),
            },
        ];

        for key in keys {
            assert_eq!(
                hostdev_xml(&key, Form::Live).is_ok(),
                super::super::MODES.contains(&key.mode()),
                "{key:?}"
            );
        }
    }

    #[test]
    fn attribute_values_are_escaped() {
        assert_eq!(attr("a'b<&\"c>"), "a&apos;b&lt;&amp;&quot;c&gt;");
    }
}
