//! QEMU's device ids for our usb-host devices (`backend::qemu::ids`): derived from the
//! attach key alone, and read back into it when listing.

use crate::policy_support;

use policy_support::device;
use proptest::prelude::*;
use usbroute::backend::qemu::ids::{self, usbroute_device_id};
use usbroute::backend::{AttachKey, AttachMode};
use usbroute::inventory::{HexId, PortPath};

#[test]
fn ids_for_each_mode() {
    let d = device("1-3.4.2", 5);
    let ids =
        [AttachMode::Address, AttachMode::Port, AttachMode::Id].map(|m| usbroute_device_id(m, &d));
    assert_eq!(
        ids,
        [
            Some("usbroute-addr-1-5".to_string()),
            Some("usbroute-port-1-3.4.2".to_string()),
            Some("usbroute-id-046d-c016".to_string())
        ]
    );
}

#[test]
fn no_address_means_no_address_id() {
    let mut d = device("1-1", 5);
    d.address = None;
    assert_eq!(usbroute_device_id(AttachMode::Address, &d), None);
}

#[test]
fn foreign_and_non_canonical_ids_are_not_ours() {
    let parsed = [
        "usb0",
        "usbroute-addr-1-05",
        "usbroute-id-46d-c016",
        "usbroute-port-1-3-4",
        "usbroute-x-1",
    ]
    .map(ids::key_of);
    assert_eq!(parsed, [None, None, None, None, None]);
}

fn key() -> impl Strategy<Value = AttachKey> {
    prop_oneof![
        (1u8..=255, 1u16..=127).prop_map(|(bus, address)| AttachKey::Address { bus, address }),
        (1u8..=255, prop::collection::vec(1u8..=255, 1..=7))
            .prop_map(|(bus, ports)| AttachKey::Port(PortPath { bus, ports })),
        (any::<u16>(), any::<u16>()).prop_map(|(v, p)| AttachKey::Id {
            vendor_id: HexId(v),
            product_id: HexId(p)
        }),
    ]
}

proptest! {
    #[test]
    fn id_parses_back_to_key_and_is_qemu_safe(k in key()) {
        let id = ids::device_id(&k);
        prop_assert!(id.starts_with(|c: char| c.is_ascii_alphabetic()));
        prop_assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
        prop_assert_eq!(ids::key_of(&id), Some(k));
    }
}
