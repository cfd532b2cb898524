//! Names from the USB and PCI id databases (the `usb.ids` and `pci.ids` lists, as the
//! `usb-ids` and `pci-ids` crates carry them), for devices and controllers that name
//! themselves poorly or not at all.
//!
//! build.rs turns the crates' tables into sorted integer keys and one string of names
//! each (`OUT_DIR/ids.rs`): no pointers, so nothing for the loader to relocate at start,
//! and a lookup reads only the pages a binary search lands on. Linked as the crates
//! ship them, the tables cost the daemon 2.5 MiB of resident memory from its first
//! instant (issue 14).

/// One table: `keys` sorted, name `i` is `names[ends[i - 1]..ends[i]]`.
struct IdTable {
    keys: &'static [u32],
    ends: &'static [u32],
    names: &'static str,
}

impl IdTable {
    fn get(&self, key: u32) -> Option<&'static str> {
        let i = self.keys.binary_search(&key).ok()?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.names.get(start..self.ends[i] as usize)
    }
}

include!(concat!(env!("OUT_DIR"), "/ids.rs"));

/// A USB vendor's name.
pub fn usb_vendor(vendor: u16) -> Option<&'static str> {
    USB_VENDORS.get(u32::from(vendor))
}

/// A USB product's name.
pub fn usb_product(vendor: u16, product: u16) -> Option<&'static str> {
    USB_PRODUCTS.get(u32::from(vendor) << 16 | u32::from(product))
}

/// A PCI vendor's name.
pub fn pci_vendor(vendor: u16) -> Option<&'static str> {
    PCI_VENDORS.get(u32::from(vendor))
}

/// A PCI device's name (without its vendor's).
pub fn pci_device(vendor: u16, device: u16) -> Option<&'static str> {
    PCI_DEVICES.get(u32::from(vendor) << 16 | u32::from(device))
}

/// A PCI subclass's name (`USB controller` for class 0x0c, subclass 0x03).
pub fn pci_subclass(class: u8, subclass: u8) -> Option<&'static str> {
    PCI_SUBCLASSES.get(u32::from(class) << 8 | u32::from(subclass))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_have_their_database_names() {
        assert_eq!(usb_vendor(0x1d6b), Some("Linux Foundation"));
        assert_eq!(usb_product(0x1d6b, 0x0003), Some("3.0 root hub"));
        assert_eq!(pci_vendor(0x8086), Some("Intel Corporation"));
        assert_eq!(pci_subclass(0x0c, 0x03), Some("USB controller"));
        assert_eq!(
            pci_device(0x1b36, 0x000d),
            Some("QEMU XHCI Host Controller")
        );
    }

    #[test]
    fn unknown_ids_have_no_name() {
        assert_eq!(usb_vendor(0xfffe), None);
        assert_eq!(usb_product(0x1d6b, 0xfffe), None);
        assert_eq!(pci_device(0x8086, 0xfffe), None);
        assert_eq!(pci_subclass(0xfe, 0xfe), None);
    }

    #[test]
    fn every_table_is_sorted_and_its_names_are_in_bounds() {
        for table in [
            &USB_VENDORS,
            &USB_PRODUCTS,
            &PCI_VENDORS,
            &PCI_DEVICES,
            &PCI_SUBCLASSES,
        ] {
            assert!(table.keys.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(table.keys.len(), table.ends.len());
            assert_eq!(
                table.ends.last().map(|e| *e as usize),
                Some(table.names.len())
            );
        }
    }
}
