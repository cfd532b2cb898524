//! Answers to control requests: read from the engine's published status, or turned into
//! engine inputs (overrides). Anything that waits (an attach being confirmed, a `why`)
//! runs in its own task, so the daemon loop never waits on a VM.

use super::event_loop::Daemon;
use super::protocol::{
    ControllerStatus, DeviceStatus, ErrorKind, Followed, Pending, Reply, Request, RuleVerdict,
    StatusReport, VmDevice, VmStatus, WhyDevice, WhyReport,
};
use crate::backend::{AttachMode, VmBackend};
use crate::engine::coordinator::{EngineHandle, Input as EngineInput, Status};
use crate::engine::Settled;
use crate::inventory::Device;
use crate::policy::{Override, OverrideAction, Reason, RuleMatch};
use crate::selector::Selector;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long `attach`/`detach` wait for the VM to confirm before answering "still pending".
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    pub(super) fn on_request(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        let answer = match request {
            Request::Status {} => Reply::Status(Box::new(self.status())),
            Request::Reload {} => match self.reload() {
                Ok(msg) => Reply::done(msg),
                Err(msg) => Reply::error(ErrorKind::Failed, msg),
            },
            Request::Clear { selector } => self.clear(&selector),
            Request::Routing { line } => {
                let answer = self.routing.control_line(line);
                tokio::spawn(async move { reply.send(answer.await) });
                return;
            }
            Request::Why { selector } => match self.matching(&selector) {
                Ok(devices) => {
                    tokio::spawn(why(self.engine.clone(), devices, reply));
                    return;
                }
                Err(r) => r,
            },
            Request::Attach { selector, vm, by } => {
                match self.set_override(&selector, Some((vm, by))) {
                    Ok(wait) => {
                        tokio::spawn(wait.confirm(self.engine.clone(), reply));
                        return;
                    }
                    Err(r) => r,
                }
            }
            Request::VmDevices { vm } => match self.connected_backend(&vm) {
                Ok(backend) => {
                    tokio::spawn(vm_devices(vm, backend, reply));
                    return;
                }
                Err(r) => r,
            },
            Request::Detach { selector } => match self.set_override(&selector, None) {
                Ok(wait) => {
                    tokio::spawn(wait.confirm(self.engine.clone(), reply));
                    return;
                }
                Err(r) => r,
            },
        };
        let _ = reply.send(answer);
    }

    fn status(&self) -> StatusReport {
        let engine = self.engine.status();
        let s = engine.borrow();
        StatusReport {
            at_rest: self.at_rest(&s),
            config: self.config.origin.as_ref().map(|p| p.display().to_string()),
            dry_run: self.options.dry_run,
            vms: self
                .vms
                .iter()
                .map(|(name, v)| VmStatus {
                    name: name.clone(),
                    qmp: v.target.to_string(),
                    up: v.up,
                    monitor_held: v.held.is_some(),
                    devices: s
                        .vms
                        .get(name)
                        .map(|view| {
                            view.devices
                                .iter()
                                .filter(|e| e.is_ours())
                                .map(|e| e.id.clone())
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            devices: self
                .snapshot
                .devices
                .iter()
                .map(|d| device_status(&s, d))
                .collect(),
            controllers: s
                .controllers
                .iter()
                .map(|o| ControllerStatus {
                    pci: o.pci.to_string(),
                    vm: o.vm.clone(),
                    ok: o.ok,
                    message: o.message.clone(),
                })
                .collect(),
            sysfs_error: self.scan_failure.as_ref().map(ToString::to_string),
            routing: s.routing.clone(),
        }
    }

    /// The daemon's connected backend of VM `vm`: `not_found` for a VM the config does
    /// not name, `failed` while it is down.
    fn connected_backend(&self, vm: &str) -> Result<Arc<dyn VmBackend>, Reply> {
        let Some(presence) = self.vms.get(vm) else {
            let known: Vec<&str> = self.vms.keys().map(String::as_str).collect();
            return Err(Reply::error(
                ErrorKind::NotFound,
                format!(
                    "no VM named `{vm}` that the daemon manages (managed: {})",
                    known.join(", ")
                ),
            ));
        };
        let held = presence
            .held
            .as_ref()
            .map_or(String::new(), |h| format!(": {h}"));
        presence.backend.clone().ok_or_else(|| {
            Reply::error(
                ErrorKind::Failed,
                format!("VM {vm} is down: the daemon has no connection to it{held}"),
            )
        })
    }

    fn matching(&self, selector: &str) -> Result<Vec<Device>, Reply> {
        let sel: Selector = selector
            .parse()
            .map_err(|e: crate::selector::SelectorError| {
                Reply::error(ErrorKind::BadRequest, e.to_string())
            })?;
        let found: Vec<Device> = self
            .snapshot
            .devices
            .iter()
            .filter(|d| sel.matches(d))
            .cloned()
            .collect();
        if found.is_empty() {
            return Err(Reply::error(
                ErrorKind::NotFound,
                format!(
                    "no USB device matches `{selector}`; `usbroute list` shows what is plugged in"
                ),
            ));
        }
        Ok(found)
    }

    fn clear(&mut self, selector: &str) -> Reply {
        let devices = match self.matching(selector) {
            Ok(d) => d,
            Err(reply) => return reply,
        };
        for d in &devices {
            self.engine.send(EngineInput::Override {
                port: d.port.clone(),
                value: None,
            });
        }
        Reply::done(format!(
            "cleared the overrides of {} device(s); the rules decide again",
            devices.len()
        ))
    }

    /// `attach` (`to` = Some) or `detach` (`to` = None) of exactly one device: set the
    /// override and return what to wait for.
    fn set_override(
        &mut self,
        selector: &str,
        to: Option<(String, Option<AttachMode>)>,
    ) -> Result<Confirmation, Reply> {
        let devices = self.matching(selector)?;
        let [device] = <[Device; 1]>::try_from(devices).map_err(|d| {
            let ports: Vec<String> = d.iter().map(|d| d.port.to_string()).collect();
            Reply::error(
                ErrorKind::Ambiguous,
                format!(
                    "`{selector}` matches {} devices ({}); name one, e.g. port:{}",
                    d.len(),
                    ports.join(", "),
                    ports[0]
                ),
            )
        })?;
        if let Some((vm, _)) = &to {
            if self.config.vm(vm).is_none() {
                let known: Vec<&str> = self.config.vms.iter().map(|v| v.name.as_str()).collect();
                return Err(Reply::error(
                    ErrorKind::NotFound,
                    format!(
                        "no VM named `{vm}` in the config (known: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        // Without `by`: how a rule passing this device to that VM would attach it, else
        // by address.
        let to = to.map(|(vm, by)| {
            let mode = by.unwrap_or_else(|| {
                let rules = self.engine.status();
                let mode = rules.borrow().rule_mode(&device, &vm);
                mode.unwrap_or_default()
            });
            (vm, mode)
        });
        let action = match &to {
            Some((vm, mode)) => OverrideAction::Attach {
                vm: vm.clone(),
                mode: *mode,
                force: false,
            },
            None => OverrideAction::Detach,
        };
        tracing::info!(device = %device.port, vm = to.as_ref().map_or("host", |(v, _)| v.as_str()), "manual override");
        self.engine.send(EngineInput::Override {
            port: device.port.clone(),
            value: Some(Override {
                address: device.address,
                action,
            }),
        });
        Ok(Confirmation {
            device,
            to,
            dry_run: self.options.dry_run,
        })
    }
}

/// One device present on the host, as `status` shows it. A device the engine has not
/// planned yet (it appeared after the engine's last round) is shown as `planning`.
fn device_status(s: &Status, d: &Device) -> DeviceStatus {
    let state = s.device(d);
    let (desired, reason) = match state.decision {
        Some(decision) => (decision.placement.to_string(), decision.reason.to_string()),
        None => (
            PLANNING.to_string(),
            "just seen: the daemon has not decided about it yet".to_string(),
        ),
    };
    DeviceStatus {
        port: d.port.to_string(),
        address: d.address.map(|a| format!("{}:{a}", d.bus)),
        label: d.label(),
        location: state.holder.unwrap_or_else(|| "host".into()),
        desired,
        reason,
        manual_override: state.manual_override.map(|o| match &o.action {
            OverrideAction::Detach => "detach".to_string(),
            OverrideAction::Attach { vm, .. } => format!("attach:{vm}"),
        }),
        pending: state.pending.map(|p| Pending {
            action: format!("{} in VM {}", p.id, p.vm),
            attempts: p.failures,
            last_error: p.last_error.clone(),
        }),
    }
}

/// `desired` of a device the engine has not planned yet.
const PLANNING: &str = "planning";

/// What an `attach`/`detach` request waits for.
struct Confirmation {
    device: Device,
    to: Option<(String, AttachMode)>,
    dry_run: bool,
}

impl Confirmation {
    /// Watch the engine's status until the device is where it was asked to be, the plan
    /// says why it cannot be, or an attempt failed; then reply.
    async fn confirm(self, engine: EngineHandle, reply: oneshot::Sender<Reply>) {
        let port = self.device.port.clone();
        let target = self
            .to
            .as_ref()
            .map_or("host".to_string(), |(vm, _)| vm.clone());
        if self.dry_run {
            let _ = reply.send(Reply::done(format!(
                "dry run: override set, {port} → {target}; nothing is done"
            )));
            return;
        }
        let mut status = engine.status();
        let verdict = tokio::time::timeout(CONFIRM_TIMEOUT, async {
            loop {
                if let Some(answer) = self.settled(&status.borrow_and_update()) {
                    return answer;
                }
                if status.changed().await.is_err() {
                    return Reply::error(ErrorKind::Failed, "the engine stopped");
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            Reply::done(format!(
                "override set: {port} → {target}; not confirmed within {} s, see `usbroute status`",
                CONFIRM_TIMEOUT.as_secs()
            ))
        });
        let _ = reply.send(verdict);
    }

    fn settled(&self, s: &Status) -> Option<Reply> {
        let port = &self.device.port;
        let to = self.to.as_ref().map(|(vm, mode)| (vm.as_str(), *mode));
        Some(match s.settled(&self.device, to)? {
            Settled::OnHost => Reply::done(format!(
                "{port} is on the host (until unplugged or a `clear` request)"
            )),
            Settled::Attached { vm } => {
                Reply::done(format!("{port} attached to VM {vm} (confirmed by the VM)"))
            }
            Settled::StaysOnHost { reason } => Reply::done(format!(
                "override set, but {port} stays on the host for now: {reason}"
            )),
            Settled::Failed(p) => Reply::error(
                ErrorKind::Failed,
                format!(
                    "{} in VM {} failed: {}; the daemon keeps retrying (see `usbroute status`)",
                    p.id, p.vm, p.last_error
                ),
            ),
        })
    }
}

/// Answer `vm_devices` from the VM itself, over the daemon's connection (its own task:
/// a slow VM delays only this reply).
async fn vm_devices(vm: String, backend: Arc<dyn VmBackend>, reply: oneshot::Sender<Reply>) {
    let answer = match backend.list().await {
        Ok(listed) => Reply::VmDevices {
            vm,
            devices: listed.iter().map(VmDevice::from).collect(),
        },
        Err(e) => Reply::error(ErrorKind::Failed, crate::error_chain::one_line(&e)),
    };
    let _ = reply.send(answer);
}

/// Answer `why` for each device from the engine.
async fn why(engine: EngineHandle, devices: Vec<Device>, reply: oneshot::Sender<Reply>) {
    let mut out = Vec::new();
    for d in devices {
        let Some(w) = engine.why(d.port.clone()).await else {
            continue;
        };
        let rules = w
            .rules
            .into_iter()
            .map(|(rule, verdict)| {
                let (matched, decided, detail) = match verdict {
                    RuleMatch::Decided => (true, true, "decided".to_string()),
                    RuleMatch::Outranked { by, .. } => (true, false, format!("matched, but {by}")),
                    RuleMatch::NoMatch { terms } => (false, false, terms.join("; ")),
                };
                RuleVerdict {
                    rule: rule.text,
                    matched,
                    decided,
                    detail,
                }
            })
            .collect();
        out.push(WhyDevice {
            port: d.port.to_string(),
            physical_port: d.physical_port.as_ref().map(ToString::to_string),
            label: d.label(),
            target: w.decision.placement.to_string(),
            reason: w.decision.reason.to_string(),
            rules,
            followed: followed(&w.decision.reason),
        });
    }
    let _ = reply.send(Reply::Why(WhyReport { devices: out }));
}

/// What a followed device came after, for `why --json`.
fn followed(reason: &Reason) -> Option<Followed> {
    let Reason::Followed {
        rule,
        previous,
        after_ms,
    } = reason
    else {
        return None;
    };
    let id = previous
        .vendor_id
        .zip(previous.product_id)
        .map(|(v, p)| format!("{v}:{p}"));
    Some(Followed {
        rule: rule.text.clone(),
        port: previous.port.to_string(),
        physical_port: previous.physical_port.to_string(),
        id,
        left_at: previous.left_at.clone(),
        after_ms: *after_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Decision, Placement, Reason};

    #[test]
    fn status_shows_a_device_the_engine_has_not_planned_yet_as_planning() {
        let planned = Device {
            address: Some(5),
            ..Device::at("1-3".parse().unwrap())
        };
        let new = Device {
            address: Some(6),
            ..Device::at("1-4".parse().unwrap())
        };
        let mut s = Status::default();
        s.desired.devices.insert(
            planned.port.clone(),
            Decision {
                placement: Placement::Host,
                reason: Reason::NoRule,
            },
        );

        let rows: Vec<(String, String, String)> = [&planned, &new]
            .into_iter()
            .map(|d| device_status(&s, d))
            .map(|row| (row.port, row.location, row.desired))
            .collect();

        assert_eq!(
            rows,
            [
                ("1-3".to_string(), "host".to_string(), "host".to_string()),
                (
                    "1-4".to_string(),
                    "host".to_string(),
                    "planning".to_string()
                ),
            ]
        );
    }

    #[test]
    fn why_json_says_what_a_followed_device_came_after_and_nothing_for_others() {
        let previous = crate::policy::Departed {
            port: "1-3".parse().unwrap(),
            physical_port: "0000:00:14.0/3".parse().unwrap(),
            vendor_id: Some(crate::inventory::HexId(0x0627)),
            product_id: Some(crate::inventory::HexId(0x0001)),
            left_at: "2026-12-01T19:55:04Z".into(),
        };
        let rule = crate::policy::RuleRef {
            index: 0,
            line: 4,
            text: "rule 1".into(),
        };
        let reason = Reason::Followed {
            rule,
            previous,
            after_ms: 1500,
        };

        let json = serde_json::to_value(followed(&reason)).unwrap();

        assert_eq!(
            json,
            serde_json::json!({"rule": "rule 1", "port": "1-3", "physical_port": "0000:00:14.0/3",
                "id": "0627:0001", "left_at": "2026-12-01T19:55:04Z", "after_ms": 1500})
        );
        assert_eq!(followed(&Reason::NoRule), None);
    }
}
