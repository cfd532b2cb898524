//! `usbroute serve`: the daemon loop. One task owns the state (snapshot, VMs, overrides,
//! retries) and reacts to inputs: uevents, VM sockets appearing, VM tasks reporting,
//! control requests, SIGHUP, retry timers. After each it recomputes the decisions, diffs
//! them against what the VMs really have, and hands each VM task its actions.

use super::actions::{plan_actions, Action};
use super::decide::{expire_overrides, Decision, Overrides, PolicyView};
use super::protocol::{Reply, Request};
use super::server::{ControlGroup, ControlHandler, ControlServer, Peer, ServiceError};
use super::vm_link::{self, FromVm, ToVm, VmConnector};
use super::ControlSettings;
use crate::backend::{BoxFuture, VmUsbDevice};
use crate::events::{Received, SocketWatcher, Trigger, UeventSocket};
use crate::inventory::{self, Snapshot};
use crate::sysfs::SysfsRoot;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

/// Turns a config file into a policy; the error names file:line:column and the fix.
pub type PolicyLoader = Arc<dyn Fn(&Path) -> Result<Arc<dyn PolicyView>, String> + Send + Sync>;

/// How to run the daemon.
pub struct DaemonOptions {
    /// The config file; `None` runs the empty policy.
    pub config: Option<PathBuf>,
    /// The control socket (`--control`), else the config's, else the default.
    pub control: Option<PathBuf>,
    /// Where sysfs is read.
    pub root: SysfsRoot,
    /// Log what would be done; do nothing.
    pub dry_run: bool,
    /// Reaches VMs.
    pub connector: Arc<dyn VmConnector>,
    /// Reads config files.
    pub loader: PolicyLoader,
    /// Listen to kernel uevents (off only where netlink is unavailable, and in benches).
    pub uevents: bool,
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file is not valid.
    #[error("{0}")]
    Config(String),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ServiceError),
    /// The uevent socket could not be opened.
    #[error(transparent)]
    Events(#[from] crate::events::EventsError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Retry delay after `attempts` failures: 250 ms doubling, capped at 30 s.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(7);
    Duration::from_millis(250u64 << exp).min(Duration::from_secs(30))
}

pub(super) enum Input {
    Control(Request, oneshot::Sender<Reply>),
    SocketAppeared(String),
}

pub(super) struct VmState {
    pub(super) qmp: PathBuf,
    tx: mpsc::UnboundedSender<ToVm>,
    pub(super) up: bool,
    busy: bool,
    pub(super) devices: Vec<VmUsbDevice>,
    reconnect_at: Option<Instant>,
    reconnect_attempts: u32,
}

pub(super) struct Retry {
    pub(super) attempts: u32,
    pub(super) last_error: String,
    pub(super) due: Instant,
}

/// A control request waiting for an action to be confirmed.
pub(super) struct Waiter {
    pub(super) vm: String,
    pub(super) action_key: String,
    pub(super) reply: oneshot::Sender<Reply>,
}

/// The daemon's state; only the loop task touches it.
pub(super) struct Daemon {
    pub(super) options: DaemonOptions,
    pub(super) policy: Arc<dyn PolicyView>,
    pub(super) snapshot: Snapshot,
    pub(super) vms: BTreeMap<String, VmState>,
    pub(super) overrides: Overrides,
    pub(super) retries: BTreeMap<(String, String), Retry>,
    pub(super) waiters: Vec<Waiter>,
    pub(super) decisions: Vec<Decision>,
    announced: BTreeSet<(String, String)>,
    reports: mpsc::UnboundedSender<FromVm>,
    inputs: mpsc::UnboundedSender<Input>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    last_status: String,
}

/// Run the daemon until SIGTERM or SIGINT.
pub async fn run(options: DaemonOptions) -> Result<(), DaemonError> {
    let policy: Arc<dyn PolicyView> = match &options.config {
        Some(path) => (options.loader)(path).map_err(DaemonError::Config)?,
        None => Arc::new(super::decide::EmptyPolicy),
    };
    let settings = match &options.config {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| ControlSettings::from_toml(&t))
            .map_err(|e| DaemonError::Config(format!("{}: {e}", path.display())))?,
        None => ControlSettings::default(),
    };
    let socket = options.control.clone().unwrap_or_else(|| settings.socket());
    let group = settings
        .control_group
        .as_deref()
        .map(ControlGroup::lookup)
        .transpose()?;
    let server = ControlServer::bind(&socket, group)?;
    let uevents = options.uevents.then(UeventSocket::open).transpose()?;

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (inputs_tx, mut inputs) = mpsc::unbounded_channel();
    let dirty = Arc::new(Notify::new());
    if let Some(sock) = uevents {
        tokio::spawn(listen_uevents(sock, dirty.clone()));
    }
    tokio::spawn(server.serve(Arc::new(ControlBridge(inputs_tx.clone()))));

    let mut daemon = Daemon {
        options,
        policy,
        snapshot: Snapshot::default(),
        vms: BTreeMap::new(),
        overrides: Overrides::new(),
        retries: BTreeMap::new(),
        waiters: Vec::new(),
        decisions: Vec::new(),
        announced: BTreeSet::new(),
        reports: reports_tx,
        inputs: inputs_tx,
        watcher: None,
        last_status: String::new(),
    };
    daemon.sync_vms();
    daemon.rescan("start");
    tracing::info!(socket = %socket.display(), config = ?daemon.options.config, dry_run = daemon.options.dry_run, "usbroute daemon ready");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    daemon.publish_status();

    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    loop {
        let wake = daemon.next_timer();
        tokio::select! {
            _ = dirty.notified() => daemon.rescan("uevent"),
            Some(report) = reports.recv() => daemon.on_vm_report(report),
            Some(input) = inputs.recv() => match input {
                Input::Control(req, reply) => daemon.on_request(req, reply),
                Input::SocketAppeared(vm) => daemon.on_socket_appeared(&vm),
            },
            _ = hup.recv() => {
                match daemon.reload() {
                    Ok(msg) => tracing::info!("SIGHUP: {msg}"),
                    Err(msg) => tracing::error!("SIGHUP: {msg}"),
                }
            }
            _ = sleep_until(wake) => daemon.on_timer(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("usbroute daemon stopping; devices stay where they are");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Read uevents, log each, and mark the picture dirty for the ones that matter. Marking
/// (not queueing) coalesces a storm into one rescan: the rescan reads the current state,
/// so no decision is lost however many events arrive.
async fn listen_uevents(mut sock: UeventSocket, dirty: Arc<Notify>) {
    loop {
        match sock.recv().await {
            Received::Event(ev) => {
                let trigger = ev.trigger();
                if trigger == Trigger::Ignore {
                    tracing::trace!(device = ev.kernel_name(), action = %ev.action, "uevent ignored");
                    continue;
                }
                tracing::info!(device = ev.kernel_name(), action = %ev.action, product = ev.product.as_deref().unwrap_or("?"), "uevent: {trigger:?}");
                dirty.notify_one();
            }
            Received::Resync { reason } => {
                tracing::warn!("uevents may be lost ({reason}); rescanning sysfs");
                dirty.notify_one();
            }
            Received::Rejected { reason } => {
                tracing::warn!("ignored a netlink datagram: {reason}");
            }
        }
    }
}

/// Carries control requests from the server's connection tasks into the loop.
struct ControlBridge(mpsc::UnboundedSender<Input>);

impl ControlHandler for ControlBridge {
    fn handle<'a>(&'a self, request: Request, _peer: &'a Peer) -> BoxFuture<'a, Reply> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if self.0.send(Input::Control(request, tx)).is_err() {
                return Reply::error(super::ErrorKind::Failed, "the daemon is stopping");
            }
            rx.await.unwrap_or_else(|_| {
                Reply::error(super::ErrorKind::Failed, "the daemon dropped the request")
            })
        })
    }
}

impl Daemon {
    /// Start tasks for VMs new in the policy, stop those gone, and re-arm the socket watcher.
    pub(super) fn sync_vms(&mut self) {
        let wanted: BTreeMap<String, PathBuf> = self.policy.vms().into_iter().collect();
        let gone: Vec<String> = self
            .vms
            .iter()
            .filter(|(name, vm)| wanted.get(*name) != Some(&vm.qmp))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            // Dropping its sender ends the VM's task; what it holds stays in it.
            self.vms.remove(&name);
            tracing::info!(vm = %name, "VM no longer in the config (or its socket moved); its devices stay where they are");
            self.answer_waiters_of(
                &name,
                Reply::error(
                    super::ErrorKind::NotFound,
                    format!("VM {name} left the config"),
                ),
            );
        }
        for (name, qmp) in &wanted {
            if self.vms.contains_key(name) {
                continue;
            }
            let tx = vm_link::spawn(
                name.clone(),
                qmp.clone(),
                self.options.connector.clone(),
                self.reports.clone(),
            );
            let _ = tx.send(ToVm::TryConnect);
            self.vms.insert(
                name.clone(),
                VmState {
                    qmp: qmp.clone(),
                    tx,
                    up: false,
                    busy: false,
                    devices: Vec::new(),
                    reconnect_at: None,
                    reconnect_attempts: 0,
                },
            );
        }
        if let Some(old) = self.watcher.take() {
            old.abort();
        }
        let inputs = self.inputs.clone();
        match SocketWatcher::new(wanted) {
            Ok(mut watcher) => {
                self.watcher = Some(tokio::spawn(async move {
                    while let Ok(seen) = watcher.next().await {
                        let _ = inputs.send(Input::SocketAppeared(seen.vm));
                    }
                }))
            }
            Err(e) => tracing::error!("VM sockets will only be retried on a timer: {e}"),
        }
    }

    pub(super) fn rescan(&mut self, why: &str) {
        self.snapshot = inventory::scan(&self.options.root);
        for w in &self.snapshot.warnings {
            tracing::warn!("sysfs: {w}");
        }
        expire_overrides(&mut self.overrides, &self.snapshot);
        tracing::debug!(
            devices = self.snapshot.devices.len(),
            "rescanned sysfs ({why})"
        );
        self.reconcile();
    }

    /// Decide, diff, and hand out actions to idle VMs.
    pub(super) fn reconcile(&mut self) {
        let up: BTreeSet<String> = self
            .vms
            .iter()
            .filter(|(_, v)| v.up)
            .map(|(n, _)| n.clone())
            .collect();
        self.decisions = self.policy.decide(&self.snapshot, &up, &self.overrides);
        let actual: BTreeMap<String, Vec<VmUsbDevice>> = self
            .vms
            .iter()
            .filter(|(_, v)| v.up)
            .map(|(n, v)| (n.clone(), v.devices.clone()))
            .collect();
        let plan = plan_actions(&self.decisions, &actual);
        let planned: BTreeSet<(String, String)> = plan
            .iter()
            .flat_map(|(vm, acts)| acts.iter().map(move |a| (vm.clone(), a.key())))
            .collect();
        // A retry for an action the plan no longer wants is dropped, not carried out later.
        self.retries.retain(|k, _| planned.contains(k));
        self.answer_settled_waiters(&planned);
        let now = Instant::now();
        for (vm, actions) in plan {
            let Some(state) = self.vms.get_mut(&vm) else {
                continue;
            };
            if state.busy {
                continue;
            }
            let due: Vec<Action> = actions
                .into_iter()
                .filter(|a| {
                    self.retries
                        .get(&(vm.clone(), a.key()))
                        .map_or(true, |r| r.due <= now)
                })
                .collect();
            if self.options.dry_run {
                for a in &due {
                    if self.announced.insert((vm.clone(), a.key())) {
                        tracing::info!(vm = %vm, device = %a.subject(), "dry run: would {}", a.key());
                    }
                }
                continue;
            }
            if !due.is_empty() {
                state.busy = true;
                let _ = state.tx.send(ToVm::Apply(due));
            }
        }
        self.publish_status();
    }

    /// Waiters whose action is no longer planned are done: the state is already as asked.
    fn answer_settled_waiters(&mut self, planned: &BTreeSet<(String, String)>) {
        let busy: BTreeSet<&String> = self
            .vms
            .iter()
            .filter(|(_, v)| v.busy)
            .map(|(n, _)| n)
            .collect();
        let (settled, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| {
                !busy.contains(&w.vm) && !planned.contains(&(w.vm.clone(), w.action_key.clone()))
            });
        self.waiters = waiting;
        for w in settled {
            let _ = w.reply.send(Reply::done(format!(
                "done: {} in VM {}",
                w.action_key, w.vm
            )));
        }
    }

    fn on_vm_report(&mut self, report: FromVm) {
        match report {
            FromVm::Up { vm, devices } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    s.up = true;
                    s.busy = false;
                    s.devices = devices;
                    s.reconnect_at = None;
                    s.reconnect_attempts = 0;
                }
                self.reconcile();
            }
            FromVm::Down { vm, reason } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    let was_up = s.up;
                    s.up = false;
                    s.busy = false;
                    s.devices.clear();
                    // A socket that exists but refuses may be busy (another QMP client):
                    // try again later; a missing one is waited for with inotify.
                    if s.qmp.exists() {
                        s.reconnect_attempts += 1;
                        s.reconnect_at = Some(Instant::now() + backoff(s.reconnect_attempts));
                    }
                    match was_up {
                        true => tracing::warn!(vm = %vm, "VM went down: {reason}"),
                        false => tracing::debug!(vm = %vm, "VM not reachable: {reason}"),
                    }
                }
                self.answer_waiters_of(
                    &vm,
                    Reply::done(format!("override kept: VM {vm} is down ({reason}); it gets the device when it is back")),
                );
                self.reconcile();
            }
            FromVm::Done { vm, action, result } => self.on_done(vm, &action, result),
            FromVm::Listed { vm, devices } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    s.busy = false;
                    if let Some(d) = devices {
                        s.devices = d;
                    }
                }
                self.reconcile();
            }
        }
    }

    fn on_done(&mut self, vm: String, action: &Action, result: Result<(), String>) {
        let key = (vm.clone(), action.key());
        match result {
            Ok(()) => {
                self.retries.remove(&key);
            }
            Err(error) => {
                let retry = self.retries.entry(key.clone()).or_insert(Retry {
                    attempts: 0,
                    last_error: String::new(),
                    due: Instant::now(),
                });
                retry.attempts += 1;
                retry.last_error = error.clone();
                let delay = backoff(retry.attempts);
                retry.due = Instant::now() + delay;
                tracing::warn!(vm = %vm, device = %action.subject(), attempts = retry.attempts, "{} failed: {error}; retrying in {delay:?}", action.key());
                let (failed, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
                    .into_iter()
                    .partition(|w| w.vm == vm && w.action_key == action.key());
                self.waiters = rest;
                for w in failed {
                    let msg = format!("{} in VM {vm} failed: {error}; the daemon keeps retrying (see `usbroute status`)", action.key());
                    let _ = w.reply.send(Reply::error(super::ErrorKind::Failed, msg));
                }
            }
        }
    }

    /// Answer every request waiting on `vm` with `reply`.
    fn answer_waiters_of(&mut self, vm: &str, reply: Reply) {
        let (answered, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.vm == vm);
        self.waiters = rest;
        for w in answered {
            let _ = w.reply.send(reply.clone());
        }
    }

    fn on_socket_appeared(&mut self, vm: &str) {
        if let Some(s) = self.vms.get_mut(vm) {
            tracing::info!(vm = %vm, socket = %s.qmp.display(), "QMP socket appeared");
            s.reconnect_at = None;
            s.reconnect_attempts = 0;
            let _ = s.tx.send(ToVm::TryConnect);
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let retry = self.retries.values().map(|r| r.due);
        let reconnect = self.vms.values().filter_map(|v| v.reconnect_at);
        retry.chain(reconnect).min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        for s in self.vms.values_mut() {
            if s.reconnect_at.is_some_and(|t| t <= now) {
                s.reconnect_at = None;
                let _ = s.tx.send(ToVm::TryConnect);
            }
        }
        self.reconcile();
    }

    /// Re-read the config; on error keep the running one and say why.
    pub(super) fn reload(&mut self) -> Result<String, String> {
        let Some(path) = self.options.config.clone() else {
            return Err("running without a config file (the empty policy): nothing to reload; restart with --config FILE".into());
        };
        let policy = (self.options.loader)(&path)
            .map_err(|e| format!("{e}\nthe running config stays in force"))?;
        self.policy = policy;
        self.sync_vms();
        self.rescan("reload");
        Ok(format!(
            "reloaded {}: {} VMs",
            path.display(),
            self.vms.len()
        ))
    }

    fn publish_status(&mut self) {
        let up = self.vms.values().filter(|v| v.up).count();
        let passed = self
            .decisions
            .iter()
            .filter(|d| d.target != super::decide::Target::Host)
            .count();
        let status = format!(
            "{} USB devices, {passed} for VMs; {up}/{} VMs up; {} retries pending{}",
            self.snapshot.devices.len(),
            self.vms.len(),
            self.retries.len(),
            if self.options.dry_run {
                " (dry run)"
            } else {
                ""
            }
        );
        if status != self.last_status {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }
}
