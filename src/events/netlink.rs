//! The kernel's uevent netlink socket (NETLINK_KOBJECT_UEVENT, multicast group 1), async.
//!
//! Group 1 is the kernel's own broadcast: it works without udevd (edge systems, containers,
//! the test guest). Every datagram is checked to come from the kernel: the sender's port id
//! in `sockaddr_nl` must be 0 and, with SO_PASSCRED, the credentials uid 0. Anything else is
//! [`Received::Rejected`]. When the kernel could not deliver (ENOBUFS: the receive buffer
//! overflowed) or the socket fails, the caller gets [`Received::Resync`] and must rescan
//! sysfs: an event may be lost on the wire, never in the daemon's picture.

use super::uevent::UEvent;
use nix::errno::Errno;
use nix::sys::socket::{
    bind, getsockname, recvmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned,
    MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// The kernel's uevent multicast group (udevd re-broadcasts on group 2; we never listen there).
pub const KERNEL_GROUP: u32 = 1;

/// Receive buffer asked for: big enough for a storm of a few thousand events between reads.
pub const DEFAULT_RECEIVE_BUFFER: usize = 8 << 20;

/// Largest datagram we expect: the kernel's UEVENT_BUFFER_SIZE is 2048 bytes of
/// environment plus the header; 16 KiB leaves room and a truncated read is still detected.
const DATAGRAM_BUFFER: usize = 16 << 10;

/// What one read from the socket produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A kernel uevent.
    Event(UEvent),
    /// Events may have been lost: rescan sysfs and reconcile.
    Resync {
        /// Why (for the log).
        reason: String,
    },
    /// A datagram that is not a kernel uevent (another sender, or malformed); ignored.
    Rejected {
        /// Why (for the log).
        reason: String,
    },
}

/// The socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// A socket call failed.
    #[error("uevent netlink socket: {call} failed: {errno}; usbroute needs a kernel with NETLINK_KOBJECT_UEVENT and must run where it can open it (not in a network namespace without uevents)")]
    Socket {
        /// Which call.
        call: &'static str,
        /// The kernel's error.
        errno: Errno,
    },
    /// tokio could not register the socket.
    #[error("uevent netlink socket: cannot register with the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The uevent socket of `serve --uevent-socket` could not be set up.
    #[error("uevent socket {}: {what} failed; choose a path in a directory the daemon can write, not in use by another daemon", path.display())]
    Listener {
        /// The socket path.
        path: std::path::PathBuf,
        /// What was tried.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// An open, bound uevent socket.
pub struct UeventSocket {
    fd: AsyncFd<OwnedFd>,
    receive_buffer: usize,
    datagram: Vec<u8>,
    consecutive_failures: u32,
}

impl std::fmt::Debug for UeventSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UeventSocket")
            .field("fd", &self.fd.get_ref().as_raw_fd())
            .field("receive_buffer", &self.receive_buffer)
            .finish()
    }
}

impl UeventSocket {
    /// Open and bind to the kernel group with [`DEFAULT_RECEIVE_BUFFER`]. Needs a tokio runtime.
    pub fn open() -> Result<Self, EventsError> {
        Self::open_with_buffer(DEFAULT_RECEIVE_BUFFER)
    }

    /// Open with a given receive buffer size (tests use a tiny one to force ENOBUFS).
    pub fn open_with_buffer(receive_buffer: usize) -> Result<Self, EventsError> {
        let fd = open_socket(receive_buffer)?;
        Ok(Self {
            fd: register(fd)?,
            receive_buffer,
            datagram: vec![0; DATAGRAM_BUFFER],
            consecutive_failures: 0,
        })
    }

    /// The netlink port id the kernel gave this socket (where unicast senders aim).
    pub fn port_id(&self) -> u32 {
        getsockname::<NetlinkAddr>(self.fd.get_ref().as_raw_fd())
            .map(|a| a.pid())
            .unwrap_or(0)
    }

    /// Wait for the next datagram and say what it is. Never fails: a broken socket is
    /// reopened (with capped backoff) and reported as [`Received::Resync`].
    pub async fn recv(&mut self) -> Received {
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    return self
                        .reopen(format!("waiting for readiness failed: {e}"))
                        .await
                }
            };
            let datagram = &mut self.datagram;
            let result = guard.try_io(|fd| read_one(fd.get_ref(), datagram));
            match result {
                Err(_would_block) => continue,
                Ok(Ok(received)) => {
                    self.consecutive_failures = 0;
                    return received;
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Received::Resync {
                        reason: "the kernel dropped uevents: receive buffer overflowed (ENOBUFS)"
                            .to_string(),
                    };
                }
                Ok(Err(e)) => return self.reopen(format!("read failed: {e}")).await,
            }
        }
    }

    async fn reopen(&mut self, why: String) -> Received {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let exponent = self.consecutive_failures.min(7);
        let delay = Duration::from_millis(50 << exponent).min(Duration::from_secs(5));
        tokio::time::sleep(delay).await;
        let reopened = open_socket(self.receive_buffer).and_then(register);
        let outcome = match reopened {
            Ok(fd) => {
                self.fd = fd;
                "socket reopened".to_string()
            }
            Err(e) => format!("reopening failed, will retry: {e}"),
        };
        Received::Resync {
            reason: format!("uevent socket {why}; {outcome}"),
        }
    }
}

/// Hand the socket to tokio's reactor.
#[allow(unsafe_code)]
pub(super) fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, EventsError> {
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and always returns the
    // same number from `as_raw_fd`, for as long as it lives; the `AsyncFd` owns it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| EventsError::Runtime(e.into()))
}

fn open_socket(receive_buffer: usize) -> Result<OwnedFd, EventsError> {
    let err = |call| move |errno| EventsError::Socket { call, errno };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )
    .map_err(err("socket(AF_NETLINK, NETLINK_KOBJECT_UEVENT)"))?;
    // SO_RCVBUFFORCE passes rmem_max but needs CAP_NET_ADMIN; without it take what
    // SO_RCVBUF gives (capped by net.core.rmem_max): ENOBUFS plus a rescan covers the rest.
    if setsockopt(&fd, sockopt::RcvBufForce, &receive_buffer).is_err() {
        setsockopt(&fd, sockopt::RcvBuf, &receive_buffer).map_err(err("setsockopt(SO_RCVBUF)"))?;
    }
    setsockopt(&fd, sockopt::PassCred, &true).map_err(err("setsockopt(SO_PASSCRED)"))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP)).map_err(err("bind(group 1)"))?;
    Ok(fd)
}

/// One non-blocking `recvmsg`, checked: WouldBlock and other errors go up as io errors.
fn read_one(fd: &OwnedFd, datagram: &mut [u8]) -> std::io::Result<Received> {
    let (sender, got) = read_with_credentials::<NetlinkAddr>(fd, datagram)?;
    let sender = sender.map(|a| a.pid());
    Ok(classify(
        sender,
        got.uid,
        got.truncated,
        &datagram[..got.len],
    ))
}

/// What one datagram read with its sender's credentials carried.
pub(super) struct Credentialed {
    /// The sender's uid from SCM_CREDENTIALS (`None`: none came with it).
    pub(super) uid: Option<u32>,
    /// The datagram was longer than the buffer.
    pub(super) truncated: bool,
    /// Bytes read into the buffer.
    pub(super) len: usize,
}

/// One non-blocking `recvmsg` into `datagram` with room for SCM_CREDENTIALS (the socket
/// has SO_PASSCRED): the sender's address and what came. Shared by the kernel's netlink
/// socket and the benches' Unix one (`feed.rs`), which judge the sender differently.
pub(super) fn read_with_credentials<A: nix::sys::socket::SockaddrLike>(
    fd: &OwnedFd,
    datagram: &mut [u8],
) -> std::io::Result<(Option<A>, Credentialed)> {
    let mut cmsg = nix::cmsg_space!(libc::ucred);
    let mut iov = [IoSliceMut::new(datagram)];
    let msg = recvmsg::<A>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(std::io::Error::from)?;
    let uid = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::ScmCredentials(cred) => Some(cred.uid()),
            _ => None,
        })
    });
    let got = Credentialed {
        uid,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        len: msg.bytes,
    };
    Ok((msg.address, got))
}

/// Decide what a datagram is from its sender, credentials and bytes. Pure.
pub fn classify(sender: Option<u32>, uid: Option<u32>, truncated: bool, bytes: &[u8]) -> Received {
    match (sender, uid) {
        (Some(0), Some(0)) => {}
        (Some(0), None) => {
            return Received::Rejected {
                reason: "no sender credentials (SO_PASSCRED) on the datagram".into(),
            }
        }
        (Some(0), Some(uid)) => {
            return Received::Rejected {
                reason: format!("sender uid {uid} is not the kernel (0)"),
            }
        }
        (Some(pid), _) => {
            return Received::Rejected {
                reason: format!("sender netlink port {pid} is not the kernel (0)"),
            }
        }
        (None, _) => {
            return Received::Rejected {
                reason: "datagram without a sender address".into(),
            }
        }
    }
    if truncated {
        // From the kernel but cut: the event is lost to us, so the picture must be rebuilt.
        return Received::Resync {
            reason: format!("a kernel uevent longer than {DATAGRAM_BUFFER} bytes was truncated"),
        };
    }
    match UEvent::parse(bytes) {
        Ok(ev) => Received::Event(ev),
        Err(e) => Received::Rejected {
            reason: format!("malformed kernel uevent: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: &[u8] = b"add@/devices/virtual/mem/null\0ACTION=add\0SUBSYSTEM=mem\0";

    #[test]
    fn classify_accepts_kernel_sender_with_root_credentials() {
        let r = classify(Some(0), Some(0), false, ADD);

        assert!(matches!(r, Received::Event(ev) if ev.devpath == "/devices/virtual/mem/null"));
    }

    #[test]
    fn classify_rejects_userspace_sender_port() {
        let r = classify(Some(4242), Some(0), false, ADD);

        assert_eq!(
            r,
            Received::Rejected {
                reason: "sender netlink port 4242 is not the kernel (0)".into()
            }
        );
    }

    #[test]
    fn classify_rejects_non_root_credentials() {
        let r = classify(Some(0), Some(1000), false, ADD);

        assert!(matches!(r, Received::Rejected { reason } if reason.contains("uid 1000")));
    }

    #[test]
    fn classify_truncated_kernel_datagram_asks_for_resync() {
        let r = classify(Some(0), Some(0), true, ADD);

        assert!(matches!(r, Received::Resync { .. }));
    }
}
