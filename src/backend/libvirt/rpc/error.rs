//! What can go wrong talking to libvirt, each naming the socket or the call and the fix.

use std::path::PathBuf;
use std::time::Duration;

/// `VIR_ERR_NO_DOMAIN` (`include/libvirt/virterror.h`): no such domain (or it went away).
pub const VIR_ERR_NO_DOMAIN: i32 = 42;
/// `VIR_ERR_OPERATION_INVALID`: not applicable now, e.g. a live attach to a domain that is
/// not running.
pub const VIR_ERR_OPERATION_INVALID: i32 = 55;

/// The most characters of a daemon's error message kept (after escaping).
pub const MESSAGE_SHOWN: usize = 512;

/// What went wrong talking to libvirt; each names the socket or the call and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No socket of the URI exists: no daemon is listening.
    #[error(
        "no libvirt daemon for {uri}: none of {sockets} exists; start it \
         (`systemctl start virtqemud.socket`, or `libvirtd.socket` where only libvirtd is installed)"
    )]
    SocketMissing {
        /// The URI.
        uri: String,
        /// The sockets tried, comma-separated.
        sockets: String,
    },
    /// The socket exists but connecting failed (refused: a stale socket of a stopped daemon).
    #[error("cannot connect to libvirt at {}; is the daemon running? (`systemctl start virtqemud.socket`)", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process on the socket is neither root nor us: not the daemon we mean to trust.
    #[error(
        "refusing libvirt at {}: the socket's owner process runs as uid {uid}, not root or our own uid; \
         a libvirt socket must be served by the system daemon",
        socket.display()
    )]
    PeerNotTrusted {
        /// The socket.
        socket: PathBuf,
        /// The peer's uid (SO_PEERCRED).
        uid: u32,
    },
    /// The daemon wants authentication usbroute does not do.
    #[error(
        "libvirt at {} asks for {offered} authentication, which usbroute does not do (only `none`); \
         run usbroute as root, or set `auth_unix_rw = \"none\"` in the daemon's config for a socket only root can open",
        socket.display()
    )]
    UnsupportedAuth {
        /// The socket.
        socket: PathBuf,
        /// What it offered (`polkit`, `sasl`).
        offered: String,
    },
    /// libvirt did the call and refused it.
    #[error("libvirt refused {call} (error {code}, domain {domain}): {message}")]
    Libvirt {
        /// The procedure (`DOMAIN_ATTACH_DEVICE_FLAGS`).
        call: &'static str,
        /// `virErrorNumber`: [`VIR_ERR_NO_DOMAIN`], [`VIR_ERR_OPERATION_INVALID`], ...
        code: i32,
        /// `virErrorDomain`.
        domain: i32,
        /// libvirt's message, escaped and capped at [`MESSAGE_SHOWN`] characters.
        message: String,
    },
    /// The daemon sent something that is not libvirt's protocol.
    #[error("libvirt at {} broke the protocol during {call}: {what}", socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// The call it answered, or `the connection` for a packet no call asked for.
        call: &'static str,
        /// What was wrong.
        what: String,
    },
    /// No answer in time.
    #[error(
        "libvirt at {} did not answer {call} within {} s; the daemon or the domain is hung",
        socket.display(), after.as_secs()
    )]
    Timeout {
        /// The procedure.
        call: &'static str,
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        after: Duration,
    },
    /// The connection closed before the answer came.
    #[error("lost the connection to libvirt at {} during {call}: {reason}", socket.display())]
    ConnectionLost {
        /// The procedure.
        call: &'static str,
        /// The socket.
        socket: PathBuf,
        /// Why it closed (the daemon stopped, a protocol error).
        reason: String,
    },
    /// A URI usbroute cannot serve.
    #[error(
        "libvirt URI {uri} is not supported: {why}; supported: {}",
        super::uri::supported()
    )]
    UnsupportedUri {
        /// The URI.
        uri: String,
        /// Why not.
        why: String,
    },
}

impl RpcError {
    /// libvirt's `virErrorNumber` when libvirt itself refused the call.
    pub fn libvirt_code(&self) -> Option<i32> {
        match self {
            RpcError::Libvirt { code, .. } => Some(*code),
            _ => None,
        }
    }
}
