//! The listing on domain XML in the shapes libvirt documents (formatdomain.html: "USB /
//! PCI / SCSI devices", "Device aliases", "Meta-data") and prints (`virsh dumpxml` of a
//! running domain: aliases and guest addresses filled in), plus odd but valid XML.

use super::*;
use crate::backend::libvirt::hostdev::{hostdev_xml, Form};
use crate::backend::AttachKey;

/// A running domain as `virsh dumpxml` prints it, written from formatdomain.html: a
/// hostdev of ours by address, the user's own by vendor/product (libvirt's alias), a PCI
/// hostdev, a SCSI hostdev, an `<interface type='hostdev'>`, a `<redirdev>`, and the
/// guest-side `<address type='usb'>` libvirt adds to each USB hostdev.
const LIVE_DOMAIN: &str = r#"<domain type='kvm' id='3'>
  <name>win11</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>4194304</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-9.2'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'>
      <alias name='usb'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <interface type='hostdev' managed='yes'>
      <source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
      </source>
      <alias name='hostdev2'/>
    </interface>
    <hostdev mode='subsystem' type='usb' managed='no'>
      <source>
        <address bus='1' device='5'/>
      </source>
      <alias name='ua-usbroute-addr-1-5'/>
      <address type='usb' bus='0' port='1'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb' managed='no'>
      <source startupPolicy='optional'>
        <vendor id='0x1234'/>
        <product id='0xbeef'/>
        <address bus='3' device='7'/>
      </source>
      <alias name='hostdev0'/>
      <address type='usb' bus='0' port='2'/>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x0000' bus='0x06' slot='0x02' function='0x0'/>
      </source>
      <alias name='hostdev1'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </hostdev>
    <hostdev mode='subsystem' type='scsi' sgio='filtered' rawio='yes'>
      <source>
        <adapter name='scsi_host0'/>
        <address bus='0' target='0' unit='0'/>
      </source>
      <alias name='hostdev3'/>
    </hostdev>
    <redirdev bus='usb' type='spicevmc'>
      <alias name='redir0'/>
      <address type='usb' bus='0' port='3'/>
    </redirdev>
  </devices>
</domain>
"#;

fn listed(xml: &str) -> Vec<VmUsbDevice> {
    usb_hostdevs(xml)
        .unwrap()
        .iter()
        .map(UsbHostdev::to_vm_device)
        .collect()
}

/// A domain whose `<devices>` holds `devices` and nothing else.
fn domain_with(devices: &str) -> String {
    format!("<domain type='kvm'><name>vm</name><devices>{devices}</devices></domain>")
}

#[test]
fn a_live_domain_lists_its_usb_hostdevs_only_ours_by_alias() {
    let devices = listed(LIVE_DOMAIN);

    assert_eq!(
        devices,
        [
            VmUsbDevice {
                id: "ua-usbroute-addr-1-5".into(),
                attached: true,
                key: Some(AttachKey::Address { bus: 1, address: 5 }),
                matcher: HostMatch::Address { bus: 1, address: 5 },
            },
            VmUsbDevice {
                id: "hostdev0".into(),
                attached: true,
                key: None,
                matcher: HostMatch::Address { bus: 3, address: 7 },
            },
        ]
    );
}

#[test]
fn the_guest_side_usb_address_is_not_taken_for_the_host_device() {
    let hostdevs = usb_hostdevs(LIVE_DOMAIN).unwrap();

    assert_eq!((hostdevs[0].bus, hostdevs[0].device), (Some(1), Some(5)));
}

#[test]
fn a_hostdev_by_vendor_and_product_matches_by_id() {
    let xml = domain_with(
        "<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'>\
         <vendor id='0x046d'/><product id='0xc016'/></source>\
         <alias name='ua-usbroute-id-046d-c016'/></hostdev>",
    );

    let devices = listed(&xml);

    let id = HostMatch::Id {
        vendor_id: HexId(0x046d),
        product_id: HexId(0xc016),
    };
    assert_eq!(
        (devices[0].key.clone(), devices[0].matcher.clone()),
        (
            Some(AttachKey::Id {
                vendor_id: HexId(0x046d),
                product_id: HexId(0xc016)
            }),
            id
        )
    );
}

#[test]
fn a_hostdev_without_alias_is_listed_as_not_ours_with_an_empty_id() {
    let xml = domain_with(
        "<hostdev mode='subsystem' type='usb'><source><address bus='2' device='3'/></source></hostdev>",
    );

    let devices = listed(&xml);

    assert_eq!((devices[0].id.as_str(), devices[0].is_ours()), ("", false));
}

#[test]
fn a_users_own_ua_alias_is_not_ours() {
    let xml = domain_with(
        "<hostdev mode='subsystem' type='usb'><source><address bus='2' device='3'/></source>\
         <alias name='ua-my-mouse'/></hostdev>",
    );

    assert_eq!(listed(&xml)[0].key, None);
}

#[test]
fn every_hostdev_we_write_reads_back_as_its_key() {
    let keys = [
        AttachKey::Address {
            bus: 12,
            address: 127,
        },
        AttachKey::Id {
            vendor_id: HexId(0xffff),
            product_id: HexId(0x0001),
        },
    ];
    for key in keys {
        for form in [Form::Live, Form::Config] {
            let xml = domain_with(&hostdev_xml(&key, form).unwrap());

            let devices = listed(&xml);

            assert_eq!(devices[0].key.as_ref(), Some(&key), "{xml}");
            assert_eq!(devices[0].matcher, key.host_match(), "{xml}");
        }
    }
}

#[test]
fn comments_cdata_entities_and_both_quote_kinds_are_read_as_xml() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- a comment before the root, with <hostdev> in it -->
<domain type="kvm">
  <description><![CDATA[<hostdev mode='subsystem' type='usb'> in a description]]></description>
  <title>Tom &amp; Jerry&apos;s &#x56;M</title>
  <devices>
    <!-- <hostdev mode='subsystem' type='usb'><alias name='ua-usbroute-addr-9-9'/></hostdev> -->
    <hostdev
        mode="subsystem"
        type = 'usb' >
      <source>
        <address bus="&#x31;" device='&#53;'  />
      </source>
      <alias name="ua-usbroute-addr-1-5"/>
    </hostdev>
  </devices>
</domain>"#;

    let devices = listed(xml);

    assert_eq!(
        devices
            .iter()
            .map(|d| (d.key.clone(), d.matcher.clone()))
            .collect::<Vec<_>>(),
        [(
            Some(AttachKey::Address { bus: 1, address: 5 }),
            HostMatch::Address { bus: 1, address: 5 }
        )]
    );
}

#[test]
fn look_alikes_in_namespaced_metadata_are_passed_over() {
    // formatdomain.html, "Meta-data": applications keep their own XML in <metadata>,
    // each in its own namespace; a default namespace makes a bare <hostdev> there too.
    let xml = r#"<domain type='kvm'>
  <metadata>
    <app1:foo xmlns:app1="http://app1.org/app1/">
      <app1:hostdev mode='subsystem' type='usb'><app1:alias name='ua-usbroute-addr-1-1'/></app1:hostdev>
    </app1:foo>
    <app2:bar xmlns:app2="http://app1.org/app2/">
      <hostdev xmlns="http://app1.org/app2/" mode='subsystem' type='usb'>
        <source><address bus='1' device='2'/></source>
      </hostdev>
    </app2:bar>
  </metadata>
  <devices>
    <app1:hostdev xmlns:app1="http://app1.org/app1/" mode='subsystem' type='usb'/>
  </devices>
</domain>"#;

    assert_eq!(listed(xml), []);
}

#[test]
fn a_capabilities_mode_hostdev_is_not_a_usb_subsystem_one() {
    let xml = domain_with(
        "<hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source></hostdev>\
         <hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source></hostdev>",
    );

    assert_eq!(listed(&xml), []);
}

#[test]
fn a_source_with_both_address_and_ids_matches_on_the_address() {
    let hostdev = UsbHostdev {
        bus: Some(3),
        device: Some(7),
        vendor: Some(0x1234),
        product: Some(0xbeef),
        ..UsbHostdev::default()
    };

    assert_eq!(hostdev.matcher(), HostMatch::Address { bus: 3, address: 7 });
}

#[test]
fn numbers_out_of_usbs_range_or_missing_match_on_nothing_known() {
    let cases = [
        UsbHostdev {
            bus: Some(256),
            device: Some(1),
            ..UsbHostdev::default()
        },
        UsbHostdev {
            vendor: Some(0x1_0000),
            product: Some(1),
            ..UsbHostdev::default()
        },
        UsbHostdev {
            vendor: Some(1),
            ..UsbHostdev::default()
        },
    ];

    assert_eq!(
        cases.map(|h| h.matcher()),
        [
            HostMatch::Other {},
            HostMatch::Other {},
            HostMatch::Other {}
        ]
    );
}

#[test]
fn numbers_are_read_as_libvirt_reads_them() {
    let inputs = [
        "5", " 5 ", "0x1f", "0X1F", "017", "0", "", "0x", "-1", "5a", "1e3", "08",
    ];

    assert_eq!(
        inputs.map(|s| number(Some(s))),
        [
            Some(5),
            Some(5),
            Some(31),
            Some(31),
            Some(15),
            Some(0),
            None,
            None,
            None,
            None,
            None,
            None
        ]
    );
}

#[test]
fn an_alias_with_control_characters_is_kept_escaped() {
    let xml = domain_with(
        "<hostdev mode='subsystem' type='usb'><source><address bus='1' device='2'/></source>\
         <alias name='a&#x1b;[2Jb'/></hostdev>",
    );

    assert_eq!(listed(&xml)[0].id, "a\\u{1b}[2Jb");
}

#[test]
fn xml_over_the_limit_is_refused_unread() {
    let xml = " ".repeat(MAX_DOMAIN_XML + 1);

    let err = usb_hostdevs(&xml).unwrap_err();

    assert!(matches!(err, DomainXmlError::TooLarge { .. }), "{err}");
}

#[test]
fn malformed_xml_is_an_error_naming_where() {
    let cases = [
        "<domain><devices><hostdev mode='subsystem' type='usb'></devices></domain>",
        "<domain><devices><hostdev mode='subsystem type='usb'/></devices></domain>",
        "<domain><devices><hostdev mode='&bogus;' type='usb'/></devices></domain>",
    ];

    for xml in cases {
        let err = usb_hostdevs(xml).unwrap_err();
        assert!(
            matches!(err, DomainXmlError::Malformed { .. }),
            "{xml}: {err}"
        );
    }
}

#[test]
fn a_root_other_than_domain_is_refused() {
    let err = usb_hostdevs("<network><name>default</name></network>").unwrap_err();

    assert_eq!(
        err.to_string(),
        "the XML's root element is <network>, not <domain>: not a libvirt domain description"
    );
}
