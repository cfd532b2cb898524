//! The control socket server: a unix socket (0660, root and the control group), every peer
//! checked with SO_PEERCRED, line-delimited JSON in and out, requests handed to a
//! [`ControlHandler`].

use super::protocol::{ErrorKind, Reply, Request, MAX_LINE};
use crate::backend::BoxFuture;
use nix::unistd::{Group, Uid, User};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    #[error("{path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What we tried.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// A bound control socket, ready to serve.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<ControlGroup>,
}

impl ControlServer {
    /// Bind at `path` (creating its directory), mode 0660, group `group` when given.
    /// A stale socket left by a killed daemon is replaced; a live one is an error.
    pub fn bind(path: &Path, group: Option<ControlGroup>) -> Result<Self, ServiceError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| ServiceError::Io { path, what, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("creating its directory"))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ServiceError::NotASocket(path.to_path_buf()))
            }
            Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
                return Err(ServiceError::InUse(path.to_path_buf()))
            }
            Ok(_) => std::fs::remove_file(path).map_err(io("removing the stale socket"))?,
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(io("binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io("setting mode 0660"))?;
        if let Some(g) = &group {
            std::os::unix::fs::chown(path, None, Some(g.gid)).map_err(io("setting the group"))?;
        }
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            group,
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections for ever, one task each; a slow client never blocks another.
    pub async fn serve(self, handler: Arc<dyn ControlHandler>) {
        let group = Arc::new(self.group.clone());
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(socket = %self.path.display(), "control socket accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            let group = group.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_connection(stream, handler, group.as_ref().as_ref()).await {
                    tracing::debug!("control connection ended: {e}");
                }
            });
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_connection(
    stream: UnixStream,
    handler: Arc<dyn ControlHandler>,
    group: Option<&ControlGroup>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    };
    let (read, mut write) = stream.into_split();
    let supplementary = peer.pid.map(supplementary_groups).unwrap_or_default();
    if let Err(why) = authorize(&peer, &supplementary, Uid::effective().as_raw(), group) {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "control request refused: {why}");
        send(&mut write, &Reply::error(ErrorKind::PermissionDenied, why)).await?;
        return linger(read, write).await;
    }
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
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

/// The peer's supplementary groups, read from /proc (its `Groups:` line).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            pid: None,
            uid,
            gid,
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
