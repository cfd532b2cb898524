//! Answers to control requests, computed inside the daemon loop.

use super::actions::Action;
use super::decide::{why_entry, Override, Target};
use super::protocol::{
    DeviceStatus, ErrorKind, Pending, Reply, Request, StatusReport, VmStatus, WhyReport,
};
use super::runtime::{Daemon, Waiter};
use crate::backend::AttachMode;
use crate::inventory::Device;
use crate::selector::Selector;
use tokio::sync::oneshot;
use tokio::time::Instant;

impl Daemon {
    pub(super) fn on_request(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        let answer = match request {
            Request::Status {} => Some(Reply::Status(self.status())),
            Request::Why { selector } => Some(self.why(&selector)),
            Request::Reload {} => Some(match self.reload() {
                Ok(msg) => Reply::done(msg),
                Err(msg) => Reply::error(ErrorKind::Failed, msg),
            }),
            Request::Clear { selector } => Some(self.clear(&selector)),
            Request::Attach { selector, vm, by } => {
                return self.set_override(&selector, Some((vm, by.unwrap_or_default())), reply)
            }
            Request::Detach { selector } => return self.set_override(&selector, None, reply),
        };
        if let Some(answer) = answer {
            let _ = reply.send(answer);
        }
    }

    fn status(&self) -> StatusReport {
        let now = Instant::now();
        let devices = self
            .decisions
            .iter()
            .map(|d| {
                let location = self
                    .vms
                    .iter()
                    .find(|(_, v)| {
                        v.devices
                            .iter()
                            .any(|h| h.ours && super::decide::holds_any(h, &d.device))
                    })
                    .map_or("host".to_string(), |(n, _)| n.clone());
                let pending = self
                    .retries
                    .iter()
                    .find(|((_, key), _)| {
                        key.starts_with("attach ") && key.contains(&format!(" {} ", d.device.port))
                    })
                    .map(|((vm, key), r)| Pending {
                        action: format!("{key} in VM {vm}"),
                        attempts: r.attempts,
                        last_error: r.last_error.clone(),
                        retry_in_ms: r.due.saturating_duration_since(now).as_millis() as u64,
                    });
                DeviceStatus {
                    port: d.device.port.to_string(),
                    address: d.device.address.map(|a| format!("{}:{a}", d.device.bus)),
                    label: d.device.label(),
                    location,
                    desired: d.target.label().to_string(),
                    reason: d.reason.clone(),
                    manual_override: self.overrides.get(&d.device.port).map(|o| match &o.target {
                        Target::Host => "detach".to_string(),
                        Target::Vm { name, .. } => format!("attach:{name}"),
                    }),
                    pending,
                }
            })
            .collect();
        StatusReport {
            config: self.policy.origin().map(|p| p.display().to_string()),
            dry_run: self.options.dry_run,
            vms: self
                .vms
                .iter()
                .map(|(name, v)| VmStatus {
                    name: name.clone(),
                    qmp: v.qmp.display().to_string(),
                    up: v.up,
                    devices: v
                        .devices
                        .iter()
                        .filter(|h| h.ours)
                        .map(|h| h.id.clone())
                        .collect(),
                })
                .collect(),
            devices,
        }
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

    fn why(&self, selector: &str) -> Reply {
        let devices = match self.matching(selector) {
            Ok(d) => d,
            Err(reply) => return reply,
        };
        let entries = devices
            .iter()
            .filter_map(|dev| {
                let decision = self.decisions.iter().find(|d| d.device.port == dev.port)?;
                Some(why_entry(
                    decision,
                    self.policy.verdicts(&self.snapshot, dev),
                ))
            })
            .collect();
        Reply::Why(WhyReport { devices: entries })
    }

    fn clear(&mut self, selector: &str) -> Reply {
        let devices = match self.matching(selector) {
            Ok(d) => d,
            Err(reply) => return reply,
        };
        let cleared = devices
            .iter()
            .filter(|d| self.overrides.remove(&d.port).is_some())
            .count();
        self.reconcile();
        Reply::done(format!(
            "cleared {cleared} override(s); the rules decide again"
        ))
    }

    /// `attach` (`to` = Some) or `detach` (`to` = None): set the override, reconcile, and
    /// answer once the VM confirmed (or at once when nothing needs doing or the VM is down).
    fn set_override(
        &mut self,
        selector: &str,
        to: Option<(String, AttachMode)>,
        reply: oneshot::Sender<Reply>,
    ) {
        let device = match self.matching(selector) {
            Ok(d) if d.len() == 1 => d.into_iter().next().expect("one device"),
            Ok(d) => {
                let ports: Vec<String> = d.iter().map(|d| d.port.to_string()).collect();
                let msg = format!(
                    "`{selector}` matches {} devices ({}); name one, e.g. port:{}",
                    d.len(),
                    ports.join(", "),
                    ports[0]
                );
                let _ = reply.send(Reply::error(ErrorKind::Ambiguous, msg));
                return;
            }
            Err(r) => {
                let _ = reply.send(r);
                return;
            }
        };
        if device.hub {
            let msg = format!("{} is a hub: hubs cannot be passed to a VM (QEMU skips them); pass the devices behind it", device.port);
            let _ = reply.send(Reply::error(ErrorKind::Failed, msg));
            return;
        }
        let target = match &to {
            Some((vm, mode)) => {
                if !self.vms.contains_key(vm) {
                    let known: Vec<&String> = self.vms.keys().collect();
                    let msg = format!("no VM named `{vm}` in the config (known: {known:?})");
                    let _ = reply.send(Reply::error(ErrorKind::NotFound, msg));
                    return;
                }
                Target::Vm {
                    name: vm.clone(),
                    mode: *mode,
                }
            }
            None => Target::Host,
        };
        self.overrides.insert(
            device.port.clone(),
            Override {
                address: device.address,
                target: target.clone(),
            },
        );
        tracing::info!(device = %device.port, vm = target.label(), "manual override");
        if self.options.dry_run {
            let _ = reply.send(Reply::done(format!(
                "dry run: override set, {} → {}; nothing is done",
                device.port,
                target.label()
            )));
            self.reconcile();
            return;
        }
        // Register what we wait for before reconciling, so a waiter is answered by the
        // pass that finds nothing left to do.
        let waits: Vec<(String, String)> = match &to {
            Some((vm, mode)) => vec![(
                vm.clone(),
                Action::Attach {
                    device: Box::new(device.clone()),
                    mode: *mode,
                }
                .key(),
            )],
            None => self
                .vms
                .iter()
                .flat_map(|(vm, s)| {
                    s.devices
                        .iter()
                        .filter(|h| h.ours && super::decide::holds_any(h, &device))
                        .map(move |h| (vm.clone(), format!("detach {}", h.id)))
                })
                .collect(),
        };
        match (
            waits.first(),
            to.as_ref()
                .map(|(vm, _)| self.vms.get(vm).is_some_and(|v| v.up)),
        ) {
            (_, Some(false)) => {
                let vm = target.label();
                let _ = reply.send(Reply::done(format!(
                    "override set: {} → {vm}; VM {vm} is down, it gets the device when it comes up",
                    device.port
                )));
            }
            (None, _) => {
                let _ = reply.send(Reply::done(format!(
                    "override set: {} → {}; already there",
                    device.port,
                    target.label()
                )));
            }
            (Some((vm, key)), _) => self.waiters.push(Waiter {
                vm: vm.clone(),
                action_key: key.clone(),
                reply,
            }),
        }
        self.reconcile();
    }
}
