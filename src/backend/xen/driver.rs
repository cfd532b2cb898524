//! The Xen driver: a VM is up while a domain of its name runs with a connected qusb USB
//! controller, as xenstore says (`presence`, one xenstored connection per VM, watches
//! only). Not registered in [`crate::backend::drivers`] until it is proven on a real Xen.

use super::client::{candidate_sockets, DEFAULT_TIMEOUT};
use super::presence::{self, Watched};
use super::xl::Xl;
use crate::backend::driver::Retry;
use crate::backend::{AttachMode, BackendError, PresenceStream, VmDriver, VmTarget};
use crate::sysfs::SysfsRoot;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Drives Xen domains through xenstore (presence, ports, marks) and `xl` (attach, detach).
#[derive(Debug, Clone)]
pub struct XenDriver {
    /// Where xenstored's socket may be, the first existing one used at each connect
    /// ([`super::client::candidate_sockets`]).
    pub sockets: Vec<PathBuf>,
    /// How long a xenstore request waits for its reply.
    pub timeout: Duration,
    /// How xl is run.
    pub xl: Xl,
    /// Where the host's sysfs is (each busid's device address).
    pub root: SysfsRoot,
}

/// The Xen driver with dom0's defaults, reading the host under `root`.
pub fn driver(root: SysfsRoot) -> Arc<dyn VmDriver> {
    Arc::new(XenDriver {
        sockets: candidate_sockets(),
        timeout: DEFAULT_TIMEOUT,
        xl: Xl::default(),
        root,
    })
}

impl VmDriver for XenDriver {
    fn name(&self) -> &'static str {
        "xen"
    }

    fn modes(&self) -> BTreeSet<AttachMode> {
        super::MODES.into()
    }

    fn follows_by_address(&self) -> bool {
        true
    }

    fn watch(&self, vm: &str, target: &VmTarget) -> Result<PresenceStream, BackendError> {
        let VmTarget::Xen { domain } = target else {
            return Err(BackendError::Refused {
                vm: vm.to_string(),
                reason: format!(
                    "the Xen driver cannot reach {target}; give the VM `xen = \"DOMAIN\"`"
                ),
            });
        };
        let (report, events) = mpsc::unbounded_channel();
        let (wake, wakes) = mpsc::unbounded_channel();
        let watched = Watched {
            vm: vm.to_string(),
            domain: domain.clone(),
            sockets: self.sockets.clone(),
            timeout: self.timeout,
            xl: self.xl.clone(),
            root: self.root.clone(),
        };
        tokio::spawn(presence::watch_domain(watched, wakes, report));
        // A retry looks at the domain again, or reconnects now if xenstored was down.
        let retry: Retry = Arc::new(move || {
            let _ = wake.send(());
        });
        Ok(PresenceStream::new(events, retry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::xen::fake_xenstored::FakeXenstored;
    use crate::backend::PresenceEvent;

    fn driver_at(socket: PathBuf) -> XenDriver {
        XenDriver {
            sockets: vec![socket],
            timeout: Duration::from_secs(5),
            xl: Xl::default(),
            root: SysfsRoot::default(),
        }
    }

    #[test]
    fn xen_attaches_by_address_and_follows_ports_and_kinds_itself() {
        let caps = driver(SysfsRoot::default()).capabilities();

        assert_eq!(caps.backend, "xen");
        assert_eq!(caps.modes, [AttachMode::Address].into());
        assert!(caps.follows_by_address);
    }

    #[test]
    fn a_vm_that_is_not_a_xen_domain_is_refused_with_the_key_to_use() {
        let target = VmTarget::Qemu {
            qmp: "/run/a.qmp".into(),
        };

        let err = driver_at("/x".into()).watch("a", &target).err().unwrap();

        assert!(err.to_string().contains("`xen = \"DOMAIN\"`"), "{err}");
    }

    #[tokio::test]
    async fn a_xenstored_that_closes_every_connection_is_reconnected_to_and_nothing_comes_up() {
        let fake = FakeXenstored::start(Box::new(|_, _| None));
        let target = VmTarget::Xen {
            domain: "lab".into(),
        };
        let mut stream = driver_at(fake.socket.clone())
            .watch("lab", &target)
            .unwrap();

        let reconnected = tokio::time::timeout(Duration::from_secs(20), async {
            while fake.connections() < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let event = tokio::time::timeout(Duration::ZERO, stream.next()).await;

        assert!(reconnected.is_ok(), "{} connections", fake.connections());
        assert!(
            !matches!(event, Ok(Some(PresenceEvent::Up(_)))),
            "came up on a broken xenstored"
        );
        assert!(
            event.is_err(),
            "an event from a xenstored that never answered"
        );
    }

    #[tokio::test]
    async fn a_xenstored_that_refuses_every_read_is_reconnected_to_with_backoff_not_at_once() {
        use crate::backend::xen::wire::{encode, Kind};
        let fake = FakeXenstored::start(Box::new(|h, _| {
            let (kind, payload): (Kind, &[u8]) = match h.kind {
                Kind::Watch => (Kind::Watch, b"OK\0"),
                _ => (Kind::Error, b"EACCES\0"),
            };
            Some(encode(kind, h.req_id, h.tx_id, payload).unwrap())
        }));
        let target = VmTarget::Xen {
            domain: "lab".into(),
        };
        let started = tokio::time::Instant::now();
        let _stream = driver_at(fake.socket.clone())
            .watch("lab", &target)
            .unwrap();

        let reconnected = tokio::time::timeout(Duration::from_secs(20), async {
            while fake.connections() < 4 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;

        assert!(reconnected.is_ok(), "{} connections", fake.connections());
        // 100 + 200 + 400 ms of backoff before the fourth; at once would be 3 x 100 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
    }
}
