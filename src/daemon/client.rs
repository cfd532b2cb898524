//! The CLI side of the control socket: find it, send one request, read one reply.
//! Blocking on purpose: the CLI does one round trip and exits.

use super::protocol::{Reply, Request, MAX_REPLY_LINE};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemon listens when neither `--control` nor the config says otherwise.
pub use crate::config::DEFAULT_CONTROL_SOCKET;

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
    /// The daemon closed the connection without answering.
    #[error("usbroute daemon at {path} closed the connection without a reply; see its log (`journalctl -u usbroute`)")]
    NoReply {
        /// Socket path.
        path: PathBuf,
    },
    /// The daemon's answer is not a reply this client understands.
    #[error("usbroute daemon at {path} sent a reply this client does not understand; are the daemon and CLI the same version?")]
    BadReply {
        /// Socket path.
        path: PathBuf,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The config file named to find the socket cannot be read.
    #[error("cannot read the config file {path} to find the control socket; pass --control SOCKET instead")]
    ConfigRead {
        /// Config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file's `control_socket`/`control_group` are not valid TOML of their type.
    #[error("{path}: the control socket settings are not valid (see docs/config.md)")]
    ConfigInvalid {
        /// Config file.
        path: PathBuf,
        /// What the TOML parser said.
        #[source]
        source: toml::de::Error,
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
        let text = std::fs::read_to_string(file).map_err(|source| ClientError::ConfigRead {
            path: file.to_path_buf(),
            source,
        })?;
        let settings = super::ControlSettings::from_toml(&text).map_err(|source| {
            ClientError::ConfigInvalid {
                path: file.to_path_buf(),
                source,
            }
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
    if reply.is_empty() {
        return Err(ClientError::NoReply {
            path: socket.to_path_buf(),
        });
    }
    serde_json::from_slice(&reply).map_err(|source| ClientError::BadReply {
        path: socket.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    /// A fake daemon (a real one never answers this way): it reads the request line, then
    /// sends `answer` and hangs up.
    fn fake_daemon(answer: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            (&stream).write_all(answer).unwrap();
        });
        (dir, path)
    }

    #[test]
    fn a_daemon_that_hangs_up_without_answering_is_no_reply() {
        let (_dir, path) = fake_daemon(b"");
        let err = request(&path, &Request::Status {}).unwrap_err();
        assert!(matches!(err, ClientError::NoReply { .. }), "{err:?}");
    }

    #[test]
    fn a_reply_that_is_not_json_keeps_the_parser_error_as_its_source() {
        let (_dir, path) = fake_daemon(b"not json\n");
        let err = request(&path, &Request::Status {}).unwrap_err();
        assert!(matches!(err, ClientError::BadReply { .. }), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
    }
}
