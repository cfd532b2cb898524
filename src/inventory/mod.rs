//! Inventory: the read-only model of the host's USB controllers, buses and devices,
//! read from sysfs under a [`SysfsRoot`]. Reads, never writes.
//!
//! Parse, don't trust: a missing or malformed attribute makes that one field `None` and
//! adds a line to [`Snapshot::warnings`]; it never fails the listing.

mod types;

pub use types::*;

use crate::sysfs::SysfsRoot;

/// Read the whole USB picture under `root`.
pub fn scan(root: &SysfsRoot) -> Snapshot {
    let _ = root;
    Snapshot::default()
}
