//! The libvirt driver: a VM is up while its domain runs, as libvirt says over one shared
//! connection per URI (`link`), followed by lifecycle events (`presence`). A URI usbroute cannot use (a remote host, another driver) is
//! refused when the VM is watched, naming what is supported.

use super::link::Link;
use super::presence::{self, Watched};
use super::rpc::LibvirtUri;
use super::vm::DEFAULT_REMOVAL_TIMEOUT;
use crate::backend::driver::Retry;
use crate::backend::{AttachMode, BackendError, PresenceStream, VmDriver, VmTarget};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// The URI a libvirt VM without `uri` is at.
pub const DEFAULT_URI: &str = "qemu:///system";

/// Drives libvirt domains over libvirt's remote protocol.
pub struct LibvirtDriver {
    /// The live link of each URI, shared by its VMs; a link ends with its last VM.
    links: Mutex<BTreeMap<String, Weak<Link>>>,
    removal_timeout: Duration,
}

/// The libvirt driver.
pub fn driver() -> Arc<dyn VmDriver> {
    Arc::new(LibvirtDriver::new(DEFAULT_REMOVAL_TIMEOUT))
}

impl LibvirtDriver {
    /// A driver whose detaches wait `removal_timeout` for libvirt's device-removed event.
    pub fn new(removal_timeout: Duration) -> Self {
        LibvirtDriver {
            links: Mutex::default(),
            removal_timeout,
        }
    }

    /// The link of `uri`, opened if no VM holds one now.
    fn link(&self, uri: LibvirtUri) -> Arc<Link> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|_, link| link.strong_count() > 0);
        if let Some(link) = links.get(&uri.text).and_then(Weak::upgrade) {
            return link;
        }
        let link = Link::open(uri);
        links.insert(link.uri.text.clone(), Arc::downgrade(&link));
        link
    }
}

impl VmDriver for LibvirtDriver {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn modes(&self) -> BTreeSet<AttachMode> {
        super::MODES.into()
    }

    fn watch(&self, vm: &str, target: &VmTarget) -> Result<PresenceStream, BackendError> {
        let refused = |reason: String| BackendError::Refused {
            vm: vm.to_string(),
            reason,
        };
        let VmTarget::Libvirt { domain, uri } = target else {
            return Err(refused(format!(
                "the libvirt driver cannot reach {target}; give the VM `libvirt = \"DOMAIN\"`"
            )));
        };
        let uri = LibvirtUri::parse(uri.as_deref().unwrap_or(DEFAULT_URI))
            .map_err(|e| refused(crate::error_chain::one_line(&e)))?;
        let link = self.link(uri);
        let (report, events) = mpsc::unbounded_channel();
        let (wake, wakes) = mpsc::unbounded_channel();
        let watched = Watched {
            vm: vm.to_string(),
            domain: domain.clone(),
            removal_timeout: self.removal_timeout,
        };
        tokio::spawn(presence::watch_domain(watched, link.clone(), wakes, report));
        // A retry reconnects now if the connection is down, and looks at the domain again.
        let retry: Retry = Arc::new(move || {
            link.retry();
            let _ = wake.send(());
        });
        Ok(PresenceStream::new(events, retry))
    }
}
