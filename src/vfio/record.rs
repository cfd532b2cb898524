//! The bind record: each member's driver and override before a bind, kept in
//! `/var/lib/usbroute/vfio/<group>.json` (under the root) until `restore` puts them
//! back. It must outlive a daemon restart (see [`crate::state`]); a record from an
//! earlier boot is ignored, since the binding did not survive the reboot either.

use super::VfioError;
use crate::inventory::PciAddress;
use crate::state::{self, LEGACY_STATE_DIR};
use crate::sysfs::SysfsRoot;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where bind records live (a host path, under the root).
pub const RECORD_DIR: &str = "/var/lib/usbroute/vfio";

/// A member's driver and `driver_override` at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// The function.
    pub pci: PciAddress,
    /// Its driver, `None` if unbound.
    pub driver: Option<String>,
    /// Its `driver_override`, `None` if unset.
    pub driver_override: Option<String>,
}

/// What a bind changed, so restore can undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindRecord {
    /// Format version (1).
    pub version: u32,
    /// The IOMMU group.
    pub group: u32,
    /// The controller the user named.
    pub controller: PciAddress,
    /// Every non-bridge member as it was before the bind.
    pub members: Vec<MemberState>,
    /// The boot it was written in (`/proc/sys/kernel/random/boot_id`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

impl BindRecord {
    /// The record's host path for `group`.
    pub fn path(group: u32) -> PathBuf {
        PathBuf::from(format!("{RECORD_DIR}/{group}.json"))
    }

    /// Where earlier versions kept the record of `group` (`/run`, emptied by systemd).
    fn legacy_path(group: u32) -> PathBuf {
        PathBuf::from(format!("{LEGACY_STATE_DIR}/vfio/{group}.json"))
    }

    /// Write it atomically and durably (see [`state::write_atomic`]), replacing an older
    /// record of the group only when that one is for members that are no longer on
    /// vfio-pci (caller decides).
    pub fn save(&self, root: &SysfsRoot) -> Result<(), VfioError> {
        let path = Self::path(self.group);
        let err = |source| VfioError::Record {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        state::write_atomic(&root.path(&path), &json).map_err(err)
    }

    /// The record of `group`, `Ok(None)` if there is none or it is from an earlier boot.
    /// Falls back to where earlier versions kept it, so an upgrade loses nothing.
    pub fn load(root: &SysfsRoot, group: u32) -> Result<Option<Self>, VfioError> {
        for path in [Self::path(group), Self::legacy_path(group)] {
            let bytes = match std::fs::read(root.path(&path)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(VfioError::Record { path, source }),
            };
            let record: Self = serde_json::from_slice(&bytes)
                .map_err(|source| VfioError::BadRecord { path, source })?;
            return Ok(state::same_boot(root, record.boot_id.as_deref()).then_some(record));
        }
        Ok(None)
    }

    /// Delete the record of `group`, and an earlier version's copy (missing is fine).
    pub fn remove(root: &SysfsRoot, group: u32) -> Result<(), VfioError> {
        for path in [Self::path(group), Self::legacy_path(group)] {
            match std::fs::remove_file(root.path(&path)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(VfioError::Record { path, source: e })
                }
                _ => {}
            }
        }
        Ok(())
    }
}
