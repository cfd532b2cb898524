//! A native client of libvirt's remote protocol (XDR over the daemon's unix socket), as
//! digitalocean/go-libvirt is in Go; no libvirt C library, so usbroute builds and runs on
//! a host without libvirt.
//!
//! The parts: [`xdr`] (bounded encode/decode), [`packet`] (header and framing),
//! [`procedures`] (the calls and events we use, their numbers and layouts), `uri.rs`
//! (which socket), `connection.rs` (peer check, the I/O task), `error.rs` ([`RpcError`]).
//!
//! Checked against libvirt's own source: `src/rpc/virnetprotocol.x` (framing, header, the
//! 16 MiB message cap), `src/remote/remote_protocol.x` (program 0x20008086 version 1, the
//! procedure numbers, `remote_error`, `remote_nonnull_domain`; the args/ret/msg structs
//! also as go-libvirt generates them from it), `src/remote/remote_sockets.c`
//! (socket choice), `src/rpc/virkeepaliveprotocol.x` (program 0x6b656570), and libvirt 11.3's
//! installed `virterror.h`/`libvirt-domain.h` (error codes, event ids, states, flags).
//! Keepalive: the client asks the daemon to start it; we never do, and libvirtd 11.3 left
//! a connection idle for 40 s (past its 5 s x 5 keepalive window) open with no ping
//! (`examples/libvirt_probe.rs --idle`). A keepalive packet, if one came, is dropped.

mod connection;
mod error;
pub mod packet;
pub mod procedures;
mod uri;
pub mod xdr;

pub use error::{RpcError, MESSAGE_SHOWN, VIR_ERR_NO_DOMAIN, VIR_ERR_OPERATION_INVALID};

use connection::Shared;
use procedures as p;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a call may take before it fails with [`RpcError::Timeout`] (a hung daemon or
/// a domain stuck in a job), unless [`Connection::open_with_timeout`] says otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The most bytes of domain XML read back (libvirt's own string cap is 4 MiB; a real
/// domain's live XML is a few KiB).
pub const DOMAIN_XML_MAX: usize = 1024 * 1024;

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
        let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
        LibvirtUri::parse_in(uri, runtime_dir.as_deref())
    }

    /// Is `uri` of a form [`Self::parse`] accepts, whatever this process's environment
    /// (a session URI is checked as if `$XDG_RUNTIME_DIR` were set)? For the config check.
    pub fn check_form(uri: &str) -> Result<(), RpcError> {
        LibvirtUri::parse_in(uri, Some(std::path::Path::new("/run/user/0"))).map(drop)
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

/// An open connection; cheap to clone, calls may run concurrently (matched by serial).
#[derive(Debug, Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl Connection {
    /// Connect to the first socket of `uri` that answers, check its peer (SO_PEERCRED:
    /// root, or our own uid), run AUTH_LIST (only `none` is supported: say so otherwise),
    /// CONNECT_OPEN, and register for lifecycle, device-removed and device-removal-failed
    /// events of every domain. The receiver gets every event until the connection closes.
    pub async fn open(
        uri: &LibvirtUri,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<DomainEvent>), RpcError> {
        Connection::open_with_timeout(uri, CALL_TIMEOUT).await
    }

    /// [`Connection::open`] with another deadline for each call than [`CALL_TIMEOUT`].
    pub async fn open_with_timeout(
        uri: &LibvirtUri,
        timeout: Duration,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<DomainEvent>), RpcError> {
        let mut refused = None;
        for socket in &uri.sockets {
            match connection::connect(socket, timeout).await {
                Ok(stream) => {
                    let (events_tx, events) = mpsc::unbounded_channel();
                    let shared = Shared::start(stream, socket, timeout, events_tx);
                    let conn = Connection {
                        shared: Arc::new(shared),
                    };
                    conn.handshake(uri).await?;
                    return Ok((conn, events));
                }
                // No file there: that daemon is not installed or not started; try the next.
                Err(RpcError::Connect { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                // A stale socket (refused): remember it, but a later one may answer.
                Err(e @ RpcError::Connect { .. }) => refused = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(refused.unwrap_or_else(|| RpcError::SocketMissing {
            uri: uri.text.clone(),
            sockets: uri
                .sockets
                .iter()
                .map(|s| s.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }))
    }

    async fn handshake(&self, uri: &LibvirtUri) -> Result<(), RpcError> {
        let reply = self.shared.call(p::AUTH_LIST, &[]).await?;
        let types = p::auth_list_ret(&reply).map_err(|e| self.malformed(p::AUTH_LIST, &e))?;
        // An empty list or one with NONE: no authentication step (libvirt answers NONE to
        // root even where polkit guards the socket).
        if !types.is_empty() && !types.contains(&p::AUTH_NONE) {
            let offered = types
                .iter()
                .map(|t| match t {
                    1 => "sasl".to_owned(),
                    2 => "polkit".to_owned(),
                    t => format!("type {t}"),
                })
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(RpcError::UnsupportedAuth {
                socket: self.socket().to_owned(),
                offered,
            });
        }
        let mut args = xdr::Encoder::new();
        args.opt_string(Some(&uri.open_name)).u32(0);
        self.void(p::CONNECT_OPEN, &args.into_bytes()).await?;
        for id in [
            p::EVENT_ID_LIFECYCLE,
            p::EVENT_ID_DEVICE_REMOVED,
            p::EVENT_ID_DEVICE_REMOVAL_FAILED,
        ] {
            let mut args = xdr::Encoder::new();
            // eventID, then `remote_domain dom` absent: every domain.
            args.i32(id).bool(false);
            let call = p::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY;
            let reply = self.shared.call(call, &args.into_bytes()).await?;
            p::int_ret(&reply, "callback id", 1).map_err(|e| self.malformed(call, &e))?;
        }
        Ok(())
    }

    /// A call whose reply has no body.
    async fn void(&self, procedure: i32, args: &[u8]) -> Result<(), RpcError> {
        let reply = self.shared.call(procedure, args).await?;
        if !reply.is_empty() {
            let what = format!("{} unexpected bytes in the reply", reply.len());
            return Err(self.shared.protocol(p::name(procedure), what));
        }
        Ok(())
    }

    fn malformed(&self, procedure: i32, e: &xdr::XdrError) -> RpcError {
        self.shared.protocol(p::name(procedure), e.to_string())
    }

    /// The socket this connection is on.
    pub fn socket(&self) -> &Path {
        self.shared.socket()
    }

    /// DOMAIN_LOOKUP_BY_NAME; `Ok(None)` when no such domain is defined (VIR_ERR_NO_DOMAIN).
    pub async fn lookup_domain(&self, name: &str) -> Result<Option<Domain>, RpcError> {
        let mut args = xdr::Encoder::new();
        args.string(name);
        match self
            .shared
            .call(p::DOMAIN_LOOKUP_BY_NAME, &args.into_bytes())
            .await
        {
            Ok(reply) => p::domain_ret(&reply)
                .map(Some)
                .map_err(|e| self.malformed(p::DOMAIN_LOOKUP_BY_NAME, &e)),
            Err(e) if e.libvirt_code() == Some(VIR_ERR_NO_DOMAIN) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Is the domain running now (DOMAIN_GET_STATE: RUNNING, PAUSED, BLOCKED, PMSUSPENDED
    /// count as running; SHUTOFF, CRASHED do not)? `Ok(false)` for a domain gone.
    pub async fn is_running(&self, domain: &Domain) -> Result<bool, RpcError> {
        let args = p::domain_flags(domain, 0);
        match self.shared.call(p::DOMAIN_GET_STATE, &args).await {
            Ok(reply) => {
                let v = p::int_ret(&reply, "domain state", 2)
                    .map_err(|e| self.malformed(p::DOMAIN_GET_STATE, &e))?;
                // virDomainState: NOSTATE 0, RUNNING 1, BLOCKED 2, PAUSED 3, SHUTDOWN 4
                // (shutting down: QEMU still runs), SHUTOFF 5, CRASHED 6, PMSUSPENDED 7.
                Ok(matches!(v[0], 1..=4 | 7))
            }
            Err(e) if e.libvirt_code() == Some(VIR_ERR_NO_DOMAIN) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// DOMAIN_GET_XML_DESC with flags 0 (the live XML of a running domain), bounded.
    pub async fn domain_xml(&self, domain: &Domain) -> Result<String, RpcError> {
        let args = p::domain_flags(domain, 0);
        let reply = self.shared.call(p::DOMAIN_GET_XML_DESC, &args).await?;
        p::string_ret(&reply, "domain XML", DOMAIN_XML_MAX)
            .map_err(|e| self.malformed(p::DOMAIN_GET_XML_DESC, &e))
    }

    /// DOMAIN_ATTACH_DEVICE_FLAGS with VIR_DOMAIN_AFFECT_LIVE; returns once libvirt did it.
    pub async fn attach_device_live(&self, domain: &Domain, xml: &str) -> Result<(), RpcError> {
        let args = p::domain_string_flags(domain, xml, p::AFFECT_LIVE);
        self.void(p::DOMAIN_ATTACH_DEVICE_FLAGS, &args).await
    }

    /// DOMAIN_DETACH_DEVICE_ALIAS with VIR_DOMAIN_AFFECT_LIVE; returns once libvirt sent
    /// the request: the removal itself ends with [`DomainEvent::DeviceRemoved`].
    pub async fn detach_device_alias_live(
        &self,
        domain: &Domain,
        alias: &str,
    ) -> Result<(), RpcError> {
        let args = p::domain_string_flags(domain, alias, p::AFFECT_LIVE);
        self.void(p::DOMAIN_DETACH_DEVICE_ALIAS, &args).await
    }

    /// Resolves when the connection has closed (libvirt's daemon stopped or restarted,
    /// or a protocol error ended it).
    pub async fn closed(&self) {
        self.shared.closed().await
    }
}
