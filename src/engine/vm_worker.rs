//! One VM's worker: the task that talks to that VM's backend, so a slow or hung VM
//! stalls only itself. The coordinator hands it [`Job`]s and reads its [`Report`]s; it
//! never awaits a backend itself.

use super::diff::Action;
use crate::backend::{BackendError, VmBackend, VmUsbDevice};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// One batch of work for a VM worker; an empty batch only lists.
pub(super) struct Job {
    pub(super) actions: Vec<Action>,
}

/// A worker's answer to a job: its actions' results (when it had actions), then a fresh
/// list unless every action succeeded.
pub(super) struct Report {
    pub(super) vm: String,
    pub(super) generation: u64,
    pub(super) body: Reported,
}

/// What one [`Report`] carries.
pub(super) enum Reported {
    /// Every action of the job with the VM's answer, sent as soon as the last one
    /// returned: a control request waiting on an attach need not wait for a list too
    /// (several round trips).
    Results {
        results: Vec<(Action, Result<(), BackendError>)>,
        /// Every answer was yes: no list follows and the worker is idle. The VM holds
        /// what the engine now counts it holding (by address, `device_add` returning
        /// means attached), and a list would only say so again, a few round trips later,
        /// holding up the next job.
        idle: bool,
    },
    /// The list that ends a job with a refusal or a lost answer in it (only a list tells
    /// what the VM has then), and a job with no actions. The worker is idle after it.
    Listed(Result<Vec<VmUsbDevice>, BackendError>),
}

pub(super) struct Worker {
    pub(super) jobs: mpsc::UnboundedSender<Job>,
    /// The backend it works on; asked only what it calls a device (for status and logs).
    pub(super) backend: Arc<dyn VmBackend>,
    pub(super) generation: u64,
    /// A job is in flight: its last report (the list, or results that all succeeded)
    /// has not come back.
    pub(super) busy: bool,
    /// The job in flight has actions whose results have not come back yet.
    pub(super) acting: bool,
    /// No list has answered since it came up: it may hold anything.
    pub(super) holdings_unknown: bool,
    /// When it came up (engine clock).
    pub(super) up_since: Duration,
    pub(super) answering: bool,
    pub(super) list_failures: u32,
    pub(super) relist_at: Duration,
    /// The host resumed: once a fresh list answers, every device of ours in it is
    /// detached and attached again ([`super::diff::renewals`]).
    pub(super) renew: bool,
}

/// One VM's worker: runs its jobs one after another, each followed by a list unless the
/// VM said yes to every action of it.
pub(super) async fn work(
    vm: String,
    generation: u64,
    backend: Arc<dyn VmBackend>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    reports: mpsc::UnboundedSender<Report>,
) {
    while let Some(job) = jobs.recv().await {
        let mut results = Vec::with_capacity(job.actions.len());
        for action in job.actions {
            let result = match &action {
                Action::Attach {
                    device, mode, key, ..
                } => {
                    backend.attach(device, *mode).await.map(|got| {
                        if got.key.as_ref() != Some(key) {
                            // The backend must read the key back from what it lists, or a
                            // restarted daemon cannot recognise its devices.
                            tracing::error!(vm = %vm, expected = ?key, got = ?got.key, id = %got.id, "backend listed the device under another key");
                        }
                    })
                }
                Action::Detach { key, .. } => backend.detach(key).await,
            };
            // Said now, when the VM answered, not after the list below (several round
            // trips): "attach ... done" is the moment the device is the guest's.
            let id = backend.device_id(action.key());
            match &result {
                Ok(()) => tracing::info!(vm = %vm, id, "{} done", verb(&action)),
                Err(e) => {
                    let error = crate::error_chain::one_line(e);
                    tracing::warn!(vm = %vm, id, %error, "{} failed", verb(&action));
                }
            }
            results.push((action, result));
        }
        let send = |body| {
            let report = Report {
                vm: vm.clone(),
                generation,
                body,
            };
            reports.send(report).is_ok()
        };
        let idle = !results.is_empty() && results.iter().all(|(_, r)| r.is_ok());
        if !results.is_empty() && !send(Reported::Results { results, idle }) {
            return;
        }
        if !idle && !send(Reported::Listed(backend.list().await)) {
            return;
        }
    }
}

/// What an action does, for the log.
pub(super) fn verb(action: &Action) -> String {
    match action {
        Action::Attach { device, mode, .. } => {
            format!("attach {} ({}) by {mode:?}", device.port, device.label())
        }
        Action::Detach { .. } => "detach".to_string(),
    }
}
