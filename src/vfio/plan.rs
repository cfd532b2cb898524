//! Bind and restore as plans: the ordered list of writes and checks, computed purely
//! from a group's state, so `--dry-run` prints exactly what [`bind`](super::bind) does.

use super::group::IommuGroup;
use super::record::MemberState;
use super::VFIO_DRIVER;
use crate::inventory::PciAddress;
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// One thing bind or restore does, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Write the record of every member's driver (so `restore` can put them back).
    SaveRecord {
        /// Host path of the record.
        path: PathBuf,
    },
    /// `modprobe vfio-pci`.
    LoadModule {
        /// The module.
        module: String,
    },
    /// Write `value` to the attribute `path`.
    Write {
        /// The function this write is about.
        pci: PciAddress,
        /// Host path of the attribute.
        path: PathBuf,
        /// Exactly the bytes written.
        value: String,
        /// Why, for people.
        why: String,
    },
    /// Check that `pci` is bound to `driver` (the kernel accepts a probe write even when
    /// no driver takes the device, so the result must be read back).
    ExpectDriver {
        /// The function.
        pci: PciAddress,
        /// The driver it must be on.
        driver: String,
    },
    /// If re-probing did not give `pci` back to `driver`, unbind whatever took it and
    /// write the address to `/sys/bus/pci/drivers/<driver>/bind`.
    EnsureDriver {
        /// The function.
        pci: PciAddress,
        /// The driver it had before.
        driver: String,
    },
    /// Wait until `path` exists.
    WaitFor {
        /// Host path (`/dev/vfio/7`).
        path: PathBuf,
        /// How long at most.
        #[serde(with = "millis")]
        timeout: Duration,
    },
    /// Delete the record: everything is back.
    RemoveRecord {
        /// Host path of the record.
        path: PathBuf,
    },
}

mod millis {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SaveRecord { path } => write!(
                f,
                "save each member's current driver to {}  # for `controller restore`",
                path.display()
            ),
            Self::LoadModule { module } => {
                write!(
                    f,
                    "run `modprobe {module}`  # the {module} driver is not loaded"
                )
            }
            Self::Write {
                path, value, why, ..
            } => write!(f, "write {value:?} to {}  # {why}", path.display()),
            Self::ExpectDriver { pci, driver } => {
                write!(f, "check that {pci} is now bound to {driver}")
            }
            Self::EnsureDriver { pci, driver } => write!(
                f,
                "if {pci} is not back on {driver}: unbind it from whatever took it and write \
                 {:?} to /sys/bus/pci/drivers/{driver}/bind",
                pci.to_string()
            ),
            Self::WaitFor { path, timeout } => write!(
                f,
                "wait up to {} s for {} to appear",
                timeout.as_secs_f32(),
                path.display()
            ),
            Self::RemoveRecord { path } => write!(f, "delete {}", path.display()),
        }
    }
}

fn override_path(pci: &PciAddress) -> PathBuf {
    PathBuf::from(format!("/sys/bus/pci/devices/{pci}/driver_override"))
}

fn driver_attr(driver: &str, attr: &str) -> PathBuf {
    PathBuf::from(format!("/sys/bus/pci/drivers/{driver}/{attr}"))
}

const DRIVERS_PROBE: &str = "/sys/bus/pci/drivers_probe";

/// Move every non-bridge member of `group` to vfio-pci: for each, set `driver_override`,
/// unbind it from its driver (if any), re-probe, check; then wait for `/dev/vfio/N`.
/// Members already on vfio-pci are left alone.
pub fn bind_plan(
    group: &IommuGroup,
    vfio_loaded: bool,
    record: PathBuf,
    wait: Duration,
) -> Vec<Step> {
    let mut steps = vec![Step::SaveRecord { path: record }];
    if !vfio_loaded {
        steps.push(Step::LoadModule {
            module: VFIO_DRIVER.to_string(),
        });
    }
    for m in group.passed_members() {
        if m.driver.as_deref() == Some(VFIO_DRIVER) {
            continue;
        }
        let addr = m.pci.to_string();
        steps.push(Step::Write {
            pci: m.pci,
            path: override_path(&m.pci),
            value: VFIO_DRIVER.to_string(),
            why: format!("from now on only {VFIO_DRIVER} may take {addr}"),
        });
        if let Some(driver) = &m.driver {
            steps.push(Step::Write {
                pci: m.pci,
                path: driver_attr(driver, "unbind"),
                value: addr.clone(),
                why: format!("{driver} lets go of it"),
            });
        }
        steps.push(Step::Write {
            pci: m.pci,
            path: PathBuf::from(DRIVERS_PROBE),
            value: addr,
            why: format!("{VFIO_DRIVER} takes it"),
        });
        steps.push(Step::ExpectDriver {
            pci: m.pci,
            driver: VFIO_DRIVER.to_string(),
        });
    }
    steps.push(Step::WaitFor {
        path: group.dev_path(),
        timeout: wait,
    });
    steps
}

/// Put members back as `before` says, given how they are `now` (same functions).
/// Members go in reverse address order, the reverse of bind: an EHCI (function 7) comes
/// back before its UHCI/OHCI companions, as at boot. Only vfio-pci is unbound: a driver
/// someone else chose since is left alone.
pub fn restore_plan(
    before: &[MemberState],
    now: &[MemberState],
    record: Option<PathBuf>,
) -> Vec<Step> {
    let mut order: Vec<&MemberState> = before.iter().collect();
    order.sort_by_key(|m| std::cmp::Reverse(m.pci));
    let mut steps = Vec::new();
    for was in order {
        let Some(is) = now.iter().find(|n| n.pci == was.pci) else {
            continue;
        };
        let addr = was.pci.to_string();
        let mut driver_now = is.driver.clone();
        if driver_now.as_deref() == Some(VFIO_DRIVER) && was.driver.as_deref() != Some(VFIO_DRIVER)
        {
            steps.push(Step::Write {
                pci: was.pci,
                path: driver_attr(VFIO_DRIVER, "unbind"),
                value: addr.clone(),
                why: format!("{VFIO_DRIVER} lets go of it"),
            });
            driver_now = None;
        }
        if is.driver_override != was.driver_override {
            let value = match &was.driver_override {
                Some(o) => o.clone(),
                // A lone newline clears the override (the kernel shows "(null)" again).
                None => "\n".to_string(),
            };
            let why = match &was.driver_override {
                Some(o) => format!("{addr} goes back to its earlier override {o}"),
                None => format!("any driver may take {addr} again"),
            };
            steps.push(Step::Write {
                pci: was.pci,
                path: override_path(&was.pci),
                value,
                why,
            });
        }
        if let Some(driver) = &was.driver {
            if driver_now.as_ref() != Some(driver) {
                steps.push(Step::Write {
                    pci: was.pci,
                    path: PathBuf::from(DRIVERS_PROBE),
                    value: addr,
                    why: format!("the kernel gives it a driver again (it had {driver})"),
                });
                steps.push(Step::EnsureDriver {
                    pci: was.pci,
                    driver: driver.clone(),
                });
            }
        }
    }
    if let Some(path) = record {
        steps.push(Step::RemoveRecord { path });
    }
    steps
}

/// Restore without a bind record (bound by hand, or the record is gone): every member on
/// vfio-pci is unbound, its vfio-pci override cleared, and re-probed so the kernel picks
/// its default driver.
pub fn restore_plan_without_record(now: &[MemberState]) -> Vec<Step> {
    let mut order: Vec<&MemberState> = now.iter().collect();
    order.sort_by_key(|m| std::cmp::Reverse(m.pci));
    let mut steps = Vec::new();
    for is in order {
        let addr = is.pci.to_string();
        let on_vfio = is.driver.as_deref() == Some(VFIO_DRIVER);
        let vfio_override = is.driver_override.as_deref() == Some(VFIO_DRIVER);
        if on_vfio {
            steps.push(Step::Write {
                pci: is.pci,
                path: driver_attr(VFIO_DRIVER, "unbind"),
                value: addr.clone(),
                why: format!("{VFIO_DRIVER} lets go of it"),
            });
        }
        if vfio_override {
            steps.push(Step::Write {
                pci: is.pci,
                path: override_path(&is.pci),
                value: "\n".to_string(),
                why: format!("any driver may take {addr} again"),
            });
        }
        if on_vfio || (vfio_override && is.driver.is_none()) {
            steps.push(Step::Write {
                pci: is.pci,
                path: PathBuf::from(DRIVERS_PROBE),
                value: addr,
                why: "the kernel gives it its default driver (no record of an earlier one)"
                    .to_string(),
            });
        }
    }
    steps
}
