//! The routing reconciler at work inside the engine: one task owns the
//! [`PortRouting`], so requests from every listener and the checks the daemon asks for
//! run one at a time. Its state goes into the engine's `Status` after each of them.
//!
//! Nothing runs on a timer: the register is read once at start and whenever something
//! may have rewritten it. The kernel rewrites XUSB2PR on every resume of the xHCI; a
//! runtime resume sends no uevent, but cannot happen while a routing is in force (the
//! router pins the xHCI's `power/control` to `on`), a system resume is noticed by the
//! daemon's clock watch, and a rewrite that moves a device is seen by its uevents (the
//! daemon checks on the uevents of USB devices below the xHCI and its EHCIs).

use super::{answer, decide, PortRouting, RoutingRequest, RoutingStatus, RoutingStep};
use super::{PowerStep, RoutingAnswer};
use tokio::sync::{mpsc, oneshot};

/// Why the first check runs, for its log lines.
const START_WHY: &str = "at start (the kernel resets it at boot and on each resume of the xHCI)";

/// Something for the routing reconciler.
pub enum RoutingInput {
    /// Route with this (at start; after a reload, the same xHCI with the new profiles).
    Use(Box<dyn PortRouting>),
    /// Check now; `why` says what prompted it (a uevent of the xHCI).
    Check {
        /// For the log.
        why: String,
    },
    /// A toggle-protocol request from a listener or the control socket.
    Request {
        /// The request.
        request: RoutingRequest,
        /// Where the answer goes.
        reply: oneshot::Sender<RoutingAnswer>,
    },
}

/// The engine's end of the reconciler: nothing until the first router, then its inputs.
#[derive(Default)]
pub struct RoutingSlot(Option<mpsc::UnboundedSender<RoutingInput>>);

impl RoutingSlot {
    /// Hand `input` on, starting the reconciler at the first [`RoutingInput::Use`]
    /// (see [`spawn`] for the rest). A request before that is dropped, which answers it
    /// with "routing is off".
    pub fn forward(
        &mut self,
        input: RoutingInput,
        dry_run: bool,
        publish: impl Fn(RoutingStatus) + Send + 'static,
    ) {
        match (&self.0, input) {
            (Some(tx), input) => {
                let _ = tx.send(input);
            }
            (None, RoutingInput::Use(routing)) => {
                self.0 = Some(spawn(routing, dry_run, publish));
            }
            (None, _) => {}
        }
    }
}

/// Start the reconciler on `routing`; it stops when the sender is dropped. `publish`
/// gets its status after every check and request.
pub fn spawn(
    routing: Box<dyn PortRouting>,
    dry_run: bool,
    publish: impl Fn(RoutingStatus) + Send + 'static,
) -> mpsc::UnboundedSender<RoutingInput> {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = Worker {
        routing,
        dry_run,
        said: None,
        error: None,
        last: None,
        publish: Box::new(publish),
    };
    tokio::spawn(worker.run(rx));
    tx
}

struct Worker {
    routing: Box<dyn PortRouting>,
    dry_run: bool,
    /// What a dry run last said it would write back: said again only when it changes,
    /// not at every check.
    said: Option<RoutingStep>,
    /// Why the last check failed.
    error: Option<String>,
    /// What was published last.
    last: Option<RoutingStatus>,
    publish: Box<dyn Fn(RoutingStatus) + Send>,
}

impl Worker {
    async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<RoutingInput>) {
        self.check(START_WHY);
        while let Some(input) = inputs.recv().await {
            match input {
                RoutingInput::Use(routing) => {
                    self.routing = routing;
                    self.publish();
                }
                RoutingInput::Check { why } => self.check(&why),
                RoutingInput::Request { request, reply } => {
                    let answer = answer(&mut *self.routing, &request, self.dry_run);
                    self.publish();
                    let _ = reply.send(answer);
                }
            }
        }
    }

    /// Reconcile once: read, decide, and write back (in a dry run: say what would be).
    fn check(&mut self, why: &str) {
        let step = match self.routing.read() {
            Ok(reading) => decide(&reading),
            Err(e) => return self.failed(why, &*e),
        };
        self.error = None;
        match step {
            RoutingStep::Hold => {
                // Held again: a later difference, even the same one, is news.
                self.said = None;
            }
            step if self.dry_run => {
                if self.said.as_ref() != Some(&step) {
                    log_dry_run(&step, why);
                    self.said = Some(step);
                }
            }
            _ => match self.routing.restore() {
                Ok(Some(r)) => tracing::warn!(
                    profile = %r.profile,
                    "XUSB2PR was 0x{:04x} ({why}); put 0x{:04x} back",
                    r.found,
                    r.restored
                ),
                Ok(None) => {}
                Err(e) => return self.failed(why, &*e),
            },
        }
        self.publish();
    }

    fn failed(&mut self, why: &str, e: &(dyn std::error::Error + 'static)) {
        let text = crate::error_chain::one_line(e);
        tracing::error!("port routing check ({why}) failed: {text}");
        self.error = Some(text);
        self.publish();
    }

    /// Read again and hand the status on, when it changed.
    fn publish(&mut self) {
        let controller = self.routing.controller().to_string();
        let mut status = match &self.last {
            Some(last) if last.controller == controller => last.clone(),
            _ => RoutingStatus {
                controller,
                profile: None,
                xusb2pr: 0,
                intent: None,
                would: None,
                error: None,
            },
        };
        // A read that fails keeps the last values read; `error` says why.
        if let Ok(reading) = self.routing.read() {
            status.profile = reading.in_force;
            status.xusb2pr = reading.xusb2pr;
            status.intent = reading.intent.map(|i| i.profile);
        }
        status.would = self.said.clone();
        status.error = self.error.clone();
        if self.last.as_ref() != Some(&status) {
            self.last = Some(status.clone());
            (self.publish)(status);
        }
    }
}

fn log_dry_run(step: &RoutingStep, why: &str) {
    match step {
        RoutingStep::Hold => {}
        RoutingStep::Restore(r) => tracing::info!(
            profile = %r.profile,
            "dry run: XUSB2PR was 0x{:04x} ({why}); would put 0x{:04x} back; nothing is written",
            r.found,
            r.restored
        ),
        RoutingStep::Power { profile, power } => {
            let to = match power {
                PowerStep::Unpin { to } => to.as_str(),
                PowerStep::Pin | PowerStep::Unchanged => "on",
            };
            tracing::info!(
                profile = %profile,
                "dry run: the xHCI's power/control does not go with the routing ({why}); would set it to {to}; nothing is written"
            );
        }
    }
}
