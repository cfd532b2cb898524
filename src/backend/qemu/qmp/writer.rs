//! The write half: plain writes for any stream, `sendmsg` with `SCM_RIGHTS` on a Unix
//! socket when a command carries a file descriptor (`getfd`, `add-fd`).

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::unix::OwnedWriteHalf;

/// Where commands are written.
pub(crate) enum Writer {
    /// A Unix socket: can carry file descriptors.
    Unix(OwnedWriteHalf),
    /// Anything else (a serial tty, a test pipe).
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

impl Writer {
    /// `true` when file descriptors can go along with a message.
    pub(crate) fn can_pass_fds(&self) -> bool {
        matches!(self, Writer::Unix(_))
    }

    /// Write one whole message; with `fd`, the descriptor rides in the ancillary data of
    /// the first bytes, which is where QEMU's monitor looks for it.
    pub(crate) async fn write_message(
        &mut self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        match (self, fd) {
            (Writer::Stream(w), None) => {
                w.write_all(bytes).await?;
                w.flush().await
            }
            // sendmsg with MSG_NOSIGNAL, never write(2): a QEMU that went away is an EPIPE
            // for this command, also in CLI commands where SIGPIPE kills (src/cli/mod.rs).
            (Writer::Unix(w), fd) => {
                let mut sent = send_nosignal(w, bytes, fd).await?;
                while sent < bytes.len() {
                    sent += send_nosignal(w, &bytes[sent..], None).await?;
                }
                Ok(())
            }
            (Writer::Stream(_), Some(_)) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "fd passing needs a Unix socket",
            )),
        }
    }
}

/// One `sendmsg`, carrying `fd` when given; returns how many bytes of `bytes` went out.
async fn send_nosignal(
    w: &OwnedWriteHalf,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let stream = w.as_ref();
    let socket = stream.as_raw_fd();
    let fds: Vec<_> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        stream.writable().await?;
        let attempt = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                socket,
                &[IoSlice::new(bytes)],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match attempt {
            Ok(sent) => return Ok(sent),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
