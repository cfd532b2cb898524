//! Parse, don't trust: whatever bytes an attribute holds, `scan` neither panics nor
//! loses the device; the field goes unknown instead.

use proptest::prelude::*;
use usbroute::inventory::scan;
use usbroute::inventory::synth::{PciFunction, SysfsBuilder, UsbDevice};
use usbroute::sysfs::SysfsRoot;

const ATTRIBUTES: &[&str] = &[
    "devnum",
    "idVendor",
    "idProduct",
    "bDeviceClass",
    "speed",
    "serial",
    "product",
    "removable",
];

/// One xHCI with a hub and a device behind it; returns the device's host directory.
fn tree(dir: &std::path::Path) -> String {
    let b = SysfsBuilder::new(dir);
    b.pci(&PciFunction {
        address: "0000:00:14.0",
        class: 0x0c0330,
        vendor: 0x8086,
        device: 0xa36d,
        driver: Some("xhci_hcd"),
        iommu_group: Some(1),
    })
    .unwrap();
    b.bus("0000:00:14.0", 1, "480", "2.00", 4).unwrap();
    let device = |port, class| UsbDevice {
        port,
        devnum: 2,
        vendor: 0x046d,
        product: 0xc016,
        class,
        speed: "12",
        manufacturer: None,
        product_name: None,
        serial: None,
        interfaces: vec![(class, None)],
    };
    b.device(&device("1-1", 9)).unwrap();
    b.device(&device("1-1.2", 3)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_attribute_bytes_keep_every_device_listed(
        which in 0..ATTRIBUTES.len(),
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let device_dir = tree(dir.path());
        let path = dir.path().join(device_dir.trim_start_matches('/')).join(ATTRIBUTES[which]);
        std::fs::write(path, &bytes).unwrap();

        let s = scan(&SysfsRoot::new(dir.path()));

        prop_assert_eq!(s.devices.len(), 2);
        prop_assert_eq!(s.devices[1].port.to_string(), "1-1.2");
    }
}
