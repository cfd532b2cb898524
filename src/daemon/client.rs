//! The CLI side of the control socket: find it, send one request, read one reply.
//! Blocking on purpose: the CLI does one round trip and exits.

use super::protocol::{Reply, Request, MAX_REPLY_LINE};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemon listens when neither `--control` nor the config says otherwise.
pub use crate::policy::DEFAULT_CONTROL_SOCKET;

/// How long the client waits for a reply (an attach waits for QEMU to confirm).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens at the path.
    #[error("cannot reach the usbroute daemon at {path}; is `usbroute serve` running? (give --control SOCKET or --config FILE if it uses another socket)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    #[error("no reply from the usbroute daemon at {path}; see its log (`journalctl -u usbroute`)")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The daemon's answer is not a reply this client understands.
    #[error("usbroute daemon at {path} sent a reply this client does not understand ({reason}); are the daemon and CLI the same version?")]
    BadReply {
        /// Socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The config file named to find the socket cannot be read.
    #[error("{path}: {reason}")]
    Config {
        /// Config file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Which socket to talk to: `--control`, else the config's `control_socket`, else the default.
pub fn resolve_socket(
    control: Option<&Path>,
    config: Option<&Path>,
) -> Result<PathBuf, ClientError> {
    if let Some(c) = control {
        return Ok(c.to_path_buf());
    }
    if let Some(file) = config {
        let text = std::fs::read_to_string(file).map_err(|e| ClientError::Config {
            path: file.to_path_buf(),
            reason: e.to_string(),
        })?;
        let settings =
            super::ControlSettings::from_toml(&text).map_err(|reason| ClientError::Config {
                path: file.to_path_buf(),
                reason,
            })?;
        return Ok(settings.socket());
    }
    Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET))
}

/// `send` with MSG_NOSIGNAL, never write(2): a daemon that hung up (one that refused this
/// user closes at once) is an error to report, also in commands where SIGPIPE kills.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Send one request and wait for its reply.
pub fn request(socket: &Path, req: &Request) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    send_all(&stream, &line).map_err(io)?;
    let mut reply = Vec::new();
    BufReader::new(stream)
        .take(MAX_REPLY_LINE as u64)
        .read_until(b'\n', &mut reply)
        .map_err(io)?;
    serde_json::from_slice(&reply).map_err(|e| ClientError::BadReply {
        path: socket.to_path_buf(),
        reason: if reply.is_empty() {
            "connection closed without a reply".into()
        } else {
            e.to_string()
        },
    })
}
