//! Port routing inside `usbroute serve`: plumbing only. The engine's routing
//! reconciler (`crate::engine::routing`) decides and writes; this hands it the router
//! at start and after a reload, forwards the xHCI's uevents as checks, starts the toggle
//! listeners (whose requests go to the engine), and carries `routing` control requests
//! there. Off (and touching nothing) unless the config has `[routing.profile.*]`.

use super::protocol::{ErrorKind, Reply};
use crate::config::{check_routing_config, vm_links, Config};
use crate::engine::coordinator::{EngineHandle, Input as EngineInput};
use crate::engine::routing::worker::RoutingInput;
use crate::routing::control::ProfileRouter;
use crate::routing::detect::Detected;
use crate::routing::RoutingError;
use crate::sysfs::SysfsRoot;
use crate::toggle::dispatch::{Access, Session};
use crate::toggle::server::{ToggleError, ToggleService};
use std::future::Future;
use std::sync::Arc;

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
    on: Option<On>,
}

/// Routing is on: where requests go and what a reload needs.
#[derive(Clone)]
struct On {
    root: SysfsRoot,
    /// The xHCI found at start; a reload keeps it.
    detected: Detected,
    engine: EngineHandle,
    /// The same dispatcher the listeners use, for the control socket.
    service: ToggleService,
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
    /// Check the config, and when it has routing profiles: find the xHCI, hand the
    /// router to the engine and bind the listeners. Every error is fatal at start. Under
    /// `serve --dry-run` the engine writes nothing, whoever asks.
    pub(super) async fn start(
        root: &SysfsRoot,
        config: &Config,
        engine: &EngineHandle,
    ) -> Result<Self, RoutingStartError> {
        check(config)?;
        if config.routing.profile.is_empty() {
            return Ok(Self::default());
        }
        let router = ProfileRouter::open(root, &config.routing)?;
        let detected = router.router().detected().clone();
        engine.send(EngineInput::Routing(RoutingInput::Use(Box::new(router))));
        let service = ToggleService::new(Arc::new(engine.clone()));
        let listeners =
            crate::toggle::start(service.clone(), &config.toggle, &vm_links(config)).await?;
        tracing::info!(
            controller = %detected.xhci,
            listeners = listeners.len(),
            "port routing on: toggle service listening"
        );
        Ok(Self {
            on: Some(On {
                root: root.clone(),
                detected,
                engine: engine.clone(),
                service,
            }),
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
        match &self.on {
            Some(on) if !new.routing.profile.is_empty() => {
                let router = ProfileRouter::open_detected(
                    &on.root,
                    on.detected.clone(),
                    new.routing.clone(),
                );
                on.engine
                    .send(EngineInput::Routing(RoutingInput::Use(Box::new(router))));
            }
            Some(_) => tracing::warn!("[routing] has no profiles any more: the toggle service keeps running with the old ones until the daemon restarts"),
            None if !new.routing.profile.is_empty() => tracing::warn!("[routing] profiles were added: restart the daemon to start the toggle service"),
            None => {}
        }
        let restart_needed = old.toggle != new.toggle
            || vm_links(old) != vm_links(new)
            || old.routing.controller != new.routing.controller;
        if self.on.is_some() && restart_needed {
            tracing::warn!("[toggle], the VMs' serial links or [routing] controller changed: they take effect when the daemon restarts");
        }
    }

    /// A kernel uevent of the routed xHCI or its EHCIs, or of a USB device below them,
    /// may mean the kernel rewrote XUSB2PR: the xHCI's own (a bind rewrites it), or a
    /// device leaving one controller for the other (what a rewrite does to a routed
    /// port's device). The engine checks now: this, the start and a resume are the only
    /// times it reads the register (no timer; see `engine::routing::worker`).
    pub(super) fn on_uevent(&self, devpath: &str) {
        let Some(on) = &self.on else { return };
        let detected = &on.detected;
        let controllers = std::iter::once(detected.xhci).chain(detected.ehci.iter().map(|e| e.pci));
        if controllers
            .into_iter()
            .any(|pci| below(devpath, &pci.to_string()))
        {
            self.check("after a uevent of the routed controllers or a device on them");
        }
    }

    /// Ask the engine to check the register now (the kernel rewrites XUSB2PR on every
    /// resume of an Intel xHCI, for one); nothing when routing is off.
    pub(super) fn check(&self, why: &str) {
        if let Some(on) = &self.on {
            on.engine.send(EngineInput::Routing(RoutingInput::Check {
                why: why.into(),
            }));
        }
    }

    /// Answer a `routing` control request (one toggle-protocol line; the socket checked
    /// its peer): through the engine, so the answer comes later.
    pub(super) fn control_line(&self, line: String) -> impl Future<Output = Reply> + 'static {
        let service = self.on.as_ref().map(|on| on.service.clone());
        async move {
            let Some(service) = service else {
                return Reply::error(
                    ErrorKind::NotFound,
                    "port routing is off in this daemon: its config has no [routing.profile.*] (see docs/routing.md); `usbroute ports toggle` switches without the daemon",
                );
            };
            let access = Access::unrestricted("control socket");
            let mut session = Session::default();
            match service
                .handle_line(&access, &mut session, line.as_bytes())
                .await
            {
                Some(reply) => Reply::Routing {
                    line: reply.to_string(),
                },
                None => Reply::error(
                    ErrorKind::BadRequest,
                    "empty routing line: send toggle, host, guest, status or a profile name",
                ),
            }
        }
    }
}

/// `devpath` is the device named `name` or a device below it.
fn below(devpath: &str, name: &str) -> bool {
    devpath.split('/').any(|part| part == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::coordinator::{self as engine, EngineOptions};

    #[test]
    fn a_uevent_is_below_a_controller_when_its_path_passes_through_it() {
        let ehci = "0000:00:1d.0";
        assert!(below("/devices/pci0000:00/0000:00:1d.0", ehci));
        assert!(below(
            "/devices/pci0000:00/0000:00:1d.0/usb2/2-1/2-1.3",
            ehci
        ));
        assert!(!below("/devices/pci0000:00/0000:00:1d.1/usb3/3-1", ehci));
        assert!(!below("/devices/pci0000:00/0000:00:14.0/usb1/1-1", ehci));
    }

    #[tokio::test]
    async fn routing_is_off_without_profiles_and_looks_for_no_xhci() {
        // No sysfs at all: finding an xHCI would fail, so starting must not look.
        let root = SysfsRoot::new("/nonexistent/usbroute-test-root");
        let (engine, _task) = engine::spawn(EngineOptions::default());

        let hooks = RoutingHooks::start(&root, &Config::default(), &engine)
            .await
            .expect("routing off starts");
        let reply = hooks.control_line("toggle".into()).await;

        assert!(hooks.on.is_none());
        assert!(
            matches!(&reply, Reply::Error { message, .. } if message.contains("port routing is off")),
            "{reply:?}"
        );
        assert!(engine.status().borrow().routing.is_none());
    }
}
