//! Where the daemon's uevents come from: the kernel's netlink socket ([`UeventSocket`]),
//! or a Unix datagram socket the daemon binds (`usbroute serve --uevent-socket PATH`, a
//! hidden flag for benches and tests).
//!
//! Why the second: a bench or test that runs the daemon on a recorded host
//! (`--sysfs-root tests/fixtures/...`) must tell it that a recorded device was plugged,
//! and a real uevent (written to a real `/sys/.../uevent`) can only name the machine's
//! own devices. So the datagrams on this socket are the kernel's own format
//! (`ACTION@DEVPATH\0KEY=VALUE\0...`), parsed by the same [`UEvent::parse`] and handled
//! by the same daemon code as the kernel's; only the sender check differs. The kernel's
//! datagrams must come from netlink port 0 with uid 0; these must carry the daemon's own
//! uid in their SCM_CREDENTIALS (the kernel fills them in: a sender cannot forge another
//! uid without CAP_SETUID), and the socket is made 0600.

use super::netlink::{EventsError, Received, UeventSocket};
use super::uevent::UEvent;
use nix::sys::socket::{setsockopt, sockopt, UnixAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use tokio::io::unix::AsyncFd;

/// Largest datagram read: the kernel's uevents fit in 2 KiB of environment plus the
/// header; a longer one is refused whole, never read in part.
const DATAGRAM_BUFFER: usize = 16 << 10;

/// Which uevents the daemon listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UeventFeed {
    /// None (tests that drive the daemon by other means).
    Off,
    /// The kernel's, over netlink: what `usbroute serve` uses.
    Kernel,
    /// Datagrams in the kernel's format on a Unix socket bound at this path, from senders
    /// with the daemon's uid (`serve --uevent-socket`; benches and tests on recorded hosts).
    Socket(PathBuf),
}

impl UeventFeed {
    /// Open the feed (`None` for [`UeventFeed::Off`]). Needs a tokio runtime.
    pub fn open(&self) -> Result<Option<UeventSource>, EventsError> {
        Ok(match self {
            UeventFeed::Off => None,
            UeventFeed::Kernel => Some(UeventSource::Kernel(UeventSocket::open()?)),
            UeventFeed::Socket(path) => Some(UeventSource::Socket(UeventListener::bind(path)?)),
        })
    }
}

/// An open feed of uevents.
#[derive(Debug)]
pub enum UeventSource {
    /// The kernel's netlink socket.
    Kernel(UeventSocket),
    /// A Unix datagram socket ([`UeventFeed::Socket`]).
    Socket(UeventListener),
}

impl UeventSource {
    /// The next datagram, judged: an event, a resync, or a rejected datagram.
    pub async fn recv(&mut self) -> Received {
        match self {
            UeventSource::Kernel(sock) => sock.recv().await,
            UeventSource::Socket(sock) => sock.recv().await,
        }
    }
}

/// A bound Unix datagram socket that takes uevents in the kernel's format.
pub struct UeventListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    own_uid: u32,
    datagram: Vec<u8>,
}

impl std::fmt::Debug for UeventListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UeventListener")
            .field("path", &self.path)
            .finish()
    }
}

impl UeventListener {
    /// Bind at `path` (a stale socket there is replaced, a live one refused), mode 0600,
    /// with SO_PASSCRED so every datagram carries its sender's credentials.
    pub fn bind(path: &Path) -> Result<Self, EventsError> {
        let err = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| EventsError::Listener { path, what, source }
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            // A datagram socket someone still holds accepts a connect; a stale one refuses.
            let probe = UnixDatagram::unbound().map_err(err("creating a probe socket"))?;
            if probe.connect(path).is_ok() {
                return Err(err("binding")(std::io::ErrorKind::AddrInUse.into()));
            }
            std::fs::remove_file(path).map_err(err("removing the stale socket"))?;
        }
        let socket = UnixDatagram::bind(path).map_err(err("binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(err("setting its mode to 0600"))?;
        setsockopt(&socket, sockopt::PassCred, &true)
            .map_err(|e| err("setting SO_PASSCRED")(e.into()))?;
        socket
            .set_nonblocking(true)
            .map_err(err("making it non-blocking"))?;
        let fd = super::netlink::register(OwnedFd::from(socket))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
            own_uid: nix::unistd::geteuid().as_raw(),
            datagram: vec![0; DATAGRAM_BUFFER],
        })
    }

    /// Wait for the next datagram and judge it. A failed read is a
    /// [`Received::Resync`]: the daemon rescans, as after a lost kernel uevent.
    pub async fn recv(&mut self) -> Received {
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(g) => g,
                Err(e) => return resync(&self.path, &e),
            };
            let (datagram, own) = (&mut self.datagram, self.own_uid);
            match guard.try_io(|fd| read_one(fd.get_ref(), datagram, own)) {
                Err(_would_block) => continue,
                Ok(Ok(received)) => return received,
                Ok(Err(e)) => return resync(&self.path, &e),
            }
        }
    }
}

fn resync(path: &Path, e: &std::io::Error) -> Received {
    Received::Resync {
        reason: format!("reading the uevent socket {} failed: {e}", path.display()),
    }
}

/// One non-blocking `recvmsg` with the sender's credentials, judged.
fn read_one(fd: &OwnedFd, datagram: &mut [u8], own_uid: u32) -> std::io::Result<Received> {
    let (_, got) = super::netlink::read_with_credentials::<UnixAddr>(fd, datagram)?;
    Ok(judge(got.uid, own_uid, got.truncated, &datagram[..got.len]))
}

/// Decide what a datagram on the uevent socket is, from its sender's uid (`None`: no
/// credentials came with it), the daemon's own uid, and its bytes. Pure.
pub fn judge(uid: Option<u32>, own_uid: u32, truncated: bool, bytes: &[u8]) -> Received {
    match uid {
        Some(uid) if uid == own_uid => {}
        Some(uid) => {
            return Received::Rejected {
                reason: format!(
                    "uevent socket: sender uid {uid} is not the daemon's own ({own_uid})"
                ),
            }
        }
        None => {
            return Received::Rejected {
                reason: "uevent socket: no sender credentials (SO_PASSCRED) on the datagram".into(),
            }
        }
    }
    if truncated {
        return Received::Rejected {
            reason: format!("uevent socket: a datagram longer than {DATAGRAM_BUFFER} bytes"),
        };
    }
    match UEvent::parse(bytes) {
        Ok(ev) => Received::Event(ev),
        Err(e) => Received::Rejected {
            reason: format!("uevent socket: malformed uevent: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIND: &[u8] = b"bind@/devices/pci0000:00/0000:00:03.0/usb1/1-2/1-2.1\0ACTION=bind\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0";

    #[test]
    fn judge_accepts_a_uevent_from_the_daemons_own_uid() {
        let r = judge(Some(1000), 1000, false, BIND);

        assert!(matches!(r, Received::Event(ev) if ev.kernel_name() == "1-2.1"));
    }

    #[test]
    fn judge_rejects_another_uid_naming_both() {
        let r = judge(Some(1000), 0, false, BIND);

        assert!(
            matches!(r, Received::Rejected { reason } if reason.contains("uid 1000 is not the daemon's own (0)"))
        );
    }

    #[test]
    fn judge_rejects_a_datagram_without_credentials() {
        let r = judge(None, 0, false, BIND);

        assert!(matches!(r, Received::Rejected { reason } if reason.contains("SO_PASSCRED")));
    }

    #[test]
    fn judge_rejects_a_truncated_datagram_instead_of_reading_part_of_it() {
        let r = judge(Some(0), 0, true, BIND);

        assert!(matches!(r, Received::Rejected { reason } if reason.contains("longer than")));
    }

    #[test]
    fn judge_rejects_what_is_not_a_uevent() {
        let r = judge(Some(0), 0, false, b"hello");

        assert!(matches!(r, Received::Rejected { reason } if reason.contains("malformed")));
    }

    #[tokio::test]
    async fn a_datagram_sent_to_the_bound_socket_arrives_as_the_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uevents.sock");
        let mut listener = UeventListener::bind(&path).unwrap();

        UnixDatagram::unbound()
            .unwrap()
            .send_to(BIND, &path)
            .unwrap();
        let r = listener.recv().await;

        assert!(matches!(r, Received::Event(ev) if ev.devpath.ends_with("/1-2.1")));
    }

    #[tokio::test]
    async fn binding_where_a_live_listener_is_fails_and_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uevents.sock");
        let live = UeventListener::bind(&path).unwrap();

        let second = UeventListener::bind(&path);
        drop(live);
        let after = UeventListener::bind(&path);

        assert!(matches!(second, Err(EventsError::Listener { .. })));
        assert!(after.is_ok(), "{after:?}");
    }
}
