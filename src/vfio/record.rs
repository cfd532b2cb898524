//! The bind record: each member's driver and override before a bind, kept in
//! `/run/usbroute/vfio/<group>.json` (under the root) until `restore` puts them back.
//! `/run` is cleared at boot, as is the binding itself.

use super::VfioError;
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where bind records live (a host path, under the root).
pub const RECORD_DIR: &str = "/run/usbroute/vfio";

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
}

impl BindRecord {
    /// The record's host path for `group`.
    pub fn path(group: u32) -> PathBuf {
        PathBuf::from(format!("{RECORD_DIR}/{group}.json"))
    }

    /// Write it (creating the directory), replacing an older record of the group only
    /// when that one is for members that are no longer on vfio-pci (caller decides).
    pub fn save(&self, root: &SysfsRoot) -> Result<(), VfioError> {
        let path = Self::path(self.group);
        let err = |source| VfioError::Record {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(root.path(RECORD_DIR)).map_err(err)?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        // Write then rename: a crash never leaves half a record.
        let tmp = root.path(format!("{RECORD_DIR}/.{}.json.tmp", self.group));
        std::fs::write(&tmp, json).map_err(err)?;
        std::fs::rename(&tmp, root.path(&path)).map_err(err)
    }

    /// The record of `group`, `Ok(None)` if there is none.
    pub fn load(root: &SysfsRoot, group: u32) -> Result<Option<Self>, VfioError> {
        let path = Self::path(group);
        let bytes = match std::fs::read(root.path(&path)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(VfioError::Record { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| VfioError::BadRecord {
                path,
                reason: e.to_string(),
            })
    }

    /// Delete the record of `group` (missing is fine).
    pub fn remove(root: &SysfsRoot, group: u32) -> Result<(), VfioError> {
        let path = Self::path(group);
        match std::fs::remove_file(root.path(&path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(VfioError::Record { path, source: e })
            }
            _ => Ok(()),
        }
    }
}
