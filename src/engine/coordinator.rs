//! The async runtime: one coordinator that decides (plan → diff → backoff) and one worker
//! task per VM that talks to that VM's backend. A slow or hung VM stalls only its own
//! worker; the coordinator never awaits a backend.
//!
//! The daemon feeds [`Input`]s (from uevents, inotify, the control socket, SIGHUP) through
//! an [`EngineHandle`] and reads [`Status`] from it. Every input leads to a new round
//! (what is already waiting is taken in first: a burst costs one round). A worker reports
//! a job's results as soon as the VM answered them, which settles a control request. A
//! job the VM said yes to throughout ends there; after a refusal or a lost answer the
//! worker lists, and that list is the truth. An attach whose answer is lost counts as
//! held (never as done) until a list says otherwise.

use super::controller_host::SharedControllerHost;
use super::controllers::{owned_by_running, ControllerConfig, Groups};
use super::diff::Action;
use super::due_actions;
use super::follow::{DeviceChange, Follows, Moment};
use super::group_work::GroupWork;
pub use super::handle::{EngineHandle, EngineOptions, Input};
use super::holdings::{Holdings, Outcome};
use super::retry::RetryBook;
use super::routing::worker::{RoutingInput, RoutingSlot};
pub use super::status::Status;
use super::unknown::{Policy, Unknowns};
use super::vm_worker::{verb, work, Job, Report, Reported, Worker};
use crate::backend::{BackendError, Capabilities, VmBackend, VmUsbDevice};
use crate::inventory::{Device, PciAddress, PortPath};
use crate::policy::{plan, why, Override, PlanInput, Rule};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Start the engine on the current tokio runtime. It manages no controller groups: for
/// that, [`spawn_with_controllers`].
pub fn spawn(options: EngineOptions) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    start(options, None)
}

/// Start the engine, moving the `[[controller]]` rules' groups through `host`.
pub fn spawn_with_controllers(
    options: EngineOptions,
    host: SharedControllerHost,
) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    start(options, Some(host))
}

fn start(
    options: EngineOptions,
    host: Option<SharedControllerHost>,
) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    let (inputs, input_rx) = mpsc::unbounded_channel();
    let (status_tx, status) = watch::channel(Status::default());
    let coordinator = Coordinator::new(options, status_tx, host);
    let task = tokio::spawn(coordinator.run(input_rx));
    (EngineHandle { inputs, status }, task)
}

struct Coordinator {
    options: EngineOptions,
    start: Instant,
    rules: Arc<[Rule]>,
    controllers: ControllerConfig,
    /// The groups of `controllers` as the engine has moved them.
    groups: Groups,
    group_work: GroupWork,
    devices: Arc<Vec<Device>>,
    /// Whether any [`Input::Devices`] came yet: without a picture of the host, the plan
    /// would take every VM's devices away, so no action is taken.
    devices_known: bool,
    mounted: BTreeSet<String>,
    backends: BTreeMap<String, Capabilities>,
    overrides: BTreeMap<PortPath, Override>,
    /// Devices that left under a `follow` rule, and the plugs that follow them.
    follows: Follows,
    workers: BTreeMap<String, Worker>,
    generation: u64,
    holdings: Holdings,
    unknowns: Unknowns,
    retries: RetryBook,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports_rx: mpsc::UnboundedReceiver<Report>,
    status: watch::Sender<Status>,
    dry_run_actions: Vec<Action>,
    /// The routing reconciler, once routing is on.
    routing: RoutingSlot,
}

impl Coordinator {
    fn new(
        options: EngineOptions,
        status: watch::Sender<Status>,
        host: Option<SharedControllerHost>,
    ) -> Self {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        Coordinator {
            options,
            start: Instant::now(),
            rules: Arc::from(Vec::new()),
            controllers: ControllerConfig::default(),
            groups: Groups::default(),
            group_work: GroupWork::new(host),
            devices: Arc::default(),
            devices_known: false,
            mounted: BTreeSet::new(),
            backends: BTreeMap::new(),
            overrides: BTreeMap::new(),
            follows: Follows::default(),
            workers: BTreeMap::new(),
            generation: 0,
            holdings: Holdings::default(),
            unknowns: Unknowns::default(),
            retries: RetryBook::new(options.backoff),
            reports_tx,
            reports_rx,
            status,
            dry_run_actions: vec![],
            routing: RoutingSlot::default(),
        }
    }

    fn now(&self) -> Duration {
        Instant::now() - self.start
    }

    async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>) {
        loop {
            let wake = self.next_wake().map(|at| self.start + at);
            let mut round = tokio::select! {
                input = inputs.recv() => match input {
                    Some(input) => self.take(input),
                    None => break,
                },
                Some(report) = self.reports_rx.recv() => self.handle_report(report),
                Some(done) = self.group_work.finished_batch() => {
                    self.group_work.record(done, self.options.dry_run);
                    true
                }
                () = sleep_until(wake) => true,
            };
            round |= self.take_waiting(&mut inputs);
            if round {
                self.round();
            }
        }
    }

    /// Take in one input; whether a round must follow (routing has its own reconciler).
    fn take(&mut self, input: Input) -> bool {
        match input {
            Input::Routing(input) => {
                self.forward_to_routing(input);
                false
            }
            input => {
                self.handle_input(input);
                true
            }
        }
    }

    /// Take in what is already waiting, so that a burst (64 VMs answering their first
    /// lists at start) costs one round, not one each. Stops after a device change: the
    /// follow bookkeeping compares each change with the plan of the round before it.
    fn take_waiting(&mut self, inputs: &mut mpsc::UnboundedReceiver<Input>) -> bool {
        let mut round = false;
        while let Ok(report) = self.reports_rx.try_recv() {
            round |= self.handle_report(report);
        }
        while let Ok(input) = inputs.try_recv() {
            let devices = matches!(input, Input::Devices(_));
            round |= self.take(input);
            if devices {
                break;
            }
        }
        round
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Rules(rules) => self.rules = Arc::from(rules),
            Input::Controllers(c) => self.controllers = c,
            Input::Devices(devices) => {
                let before = std::mem::replace(&mut self.devices, devices);
                let change = DeviceChange {
                    before: &before,
                    after: &self.devices,
                    decided: &self.status.borrow().desired,
                    rules: &self.rules,
                };
                self.follows
                    .devices_changed(&change, Moment::wall_now(self.now()));
                self.devices_known = true;
                let present: BTreeMap<&PortPath, Option<u16>> =
                    self.devices.iter().map(|d| (&d.port, d.address)).collect();
                // An override holds for one plug: unplugged or re-plugged, it ends.
                self.overrides
                    .retain(|port, o| present.get(port) == Some(&o.address));
            }
            Input::MountedDisks(m) => self.mounted = m,
            Input::Backends(b) => self.backends = b,
            Input::VmUp { name, backend } => self.start_worker(name, backend),
            Input::VmGone { name } => {
                tracing::info!(vm = %name, "VM gone; its devices are free again");
                self.workers.remove(&name);
                self.holdings.forget(&name);
            }
            Input::Override { port, value } => match value {
                Some(o) => {
                    self.overrides.insert(port, o);
                }
                None => {
                    self.overrides.remove(&port);
                }
            },
            Input::Refresh | Input::Resumed => {
                let now = self.now();
                let renew = matches!(input, Input::Resumed);
                for w in self.workers.values_mut() {
                    w.relist_at = now;
                    w.answering = false;
                    w.renew |= renew;
                }
            }
            Input::Routing(input) => self.forward_to_routing(input),
            Input::Why { port, reply } => {
                let answer = self.devices.iter().find(|d| d.port == port).map(|d| {
                    let (up, owned) = self.vms_up_and_owned();
                    why(&self.plan_input(&up, &owned), d)
                });
                let _ = reply.send(answer);
            }
        }
    }

    fn forward_to_routing(&mut self, input: RoutingInput) {
        let status = self.status.clone();
        let dry_run = self.options.dry_run;
        self.routing.forward(input, dry_run, move |r| {
            status.send_modify(|s| s.routing = Some(r))
        });
    }

    fn start_worker(&mut self, name: String, backend: Arc<dyn VmBackend>) {
        tracing::info!(vm = %name, "VM up; reading its devices");
        self.generation += 1;
        let (jobs, job_rx) = mpsc::unbounded_channel();
        tokio::spawn(work(
            name.clone(),
            self.generation,
            backend.clone(),
            job_rx,
            self.reports_tx.clone(),
        ));
        self.holdings.forget(&name);
        self.unknowns.came_up(&name, self.now());
        let first = Job { actions: vec![] };
        let _ = jobs.send(first);
        let worker = Worker {
            jobs,
            backend,
            generation: self.generation,
            busy: true,
            acting: false,
            holdings_unknown: true,
            up_since: self.now(),
            answering: false,
            list_failures: 0,
            relist_at: Duration::ZERO,
            renew: false,
        };
        self.workers.insert(name, worker);
    }

    /// Take in a worker's report; whether a round must follow (results a list will
    /// follow only update the status: the list brings the round).
    fn handle_report(&mut self, report: Report) -> bool {
        let Some(worker) = self.workers.get_mut(&report.vm) else {
            return false;
        };
        if worker.generation != report.generation {
            return false; // from a previous run of this VM
        }
        match report.body {
            Reported::Results { results, idle } => {
                worker.acting = false;
                worker.busy = !idle;
                self.take_results(&report.vm, results);
                if !idle {
                    self.publish_outcomes();
                }
                // An idle worker may have work waiting for it: that takes a round.
                idle
            }
            Reported::Listed(list) => {
                self.take_list(&report.vm, list);
                true
            }
        }
    }

    fn take_results(&mut self, vm: &str, results: Vec<(Action, Result<(), BackendError>)>) {
        let now = self.now();
        let Some(worker) = self.workers.get(vm) else {
            return;
        };
        for (action, result) in results {
            let id = worker.backend.device_id(action.key());
            let outcome = match &result {
                Ok(()) => Outcome::Done,
                Err(BackendError::Refused { .. }) => Outcome::Refused,
                Err(_) => Outcome::Unknown,
            };
            // Logged by the worker as each action returned (`vm_worker::work`).
            match result {
                Ok(()) => self.retries.succeeded(&action),
                Err(e) => {
                    let error = crate::error_chain::one_line(&e);
                    self.retries.failed(&action, &id, error, now);
                }
            }
            self.holdings.acted(&action, &id, outcome);
        }
    }

    fn take_list(&mut self, vm: &str, list: Result<Vec<VmUsbDevice>, BackendError>) {
        let now = self.now();
        let Some(worker) = self.workers.get_mut(vm) else {
            return;
        };
        worker.busy = false;
        match list {
            Ok(devices) => {
                // Only an answered list makes its holdings known: a failed one says
                // nothing about what it holds.
                worker.holdings_unknown = false;
                worker.answering = true;
                worker.list_failures = 0;
                self.unknowns.listed(vm, &devices);
                self.holdings.listed(vm, devices);
            }
            Err(e) => {
                worker.answering = false;
                worker.list_failures += 1;
                worker.relist_at = now + self.options.backoff.delay(worker.list_failures);
                tracing::warn!(vm = %vm, error = %crate::error_chain::one_line(&e), "cannot read the VM's devices; its last known devices stay reserved");
            }
        }
    }

    /// The VMs whose worker is `what`.
    fn vms_where(&self, what: impl Fn(&Worker) -> bool) -> BTreeSet<String> {
        self.workers
            .iter()
            .filter(|(_, w)| what(w))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The VMs that answered their last list.
    fn answering(&self) -> BTreeSet<String> {
        self.vms_where(|w| w.answering)
    }

    /// The VMs whose actions are in flight.
    fn acting(&self) -> BTreeSet<String> {
        self.vms_where(|w| w.acting)
    }

    /// Publish what a worker's results changed (holdings, retries) without a round.
    fn publish_outcomes(&mut self) {
        let vms = self.holdings.actual(&self.answering());
        let pending: Vec<_> = self.retries.pending().cloned().collect();
        let acting = self.acting();
        self.status.send_modify(|s| {
            s.vms = vms;
            s.pending = pending;
            s.acting = acting;
        });
    }

    fn vms_up_and_owned(&self) -> (BTreeSet<String>, BTreeMap<PciAddress, String>) {
        let up: BTreeSet<String> = self.workers.keys().cloned().collect();
        let owned = owned_by_running(&self.controllers.functions, &up);
        (up, owned)
    }

    fn plan_input<'a>(
        &'a self,
        up: &'a BTreeSet<String>,
        owned: &'a BTreeMap<PciAddress, String>,
    ) -> PlanInput<'a> {
        PlanInput {
            rules: &self.rules,
            devices: &self.devices,
            mounted_disks: &self.mounted,
            vms_up: up,
            backends: &self.backends,
            overrides: &self.overrides,
            follows: self.follows.bindings(),
            controllers_owned: owned,
        }
    }

    /// Plan, diff, and hand each idle VM its due actions; move controller groups.
    fn round(&mut self) {
        let now = self.now();
        let (up, owned) = self.vms_up_and_owned();
        let group_steps = self
            .groups
            .next(&self.controllers.rules, &up, &self.controllers.vms);
        self.group_work.push(group_steps, self.options.dry_run);
        let desired = plan(&self.plan_input(&up, &owned));
        let answering = self.answering();
        let actual = self.holdings.actual(&answering);
        let mut due = due_actions(&desired, &actual, &self.devices, &mut self.retries, now);
        self.add_renewals(&actual, &mut due);
        if !self.devices_known {
            // No picture of the host yet (the first scan of sysfs failed): VMs are still
            // listed, but nothing is attached or detached.
            due.clear();
        }
        let waiting: Vec<&str> = self
            .workers
            .iter()
            .filter(|(name, w)| self.in_unknown_window(name, w, now))
            .map(|(name, _)| name.as_str())
            .collect();
        if !waiting.is_empty() {
            // A VM that just came up (or a daemon that just started) may already hold
            // devices: attaches of those wait until its list answers, for at most the
            // grace period. Detaches are safe and go ahead.
            let policy = Policy {
                rules: &self.rules,
                overrides: &self.overrides,
                devices: &self.devices,
            };
            due.retain(|a| !self.unknowns.holds_back(&waiting, a, &policy));
        }
        if self.options.dry_run {
            if due != self.dry_run_actions {
                for a in &due {
                    let id = self.device_id(a);
                    tracing::info!(vm = a.vm(), id, "dry run: would {}", verb(a));
                }
            }
            self.dry_run_actions = due;
        } else {
            self.dispatch(due, now);
        }
        let status = Status {
            desired,
            // After dispatch, so in-flight attaches show as held.
            vms: self.holdings.actual(&answering),
            pending: self.retries.pending().cloned().collect(),
            overrides: self.overrides.clone(),
            dry_run_actions: self.dry_run_actions.clone(),
            busy: self.vms_where(|w| w.busy),
            acting: self.acting(),
            routing: None,
            controllers: self.group_work.outcomes(),
            rules: self.rules.clone(),
            controller_batches: self.group_work.finished(),
        };
        // The routing reconciler writes its part itself: keep it.
        self.status.send_modify(|s| {
            *s = Status {
                routing: s.routing.take(),
                ..status
            }
        });
    }

    /// After a resume, each VM that answered a fresh list and is idle gets every device
    /// of ours detached (the next rounds attach what is still wanted).
    fn add_renewals(&mut self, actual: &super::diff::Actual, due: &mut Vec<Action>) {
        for (name, worker) in self.workers.iter_mut() {
            if !worker.renew || !worker.answering || worker.busy {
                continue;
            }
            worker.renew = false;
            if let Some(view) = actual.get(name) {
                let renew = super::diff::renewals(name, view, due);
                due.extend(renew);
            }
        }
    }

    fn dispatch(&mut self, due: Vec<Action>, now: Duration) {
        let mut by_vm: BTreeMap<String, Vec<Action>> = BTreeMap::new();
        for action in due {
            by_vm
                .entry(action.vm().to_string())
                .or_default()
                .push(action);
        }
        for (name, worker) in self.workers.iter_mut() {
            if worker.busy {
                continue;
            }
            let actions = by_vm.remove(name).unwrap_or_default();
            let relist = !worker.answering && worker.relist_at <= now;
            if actions.is_empty() && !relist {
                continue;
            }
            for a in &actions {
                let id = worker.backend.device_id(a.key());
                // In flight counts as held: no other VM may be given this device meanwhile.
                self.holdings.acted(a, &id, Outcome::Unknown);
                if matches!(a, Action::Attach { .. }) {
                    self.unknowns.attaching(name, a.key());
                }
                tracing::info!(vm = %name, id, "{}", verb(a));
            }
            let acting = !actions.is_empty();
            worker.busy = worker.jobs.send(Job { actions }).is_ok();
            worker.acting = worker.busy && acting;
        }
    }

    /// What `action`'s VM calls its device, for logs (the key itself when the VM has no
    /// worker).
    fn device_id(&self, action: &Action) -> String {
        match self.workers.get(action.vm()) {
            Some(worker) => worker.backend.device_id(action.key()),
            None => format!("{:?}", action.key()),
        }
    }

    /// Attaches of what `worker` could hold wait while its holdings are unknown and its
    /// grace has not run out.
    fn in_unknown_window(&self, name: &str, worker: &Worker, now: Duration) -> bool {
        worker.holdings_unknown && now < self.wait_ends(name, worker)
    }

    fn wait_ends(&self, name: &str, worker: &Worker) -> Duration {
        self.unknowns
            .wait_ends(name, worker.up_since, self.options.unknown_holdings_grace)
    }

    /// When a retry or a re-list falls due, or an unknown VM's grace runs out.
    ///
    /// Only times still ahead count. A retry that is due but was not sent this round is
    /// held back by something whose end wakes the engine anyway (a busy worker reports, an
    /// unknown VM's list answers or its grace runs out); arming a timer for a time already
    /// past would wake the loop at once, round after round, spinning without yielding
    /// until that other thing happened (under a paused clock: forever).
    fn next_wake(&self) -> Option<Duration> {
        let now = self.now();
        let relists = self
            .workers
            .values()
            .filter(|w| !w.busy && !w.answering)
            .map(|w| w.relist_at);
        let graces = self
            .workers
            .iter()
            .filter(|(_, w)| w.holdings_unknown)
            .map(|(name, w)| self.wait_ends(name, w));
        let retries = self.retries.pending().map(|p| p.retry_at);
        retries
            .chain(relists)
            .chain(graces)
            .filter(|at| *at > now)
            .min()
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
