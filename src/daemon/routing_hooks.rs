//! Port routing inside `usbroute serve`: the daemon's few hooks into
//! [`crate::toggle::runtime::RoutingRuntime`]. Off (and touching nothing) unless the
//! config has `[routing.profile.*]`; on, it runs the toggle listeners (TCP, each VM's
//! serial link), the watch that puts the routing back after the kernel rewrote XUSB2PR,
//! reconciles on the xHCI's uevents, and answers `routing` control requests.

use super::protocol::{ErrorKind, Reply};
use crate::config::{check_routing_config, vm_links, Config};
use crate::routing::RoutingError;
use crate::sysfs::SysfsRoot;
use crate::toggle::runtime::{RoutingRuntime, DEFAULT_WATCH_INTERVAL};
use crate::toggle::server::ToggleError;
use tokio::task::JoinHandle;

/// Port routing could not start.
#[derive(Debug, thiserror::Error)]
pub enum RoutingStartError {
    /// `[routing]`, `[toggle]` or a VM's `serial`/`profiles` is wrong.
    #[error("{path}: port routing config is not valid:\n  {}\nfix it, or remove the [routing.profile.*] tables to run without port routing", problems.join("\n  "))]
    Config {
        /// The config file.
        path: String,
        /// One message per problem.
        problems: Vec<String>,
    },
    /// The xHCI could not be found or opened.
    #[error("port routing cannot start")]
    Routing(#[from] RoutingError),
    /// A toggle listener could not be bound.
    #[error("the toggle service cannot listen")]
    Listen(#[from] ToggleError),
}

/// The routing part of the daemon; cheap to clone (the uevent task holds one).
#[derive(Clone, Default)]
pub(super) struct RoutingHooks {
    runtime: Option<RoutingRuntime>,
}

/// The config's routing problems, `Err` with them all when there are any.
fn check(config: &Config) -> Result<(), RoutingStartError> {
    let problems = check_routing_config(config);
    if problems.is_empty() {
        return Ok(());
    }
    Err(RoutingStartError::Config {
        path: config
            .origin
            .as_ref()
            .map_or_else(|| "the config".into(), |p| p.display().to_string()),
        problems,
    })
}

impl RoutingHooks {
    /// Check the config, and when it has routing profiles: find the xHCI, bind the
    /// listeners and start the watch. Every error is fatal at start. With `dry_run`
    /// (`serve --dry-run`) every route to the registers (toggles from any listener or
    /// the control socket, the watch, uevents, reloaded profiles) logs and writes nothing.
    pub(super) async fn start(
        root: &SysfsRoot,
        config: &Config,
        dry_run: bool,
    ) -> Result<Self, RoutingStartError> {
        check(config)?;
        let Some(runtime) = RoutingRuntime::from_config(root, &config.routing, dry_run)? else {
            return Ok(Self::default());
        };
        let listeners: Vec<JoinHandle<()>> = runtime
            .start_listeners(&config.toggle, &vm_links(config))
            .await?;
        tracing::info!(
            controller = %runtime.controller(),
            listeners = listeners.len(),
            "port routing on: toggle service listening"
        );
        tokio::spawn(runtime.clone().watch(DEFAULT_WATCH_INTERVAL));
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    /// Before a reload takes effect: the new config's routing problems, as the reload's
    /// error (the running config stays).
    pub(super) fn check_reload(new: &Config) -> Result<(), String> {
        check(new).map_err(|e| e.to_string())
    }

    /// After a reload: the new profiles take effect at once. Listeners and the
    /// controller are bound at start; changing them (or turning routing on or off)
    /// needs a restart, which is said in the log.
    pub(super) fn reload(&self, old: &Config, new: &Config) {
        match &self.runtime {
            Some(rt) if !new.routing.profile.is_empty() => rt.reload(&new.routing),
            Some(_) => tracing::warn!("[routing] has no profiles any more: the toggle service keeps running with the old ones until the daemon restarts"),
            None if !new.routing.profile.is_empty() => tracing::warn!("[routing] profiles were added: restart the daemon to start the toggle service"),
            None => {}
        }
        let restart_needed = old.toggle != new.toggle
            || vm_links(old) != vm_links(new)
            || old.routing.controller != new.routing.controller;
        if self.runtime.is_some() && restart_needed {
            tracing::warn!("[toggle], the VMs' serial links or [routing] controller changed: they take effect when the daemon restarts");
        }
    }

    /// A kernel uevent: the routed xHCI's own (bind, change, runtime PM) may mean the
    /// kernel rewrote XUSB2PR, so put the active profile back now rather than at the
    /// next watch tick.
    pub(super) fn on_uevent(&self, devpath: &str) {
        let Some(rt) = &self.runtime else { return };
        if !devpath.ends_with(&rt.controller().to_string()) {
            return;
        }
        rt.reconcile_and_log("after a uevent of the xHCI");
    }

    /// Answer a `routing` control request: one toggle-protocol line.
    pub(super) fn control_line(&self, line: &str) -> Reply {
        let Some(rt) = &self.runtime else {
            return Reply::error(
                ErrorKind::NotFound,
                "port routing is off in this daemon: its config has no [routing.profile.*] (see docs/routing.md); `usbroute ports toggle` switches without the daemon",
            );
        };
        match rt.control_line(line) {
            Some(line) => Reply::Routing { line },
            None => Reply::error(
                ErrorKind::BadRequest,
                "empty routing line: send toggle, host, guest, status or a profile name",
            ),
        }
    }
}
