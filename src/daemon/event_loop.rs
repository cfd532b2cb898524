//! `usbroute serve`: the edges around the engine. This loop reads the world (sysfs on
//! uevents, each VM's presence from its backend's driver, the config on SIGHUP) and
//! feeds it to [`crate::engine::coordinator`], which alone decides and acts; it answers
//! control requests from the engine's published status, and keeps systemd informed.

use super::changes::Changes;
use super::protocol::{Reply, Request};
use super::routing_hooks::RoutingHooks;
use super::server::{ControlGroup, ControlHandler, ControlServer, Peer, ServiceError};
use super::vms::{PresenceNote, VmPresence};
use crate::backend::{BoxFuture, Drivers};
use crate::config::Config;
use crate::engine::coordinator::{
    self as engine, EngineHandle, EngineOptions, Input as EngineInput,
};
use crate::engine::{ControllerConfig, VfioControllers};
use crate::events::{Received, Trigger, UeventFeed, UeventSource};
use crate::inventory::{self, ScanFailed, Snapshot};
use crate::sysfs::SysfsRoot;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// How to run the daemon.
pub struct DaemonOptions {
    /// The config file; `None` runs the empty policy.
    pub config: Option<PathBuf>,
    /// The control socket (`--control`), else the config's.
    pub control: Option<PathBuf>,
    /// Where sysfs is read.
    pub root: SysfsRoot,
    /// Log what would be done; do nothing.
    pub dry_run: bool,
    /// The hypervisor drivers: each VM's presence comes from the driver of its kind
    /// ([`crate::backend::drivers`]; tests register fakes).
    pub drivers: Drivers,
    /// Which uevents to listen to: the kernel's (`serve`), a socket's (`serve
    /// --uevent-socket`, benches and tests on a recorded host), or none.
    pub uevents: UeventFeed,
}

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config file is not valid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ServiceError),
    /// The uevent socket could not be opened.
    #[error(transparent)]
    Events(#[from] crate::events::EventsError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// Port routing (the toggle service) could not start.
    #[error(transparent)]
    Routing(#[from] super::RoutingStartError),
}

pub(super) enum Input {
    Control(Request, oneshot::Sender<Reply>),
}

/// What the daemon loop owns.
pub(super) struct Daemon {
    pub(super) options: DaemonOptions,
    pub(super) config: Arc<Config>,
    pub(super) snapshot: Snapshot,
    pub(super) vms: BTreeMap<String, VmPresence>,
    pub(super) engine: EngineHandle,
    pub(super) presence: mpsc::UnboundedSender<PresenceNote>,
    /// Numbers the watches of VMs (see [`VmPresence`]).
    pub(super) watches: u64,
    last_status: String,
    decisions: super::narrate::DecisionLog,
    trim: super::memory::Trim,
    pub(super) routing: RoutingHooks,
    /// VMs of the config whose kind has no driver in this build (said once, not managed).
    pub(super) unmanaged: BTreeSet<String>,
    /// The engine's count of finished controller batches at the last rescan: each batch
    /// moves USB devices between the host and VMs.
    controller_batches: u64,
    /// Why the last scan of sysfs failed: `snapshot` is then the last good one.
    pub(super) scan_failure: Option<ScanFailed>,
    /// When a failed scan is tried again (no uevent may come to trigger it).
    scan_retry: Option<tokio::time::Instant>,
}

/// How soon a failed scan of sysfs is tried again.
const SCAN_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Run the daemon until SIGTERM or SIGINT.
pub async fn run(options: DaemonOptions) -> Result<(), DaemonError> {
    let config = match &options.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let socket = options
        .control
        .clone()
        .unwrap_or_else(|| config.control_socket.clone());
    let group = config
        .control_group
        .as_deref()
        .map(ControlGroup::lookup)
        .transpose()?;
    let server = ControlServer::bind(&socket, group)?;
    let uevents = options.uevents.open()?;
    let (engine, _engine_task) = engine::spawn_with_controllers(
        EngineOptions {
            dry_run: options.dry_run,
            ..EngineOptions::default()
        },
        Arc::new(VfioControllers::live(options.root.clone())),
    );
    let routing = RoutingHooks::start(&options.root, &config, &engine).await?;
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let mut status = engine.status();
    let (presence_tx, mut presence) = mpsc::unbounded_channel();
    let (inputs_tx, mut inputs) = mpsc::unbounded_channel();
    let changes = Arc::new(Changes::default());
    let mut clock_jumps = super::clock_watch::spawn();
    if let Some(sock) = uevents {
        tokio::spawn(listen_uevents(sock, changes.clone(), routing.clone()));
    }
    tokio::spawn(server.serve(Arc::new(ControlBridge(inputs_tx))));

    super::narrate::overlaps(&config);
    let mut daemon = Daemon {
        options,
        config: Arc::new(config),
        snapshot: Snapshot::default(),
        vms: BTreeMap::new(),
        engine,
        presence: presence_tx,
        watches: 0,
        last_status: String::new(),
        decisions: Default::default(),
        trim: Default::default(),
        routing,
        unmanaged: BTreeSet::new(),
        controller_batches: 0,
        scan_failure: None,
        scan_retry: None,
    };
    daemon.apply_config();
    daemon.rescan("start");
    super::narrate::sees(&daemon.snapshot, "at start");
    super::narrate::ready(&socket, &daemon.config, daemon.options.dry_run);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    daemon.publish_status();

    loop {
        tokio::select! {
            pending = changes.next() => daemon.on_changes(pending),
            () = sleep_until(daemon.scan_retry) => daemon.rescan("retry after a failed scan"),
            Some(p) = presence.recv() => daemon.on_presence(p),
            Some(jump) = clock_jumps.recv() => daemon.on_clock_jump(jump),
            Some(input) = inputs.recv() => match input {
                Input::Control(req, reply) => daemon.on_request(req, reply),
            },
            Ok(()) = status.changed() => daemon.publish_status(),
            _ = hup.recv() => match daemon.reload() {
                Ok(msg) => tracing::info!("SIGHUP: {msg}"),
                Err(msg) => tracing::error!("SIGHUP: {msg}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("usbroute daemon stopping; devices stay where they are");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    Ok(())
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Read uevents, log each, and note what the ones that matter ask of the picture
/// ([`Changes`]: the devices to read again, coalesced, or a full scan after a resync).
async fn listen_uevents(mut sock: UeventSource, changes: Arc<Changes>, routing: RoutingHooks) {
    loop {
        match sock.recv().await {
            Received::Event(ev) => {
                routing.on_uevent(&ev.devpath);
                if !changes.note(&ev) {
                    tracing::trace!(device = ev.kernel_name(), action = %ev.action, "uevent ignored");
                    continue;
                }
                if ev.trigger() == Trigger::Ignore {
                    tracing::debug!(object = ev.kernel_name(), action = %ev.action, "uevent: re-reading its device");
                    continue;
                }
                tracing::info!(
                    "uevent: {} {} ({}); re-checking the rules",
                    ev.action,
                    ev.kernel_name(),
                    crate::inventory::text::printable(
                        ev.product.as_deref().unwrap_or("no product string")
                    )
                );
            }
            Received::Resync { reason } => {
                tracing::warn!("uevents may be lost ({reason}); rescanning sysfs");
                changes.resync();
            }
            // The reason quotes the datagram's header: escape what it may carry.
            Received::Rejected { reason } => tracing::warn!(
                "ignored a uevent datagram: {}",
                crate::inventory::text::escaped(&reason)
            ),
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
    /// Hand the config to the engine and watch its VMs (see [`Daemon::watch_vms`]).
    fn apply_config(&mut self) {
        self.engine
            .send(EngineInput::Rules(self.config.rules.clone()));
        // The controller rules go before any VM the config dropped is reported gone: the
        // engine must still see that VM running, or it would give back a controller a live
        // guest holds. `functions` is the whole IOMMU group of each rule: an EHCI given to
        // a VM takes its UHCI companions, whose devices stay out of the device rules too.
        self.engine.send(EngineInput::Controllers(ControllerConfig {
            rules: self.config.controllers.clone(),
            functions: crate::vfio::held_by_rules(&self.options.root, &self.config.controllers),
            vms: self.config.vms.iter().map(|v| v.name.clone()).collect(),
        }));
        self.watch_vms();
    }

    /// Read sysfs again and hand the picture to the engine. A scan that failed (EMFILE,
    /// EIO) keeps the last good picture and is retried: handing over an empty one would
    /// take every device from every VM and drop every override.
    pub(super) fn rescan(&mut self, why: &str) {
        self.scan_retry = None;
        let snapshot = match inventory::try_scan(&self.options.root) {
            Ok(snapshot) => snapshot,
            Err(failed) => {
                if self.scan_failure.as_ref() != Some(&failed) {
                    tracing::error!(
                        "sysfs scan failed ({why}): {failed}; keeping the last good picture ({} devices) and retrying every {} s",
                        self.snapshot.devices.len(),
                        SCAN_RETRY.as_secs()
                    );
                }
                self.scan_failure = Some(failed);
                self.scan_retry = Some(tokio::time::Instant::now() + SCAN_RETRY);
                self.publish_status();
                return;
            }
        };
        if self.scan_failure.take().is_some() {
            tracing::info!("sysfs reads again ({why}); the picture is current");
        }
        let previous = std::mem::take(&mut self.snapshot.warnings);
        self.snapshot = snapshot;
        // Each rescan would repeat the same complaints: say each one once.
        for w in self
            .snapshot
            .warnings
            .iter()
            .filter(|w| !previous.contains(w))
        {
            tracing::warn!("sysfs: {w}");
        }
        tracing::debug!(
            devices = self.snapshot.devices.len(),
            "rescanned sysfs ({why})"
        );
        self.tell_engine(true);
    }

    /// Hand the picture to the engine, with the host's mounted disks read again when
    /// `mounts`.
    pub(super) fn tell_engine(&self, mounts: bool) {
        if mounts {
            self.engine
                .send(EngineInput::MountedDisks(super::mounts::mounted_disks(
                    &self.options.root,
                )));
        }
        self.engine
            .send(EngineInput::Devices(self.snapshot.devices.clone()));
    }

    /// Re-read the config; on error keep the running one and say why.
    pub(super) fn reload(&mut self) -> Result<String, String> {
        let Some(path) = self.options.config.clone() else {
            return Err("running without a config file (the empty policy): nothing to reload; restart with --config FILE".into());
        };
        let config = Config::load(&path).map_err(|e| {
            let why = crate::error_chain::one_line(&e);
            format!("{why}\nthe running config stays in force")
        })?;
        RoutingHooks::check_reload(&config)
            .map_err(|e| format!("{e}\nthe running config stays in force"))?;
        self.routing.reload(&self.config, &config);
        super::narrate::overlaps(&config);
        self.config = Arc::new(config);
        self.apply_config();
        self.rescan("reload");
        Ok(format!(
            "reloaded {}: {} VMs, {} rules",
            path.display(),
            self.vms.len(),
            self.config.rules.len()
        ))
    }

    /// Whether the engine's status `s` says it is at rest with the devices present and
    /// the VMs up now.
    pub(super) fn at_rest(&self, s: &crate::engine::coordinator::Status) -> bool {
        let up = self
            .vms
            .iter()
            .filter(|(_, v)| v.up)
            .map(|(name, _)| name.as_str());
        s.at_rest(&self.snapshot.devices, up)
    }

    fn publish_status(&mut self) {
        let batches = self.engine.status().borrow().controller_batches;
        if batches != self.controller_batches {
            // A bound group's USB devices are gone from the host, a restored one's are back.
            self.controller_batches = batches;
            self.rescan("controller rules");
        }
        let status = {
            let s = self.engine.status();
            let s = s.borrow();
            self.decisions.update(&s.desired, &self.snapshot);
            let at_rest = self.at_rest(&s);
            if self.trim.status_changed(at_rest) {
                tracing::trace!("at rest: free heap memory given back");
            }
            let passed = s
                .desired
                .devices
                .values()
                .filter(|d| d.placement != crate::policy::Placement::Host)
                .count();
            format!(
                "{}{} USB devices, {passed} for VMs; {}/{} VMs up; {} retries pending{}",
                if self.scan_failure.is_some() {
                    "sysfs unreadable, last good picture: "
                } else {
                    ""
                },
                self.snapshot.devices.len(),
                self.vms.values().filter(|v| v.up).count(),
                self.vms.len(),
                s.pending.len(),
                if self.options.dry_run {
                    " (dry run)"
                } else {
                    ""
                }
            )
        };
        if status != self.last_status {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }
}
