//! Inventory: the read-only model of the host's USB controllers, buses and devices,
//! read from sysfs under a [`SysfsRoot`]. Reads, never writes (a recording is written
//! into its own directory, never into sysfs).
//!
//! Parse, don't trust: a missing or malformed attribute makes that one field `None` and
//! adds a line to [`Snapshot::warnings`]; it never fails the listing.

mod id_blocks;
pub mod ids;
mod patch;
pub(crate) mod pci;
mod physical;
mod reader;
pub mod record;
pub mod render;
pub mod synth;
pub mod text;
mod types;
pub(crate) mod usb;

pub use patch::{patch, usb_object, PatchFailed, Patched, UsbObject};
pub use physical::{BadControllerName, BadPhysicalPort, ControllerName, PhysicalPort};
pub use reader::ScanFailed;
pub use types::*;

use crate::sysfs::SysfsRoot;
use reader::Reader;

/// Read the whole USB picture under `root`: one pass over `/sys/bus/pci/devices` and
/// `/sys/bus/usb/devices`, everything sorted so equal hardware gives equal snapshots.
///
/// A pass that could not read the picture as a whole still returns what it read, with
/// the failure among the warnings; callers that act on the picture use [`try_scan`].
pub fn scan(root: &SysfsRoot) -> Snapshot {
    let mut reader = Reader::new(root);
    let snapshot = scan_with(&mut reader);
    finish(snapshot, reader).0
}

/// [`scan`], but `Err` when the picture is incomplete as a whole (a top-level listing
/// failed, or reads ran out of file descriptors or memory), so that a caller acting on
/// it keeps its last good picture instead of taking every device for unplugged. An
/// absent `/sys/bus/usb` (no USB at all) is a valid, empty picture.
pub fn try_scan(root: &SysfsRoot) -> Result<Snapshot, ScanFailed> {
    let mut reader = Reader::new(root);
    let snapshot = scan_with(&mut reader);
    if let Some(failed) = reader.failure() {
        return Err(failed.clone());
    }
    Ok(finish(snapshot, reader).0)
}

/// [`scan`] with a [`Reader`] of the caller's choice (the recorder logs its paths).
fn scan_with(r: &mut Reader) -> Snapshot {
    let mut controllers = pci::read_controllers(r);
    let (buses, devices) = usb::read_usb(r);
    for c in &mut controllers {
        c.buses = buses
            .iter()
            .filter(|b| b.controller == Some(c.pci))
            .map(|b| b.number)
            .collect();
    }
    Snapshot {
        controllers,
        buses,
        devices: devices.into(),
        warnings: Vec::new(),
    }
}

/// Move the reader's warnings into the snapshot; hand back its access log.
fn finish(
    mut snapshot: Snapshot,
    reader: Reader,
) -> (Snapshot, Vec<(std::path::PathBuf, reader::Access)>) {
    let (warnings, log) = reader.finish();
    snapshot.warnings = warnings;
    (snapshot, log)
}

#[cfg(test)]
mod scan_tests;
