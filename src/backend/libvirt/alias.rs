//! User aliases for our `<hostdev>`s: an [`AttachKey`] written as `<alias name='...'/>`
//! when attaching (and when detaching, by alias), and read back from the live domain XML,
//! so a restarted daemon recognises its own devices and leaves every other hostdev alone.
//!
//! libvirt keeps an alias a user gives only if it starts with `ua-` and holds nothing but
//! `[A-Za-z0-9_-]` (`USER_ALIAS_PREFIX` and `USER_ALIAS_CHARS` in libvirt's
//! src/conf/domain_conf.c, checked where device info is parsed); any other alias is
//! replaced by one of its own (`hostdev0`), and the device would no longer be known as
//! ours. libvirt hands the alias to QEMU as the device id, so ours is QEMU's id for the
//! same key ([`crate::backend::qemu::ids`]) behind that prefix: `ua-usbroute-addr-1-5`.

use crate::backend::qemu::ids;
use crate::backend::AttachKey;

/// The prefix libvirt requires of a user alias.
pub const USER_ALIAS_PREFIX: &str = "ua-";

/// The alias of our hostdev for `key`: `ua-usbroute-addr-1-5`, `ua-usbroute-id-046d-c016`.
/// `None` for a port key: libvirt cannot attach by port (see [`super::MODES`]).
pub fn alias_of(key: &AttachKey) -> Option<String> {
    match key {
        AttachKey::Port(_) => None,
        AttachKey::Address { .. } | AttachKey::Id { .. } => {
            Some(format!("{USER_ALIAS_PREFIX}{}", ids::device_id(key)))
        }
    }
}

/// The key an alias of ours stands for; `None` for anyone else's alias (libvirt's own
/// `hostdev0`, a user's `ua-mouse`), and for anything but the exact spelling
/// [`alias_of`] writes.
pub fn key_of(alias: &str) -> Option<AttachKey> {
    let key = ids::key_of(alias.strip_prefix(USER_ALIAS_PREFIX)?)?;
    (alias_of(&key).as_deref() == Some(alias)).then_some(key)
}

/// Would libvirt keep `alias` as given? (The rule our aliases are checked against.)
pub fn is_valid_user_alias(alias: &str) -> bool {
    alias.starts_with(USER_ALIAS_PREFIX)
        && alias
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::HexId;

    fn address() -> AttachKey {
        AttachKey::Address { bus: 1, address: 5 }
    }

    fn id() -> AttachKey {
        AttachKey::Id {
            vendor_id: HexId(0x046d),
            product_id: HexId(0xc016),
        }
    }

    #[test]
    fn aliases_carry_libvirts_user_prefix_and_the_qemu_id_of_the_key() {
        assert_eq!(
            [alias_of(&address()), alias_of(&id())],
            [
                Some("ua-usbroute-addr-1-5".to_string()),
                Some("ua-usbroute-id-046d-c016".to_string())
            ]
        );
    }

    #[test]
    fn every_alias_we_write_is_one_libvirt_keeps() {
        let extremes = [
            AttachKey::Address {
                bus: u8::MAX,
                address: u16::MAX,
            },
            AttachKey::Id {
                vendor_id: HexId(0xffff),
                product_id: HexId(0),
            },
        ];

        for key in extremes.iter().chain(&[address(), id()]) {
            let alias = alias_of(key).unwrap();
            assert!(is_valid_user_alias(&alias), "{alias}");
        }
    }

    #[test]
    fn a_port_key_has_no_alias_because_libvirt_cannot_attach_by_port() {
        let port = AttachKey::Port("1-3.4.2".parse().unwrap());

        assert_eq!(alias_of(&port), None);
    }

    #[test]
    fn an_alias_reads_back_as_its_key() {
        for key in [address(), id()] {
            assert_eq!(key_of(&alias_of(&key).unwrap()), Some(key));
        }
    }

    #[test]
    fn aliases_not_ours_are_left_alone() {
        let others = [
            "hostdev0",
            "ua-mouse",
            "usbroute-addr-1-5",
            "ua-usbroute-addr-01-5",
            "ua-usbroute-id-046D-c016",
            "ua-usbroute-port-1-3",
            "ua-usbroute-addr-1-5-",
            "UA-usbroute-addr-1-5",
            "",
        ];

        assert_eq!(
            others.map(key_of),
            [None, None, None, None, None, None, None, None, None]
        );
    }

    #[test]
    fn a_user_alias_needs_the_prefix_and_only_libvirts_characters() {
        assert_eq!(
            ["ua-my_mouse-2", "my-mouse", "ua-mouse.1", "ua-mäus"].map(is_valid_user_alias),
            [true, false, false, false]
        );
    }
}
