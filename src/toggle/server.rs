//! The toggle service's listeners: TCP only where configured (and then always behind
//! the secret), one unix socket per VM that its QEMU connects to (checked with
//! SO_PEERCRED against the VM's QEMU user), and a hook for the control socket.
//!
//! Every connection is read line by line with a bounded buffer; the first line that is
//! not a command closes it (so an HTTP request smuggled in by a web page ends at its
//! first header). Idle and not-yet-authenticated connections time out, wrong secrets
//! are counted across all connections of a listener ([`AuthThrottle`]), and a stranger
//! can never hold a slot the real client needs ([`Slots`]). Replies are written with
//! `try_write` only: a client that never reads (the netcat one-liner, PowerShell
//! writing to COM1) can never stall the service; once its socket buffer is full it
//! simply stops getting replies.

use super::dispatch::{dispatch, Access, RoutingControl, Session};
use super::limits::{AuthBudget, AuthThrottle, RateLimit, Slot, Slots};
use super::lines::{Line, LineSplitter, ReplyWriter};
use super::protocol::{parse_line, Reply, Request, MAX_LINE};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, UnixListener};

/// Where every listener sends its requests: the engine in the daemon.
pub type SharedControl = Arc<dyn RoutingControl>;

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ToggleError {
    /// Not `IP:PORT`.
    #[error("Toggle listener address `{0}` is not IP:PORT (such as 127.0.0.1:4510)")]
    BadAddress(String),
    /// A TCP listener without a secret.
    #[error("Refusing to listen on {0} without a secret: any local user, web page or guest on user-mode networking could switch your USB ports. Set `secret = \"...\"` (clients then send `auth SECRET` first), or drop the TCP listener and use `usbroute toggle` (the control socket) or a VM's unix serial link")]
    NoSecret(SocketAddr),
    /// bind() failed.
    #[error("Cannot listen on {addr} ({origin})")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// Which listener.
        origin: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A VM's unix serial socket could not be set up.
    #[error("{origin}: cannot set up the serial socket")]
    Socket {
        /// Which listener.
        origin: String,
        /// What went wrong at the path.
        #[source]
        source: crate::unix_socket::SocketPathError,
    },
    /// `qemu_user` names no user.
    #[error("{origin}: qemu_user `{user}` is neither a user name nor a uid on this system; set it to the user QEMU runs as (such as libvirt-qemu)")]
    NoSuchUser {
        /// Which listener.
        origin: String,
        /// The configured name.
        user: String,
    },
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Hang up after this long without a line; `None` for links that stay up (serial).
    pub idle_timeout: Option<Duration>,
    /// Commands per second a connection may send (bursts of the same size); 0 = no limit.
    pub rate_per_second: u32,
    /// Connections at once per listener; when all are taken the oldest connection that
    /// has not authenticated yet makes room, else the newcomer is told `err busy`.
    pub max_connections: usize,
    /// On a listener with a secret: time to send `auth SECRET` before being closed.
    pub auth_timeout: Duration,
    /// Wrong secrets the listener takes from all its connections together.
    pub auth_budget: AuthBudget,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: Some(Duration::from_secs(300)),
            rate_per_second: 20,
            max_connections: 32,
            auth_timeout: Duration::from_secs(10),
            auth_budget: AuthBudget::default(),
        }
    }
}

/// Failed `auth` attempts before the connection is closed.
const MAX_FAILED_AUTHS: u32 = 3;

/// Check an address for a TCP listener: `IP:PORT`, and a secret whatever the address
/// (loopback is reachable by every local user, web pages and slirp guests).
pub fn check_listen_address(addr: &str, has_secret: bool) -> Result<SocketAddr, ToggleError> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| ToggleError::BadAddress(addr.to_string()))?;
    if !has_secret {
        return Err(ToggleError::NoSecret(parsed));
    }
    Ok(parsed)
}

/// Bind a TCP listener after [`check_listen_address`].
pub async fn bind(
    addr: &str,
    secret: Option<&str>,
    origin: &str,
) -> Result<TcpListener, ToggleError> {
    let parsed = check_listen_address(addr, secret.is_some())?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| ToggleError::Bind {
            addr: parsed.to_string(),
            origin: origin.to_string(),
            source,
        })
}

/// Who may connect to a VM's unix serial socket: root, the daemon's own user and the
/// VM's QEMU user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialPeers {
    /// The VM (for messages).
    pub vm: String,
    /// The uid QEMU runs as, from `qemu_user`; `None`: QEMU runs as root.
    pub qemu_uid: Option<u32>,
}

impl SerialPeers {
    /// Resolve `qemu_user` (a name or a numeric uid).
    pub fn new(vm: &str, qemu_user: Option<&str>) -> Result<Self, ToggleError> {
        let qemu_uid = qemu_user
            .map(|user| {
                user.parse::<u32>()
                    .ok()
                    .or_else(|| {
                        nix::unistd::User::from_name(user)
                            .ok()
                            .flatten()
                            .map(|u| u.uid.as_raw())
                    })
                    .ok_or_else(|| ToggleError::NoSuchUser {
                        origin: format!("VM {vm}"),
                        user: user.to_string(),
                    })
            })
            .transpose()?;
        Ok(Self {
            vm: vm.to_string(),
            qemu_uid,
        })
    }

    /// `Err` with the refusal for a peer that is not one of these.
    fn check(&self, uid: u32) -> Result<(), String> {
        let daemon = nix::unistd::Uid::effective().as_raw();
        if uid == 0 || uid == daemon || Some(uid) == self.qemu_uid {
            return Ok(());
        }
        Err(match self.qemu_uid {
            Some(q) => format!("uid {uid} is not VM {}'s QEMU user (uid {q})", self.vm),
            None => format!(
                "uid {uid} is not root; if VM {}'s QEMU runs as that user, set `qemu_user` in its [[vm]]",
                self.vm
            ),
        })
    }
}

/// Create a VM's serial socket at `path`: its directory if missing, a stale socket
/// replaced, mode 0600 owned by the QEMU user, so only it (and root) can connect.
pub fn bind_unix(path: &Path, peers: &SerialPeers) -> Result<UnixListener, ToggleError> {
    let origin = format!("VM {}", peers.vm);
    let socket_error = |source| ToggleError::Socket {
        origin: origin.clone(),
        source,
    };
    crate::unix_socket::prepare_socket_path(path).map_err(socket_error)?;
    let listener = UnixListener::bind(path).map_err(|source| ToggleError::Bind {
        addr: path.display().to_string(),
        origin: origin.clone(),
        source,
    })?;
    crate::unix_socket::restrict_socket(path, 0o600, peers.qemu_uid, None).map_err(socket_error)?;
    Ok(listener)
}

/// A bound listener to [`ToggleService::serve`].
#[derive(Debug)]
pub enum Listener {
    /// TCP: anyone who can reach the address; the [`Access`] must have a secret.
    Tcp(TcpListener),
    /// A VM's unix serial socket: peers are checked with SO_PEERCRED.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path (removed when the listener stops).
        path: PathBuf,
        /// Who may connect.
        peers: SerialPeers,
    },
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

/// One accepted connection, either kind.
struct Conn {
    reader: Box<dyn AsyncRead + Unpin + Send>,
    writer: ReplyWriter,
    peer: String,
}

impl Listener {
    /// The next connection whose peer may talk to this listener. Refused peers are told
    /// why and dropped here, before they take a slot.
    async fn accept(&self, origin: &str) -> Conn {
        loop {
            let accepted = match self {
                Listener::Tcp(l) => l.accept().await.map(|(stream, peer)| {
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    Ok(Conn {
                        reader: Box::new(r),
                        writer: ReplyWriter::new(Box::new(move |b| w.try_write(b))),
                        peer: peer.to_string(),
                    })
                }),
                Listener::Unix {
                    listener, peers, ..
                } => listener.accept().await.map(|(stream, _)| {
                    let verdict = stream
                        .peer_cred()
                        .map_err(|e| e.to_string())
                        .and_then(|c| peers.check(c.uid()).map(|()| c.uid()));
                    let uid = match verdict {
                        Ok(uid) => uid,
                        Err(why) => {
                            refuse(&stream, &why);
                            return Err(why);
                        }
                    };
                    let (r, w) = stream.into_split();
                    Ok(Conn {
                        reader: Box::new(r),
                        writer: ReplyWriter::new(Box::new(move |b| w.try_write(b))),
                        peer: format!("uid {uid}"),
                    })
                }),
            };
            match accepted {
                Ok(Ok(conn)) => return conn,
                Ok(Err(why)) => tracing::warn!(%origin, "toggle connection refused: {why}"),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%origin, "toggle accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// Tell a refused unix peer why, without waiting on it. What it already sent is read
/// and dropped first: closing a unix socket with unread input resets the connection,
/// and the peer would then lose the reply.
fn refuse(stream: &tokio::net::UnixStream, why: &str) {
    let mut sink = [0u8; 1024];
    for _ in 0..4 {
        if !matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = stream.try_write(format!("err {why}\n").as_bytes());
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What every connection of one listener shares.
struct Shared {
    access: Access,
    limits: Limits,
    throttle: Mutex<AuthThrottle>,
}

/// The line service over one [`RoutingControl`].
#[derive(Clone)]
pub struct ToggleService {
    control: SharedControl,
}

impl ToggleService {
    /// A service switching `control`.
    pub fn new(control: SharedControl) -> Self {
        Self { control }
    }

    /// Handle one line from anywhere (the daemon's control socket calls this with
    /// [`Access::unrestricted`]). `None` for a blank line.
    pub async fn handle_line(
        &self,
        access: &Access,
        session: &mut Session,
        line: &[u8],
    ) -> Option<Reply> {
        match parse_line(line) {
            Ok(None) => None,
            Ok(Some(request)) => Some(self.dispatch(access, session, request).await),
            Err(e) => Some(Reply::Err(e.to_string())),
        }
    }

    async fn dispatch(&self, access: &Access, session: &mut Session, request: Request) -> Reply {
        dispatch(&*self.control, access, session, request).await
    }

    /// Accept connections on `listener` forever.
    pub async fn serve(self, listener: impl Into<Listener>, access: Access, limits: Limits) {
        let listener = listener.into();
        let slots = Slots::new(limits.max_connections);
        let shared = Arc::new(Shared {
            throttle: Mutex::new(AuthThrottle::new(limits.auth_budget)),
            access,
            limits,
        });
        loop {
            let mut conn = listener.accept(&shared.access.origin).await;
            let Some(slot) = slots.acquire(shared.access.secret.is_none()).await else {
                conn.writer
                    .send(&Reply::Err("busy: too many connections".into()));
                continue;
            };
            tracing::debug!(origin = %shared.access.origin, peer = %conn.peer, "toggle client connected");
            let service = self.clone();
            let shared = shared.clone();
            tokio::spawn(async move { service.connection(conn, &shared, slot).await });
        }
    }

    async fn connection(&self, conn: Conn, shared: &Shared, slot: Slot) {
        let Conn {
            mut reader,
            writer: mut out,
            ..
        } = conn;
        let mut session = Session::default();
        let mut bucket = RateLimit::new(shared.limits.rate_per_second);
        let mut lines = LineSplitter::default();
        let mut chunk = [0u8; 1024];
        loop {
            let proven = shared.access.secret.is_none() || session.authenticated;
            let timeout = match proven {
                true => shared.limits.idle_timeout,
                false => Some(shared.limits.auth_timeout),
            };
            let read = tokio::select! {
                r = reader.read(&mut chunk) => r,
                () = slot.evicted.notified(), if !proven => {
                    out.send(&Reply::Err("busy: slot given to a newer connection; authenticate at once".into()));
                    return;
                }
                () = sleep_or_never(timeout) => {
                    out.send(&Reply::Err(match proven {
                        true => "idle timeout, closing".into(),
                        false => "no `auth SECRET` in time, closing".into(),
                    }));
                    return;
                }
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &byte in &chunk[..n] {
                let keep_going = match lines.push(byte) {
                    None => true,
                    Some(Line::Complete(line)) => {
                        self.process(&line, shared, &mut session, &mut bucket, &mut out)
                            .await
                    }
                    Some(Line::TooLong) => {
                        out.send(&Reply::Err(format!(
                            "line too long (at most {MAX_LINE} bytes), closing"
                        )));
                        false
                    }
                };
                if session.authenticated {
                    slot.proven();
                }
                if !keep_going {
                    return;
                }
            }
        }
        // `printf toggle | nc ...` ends without a newline: still a command.
        if let Some(line) = lines.finish() {
            self.process(&line, shared, &mut session, &mut bucket, &mut out)
                .await;
        }
    }

    /// One complete line; `false` to hang up.
    async fn process(
        &self,
        line: &[u8],
        shared: &Shared,
        session: &mut Session,
        bucket: &mut RateLimit,
        out: &mut ReplyWriter,
    ) -> bool {
        let access = &shared.access;
        let request = match parse_line(line) {
            Ok(None) => return true,
            Ok(Some(request)) => request,
            // Not the protocol (an HTTP header, binary, a typo): nothing after it on this
            // connection can be trusted to be meant as a command.
            Err(e) => {
                tracing::info!(origin = %access.origin, "toggle: {e}; closing");
                out.send(&Reply::Err(format!("{e}; closing")));
                return false;
            }
        };
        if !bucket.take() {
            out.send(&Reply::Err(format!(
                "rate limit: at most {} commands per second",
                bucket.per_second
            )));
            return true;
        }
        let checks_secret = matches!(request, Request::Auth(_)) && access.secret.is_some();
        if checks_secret && !lock(&shared.throttle).may_check() {
            out.send(&Reply::Err(
                "too many wrong secrets on this listener; try again later, closing".into(),
            ));
            return false;
        }
        let failed_before = session.failed_auths;
        let reply = self.dispatch(access, session, request).await;
        if session.failed_auths > failed_before {
            lock(&shared.throttle).wrong();
        }
        if let Reply::Err(e) = &reply {
            tracing::info!(origin = %access.origin, "toggle: {e}");
        }
        out.send(&reply);
        if session.failed_auths >= MAX_FAILED_AUTHS {
            out.send(&Reply::Err("too many wrong secrets, closing".into()));
            return false;
        }
        true
    }
}

async fn sleep_or_never(timeout: Option<Duration>) {
    match timeout {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_serial_path_taken_by_a_file_is_refused_in_the_serial_sockets_own_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("win11.serial");
        std::fs::write(&path, b"not a socket").unwrap();
        let peers = SerialPeers::new("win11", None).unwrap();

        let err = bind_unix(&path, &peers).unwrap_err();

        let line = crate::error_chain::one_line(&err);
        assert!(
            line.starts_with("VM win11: cannot set up the serial socket: "),
            "{line}"
        );
        assert!(line.contains("exists and is not a socket"), "{line}");
        assert!(!line.contains("control_socket"), "{line}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
