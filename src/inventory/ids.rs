//! Names from the USB and PCI id databases (the `usb.ids` and `pci.ids` lists, as the
//! `usb-ids` and `pci-ids` crates carry them), for devices and controllers that name
//! themselves poorly or not at all.
//!
//! build.rs turns the crates' tables into one blob of bytes in blocks
//! ([`super::id_blocks`]): no pointers, so nothing for the loader to relocate at start.
//! A lookup reads the blob's index and one block from the executable's file with
//! `pread`, not through its mapping: the kernel maps a file into a process in runs of
//! 64 to 256 KiB around each page touched, so a handful of lookups through the mapping
//! kept most of the 1.4 MiB blob resident in the daemon for its whole life; read, the
//! pages are only the page cache's. Where the file cannot be read (no `/proc`, a blob
//! not where the program headers say), lookups read the mapping as before (issue 14).

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use super::id_blocks::{Blob, IdTable, MAGIC};

include!(concat!(env!("OUT_DIR"), "/ids.rs"));

/// The blob in the executable's file.
struct ExeFile {
    file: File,
    /// Where the blob starts in the file.
    offset: u64,
}

impl Blob for ExeFile {
    fn read(&self, at: usize, len: usize) -> Option<Cow<'_, [u8]>> {
        let mut bytes = vec![0; len];
        let at = self.offset.checked_add(u64::try_from(at).ok()?)?;
        self.file.read_exact_at(&mut bytes, at).ok()?;
        Some(Cow::Owned(bytes))
    }
}

impl ExeFile {
    /// The running executable (its inode, even if replaced on disk since), if the blob is
    /// where its program headers say and begins with [`MAGIC`].
    fn open() -> Option<ExeFile> {
        let offset = blob_file_offset()?;
        let file = File::open("/proc/self/exe").ok()?;
        let exe = ExeFile { file, offset };
        (exe.read(0, MAGIC.len())?.as_ref() == MAGIC).then_some(exe)
    }
}

static EXE: OnceLock<Option<ExeFile>> = OnceLock::new();

fn name(table: &IdTable, key: u32) -> Option<String> {
    match EXE.get_or_init(ExeFile::open) {
        Some(exe) => table.get(exe, key),
        None => table.get(BLOB, key),
    }
}

/// Where [`BLOB`] lies in the file of the object it was loaded from: found among the
/// loaded objects' program headers by its address, without reading its bytes.
#[allow(unsafe_code)]
fn blob_file_offset() -> Option<u64> {
    struct Search {
        start: usize,
        end: usize,
        offset: Option<u64>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: `data` is the `Search` below, alive and not otherwise borrowed during
        // the call; `info` and its `dlpi_phnum` program headers are the loader's, valid
        // for the duration of this callback.
        let (search, info) = unsafe { (&mut *data.cast::<Search>(), &*info) };
        // SAFETY: as above: the loader's `dlpi_phnum` headers at `dlpi_phdr`.
        let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
        for header in headers.iter().filter(|h| h.p_type == libc::PT_LOAD) {
            let loaded = info.dlpi_addr as usize + header.p_vaddr as usize;
            if search.start >= loaded && search.end <= loaded + header.p_filesz as usize {
                search.offset = Some((search.start - loaded) as u64 + header.p_offset);
                return 1;
            }
        }
        0
    }
    let mut search = Search {
        start: BLOB.as_ptr() as usize,
        end: BLOB.as_ptr() as usize + BLOB.len(),
        offset: None,
    };
    // SAFETY: `visit` only reads what the loader hands it and writes `search`.
    unsafe {
        libc::dl_iterate_phdr(Some(visit), (&raw mut search).cast());
    }
    search.offset
}

/// A USB vendor's name.
pub fn usb_vendor(vendor: u16) -> Option<String> {
    name(&USB_VENDORS, u32::from(vendor))
}

/// A USB product's name.
pub fn usb_product(vendor: u16, product: u16) -> Option<String> {
    name(&USB_PRODUCTS, u32::from(vendor) << 16 | u32::from(product))
}

/// A PCI vendor's name.
pub fn pci_vendor(vendor: u16) -> Option<String> {
    name(&PCI_VENDORS, u32::from(vendor))
}

/// A PCI device's name (without its vendor's).
pub fn pci_device(vendor: u16, device: u16) -> Option<String> {
    name(&PCI_DEVICES, u32::from(vendor) << 16 | u32::from(device))
}

/// A PCI subclass's name (`USB controller` for class 0x0c, subclass 0x03).
pub fn pci_subclass(class: u8, subclass: u8) -> Option<String> {
    name(&PCI_SUBCLASSES, u32::from(class) << 8 | u32::from(subclass))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_have_their_database_names() {
        assert_eq!(usb_vendor(0x1d6b).as_deref(), Some("Linux Foundation"));
        assert_eq!(usb_product(0x1d6b, 0x0003).as_deref(), Some("3.0 root hub"));
        assert_eq!(pci_vendor(0x8086).as_deref(), Some("Intel Corporation"));
        assert_eq!(pci_subclass(0x0c, 0x03).as_deref(), Some("USB controller"));
        assert_eq!(
            pci_device(0x1b36, 0x000d).as_deref(),
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
    fn names_are_read_from_the_executable_file_and_match_the_mapped_blob() {
        let exe = ExeFile::open().expect("the test binary's blob is found in its file");
        assert!(exe.offset > 0);
        for (table, key) in [
            (&USB_VENDORS, 0x1d6b),
            (&PCI_DEVICES, 0x1b36_000d),
            (&PCI_SUBCLASSES, 0x0c03),
        ] {
            assert_eq!(table.get(&exe, key), table.get(BLOB, key));
            assert!(table.get(&exe, key).is_some());
        }
    }

    #[test]
    fn every_key_of_every_block_has_its_name_and_the_keys_run_in_order() {
        let u32_at = |at: usize| u32::from_le_bytes(BLOB[at..at + 4].try_into().unwrap());
        for table in [
            &USB_VENDORS,
            &USB_PRODUCTS,
            &PCI_VENDORS,
            &PCI_DEVICES,
            &PCI_SUBCLASSES,
        ] {
            let mut previous = None;
            for block in 0..table.blocks as usize {
                let start = u32_at(table.block_starts as usize + 4 * block) as usize;
                assert_eq!(
                    u32_at(table.first_keys as usize + 4 * block),
                    u32_at(start + 1)
                );
                for i in 0..usize::from(BLOB[start]) {
                    let key = u32_at(start + 1 + 4 * i);
                    assert!(previous < Some(key), "{key:#x} after {previous:?}");
                    assert!(name(table, key).is_some(), "{key:#x}");
                    previous = Some(key);
                }
            }
        }
    }
}
