//! The control socket server: a unix socket (0660, root and the control group), every peer
//! checked with SO_PEERCRED and SO_PEERGROUPS, line-delimited JSON in and out, requests
//! handed to a [`ControlHandler`]. [`ControlLimits`] caps connections per uid and in all,
//! and closes idle connections and half-sent requests, so one group member cannot use up
//! the daemon's file descriptors.

use super::protocol::{ErrorKind, Reply, Request, MAX_LINE};
use crate::backend::BoxFuture;
use crate::unix_socket::{peer_groups, prepare_socket_path, restrict_socket, SocketPathError};
use nix::unistd::{Group, Uid, User};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Who is on the other end of a connection (from SO_PEERCRED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Process id at connect time.
    pub pid: Option<i32>,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups at connect time (SO_PEERGROUPS).
    pub groups: Vec<u32>,
}

/// What the daemon does with a checked request.
pub trait ControlHandler: Send + Sync + 'static {
    /// Answer one request from an authorized peer.
    fn handle<'a>(&'a self, request: Request, peer: &'a Peer) -> BoxFuture<'a, Reply>;
}

/// Who may talk to the daemon besides root and the daemon's own user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlGroup {
    /// Group name (as written in the config).
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

impl ControlGroup {
    /// Look a group name up in the system's group database.
    pub fn lookup(name: &str) -> Result<Self, ServiceError> {
        match Group::from_name(name) {
            Ok(Some(g)) => Ok(ControlGroup {
                name: name.to_string(),
                gid: g.gid.as_raw(),
            }),
            _ => Err(ServiceError::NoSuchGroup(name.to_string())),
        }
    }
}

/// The control socket's path problems, worded for the control socket.
impl From<SocketPathError> for ServiceError {
    fn from(e: SocketPathError) -> Self {
        match e {
            SocketPathError::InUse(path) => ServiceError::InUse(path),
            SocketPathError::NotASocket(path) => ServiceError::NotASocket(path),
            SocketPathError::Io { path, what, source } => ServiceError::Io { path, what, source },
        }
    }
}

/// The control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The configured group does not exist.
    #[error("control_group `{0}` does not exist: create it (`groupadd {0}`) or change control_group in the config")]
    NoSuchGroup(String),
    /// Another daemon answers on the socket.
    #[error("{0}: another usbroute daemon is already listening there; stop it first, or give this one another control_socket")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0}: exists and is not a socket; remove it or choose another control_socket")]
    NotASocket(PathBuf),
    /// A filesystem or socket call failed.
    #[error("{}: {what}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A bound control socket, ready to serve.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<ControlGroup>,
    limits: ControlLimits,
}

/// How much of the daemon one client can take: connections and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLimits {
    /// Connections at once from one uid (root included).
    pub per_peer: usize,
    /// Connections at once in all; well under the daemon's file limit, which the QMP
    /// sockets, the uevent socket and the toggle listeners need too.
    pub total: usize,
    /// A connection with no request started for this long is closed.
    pub idle_timeout: Duration,
    /// A request line must be complete this long after its first byte.
    pub request_timeout: Duration,
}

impl Default for ControlLimits {
    fn default() -> Self {
        Self {
            per_peer: 64,
            total: 256,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl ControlServer {
    /// Bind at `path` (creating its directory), mode 0660, group `group` when given.
    /// A stale socket left by a killed daemon is replaced; a live one is an error.
    pub fn bind(path: &Path, group: Option<ControlGroup>) -> Result<Self, ServiceError> {
        prepare_socket_path(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ServiceError::Io {
            path: path.to_path_buf(),
            what: "binding",
            source,
        })?;
        restrict_socket(path, 0o660, None, group.as_ref().map(|g| g.gid))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            group,
            limits: ControlLimits::default(),
        })
    }

    /// Other connection limits than the defaults.
    pub fn with_limits(mut self, limits: ControlLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections for ever, one task each; a slow client never blocks another,
    /// and no client holds more than its share of connections.
    pub async fn serve(self, handler: Arc<dyn ControlHandler>) {
        let group = Arc::new(self.group.clone());
        let open = Arc::new(Mutex::new(OpenConnections::default()));
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(socket = %self.path.display(), "control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let peer = match peer_of(&stream) {
                Ok(peer) => peer,
                Err(e) => {
                    // Without credentials nobody is let in (SO_PEERGROUPS needs Linux 4.13).
                    tracing::warn!(socket = %self.path.display(), "cannot read a control peer's credentials: {e}");
                    continue;
                }
            };
            let ticket = match OpenConnections::admit(&open, peer.uid, &self.limits) {
                Ok(ticket) => ticket,
                Err(why) => {
                    tracing::warn!(uid = peer.uid, "control connection refused: {why}");
                    let mut line =
                        serde_json::to_vec(&Reply::error(ErrorKind::Busy, why)).unwrap_or_default();
                    line.push(b'\n');
                    // Never wait on a peer that is being refused for holding too much.
                    let _ = stream.try_write(&line);
                    continue;
                }
            };
            let handler = handler.clone();
            let group = group.clone();
            let limits = self.limits;
            tokio::spawn(async move {
                let served =
                    serve_connection(stream, peer, handler, group.as_ref().as_ref(), limits);
                if let Err(e) = served.await {
                    tracing::debug!("control connection ended: {e}");
                }
                drop(ticket);
            });
        }
    }
}

/// Connections open now, per uid and in all.
#[derive(Debug, Default)]
struct OpenConnections {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

/// One admitted connection; counted until dropped.
struct Ticket {
    open: Arc<Mutex<OpenConnections>>,
    uid: u32,
}

impl OpenConnections {
    fn admit(
        open: &Arc<Mutex<OpenConnections>>,
        uid: u32,
        limits: &ControlLimits,
    ) -> Result<Ticket, String> {
        let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = o.per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= limits.per_peer {
            return Err(format!(
                "too many connections from uid {uid} (at most {} at once); close some and retry",
                limits.per_peer
            ));
        }
        if o.total >= limits.total {
            return Err(format!(
                "too many connections to the daemon (at most {} at once); retry later",
                limits.total
            ));
        }
        *o.per_uid.entry(uid).or_default() += 1;
        o.total += 1;
        Ok(Ticket {
            open: open.clone(),
            uid,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.per_uid.remove(&self.uid);
            }
        }
    }
}

/// The peer's credentials and groups as the kernel recorded them at connect time.
fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = stream.peer_cred()?;
    Ok(Peer {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
        groups: peer_groups(stream.as_fd())?,
    })
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_connection(
    stream: UnixStream,
    peer: Peer,
    handler: Arc<dyn ControlHandler>,
    group: Option<&ControlGroup>,
    limits: ControlLimits,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    if let Err(why) = authorize(&peer, &peer.groups, Uid::effective().as_raw(), group) {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "control request refused: {why}");
        send(&mut write, &Reply::error(ErrorKind::PermissionDenied, why)).await?;
        return linger(read, write).await;
    }
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Idle between requests for a while is fine; a request begun must be finished
        // soon, so a peer cannot hold a connection with a few bytes a minute.
        match tokio::time::timeout(limits.idle_timeout, reader.fill_buf()).await {
            Err(_) => return timed_out(reader, write, "no request for a while").await,
            Ok(Ok([])) => return Ok(()),
            Ok(r) => r.map(|_| ())?,
        }
        let mut limited = (&mut reader).take(MAX_LINE as u64);
        let read_line = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout(limits.request_timeout, read_line).await {
            Err(_) => return timed_out(reader, write, "request line not finished in time").await,
            Ok(n) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            if n >= MAX_LINE {
                let msg = format!("request line longer than {MAX_LINE} bytes; connection closed");
                send(&mut write, &Reply::error(ErrorKind::BadRequest, msg)).await?;
                return linger(reader.into_inner(), write).await;
            }
            // Over-long, or the peer closed mid-line: either way this connection is done.
            return Ok(());
        }
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                tracing::debug!(uid = peer.uid, ?request, "control request");
                handler.handle(request, &peer).await
            }
            Err(e) => Reply::error(
                ErrorKind::BadRequest,
                format!("not a valid request: {e}; see docs/daemon.md for the protocol"),
            ),
        };
        send(&mut write, &reply).await?;
    }
}

/// Close after a final reply without losing it: closing a unix socket with unread input
/// resets the connection, and the peer may then never read the reply. So: end our side,
/// and read and drop what the peer still sends, for a bounded time and amount.
async fn linger(
    mut read: tokio::net::unix::OwnedReadHalf,
    mut write: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    write.shutdown().await?;
    let drain = async {
        let mut sink = [0u8; 8192];
        let mut left = 4 * MAX_LINE;
        while left > 0 {
            match read.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
    Ok(())
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

/// May this peer use the control socket? Root, the daemon's own user, and members of the
/// control group may; the refusal says who was refused and how to get access. Pure.
pub fn authorize(
    peer: &Peer,
    supplementary_groups: &[u32],
    daemon_uid: u32,
    group: Option<&ControlGroup>,
) -> Result<(), String> {
    if peer.uid == 0 || peer.uid == daemon_uid {
        return Ok(());
    }
    if let Some(g) = group {
        if peer.gid == g.gid || supplementary_groups.contains(&g.gid) {
            return Ok(());
        }
    }
    let who = match User::from_uid(Uid::from_raw(peer.uid)) {
        Ok(Some(u)) => format!("uid {} ({})", peer.uid, u.name),
        _ => format!("uid {}", peer.uid),
    };
    Err(match group {
        Some(g) => format!(
            "{who} is not root and not in group `{}`: add the user to that group (the config's control_group)",
            g.name
        ),
        None => format!(
            "{who} is not root, and no control_group is set in the config: run as root, or set control_group"
        ),
    })
}

/// Tell a peer why its connection ends, and end it.
async fn timed_out(
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    why: &str,
) -> std::io::Result<()> {
    let msg = format!("{why}; connection closed");
    // The peer may not be reading: never wait on it.
    let mut line =
        serde_json::to_vec(&Reply::error(ErrorKind::BadRequest, msg)).unwrap_or_default();
    line.push(b'\n');
    let _ = write.try_write(&line);
    drop(reader);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            pid: None,
            uid,
            gid,
            groups: vec![],
        }
    }

    fn usbroute_group() -> ControlGroup {
        ControlGroup {
            name: "usbroute".into(),
            gid: 990,
        }
    }

    #[test]
    fn authorize_accepts_root() {
        assert_eq!(authorize(&peer(0, 0), &[], 0, None), Ok(()));
    }

    #[test]
    fn authorize_accepts_supplementary_member_of_control_group() {
        let g = usbroute_group();

        assert_eq!(
            authorize(&peer(1000, 1000), &[27, 990], 0, Some(&g)),
            Ok(())
        );
    }

    #[test]
    fn authorize_refuses_stranger_and_names_the_group() {
        let g = usbroute_group();

        let err = authorize(&peer(1000, 1000), &[27], 0, Some(&g)).unwrap_err();

        assert!(
            err.contains("uid 1000") && err.contains("`usbroute`"),
            "{err}"
        );
    }

    #[test]
    fn authorize_refuses_stranger_without_group_and_says_to_set_one() {
        let err = authorize(&peer(1000, 1000), &[], 0, None).unwrap_err();

        assert!(err.contains("control_group"), "{err}");
    }
}
