//! A driver per hypervisor: what it is called, what it can attach by, and whether a VM
//! is up. The daemon asks the [`Drivers`] registry for the driver of each `[[vm]]`'s
//! [`VmTarget`] and forwards that VM's [`PresenceStream`] to the engine; how a driver
//! notices a VM (QEMU: connecting to its QMP socket, woken by inotify) is its own business.
//!
//! Adding a hypervisor: a folder under `backend/` with a [`VmDriver`], plus one line in
//! [`drivers`].

use super::{AttachMode, BackendError, VmBackend, VmTarget};
use crate::sysfs::SysfsRoot;
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::mpsc;

/// What a VM's backend can do, as plain data for the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// The driver's name (`qemu`), for reasons and logs.
    pub backend: String,
    /// The attach modes it supports. Each mode is the identity the hypervisor finds the
    /// host device by: bus+address, bus+port path, or vendor:product.
    pub modes: BTreeSet<AttachMode>,
    /// It follows a port or a kind of device itself, attaching each plug by its address:
    /// the plan then places a rule by a mode it lacks by address instead of keeping the
    /// device home (Xen, whose libxl attaches by bus+address only).
    pub follows_by_address: bool,
}

impl Capabilities {
    /// Can this backend attach by `mode`?
    pub fn supports(&self, mode: AttachMode) -> bool {
        self.modes.contains(&mode)
    }
}

/// A VM came up or went away.
pub enum PresenceEvent {
    /// The VM is reachable; this backend is connected to it.
    Up(Arc<dyn VmBackend>),
    /// The VM went away (stopped, closed its monitor).
    Gone {
        /// Why, for the log.
        reason: String,
    },
    /// `Some(why)`: the VM runs, but another client holds the connection the driver needs
    /// (QEMU serves one client per monitor); the driver waits its turn. `None`: that wait
    /// ended without a connection. (An `Up` ends it too.)
    Held(Option<String>),
}

/// Asks a presence stream to try its VM now (after a reload: an event may have been missed).
pub type Retry = Arc<dyn Fn() + Send + Sync>;

/// One VM's presence, up and gone in turn, for as long as the stream is kept: dropping
/// it stops the driver watching that VM.
pub struct PresenceStream {
    events: mpsc::UnboundedReceiver<PresenceEvent>,
    retry: Retry,
}

impl PresenceStream {
    /// A stream of the events sent into `events`'s sender; `retry` makes the driver try the
    /// VM now.
    pub fn new(events: mpsc::UnboundedReceiver<PresenceEvent>, retry: Retry) -> Self {
        PresenceStream { events, retry }
    }

    /// The next event; `None` once the driver stopped watching.
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        self.events.recv().await
    }

    /// A handle that makes the driver try the VM now, usable after the stream moved.
    pub fn retrier(&self) -> Retry {
        self.retry.clone()
    }
}

/// A hypervisor's driver.
pub trait VmDriver: Send + Sync {
    /// Its name, which is also the [`VmTarget::kind`] it serves (`qemu`).
    fn name(&self) -> &'static str;
    /// The attach modes its backends support.
    fn modes(&self) -> BTreeSet<AttachMode>;
    /// `true` when a rule by a mode it lacks is carried out by address, plug by plug (see
    /// [`Capabilities::follows_by_address`]); `false` keeps such a rule's devices home.
    fn follows_by_address(&self) -> bool {
        false
    }
    /// Watch VM `vm` at `target` (a target of this driver's kind). Needs a tokio runtime.
    fn watch(&self, vm: &str, target: &VmTarget) -> Result<PresenceStream, BackendError>;

    /// [`Self::name`] and [`Self::modes`] as data.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: self.name().to_string(),
            modes: self.modes(),
            follows_by_address: self.follows_by_address(),
        }
    }
}

/// The drivers of this build, by the kind of target they serve.
#[derive(Clone, Default)]
pub struct Drivers {
    drivers: Vec<Arc<dyn VmDriver>>,
}

impl std::fmt::Debug for Drivers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.drivers.iter().map(|d| d.name()).collect();
        f.debug_tuple("Drivers").field(&names).finish()
    }
}

impl Drivers {
    /// A registry of these drivers (tests fill it with fakes).
    pub fn new(drivers: Vec<Arc<dyn VmDriver>>) -> Self {
        Drivers { drivers }
    }

    /// The driver of `target`'s kind; `None` when this build has none.
    pub fn for_target(&self, target: &VmTarget) -> Option<&Arc<dyn VmDriver>> {
        self.drivers.iter().find(|d| d.name() == target.kind())
    }
}

/// What is said of VM `vm` at `target` when this build has no driver for its kind.
pub fn not_built(vm: &str, target: &VmTarget) -> String {
    format!(
        "no {} backend in this build yet: the daemon will not manage VM {vm}",
        target.kind()
    )
}

/// Every driver this build has. A new hypervisor is one line here.
pub fn drivers(root: SysfsRoot) -> Drivers {
    Drivers::new(vec![
        super::qemu::driver(root.clone()),
        super::libvirt::driver(),
        super::xen::driver(root),
    ])
}

/// The fake driver beside the trait, for unit tests of what sits on drivers (the daemon,
/// `check`); its VMs are [`crate::backend::fake::FakeVm`]s.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::backend::fake::FakeHost;
    use std::sync::Mutex;

    /// A driver serving `qemu` targets by `modes` only, whose VMs start on `host` and come
    /// up at once; `senders` holds each stream's sender, to say a VM gone.
    pub(crate) struct FakeDriver {
        pub(crate) host: FakeHost,
        pub(crate) modes: BTreeSet<AttachMode>,
        pub(crate) senders: Mutex<Vec<mpsc::UnboundedSender<PresenceEvent>>>,
    }

    impl FakeDriver {
        /// A fake attaching by address only, as Xen's driver would.
        pub(crate) fn address_only() -> Self {
            FakeDriver {
                host: FakeHost::new(),
                modes: [AttachMode::Address].into(),
                senders: Mutex::default(),
            }
        }
    }

    impl VmDriver for FakeDriver {
        fn name(&self) -> &'static str {
            "qemu"
        }
        fn modes(&self) -> BTreeSet<AttachMode> {
            self.modes.clone()
        }
        fn watch(&self, vm: &str, _: &VmTarget) -> Result<PresenceStream, BackendError> {
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(PresenceEvent::Up(self.host.start(vm)));
            self.senders.lock().unwrap().push(tx);
            Ok(PresenceStream::new(rx, Arc::new(|| {})))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_finds_qemu_libvirt_and_xen() {
        let registry = drivers(SysfsRoot::default());
        let qemu = VmTarget::Qemu {
            qmp: "/run/a.qmp".into(),
        };
        let xen = VmTarget::Xen { domain: "a".into() };
        let libvirt = VmTarget::Libvirt {
            domain: "a".into(),
            uri: None,
        };

        let found = registry.for_target(&qemu).map(|d| d.name());

        assert_eq!(found, Some("qemu"));
        assert_eq!(registry.for_target(&xen).map(|d| d.name()), Some("xen"));
        assert_eq!(
            registry.for_target(&libvirt).map(|d| d.name()),
            Some("libvirt")
        );
    }

    #[test]
    fn qemu_attaches_by_address_port_and_id() {
        let registry = drivers(SysfsRoot::default());
        let qemu = VmTarget::Qemu {
            qmp: "/run/a.qmp".into(),
        };

        let caps = registry.for_target(&qemu).unwrap().capabilities();

        assert_eq!(caps.backend, "qemu");
        assert!(caps.supports(AttachMode::Address));
        assert!(caps.supports(AttachMode::Port));
        assert!(caps.supports(AttachMode::Id));
    }

    #[test]
    fn libvirt_attaches_by_address_and_id_but_not_port() {
        let registry = drivers(SysfsRoot::default());
        let libvirt = VmTarget::Libvirt {
            domain: "lab".into(),
            uri: None,
        };

        let caps = registry.for_target(&libvirt).unwrap().capabilities();

        assert_eq!(caps.backend, "libvirt");
        assert!(caps.supports(AttachMode::Address));
        assert!(!caps.supports(AttachMode::Port));
        assert!(caps.supports(AttachMode::Id));
    }
}
