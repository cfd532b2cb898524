//! The daemon's VMs: each `[[vm]]` is watched through the driver of its kind
//! ([`crate::backend::drivers`]), and its presence stream is forwarded to the engine as
//! `VmUp`/`VmGone`. How a VM is noticed (QMP sockets, inotify, retries) is the driver's
//! business; a VM whose kind has no driver in this build is said once and not managed.

use super::event_loop::Daemon;
use crate::backend::driver::Retry;
use crate::backend::{Drivers, PresenceEvent, PresenceStream, VmBackend, VmDriver, VmTarget};
use crate::config::VmConfig;
use crate::engine::coordinator::Input as EngineInput;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A VM the daemon watches through its driver.
pub(super) struct VmPresence {
    /// Where the VM is (kept to notice a reload that moves it).
    pub(super) target: VmTarget,
    /// Which watch of this VM it is: events of a watch replaced by a reload are stale.
    watch: u64,
    retry: Retry,
    /// Forwards the driver's presence stream into the loop; aborting it drops the stream,
    /// which stops the driver watching.
    forwarder: tokio::task::JoinHandle<()>,
    /// The driver reported it up and not gone since.
    pub(super) up: bool,
    /// While up: the driver's connected backend, for control requests that read the VM
    /// through the daemon's connection (`vm_devices`: its monitor serves only us).
    pub(super) backend: Option<Arc<dyn VmBackend>>,
    /// The driver waits for a connection another client holds (its words), if it does.
    pub(super) held: Option<String>,
}

impl Drop for VmPresence {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

/// A presence event of one watch of one VM.
pub(super) struct PresenceNote {
    vm: String,
    watch: u64,
    event: PresenceEvent,
}

/// The VMs a driver of this build serves, with their target and driver.
type Managed = BTreeMap<String, (VmTarget, Arc<dyn VmDriver>)>;

/// Split the config's VMs into those a driver serves and the names of those none does.
fn by_driver(vms: &[VmConfig], drivers: &Drivers) -> (Managed, BTreeSet<String>) {
    let mut managed = Managed::new();
    let mut unmanaged = BTreeSet::new();
    for vm in vms {
        let target = vm.target();
        match drivers.for_target(&target) {
            Some(driver) => {
                managed.insert(vm.name.clone(), (target, driver.clone()));
            }
            None => {
                unmanaged.insert(vm.name.clone());
            }
        }
    }
    (managed, unmanaged)
}

impl Daemon {
    /// Tell the engine what each VM's backend can attach by, watch new VMs through their
    /// drivers, stop watching those gone or moved, and ask the drivers to try every VM
    /// that is down now (an event may have been missed).
    pub(super) fn watch_vms(&mut self) {
        let (wanted, unmanaged) = by_driver(&self.config.vms, &self.options.drivers);
        // A VM without a driver is said once, when it enters the config, then left alone:
        // its rules stay in the plan, which sees it as not running.
        for name in unmanaged.difference(&self.unmanaged) {
            if let Some(vm) = self.config.vm(name) {
                tracing::warn!("{}", crate::backend::driver::not_built(name, &vm.target));
            }
        }
        self.unmanaged = unmanaged;
        let backends = wanted
            .iter()
            .map(|(name, (_, driver))| (name.clone(), driver.capabilities()))
            .collect();
        self.engine.send(EngineInput::Backends(backends));
        let gone: Vec<String> = self
            .vms
            .iter()
            .filter(|(name, vm)| wanted.get(*name).map(|(t, _)| t) != Some(&vm.target))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.vms.remove(&name);
            self.engine.send(EngineInput::VmGone { name: name.clone() });
            tracing::info!(vm = %name, "VM no longer in the config (or its socket moved); usbroute stops managing it");
        }
        for vm in self.vms.values().filter(|v| !v.up) {
            (vm.retry)();
        }
        for (name, (target, driver)) in wanted {
            if !self.vms.contains_key(&name) {
                self.watch_vm(name, target, driver.as_ref());
            }
        }
    }

    fn watch_vm(&mut self, name: String, target: VmTarget, driver: &dyn VmDriver) {
        let stream = match driver.watch(&name, &target) {
            Ok(stream) => stream,
            Err(e) => {
                let why = crate::error_chain::one_line(&e);
                tracing::error!(vm = %name, "cannot watch the VM: {why}");
                return;
            }
        };
        self.watches += 1;
        let watch = self.watches;
        let retry = stream.retrier();
        let into = self.presence.clone();
        let forwarder = tokio::spawn(forward(name.clone(), watch, stream, into));
        let vm = VmPresence {
            target,
            watch,
            retry,
            forwarder,
            up: false,
            backend: None,
            held: None,
        };
        self.vms.insert(name, vm);
    }

    /// A driver said a VM came or went: tell the engine.
    pub(super) fn on_presence(&mut self, note: PresenceNote) {
        let Some(v) = self.vms.get_mut(&note.vm).filter(|v| v.watch == note.watch) else {
            return; // a watch a reload replaced
        };
        let vm = note.vm;
        match note.event {
            PresenceEvent::Up(backend) => {
                v.up = true;
                v.held = None;
                v.backend = Some(backend.clone());
                self.engine.send(EngineInput::VmUp { name: vm, backend });
            }
            PresenceEvent::Gone { reason } => {
                v.up = false;
                v.backend = None;
                tracing::warn!(vm = %vm, "VM went down: {reason}");
                self.engine.send(EngineInput::VmGone { name: vm });
            }
            // Said once per wait, not on every retry: the driver reports a wait once.
            PresenceEvent::Held(Some(reason)) => {
                tracing::warn!(vm = %vm, "{reason}");
                v.held = Some(reason);
            }
            PresenceEvent::Held(None) => v.held = None,
        }
    }
}

/// Carries one VM's presence events from its driver into the loop, tagged with the watch.
async fn forward(
    vm: String,
    watch: u64,
    mut stream: PresenceStream,
    into: mpsc::UnboundedSender<PresenceNote>,
) {
    while let Some(event) = stream.next().await {
        let note = PresenceNote {
            vm: vm.clone(),
            watch,
            event,
        };
        if into.send(note).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::driver::fake::FakeDriver;
    use crate::config::Config;
    use crate::daemon::{request, DaemonOptions, Request};
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    const CONFIG: &str = "[[vm]]\nname = \"a\"\nqmp = \"/nonexistent/a.qmp\"\n\n[[rule]]\nmatch = \"port:1-2.1\"\nvm = \"a\"\nby = \"port\"\n";

    /// Ask the daemon at `socket` until `done` holds for the reply (10 s at most).
    async fn ask_until(socket: &Path, req: Request, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (s, r) = (socket.to_path_buf(), req.clone());
            let reply = tokio::task::spawn_blocking(move || request(&s, &r))
                .await
                .unwrap();
            let text = match reply {
                Ok(reply) => serde_json::to_string(&reply).unwrap(),
                Err(e) => e.to_string(),
            };
            if done(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within 10 s; last: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn a_vm_whose_kind_has_no_driver_in_this_build_is_not_managed() {
        let config = Config::parse(CONFIG, None).unwrap();

        let (managed, unmanaged) = by_driver(&config.vms, &Drivers::default());

        assert!(managed.is_empty());
        assert_eq!(unmanaged, BTreeSet::from(["a".to_string()]));
    }

    #[test]
    fn a_vm_of_this_builds_qemu_is_managed_by_the_qemu_driver() {
        let config = Config::parse(CONFIG, None).unwrap();
        let drivers = crate::backend::drivers(crate::sysfs::SysfsRoot::default());

        let (managed, unmanaged) = by_driver(&config.vms, &drivers);

        assert_eq!(managed["a"].1.name(), "qemu");
        assert!(unmanaged.is_empty());
    }

    #[tokio::test]
    async fn the_daemon_forwards_a_drivers_presence_and_plans_with_its_modes() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("usbroute.toml");
        std::fs::write(&config, CONFIG).unwrap();
        let socket = dir.path().join("control.sock");
        let fixture =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-xhci-ehci");
        let driver = Arc::new(FakeDriver::address_only());
        let options = DaemonOptions {
            config: Some(config),
            control: Some(socket.clone()),
            root: crate::sysfs::SysfsRoot::new(fixture),
            dry_run: false,
            drivers: Drivers::new(vec![driver.clone()]),
            uevents: crate::events::UeventFeed::Off,
        };
        let daemon = tokio::spawn(crate::daemon::run(options));

        let up = ask_until(&socket, Request::Status {}, |r| {
            r.contains(r#""name":"a","qmp":"/nonexistent/a.qmp","up":true"#)
        })
        .await;
        let why = Request::Why {
            selector: "port:1-2.1".into(),
        };
        let said = ask_until(&socket, why, |r| r.contains("cannot attach by")).await;
        let _ = driver.senders.lock().unwrap()[0].send(PresenceEvent::Gone {
            reason: "test".into(),
        });
        let down = ask_until(&socket, Request::Status {}, |r| r.contains(r#""up":false"#)).await;
        daemon.abort();

        assert!(up.contains(r#""up":true"#));
        assert!(
            said.contains("VM a's backend (qemu) cannot attach by port"),
            "{said}"
        );
        assert!(down.contains(r#""name":"a""#));
    }
}
