//! What can go wrong talking QMP.

use std::path::PathBuf;
use std::sync::Arc;

/// Something went wrong talking to QEMU over QMP. Every message names the command and
/// says what to check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened.
    #[error(
        "Cannot connect to the QMP socket {path} (is QEMU running with \
         `-qmp unix:{path},server=on,wait=off`, and may this user open it?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why connect(2) failed (shared: the error is cloned to every waiter).
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The first message was not a QMP greeting.
    #[error("Expected a QMP greeting ({{\"QMP\": ...}}) but got {got}; is this a QMP socket (not an HMP monitor or serial console)?")]
    Greeting {
        /// What arrived instead (shortened).
        got: String,
    },
    /// The socket accepted the connection but nothing was said: QEMU serves one client per
    /// QMP monitor and queues the rest without a word until the one it serves leaves.
    #[error(
        "QEMU sent no QMP greeting on {monitor} within {seconds:.1} s: the monitor {monitor} is \
         probably held by another client (QEMU serves one client per monitor and queues the \
         rest; the usbroute daemon, libvirt, socat), or QEMU is still starting; give usbroute \
         its own monitor: add `-qmp unix:/run/usbroute/NAME.qmp,server=on,wait=off` \
         (`-qmp` may be repeated)"
    )]
    NoGreeting {
        /// The monitor's socket path (or what else the connection runs over).
        monitor: String,
        /// How long we waited.
        seconds: f64,
    },
    /// QEMU closed the connection (it exited, was killed, or another client took over).
    #[error("QEMU closed the QMP socket{}; is the VM still running?", waiting_for(.command))]
    Closed {
        /// The command that was waiting for its reply, if any.
        command: Option<String>,
        /// Bytes of an unfinished line that arrived before the end, if any (shortened).
        partial: Option<String>,
    },
    /// The peer sent something that is not a QMP message; the connection is not trusted
    /// any more and every command on it fails.
    #[error("The QMP peer sent something that is not a QMP message: {got}{}", waiting_for(.command))]
    Garbage {
        /// What arrived (shortened).
        got: String,
        /// The command that was waiting for its reply, if any.
        command: Option<String>,
    },
    /// The peer sent a line (a reply or an event) longer than usbroute reads; the
    /// connection is closed before the rest is buffered or anything is parsed.
    #[error(
        "The QMP peer at {peer} sent a message longer than {limit} bytes, usbroute's cap \
         on one QMP reply or event (QEMU's largest, `query-qmp-schema`, is about 240 KB); \
         the connection is closed{}; is that socket really QEMU's QMP monitor?",
        waiting_for(.command)
    )]
    TooLong {
        /// The socket path (or what else the connection runs over).
        peer: String,
        /// The cap, in bytes.
        limit: usize,
        /// The command that was waiting for its reply, if any.
        command: Option<String>,
    },
    /// An answer names more objects than one listing reads: each would cost commands of
    /// its own, so a peer could make one listing send without bound.
    #[error(
        "QEMU lists {count} {what}, more than the {limit} usbroute reads in one listing; \
         the answer is not trusted"
    )]
    TooMany {
        /// What was counted (`usb-host devices`).
        what: String,
        /// How many the answer named.
        count: usize,
        /// The cap.
        limit: usize,
    },
    /// QEMU answered the command with an error.
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's words.
        desc: String,
    },
    /// No reply in time. The connection stays usable; a late reply is dropped.
    #[error(
        "QEMU did not answer `{command}` within {seconds:.1} s; the VM may be hung or very busy"
    )]
    Timeout {
        /// The command.
        command: String,
        /// How long we waited.
        seconds: f64,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O failed{}", waiting_for(.command))]
    Io {
        /// The command being sent or waited for, if any.
        command: Option<String>,
        /// The operating system's error (shared: the error is cloned to every waiter).
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Passing a file descriptor needs a Unix socket; this connection is something else.
    #[error("Cannot pass a file descriptor with `{command}`: this QMP connection is not a Unix socket (fd passing needs SCM_RIGHTS)")]
    FdPassingUnsupported {
        /// The command.
        command: String,
    },
}

impl QmpError {
    /// The same error, attributed to `command` (for errors of the connection as a whole).
    pub(crate) fn for_command(self, name: &str) -> Self {
        let command = Some(name.to_string());
        match self {
            QmpError::Closed { partial, .. } => QmpError::Closed { command, partial },
            QmpError::Garbage { got, .. } => QmpError::Garbage { got, command },
            QmpError::TooLong { peer, limit, .. } => QmpError::TooLong {
                peer,
                limit,
                command,
            },
            QmpError::Io { source, .. } => QmpError::Io { command, source },
            other => other,
        }
    }

    /// `true` when nothing listens at the socket path (no file there: QEMU not started
    /// yet, or gone), as opposed to a socket that exists but refuses.
    pub fn is_socket_missing(&self) -> bool {
        matches!(self, QmpError::Connect { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// `true` when the socket took the connection but QEMU never greeted: another client
    /// probably holds the monitor ([`QmpError::NoGreeting`]).
    pub fn is_monitor_held(&self) -> bool {
        matches!(self, QmpError::NoGreeting { .. })
    }

    /// `true` when the connection is gone (closed, broken by garbage, or failed I/O):
    /// reconnecting is the only way on.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            QmpError::Closed { .. }
                | QmpError::Garbage { .. }
                | QmpError::TooLong { .. }
                | QmpError::Io { .. }
        )
    }
}

fn waiting_for(command: &Option<String>) -> String {
    match command {
        Some(c) => format!(" while `{c}` was waiting for its reply"),
        None => String::new(),
    }
}

/// At most `max` characters of `s`, with a note of how much was cut, for error messages.
pub(crate) fn shorten(s: &str, max: usize) -> String {
    let count = s.chars().count();
    if count <= max {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(max).collect();
        format!("{head:?}... ({count} characters in all)")
    }
}
