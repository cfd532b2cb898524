//! The engine's interface: the [`Input`]s it is fed, its [`EngineOptions`], and the
//! [`EngineHandle`] the daemon holds (started by [`super::coordinator::spawn`]).

use super::controllers::ControllerConfig;
use super::retry::BackoffPolicy;
use super::routing::worker::RoutingInput;
use super::routing::{RoutingAnswer, RoutingRequest};
use super::status::Status;
use crate::backend::{Capabilities, VmBackend};
use crate::inventory::{Device, PortPath};
use crate::policy::{Override, Rule, Why};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Something the engine must know about. Each one triggers a reconcile round.
pub enum Input {
    /// The rules changed (start, reload). Only ever a whole, validated set.
    Rules(Vec<Rule>),
    /// The config's `[[controller]]` rules (start, reload): their groups go to vfio-pci
    /// (through the engine's [`ControllerHost`](super::ControllerHost)), and while a rule's VM runs, devices on
    /// any function of its group stay out of the device rules.
    Controllers(ControllerConfig),
    /// A fresh list of the devices present (after a uevent, a rescan, ENOBUFS), shared
    /// with the daemon's picture.
    Devices(Arc<Vec<Device>>),
    /// Whole disks with a host filesystem mounted (see [`PlanInput::mounted_disks`]).
    MountedDisks(BTreeSet<String>),
    /// What each configured VM's backend can attach by (start, reload); a VM absent may
    /// be asked for any mode.
    Backends(BTreeMap<String, Capabilities>),
    /// A VM is running and reachable through `backend`.
    VmUp {
        /// The VM's name.
        name: String,
        /// Its backend (already connected or connecting on demand).
        backend: Arc<dyn VmBackend>,
    },
    /// A VM's process is gone (socket removed, connection refused). Its devices are
    /// freed. Not for a VM that merely stopped answering: that one keeps its devices.
    VmGone {
        /// The VM's name.
        name: String,
    },
    /// Set (`Some`) or clear (`None`) the manual override for the device at a port.
    /// It also ends when that device is unplugged (a new plug has a new address).
    Override {
        /// The device's port.
        port: PortPath,
        /// The override.
        value: Option<Override>,
    },
    /// Read every VM's devices again (the VM may have changed behind our back).
    Refresh,
    /// The host resumed from suspend: the kernel reset every USB device and handed
    /// their interfaces back to its own drivers, while QEMU may still list its usb-host
    /// devices as attached. Every VM is listed again and every device of ours detached
    /// and attached anew (docs/daemon.md, "Suspend and resume").
    Resumed,
    /// Explain the decision for the device at `port` (`None`: no device there).
    Why {
        /// The device's port.
        port: PortPath,
        /// Where the answer goes.
        reply: oneshot::Sender<Option<Why>>,
    },
    /// For the port-routing reconciler (`engine::routing`); it runs beside the device
    /// rounds, from the first [`RoutingInput::Use`] on.
    Routing(RoutingInput),
}

/// Knobs of the runtime.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Backoff for failed actions and for VMs that do not answer a list.
    pub backoff: BackoffPolicy,
    /// Decide and log, never act.
    pub dry_run: bool,
    /// How long attaches wait for a VM that came up but has not yet answered a list
    /// (it may hold any device). After that, the kernel's exclusive claim of a device by
    /// the QEMU holding it is the backstop, so one broken VM cannot stall every other.
    /// Only attaches of devices that VM could hold wait (see `engine::unknown`), and a
    /// VM never heard from gets one grace per engine run, however often it comes and goes.
    pub unknown_holdings_grace: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            backoff: BackoffPolicy::default(),
            dry_run: false,
            unknown_holdings_grace: Duration::from_secs(10),
        }
    }
}

/// The daemon's handle on a running engine. Dropping every handle stops the engine.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) inputs: mpsc::UnboundedSender<Input>,
    pub(super) status: watch::Receiver<Status>,
}

impl EngineHandle {
    /// Tell the engine something; `false` when the engine has stopped.
    pub fn send(&self, input: Input) -> bool {
        self.inputs.send(input).is_ok()
    }

    /// The latest status, and a way to wait for the next one.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Explain the decision for the device at `port`.
    pub async fn why(&self, port: PortPath) -> Option<Why> {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Why { port, reply });
        answer.await.ok().flatten()
    }

    /// Hand a toggle-protocol request to the routing reconciler and wait for its answer.
    pub async fn routing(&self, request: RoutingRequest) -> RoutingAnswer {
        let (reply, answer) = oneshot::channel();
        self.send(Input::Routing(RoutingInput::Request { request, reply }));
        answer.await.unwrap_or_else(|_| {
            RoutingAnswer::Err("port routing is off in this daemon, or it is stopping".into())
        })
    }
}
