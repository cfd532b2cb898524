//! What `usbroute serve` runs for port routing: one router, the toggle listeners, the
//! control-socket hook and the watch that puts the routing back after the kernel
//! rewrote it (every resume of the xHCI, runtime PM included).

use super::dispatch::{Access, Session};
use super::server::{ToggleError, ToggleService};
use super::{start, ToggleConfig, VmLink};
use crate::routing::config_space::SysfsConfigSpace;
use crate::routing::control::ProfileRouter;
use crate::routing::detect::detect;
use crate::routing::router::{Reapplied, Router};
use crate::routing::{RoutingConfig, RoutingError};
use crate::sysfs::SysfsRoot;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often [`RoutingRuntime::watch`] checks the register by default. The kernel
/// sends no uevent on runtime resume, so polling is the one sure way to notice.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Port routing inside the daemon.
#[derive(Clone)]
pub struct RoutingRuntime {
    router: Arc<Mutex<ProfileRouter<SysfsConfigSpace>>>,
    service: ToggleService,
    /// What a dry run last said it would put back: said again only when it changes, not
    /// at every watch tick.
    last_dry_run: Arc<Mutex<Option<Reapplied>>>,
}

impl RoutingRuntime {
    /// Detect the xHCI and build the router; `Ok(None)` when the config has no routing
    /// profiles (then routing is off and nothing is touched). With `dry_run` every
    /// toggle and re-apply is logged and nothing is written (see [`Router::with_dry_run`]).
    pub fn from_config(
        root: &SysfsRoot,
        routing: &RoutingConfig,
        dry_run: bool,
    ) -> Result<Option<Self>, RoutingError> {
        if routing.profile.is_empty() {
            return Ok(None);
        }
        let detected = detect(root, routing.controller)?;
        let router = Arc::new(Mutex::new(ProfileRouter::new(
            Router::open(root, detected).with_dry_run(dry_run),
            routing.clone(),
        )));
        Ok(Some(Self {
            service: ToggleService::new(router.clone()),
            router,
            last_dry_run: Arc::default(),
        }))
    }

    /// The xHCI being routed: the daemon calls [`reconcile`](Self::reconcile) on uevents
    /// whose devpath ends in this address (bind, change, runtime PM changes).
    pub fn controller(&self) -> crate::inventory::PciAddress {
        self.lock().router().detected().xhci
    }

    /// Bind the TCP listener and every VM's serial link, and serve them.
    pub async fn start_listeners(
        &self,
        toggle: &ToggleConfig,
        vms: &[VmLink],
    ) -> Result<Vec<JoinHandle<()>>, ToggleError> {
        start(self.service.clone(), toggle, vms).await
    }

    /// One toggle-protocol line from the control socket (whose peer check already ran);
    /// the reply line, `None` for a blank line.
    pub fn control_line(&self, line: &str) -> Option<String> {
        self.service
            .handle_line(
                &Access::unrestricted("control socket"),
                &mut Session::default(),
                line.as_bytes(),
            )
            .map(|r| r.to_string())
    }

    /// Put the active profile back if the register no longer holds it. Call on the
    /// xHCI's uevents (bind, change) besides [`watch`](Self::watch).
    pub fn reconcile(&self) -> Result<Option<Reapplied>, RoutingError> {
        self.lock().reconcile()
    }

    /// New `[routing]` after a config reload (the registers are left as they are).
    pub fn reload(&self, routing: &RoutingConfig) {
        self.lock().set_config(routing.clone());
    }

    /// Reconcile and log what was put back (or, in a dry run, would be); `why` says
    /// what prompted the check.
    pub fn reconcile_and_log(&self, why: &str) {
        match self.reconcile() {
            Ok(Some(r)) if r.dry_run => {
                let mut last = self.last_dry_run.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_ref() != Some(&r) {
                    tracing::info!(
                        profile = %r.profile,
                        "dry run: XUSB2PR was 0x{:04x} ({why}); would put 0x{:04x} back; nothing is written",
                        r.found,
                        r.restored
                    );
                    *last = Some(r);
                }
            }
            Ok(Some(r)) => tracing::warn!(
                profile = %r.profile,
                "XUSB2PR was 0x{:04x} ({why}); put 0x{:04x} back",
                r.found,
                r.restored
            ),
            Ok(None) => {
                // Held again: a later difference, even the same one, is news.
                *self.last_dry_run.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Err(e) => tracing::error!("port routing check ({why}) failed: {e}"),
        }
    }

    /// Reconcile every `every` forever, logging what was put back.
    pub async fn watch(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reconcile_and_log("the kernel resets it when the xHCI resumes");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProfileRouter<SysfsConfigSpace>> {
        self.router.lock().unwrap_or_else(|p| p.into_inner())
    }
}
