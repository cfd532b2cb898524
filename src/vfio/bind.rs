//! Carrying out bind and restore plans through a [`PciHost`], with roll-back.

use super::group::{read_group, IommuGroup};
use super::host::PciHost;
use super::plan::{bind_plan, restore_plan, restore_plan_without_record, Step};
use super::record::{BindRecord, MemberState};
use super::verdict::{assess, PassthroughVerdict};
use super::{CpuVendor, VfioError, VFIO_DRIVER};
use crate::inventory::PciAddress;
use crate::sysfs::SysfsRoot;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How bind and restore behave.
#[derive(Debug, Clone)]
pub struct BindOptions {
    /// Take groups whose members look needed by the host.
    pub force: bool,
    /// How long to wait for `/dev/vfio/N`.
    pub wait: Duration,
    /// How long a driver may take to show up after a probe or bind write.
    pub settle: Duration,
}

impl Default for BindOptions {
    fn default() -> Self {
        Self {
            force: false,
            wait: Duration::from_secs(10),
            settle: Duration::from_secs(2),
        }
    }
}

/// A bind worked out but not yet done: what `--dry-run` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BindPlan {
    /// The verdict the bind is based on.
    pub verdict: PassthroughVerdict,
    /// The group as it is now.
    pub group: IommuGroup,
    /// What will be recorded.
    pub record: BindRecord,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// A finished bind.
#[derive(Debug, Clone, Serialize)]
pub struct BindOutcome {
    /// The IOMMU group now on vfio-pci.
    pub group: u32,
    /// `/dev/vfio/N`, for QEMU.
    pub dev_path: PathBuf,
    /// Where the record is.
    pub record: PathBuf,
    /// Each member before and after.
    pub members: Vec<MemberChange>,
    /// `true` when there was nothing to do.
    pub already_bound: bool,
}

/// A member before and after bind or restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberChange {
    /// How it was.
    pub before: MemberState,
    /// How it is now.
    pub now: MemberState,
}

/// A finished restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreOutcome {
    /// The IOMMU group.
    pub group: u32,
    /// `false` when there was no record (each member got the kernel's default driver).
    pub had_record: bool,
    /// Each member before and after.
    pub members: Vec<MemberChange>,
}

/// Work out the bind of `pci`'s whole group: refuses when there is no IOMMU group, and,
/// unless `opts.force`, when `pci` is not a USB controller or members look needed by
/// the host.
pub fn plan_bind(
    root: &SysfsRoot,
    host: &dyn PciHost,
    pci: &PciAddress,
    opts: &BindOptions,
) -> Result<BindPlan, VfioError> {
    let verdict = assess(root, pci)?;
    let Some(group) = read_group(root, pci)? else {
        return Err(VfioError::NoIommuGroup {
            pci: *pci,
            hint: CpuVendor::read(root).enable_hint(),
        });
    };
    if group.passed_members().next().is_none() {
        return Err(VfioError::OnlyBridges {
            pci: *pci,
            group: group.number,
        });
    }
    let target = group.members.iter().find(|m| m.pci == *pci);
    let is_usb = target
        .and_then(|m| m.class)
        .and_then(crate::inventory::ControllerKind::from_pci_class)
        .is_some();
    if !is_usb && !opts.force {
        return Err(VfioError::NotUsbController {
            pci: *pci,
            kind: target.map_or_else(|| "PCI device".to_string(), |m| m.kind_label()),
        });
    }
    if verdict.needs_force && !opts.force {
        return Err(VfioError::HostNeedsGroup {
            group: group.number,
            reasons: verdict.host_needs.join("; "),
        });
    }
    // After a crash half-way, members already on vfio-pci must keep the driver they had
    // before the first attempt, not "vfio-pci".
    let earlier = BindRecord::load(root, group.number)?;
    let members = group
        .passed_members()
        .map(|m| {
            earlier
                .as_ref()
                .and_then(|r| r.members.iter().find(|e| e.pci == m.pci).cloned())
                .unwrap_or_else(|| MemberState {
                    pci: m.pci,
                    driver: m.driver.clone(),
                    driver_override: m.driver_override.clone(),
                })
        })
        .collect();
    let record = BindRecord {
        version: 1,
        group: group.number,
        controller: *pci,
        members,
        boot_id: crate::state::boot_id(root),
    };
    let vfio_loaded = host.exists(Path::new("/sys/bus/pci/drivers/vfio-pci"));
    let mut steps = bind_plan(
        &group,
        vfio_loaded,
        BindRecord::path(group.number),
        opts.wait,
    );
    if verdict.on_vfio && earlier.is_none() {
        // Bound by someone else (driverctl, a script): a record would claim vfio-pci was
        // the earlier driver; without one, restore gives each member its default driver.
        steps.retain(|s| !matches!(s, Step::SaveRecord { .. }));
    }
    Ok(BindPlan {
        verdict,
        group,
        record,
        steps,
    })
}

/// Move `pci`'s whole IOMMU group (bridges aside) to vfio-pci. On a failure half-way,
/// everything done is undone and the error says what state each member is in.
pub fn bind(
    root: &SysfsRoot,
    host: &dyn PciHost,
    pci: &PciAddress,
    opts: &BindOptions,
) -> Result<BindOutcome, VfioError> {
    let plan = plan_bind(root, host, pci, opts)?;
    execute_bind(root, host, &plan, opts)
}

/// Carry out a [`BindPlan`].
pub fn execute_bind(
    root: &SysfsRoot,
    host: &dyn PciHost,
    plan: &BindPlan,
    opts: &BindOptions,
) -> Result<BindOutcome, VfioError> {
    let group = plan.group.number;
    let before = &plan.record.members;
    let already_bound = plan.verdict.on_vfio;
    for (index, step) in plan.steps.iter().enumerate() {
        let Err(cause) = run_step(root, host, step, Some(&plan.record), opts) else {
            continue;
        };
        if index == 0 {
            // Not even the record could be written: nothing was touched.
            return Err(VfioError::BindFailed {
                group,
                step: step.to_string(),
                cause,
                report: "Nothing was changed.".to_string(),
            });
        }
        let now = current_states(host, before);
        let undo = restore_plan(before, &now, Some(BindRecord::path(group)));
        let problems = run_all(root, host, &undo, opts);
        let after = current_states(host, before);
        let mut report = if problems.is_empty() {
            "Rolled back.".to_string()
        } else {
            format!("Rolling back failed too: {}.", problems.join("; "))
        };
        report.push_str(" Each member now: ");
        report.push_str(&state_report(before, &after));
        return Err(VfioError::BindFailed {
            group,
            step: step.to_string(),
            cause,
            report,
        });
    }
    Ok(BindOutcome {
        group,
        dev_path: plan.group.dev_path(),
        record: BindRecord::path(group),
        members: changes(before, &current_states(host, before)),
        already_bound,
    })
}

/// Work out the restore of `pci`'s group: from its bind record if there is one, else
/// every member on vfio-pci goes back to the kernel's default driver.
pub fn plan_restore(
    root: &SysfsRoot,
    host: &dyn PciHost,
    pci: &PciAddress,
) -> Result<(IommuGroup, Option<BindRecord>, Vec<Step>), VfioError> {
    let Some(group) = read_group(root, pci)? else {
        return Err(VfioError::NoIommuGroup {
            pci: *pci,
            hint: CpuVendor::read(root).enable_hint(),
        });
    };
    let record = BindRecord::load(root, group.number)?;
    let steps = match &record {
        Some(r) => restore_plan(
            &r.members,
            &current_states(host, &r.members),
            Some(BindRecord::path(group.number)),
        ),
        None => {
            let members: Vec<MemberState> = group
                .passed_members()
                .map(|m| MemberState {
                    pci: m.pci,
                    driver: None,
                    driver_override: None,
                })
                .collect();
            restore_plan_without_record(&current_states(host, &members))
        }
    };
    Ok((group, record, steps))
}

/// Put `pci`'s group back as it was before `bind`. Goes on past a failing member so the
/// others still come back; the record is kept unless everything worked.
pub fn restore(
    root: &SysfsRoot,
    host: &dyn PciHost,
    pci: &PciAddress,
    opts: &BindOptions,
) -> Result<RestoreOutcome, VfioError> {
    let (group, record, steps) = plan_restore(root, host, pci)?;
    let before: Vec<MemberState> = match &record {
        Some(r) => r.members.clone(),
        None => current_states(
            host,
            &group
                .passed_members()
                .map(|m| MemberState {
                    pci: m.pci,
                    driver: None,
                    driver_override: None,
                })
                .collect::<Vec<_>>(),
        ),
    };
    let mut problems = Vec::new();
    for step in &steps {
        if matches!(step, Step::RemoveRecord { .. }) && !problems.is_empty() {
            break;
        }
        if let Err(cause) = run_step(root, host, step, record.as_ref(), opts) {
            problems.push(format!("{step}: {cause}"));
        }
    }
    let now = current_states(host, &before);
    // Judge by the drivers read back, never by the steps alone: a write the kernel
    // accepted may still leave a member on vfio-pci.
    problems.extend(still_on_vfio(&before, &now, record.is_some()));
    if !problems.is_empty() {
        return Err(VfioError::RestoreFailed {
            group: group.number,
            problems: problems.join("; "),
            report: state_report(&before, &now),
        });
    }
    Ok(RestoreOutcome {
        group: group.number,
        had_record: record.is_some(),
        members: changes(&before, &now),
    })
}

/// The members a restore should have taken off vfio-pci that are still on it: every
/// member without a record, else those whose recorded driver was not vfio-pci.
fn still_on_vfio(before: &[MemberState], now: &[MemberState], had_record: bool) -> Vec<String> {
    before
        .iter()
        .zip(now)
        .filter(|(b, n)| {
            let wanted_off = !had_record || b.driver.as_deref() != Some(VFIO_DRIVER);
            wanted_off && n.driver.as_deref() == Some(VFIO_DRIVER)
        })
        .map(|(_, n)| format!("{} is still on {VFIO_DRIVER}", n.pci))
        .collect()
}

/// Run every step, collecting failures (used for roll-back, which must not stop).
fn run_all(
    root: &SysfsRoot,
    host: &dyn PciHost,
    steps: &[Step],
    opts: &BindOptions,
) -> Vec<String> {
    steps
        .iter()
        .filter_map(|s| {
            run_step(root, host, s, None, opts)
                .err()
                .map(|e| format!("{s}: {e}"))
        })
        .collect()
}

fn run_step(
    root: &SysfsRoot,
    host: &dyn PciHost,
    step: &Step,
    record: Option<&BindRecord>,
    opts: &BindOptions,
) -> Result<(), String> {
    match step {
        Step::SaveRecord { .. } => match record {
            Some(r) => r.save(root).map_err(|e| crate::error_chain::one_line(&e)),
            None => Ok(()),
        },
        Step::LoadModule { module } => {
            host.load_module(module).map_err(|e| e.to_string())?;
            let dir = PathBuf::from(format!("/sys/bus/pci/drivers/{VFIO_DRIVER}"));
            if poll(opts.settle, || host.exists(&dir)) {
                Ok(())
            } else {
                Err(format!(
                    "{module} loaded but {} did not appear",
                    dir.display()
                ))
            }
        }
        Step::Write { path, value, .. } => host
            .write_attr(path, value.as_bytes())
            .map_err(|e| format!("the kernel refused it ({e})")),
        Step::ExpectDriver { pci, driver } => {
            if poll(opts.settle, || {
                host.driver_of(pci).as_deref() == Some(driver)
            }) {
                Ok(())
            } else {
                Err(format!(
                    "{pci} is on {} instead of {driver}; the kernel log (`dmesg`) says why",
                    driver_name(host.driver_of(pci).as_deref())
                ))
            }
        }
        Step::EnsureDriver { pci, driver } => ensure_driver(host, pci, driver, opts),
        Step::WaitFor { path, timeout } => {
            if poll(*timeout, || host.exists(path)) {
                Ok(())
            } else {
                Err(format!(
                    "{} did not appear within {} s (is vfio-pci working? see `dmesg`)",
                    path.display(),
                    timeout.as_secs_f32()
                ))
            }
        }
        Step::RemoveRecord { path } => {
            let group = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok());
            match group {
                Some(g) => {
                    BindRecord::remove(root, g).map_err(|e| crate::error_chain::one_line(&e))
                }
                None => Ok(()),
            }
        }
    }
}

/// After a re-probe: if `pci` is not on `driver`, take it from whatever has it and bind
/// it to `driver` by name (the kernel's default may differ from what the user had).
fn ensure_driver(
    host: &dyn PciHost,
    pci: &PciAddress,
    driver: &str,
    opts: &BindOptions,
) -> Result<(), String> {
    if poll(opts.settle, || {
        host.driver_of(pci).as_deref() == Some(driver)
    }) {
        return Ok(());
    }
    let addr = pci.to_string();
    if let Some(other) = host.driver_of(pci) {
        let unbind = PathBuf::from(format!("/sys/bus/pci/drivers/{other}/unbind"));
        host.write_attr(&unbind, addr.as_bytes())
            .map_err(|e| format!("taking {pci} from {other} failed ({e})"))?;
    }
    let bind = PathBuf::from(format!("/sys/bus/pci/drivers/{driver}/bind"));
    host.write_attr(&bind, addr.as_bytes()).map_err(|e| {
        format!(
            "writing {addr:?} to {} failed ({e}); is the {driver} module loaded?",
            bind.display()
        )
    })?;
    if poll(opts.settle, || {
        host.driver_of(pci).as_deref() == Some(driver)
    }) {
        Ok(())
    } else {
        Err(format!("{pci} did not go back to {driver}"))
    }
}

/// Call `ready` until it says yes or `limit` has passed (at least once).
fn poll(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn current_states(host: &dyn PciHost, members: &[MemberState]) -> Vec<MemberState> {
    members
        .iter()
        .map(|m| MemberState {
            pci: m.pci,
            driver: host.driver_of(&m.pci),
            driver_override: super::group::parse_override(host.read_attr(&PathBuf::from(format!(
                "/sys/bus/pci/devices/{}/driver_override",
                m.pci
            )))),
        })
        .collect()
}

fn changes(before: &[MemberState], now: &[MemberState]) -> Vec<MemberChange> {
    before
        .iter()
        .zip(now)
        .map(|(b, n)| MemberChange {
            before: b.clone(),
            now: n.clone(),
        })
        .collect()
}

fn driver_name(driver: Option<&str>) -> String {
    driver.map_or_else(|| "no driver".to_string(), str::to_string)
}

/// `0000:00:1d.0 on uhci_hcd (as before), 0000:00:1d.7 on no driver (was ehci-pci)`.
fn state_report(before: &[MemberState], now: &[MemberState]) -> String {
    before
        .iter()
        .zip(now)
        .map(|(b, n)| {
            let state = format!("{} on {}", n.pci, driver_name(n.driver.as_deref()));
            let over = match &n.driver_override {
                Some(o) if n.driver_override != b.driver_override => {
                    format!(", driver_override {o}")
                }
                _ => String::new(),
            };
            if b.driver == n.driver && b.driver_override == n.driver_override {
                format!("{state} (as before)")
            } else {
                format!("{state}{over} (was {})", driver_name(b.driver.as_deref()))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
