//! Apply a [`Plan`]: write XUSB2PR (and USB3_PSSEN when it changes), keep the xHCI out
//! of runtime suspend while a non-default routing is in force, and put the routing
//! back when the kernel has overwritten it.
//!
//! Linux writes XUSB2PRM into XUSB2PR on every resume of the xHCI, runtime PM included,
//! so a routing that is not pinned is silently lost. The active routing is remembered in
//! `/var/lib/usbroute/routing.json` (under the sysfs root; see [`crate::state`]) so that
//! a later `ports toggle`, the daemon and [`Router::reconcile`] all know what should be
//! in force.
//!
//! The record is written first, as an intent (target registers, and the `power/control`
//! to give back), then `power/control` is pinned, then the registers are written. A kill
//! at any point leaves a record naming where the host is going, and
//! [`Router::reconcile`] (the daemon runs it at start, after a resume and on the
//! routed controllers' uevents) finishes
//! the move: registers, pin and un-pin.

use super::config_space::{ConfigSpace, SysfsConfigSpace, USB3_PSSEN, XUSB2PR};
use super::detect::{Detected, Registers};
use super::profile::Plan;
use super::RoutingError;
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the active routing is remembered, as a host path.
pub const STATE_FILE: &str = "/var/lib/usbroute/routing.json";

/// Where earlier versions kept it (emptied by systemd on every stop); read once.
const LEGACY_STATE_FILE: &str = "/run/usbroute/routing.json";

/// Held (flock) around every read-modify-write of the registers and the state file, so
/// `usbroute ports apply` and the daemon's re-apply never interleave: otherwise the
/// daemon could see the new register before the new state file and "restore" the old
/// profile, resetting every device on the moved ports twice.
pub const LOCK_FILE: &str = "/var/lib/usbroute/routing.lock";

/// The routing usbroute last put in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRouting {
    /// The xHCI.
    pub controller: PciAddress,
    /// Profile name.
    pub profile: String,
    /// XUSB2PR as written.
    pub xusb2pr: u16,
    /// USB3_PSSEN as written.
    pub usb3_pssen: u32,
    /// The xHCI's `power/control` before usbroute pinned it to `on`; `None` when not pinned.
    pub power_control_before: Option<String>,
    /// The boot it was written in: registers and `power/control` do not survive a reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// What [`Router::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// Registers before.
    pub before: Registers,
    /// Registers after (read back).
    pub after: Registers,
    /// `on` pinned, `auto` restored, or nothing.
    pub power: PowerChange,
    /// A preview: nothing was written; `after` and `power` say what would have been.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// A change to the xHCI's runtime PM setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerChange {
    /// Left as it was.
    Unchanged,
    /// Set to `on` so the xHCI does not runtime-suspend (and lose the routing on resume).
    PinnedOn,
    /// Put back to what it was before usbroute pinned it.
    Restored,
}

/// What [`Router::reconcile`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reapplied {
    /// The active profile.
    pub profile: String,
    /// XUSB2PR found (usually XUSB2PRM: the kernel's resume default).
    pub found: u16,
    /// XUSB2PR written back.
    pub restored: u16,
}

/// [`Router::prepare`]'s answer.
struct Prepared {
    before: Registers,
    target: Registers,
    /// `target` is what the kernel sets itself.
    default: bool,
    pinned_from: Option<String>,
}

/// Routing on one xHCI through one config-space accessor.
pub struct Router<C: ConfigSpace = SysfsConfigSpace> {
    root: SysfsRoot,
    detected: Detected,
    space: C,
    space_path: PathBuf,
}

impl Router<SysfsConfigSpace> {
    /// A router on the detected xHCI's sysfs `config` file.
    pub fn open(root: &SysfsRoot, detected: Detected) -> Self {
        let space = SysfsConfigSpace::new(root, detected.xhci);
        Self::with_space(root, detected, space.path().to_path_buf(), space)
    }
}

impl<C: ConfigSpace> Router<C> {
    /// A router on any config-space accessor (`path` names it in messages).
    pub fn with_space(root: &SysfsRoot, detected: Detected, path: PathBuf, space: C) -> Self {
        Self {
            root: root.clone(),
            detected,
            space,
            space_path: path,
        }
    }

    /// The controller and chipset.
    pub fn detected(&self) -> &Detected {
        &self.detected
    }

    /// The routing registers now.
    pub fn registers(&self) -> Result<Registers, RoutingError> {
        Registers::read(&self.space, &self.space_path)
    }

    /// The routing usbroute last put in force (or set out to) on this xHCI in this boot.
    pub fn active(&self) -> Result<Option<ActiveRouting>, RoutingError> {
        for file in [STATE_FILE, LEGACY_STATE_FILE] {
            let path = self.root.path(file);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RoutingError::io("read", path, e)),
            };
            // A state file that does not parse is stale debris from an older version:
            // treat it as absent rather than refusing to route.
            return Ok(serde_json::from_str::<ActiveRouting>(&text)
                .ok()
                .filter(|a| a.controller == self.detected.xhci)
                .filter(|a| crate::state::same_boot(&self.root, a.boot_id.as_deref())));
        }
        Ok(None)
    }

    /// The registers before and after `plan`, and the `power/control` to give back once
    /// the routing is the default again. Refuses bits XUSB2PRM forbids unless `force`.
    fn prepare(&self, plan: &Plan, force: bool) -> Result<Prepared, RoutingError> {
        if plan.forbidden != 0 && !force {
            return Err(RoutingError::Forbidden {
                profile: plan.profile.clone(),
                ports: super::profile::describe_bits(self.detected.chipset, plan.forbidden),
                prm: self.registers()?.xusb2prm,
            });
        }
        let before = self.registers()?;
        let previous = self.active()?;
        let target = Registers {
            xusb2pr: plan.xusb2pr,
            usb3_pssen: plan.usb3_pssen,
            ..before
        };
        let default = target.is_kernel_default(self.detected.chipset);
        // What power/control goes back to once the routing is the default again: what an
        // earlier apply recorded, else what it says now (unless it is `on` already).
        let pinned_from = match previous.and_then(|p| p.power_control_before) {
            Some(was) => Some(was),
            None if !default => self.power_control()?.filter(|v| v != "on"),
            None => None,
        };
        Ok(Prepared {
            before,
            target,
            default,
            pinned_from,
        })
    }

    /// Write a plan. Refuses bits XUSB2PRM forbids unless `force`.
    pub fn apply(&mut self, plan: &Plan, force: bool) -> Result<Applied, RoutingError> {
        let _lock = self.lock()?;
        let Prepared {
            before,
            target,
            default,
            mut pinned_from,
        } = self.prepare(plan, force)?;
        let mut record = ActiveRouting {
            controller: self.detected.xhci,
            profile: plan.profile.clone(),
            xusb2pr: target.xusb2pr,
            usb3_pssen: target.usb3_pssen,
            power_control_before: pinned_from.clone(),
            boot_id: crate::state::boot_id(&self.root),
        };
        // Intent first: a kill after this leaves a record reconcile can finish.
        self.save(&record)?;
        let mut power = PowerChange::Unchanged;
        // Pin before writing: a runtime suspend between the write and the pin would
        // undo the routing on resume.
        if !default && pinned_from.is_some() && self.pin_power()?.is_some() {
            power = PowerChange::PinnedOn;
        }
        self.write_registers(&before, &target)?;
        if default {
            if let Some(was) = pinned_from.take() {
                self.write_power_control(&was)?;
                power = PowerChange::Restored;
                record.power_control_before = None;
                self.save(&record)?;
            }
        }
        Ok(Applied {
            before,
            after: self.registers()?,
            power,
            dry_run: false,
        })
    }

    /// What [`apply`](Self::apply) would do (`dry_run` set): nothing is written and no
    /// lock is taken (creating the lock file would itself be a write).
    pub fn preview(&self, plan: &Plan, force: bool) -> Result<Applied, RoutingError> {
        let p = self.prepare(plan, force)?;
        let power = match p.pinned_from {
            Some(_) if p.default => PowerChange::Restored,
            Some(_) if self.power_control()?.is_some_and(|v| v != "on") => PowerChange::PinnedOn,
            _ => PowerChange::Unchanged,
        };
        Ok(Applied {
            before: p.before,
            after: p.target,
            power,
            dry_run: true,
        })
    }

    /// If the registers no longer hold the active routing (the kernel rewrote them on
    /// resume, or someone ran setpci), write it back. Call at start, after a resume and on
    /// the uevents of the xHCI, its EHCIs and the devices on them. `Ok(None)` when nothing needed doing.
    pub fn reconcile(&mut self) -> Result<Option<Reapplied>, RoutingError> {
        let _lock = self.lock()?;
        let Some(active) = self.active()? else {
            return Ok(None);
        };
        let now = self.registers()?;
        let target = Registers {
            xusb2pr: active.xusb2pr,
            usb3_pssen: active.usb3_pssen,
            ..now
        };
        let ss = self.detected.chipset.superspeed_bits();
        let holds = now.xusb2pr == active.xusb2pr && now.usb3_pssen & ss == active.usb3_pssen & ss;
        if let Some(was) = &active.power_control_before {
            if target.is_kernel_default(self.detected.chipset) {
                // An apply back to the default was cut short before it un-pinned.
                self.write_power_control(was)?;
                self.save(&ActiveRouting {
                    power_control_before: None,
                    ..active.clone()
                })?;
            } else {
                // Cut short before the pin, or someone (a udev rule, powertop) put it
                // back to auto: the next runtime suspend would lose the routing.
                self.pin_power()?;
            }
        }
        if holds {
            return Ok(None);
        }
        self.write_registers(&now, &target)?;
        Ok(Some(Reapplied {
            profile: active.profile,
            found: now.xusb2pr,
            restored: active.xusb2pr,
        }))
    }

    /// Write exactly the registers that differ: 2 bytes at 0xD0, 4 at 0xD8.
    fn write_registers(&mut self, now: &Registers, target: &Registers) -> Result<(), RoutingError> {
        let path = self.space_path.clone();
        if target.usb3_pssen != now.usb3_pssen {
            self.space
                .write_u32(USB3_PSSEN, target.usb3_pssen)
                .map_err(|e| RoutingError::io("write", &path, e))?;
        }
        if target.xusb2pr != now.xusb2pr {
            self.space
                .write_u16(XUSB2PR, target.xusb2pr)
                .map_err(|e| RoutingError::io("write", &path, e))?;
            let read = self.registers()?.xusb2pr;
            if read != target.xusb2pr {
                return Err(RoutingError::ReadBack {
                    pci: self.detected.xhci,
                    wrote: target.xusb2pr,
                    read,
                });
            }
        }
        Ok(())
    }

    fn power_control_path(&self) -> String {
        format!("/sys/bus/pci/devices/{}/power/control", self.detected.xhci)
    }

    /// `power/control` now; `None` without runtime PM (an odd kernel, a fixture).
    pub fn power_control(&self) -> Result<Option<String>, RoutingError> {
        let host = self.power_control_path();
        self.root
            .read_attr(&host)
            .map_err(|e| RoutingError::io("read", self.root.path(&host), e))
    }

    /// Set `power/control` to `on` if it says anything else; the old value if changed.
    fn pin_power(&self) -> Result<Option<String>, RoutingError> {
        match self.power_control()? {
            // No runtime PM file (an odd kernel or a fixture without one): nothing to pin.
            None => Ok(None),
            Some(v) if v == "on" => Ok(None),
            Some(v) => {
                self.write_power_control("on")?;
                Ok(Some(v))
            }
        }
    }

    fn write_power_control(&self, value: &str) -> Result<(), RoutingError> {
        let host = self.power_control_path();
        self.root
            .write_attr(&host, value.as_bytes())
            .map_err(|e| RoutingError::io("write", self.root.path(&host), e))
    }

    /// Take the routing lock (blocking; holders only ever do a few file writes).
    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, RoutingError> {
        let path = self.root.path(LOCK_FILE);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| RoutingError::io("create", dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RoutingError::io("open", &path, e))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| RoutingError::io("lock", &path, errno.into()))
    }

    fn save(&self, active: &ActiveRouting) -> Result<(), RoutingError> {
        let path = self.root.path(STATE_FILE);
        let json = serde_json::to_string_pretty(active).expect("state serialises");
        crate::state::write_atomic(&path, json.as_bytes())
            .map_err(|e| RoutingError::io("write", &path, e))?;
        // The copy an earlier version left in /run would be read if this one vanished.
        let _ = std::fs::remove_file(self.root.path(LEGACY_STATE_FILE));
        Ok(())
    }
}
