//! CONTRACT STUB (to be replaced by the real client): a native client of libvirt's
//! remote protocol (XDR over the daemon's unix socket), as digitalocean/go-libvirt is in
//! Go; no libvirt C library, so usbroute builds and runs on a host without libvirt.

use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Where a libvirt URI is served: the local daemon's unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtUri {
    /// The URI as the user wrote it (`qemu:///system`), for messages.
    pub text: String,
    /// The socket candidates, tried in order (`/run/libvirt/virtqemud-sock`, then
    /// `/run/libvirt/libvirt-sock`), or the one named by `?socket=`.
    pub sockets: Vec<PathBuf>,
    /// The name sent in CONNECT_OPEN (`qemu:///system`).
    pub open_name: String,
}

impl LibvirtUri {
    /// `qemu:///system` (default), `qemu:///system?socket=/path`, `qemu+unix:///system`;
    /// a remote host or another driver is refused, naming the URI and what is supported.
    pub fn parse(uri: &str) -> Result<LibvirtUri, RpcError> {
        let _ = uri;
        unimplemented!("contract stub")
    }
}

/// A domain as libvirt names it on the wire (`remote_nonnull_domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: [u8; 16],
    /// Its id while running; -1 when not running.
    pub id: i32,
}

/// A domain lifecycle event (`virDomainEventType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// DEFINED
    Defined,
    /// UNDEFINED
    Undefined,
    /// STARTED
    Started,
    /// SUSPENDED
    Suspended,
    /// RESUMED
    Resumed,
    /// STOPPED
    Stopped,
    /// SHUTDOWN (the guest shut down; STOPPED follows when QEMU exits)
    Shutdown,
    /// PMSUSPENDED
    PmSuspended,
    /// CRASHED
    Crashed,
    /// A value this build does not know.
    Other(i32),
}

/// An event the daemon sends for any domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    /// A lifecycle change.
    Lifecycle {
        /// Which domain.
        domain: Domain,
        /// What happened.
        event: Lifecycle,
        /// libvirt's detail code for it.
        detail: i32,
    },
    /// A device left the domain (the end of a detach).
    DeviceRemoved {
        /// Which domain.
        domain: Domain,
        /// The device's alias.
        alias: String,
    },
    /// The guest refused to let a device go.
    DeviceRemovalFailed {
        /// Which domain.
        domain: Domain,
        /// The device's alias.
        alias: String,
    },
}

/// What went wrong talking to libvirt; each names the socket or the call and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// Placeholder.
    #[error("stub")]
    Stub,
}

/// An open connection; cheap to clone, calls may run concurrently (matched by serial).
#[derive(Debug, Clone)]
pub struct Connection {}

impl Connection {
    /// Connect to the first socket of `uri` that answers, check its peer (SO_PEERCRED:
    /// root, or our own uid), run AUTH_LIST (only `none` is supported: say so otherwise),
    /// CONNECT_OPEN, and register for lifecycle, device-removed and device-removal-failed
    /// events of every domain. The receiver gets every event until the connection closes.
    pub async fn open(
        uri: &LibvirtUri,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<DomainEvent>), RpcError> {
        let _ = uri;
        unimplemented!("contract stub")
    }

    /// The socket this connection is on.
    pub fn socket(&self) -> &Path {
        unimplemented!("contract stub")
    }

    /// DOMAIN_LOOKUP_BY_NAME; `Ok(None)` when no such domain is defined (VIR_ERR_NO_DOMAIN).
    pub async fn lookup_domain(&self, name: &str) -> Result<Option<Domain>, RpcError> {
        let _ = name;
        unimplemented!("contract stub")
    }

    /// Is the domain running now (DOMAIN_GET_STATE: RUNNING, PAUSED, BLOCKED, PMSUSPENDED
    /// count as running; SHUTOFF, CRASHED do not)? `Ok(false)` for a domain gone.
    pub async fn is_running(&self, domain: &Domain) -> Result<bool, RpcError> {
        let _ = domain;
        unimplemented!("contract stub")
    }

    /// DOMAIN_GET_XML_DESC with flags 0 (the live XML of a running domain), bounded.
    pub async fn domain_xml(&self, domain: &Domain) -> Result<String, RpcError> {
        let _ = domain;
        unimplemented!("contract stub")
    }

    /// DOMAIN_ATTACH_DEVICE_FLAGS with VIR_DOMAIN_AFFECT_LIVE; returns once libvirt did it.
    pub async fn attach_device_live(&self, domain: &Domain, xml: &str) -> Result<(), RpcError> {
        let _ = (domain, xml);
        unimplemented!("contract stub")
    }

    /// DOMAIN_DETACH_DEVICE_ALIAS with VIR_DOMAIN_AFFECT_LIVE; returns once libvirt sent
    /// the request: the removal itself ends with [`DomainEvent::DeviceRemoved`].
    pub async fn detach_device_alias_live(
        &self,
        domain: &Domain,
        alias: &str,
    ) -> Result<(), RpcError> {
        let _ = (domain, alias);
        unimplemented!("contract stub")
    }

    /// Resolves when the connection has closed (libvirt's daemon stopped or restarted,
    /// or a protocol error ended it).
    pub async fn closed(&self) {
        unimplemented!("contract stub")
    }
}
