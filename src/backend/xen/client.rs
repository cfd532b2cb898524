//! A native client of xenstored over its Unix socket ([`SOCKETS`], or `$XENSTORED_PATH`), speaking the
//! wire protocol of [`super::wire`]: no C library and no `xenstore-*` programs, so a host
//! without Xen builds and runs usbroute, and watches (what makes presence event-driven)
//! arrive on the same connection as replies.
//!
//! One request is in flight at a time per connection, as Xen's own `xs.c` does it; a reader
//! task hands replies to the caller and watch events to the events receiver [`Xenstore::connect`] returns. A
//! request unanswered within the timeout breaks the connection (a late reply would be taken
//! for the next one's), and so does anything malformed: the caller reconnects.

use super::wire::{self, Header, Kind, WireError, HEADER_LEN};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Mutex};

/// Where xenstored listens in dom0 (`XEN_RUN_STORED/socket`), and where it listens when
/// `/var/run` is not a link to `/run` (a minimal dom0).
pub const SOCKETS: [&str; 2] = ["/run/xenstored/socket", "/var/run/xenstored/socket"];
/// The environment variable that names the socket instead, as Xen's own libxenstore reads it.
pub const SOCKET_ENV: &str = "XENSTORED_PATH";

/// The sockets xenstored may be at: `$XENSTORED_PATH` alone when set, else [`SOCKETS`].
pub fn candidate_sockets() -> Vec<PathBuf> {
    match std::env::var_os(SOCKET_ENV) {
        Some(path) if !path.is_empty() => vec![path.into()],
        _ => SOCKETS.iter().map(PathBuf::from).collect(),
    }
}

/// The socket to connect to now: the first of `candidates` that exists, else the first.
pub fn pick_socket(candidates: &[PathBuf]) -> PathBuf {
    candidates
        .iter()
        .find(|p| p.exists())
        .or(candidates.first())
        .cloned()
        .unwrap_or_else(|| SOCKETS[0].into())
}
/// How long a request waits for its reply unless told otherwise (xenstored answers in
/// milliseconds; a TCG guest under load takes longer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Watch events kept for a slow reader. Events only say "look again", so one dropped
/// while this many wait loses nothing.
const EVENT_BUFFER: usize = 64;

/// What went wrong talking to xenstored.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// The socket could not be reached.
    #[error("cannot connect to xenstored at {}: is this dom0 with xenstored running?", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket's owner is neither root nor us.
    #[error("the process behind {} runs as uid {uid}, not root: not trusted as xenstored", socket.display())]
    PeerNotTrusted {
        /// The socket.
        socket: PathBuf,
        /// Its uid.
        uid: u32,
    },
    /// A request that cannot be sent, or a malformed reply.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// xenstored answered with an error.
    #[error("xenstored refused to {request}: {errno}")]
    Refused {
        /// The request (`read /local/domain/3/name`).
        request: String,
        /// Its errno name (`EACCES`).
        errno: String,
    },
    /// No answer in time; the connection is dropped.
    #[error("xenstored did not answer {request} within {seconds:.1} s")]
    Timeout {
        /// The request.
        request: String,
        /// How long we waited.
        seconds: f64,
    },
    /// The connection is gone.
    #[error("the xenstored connection closed (xenstored stopped or restarted, or sent something malformed)")]
    Closed,
}

impl XsError {
    /// xenstored answered `errno` (`ENOENT`, `EAGAIN`).
    pub fn is(&self, errno: &str) -> bool {
        matches!(self, XsError::Refused { errno: e, .. } if e == errno)
    }
}

/// A watch that fired: the path that changed and the watch's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that changed (or `@introduceDomain`, `@releaseDomain`).
    pub path: String,
    /// The token the watch was set with.
    pub token: String,
}

/// One reply as the reader task hands it over.
struct Reply {
    header: Header,
    payload: Vec<u8>,
}

/// A connection to xenstored. Clones share it.
#[derive(Clone)]
pub struct Xenstore {
    inner: Arc<Inner>,
}

struct Inner {
    caller: Mutex<Caller>,
    next_id: AtomicU32,
    timeout: Duration,
    closed: watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
}

struct Caller {
    writer: OwnedWriteHalf,
    replies: mpsc::Receiver<Reply>,
    /// A call was dropped while writing: the stream may hold half a message.
    torn: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Xenstore {
    /// Connect to xenstored at `socket` and check its peer (root, or our own uid).
    /// Returns the connection and its watch events.
    pub async fn connect(
        socket: &Path,
        timeout: Duration,
    ) -> Result<(Xenstore, mpsc::Receiver<WatchEvent>), XsError> {
        let connect_failed = |source| XsError::Connect {
            socket: socket.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(socket).await.map_err(connect_failed)?;
        let uid = stream.peer_cred().map_err(connect_failed)?.uid();
        if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
            return Err(XsError::PeerNotTrusted {
                socket: socket.to_path_buf(),
                uid,
            });
        }
        let (read, writer) = stream.into_split();
        let (reply_tx, replies) = mpsc::channel(1);
        let (event_tx, events) = mpsc::channel(EVENT_BUFFER);
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(async move {
            let _ = read_messages(read, reply_tx, event_tx).await;
            let _ = closed_tx.send(true);
        });
        let inner = Inner {
            caller: Mutex::new(Caller {
                writer,
                replies,
                torn: false,
            }),
            next_id: AtomicU32::new(1),
            timeout,
            closed,
            reader,
        };
        Ok((
            Xenstore {
                inner: Arc::new(inner),
            },
            events,
        ))
    }

    /// Resolves once the connection is gone.
    pub async fn closed(&self) {
        let mut closed = self.inner.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Send one request and wait for its reply's payload.
    async fn call(
        &self,
        kind: Kind,
        tx: u32,
        payload: Vec<u8>,
        request: String,
    ) -> Result<Vec<u8>, XsError> {
        let mut caller = self.inner.caller.lock().await;
        if *self.inner.closed.borrow() || self.inner.reader.is_finished() || caller.torn {
            self.inner.reader.abort();
            return Err(XsError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = wire::encode(kind, id, tx, &payload)?;
        let exchange = async {
            caller.torn = true;
            let written = caller.writer.write_all(&bytes).await;
            caller.torn = false;
            written.map_err(|_| XsError::Closed)?;
            loop {
                let reply = caller.replies.recv().await.ok_or(XsError::Closed)?;
                // An earlier id: the reply to a call whose caller gave up waiting.
                if reply.header.req_id >= id {
                    return Ok::<_, XsError>(reply);
                }
            }
        };
        let reply = match tokio::time::timeout(self.inner.timeout, exchange).await {
            Ok(reply) => reply?,
            Err(_) => {
                // A late reply would be read as the next request's: end the connection.
                self.inner.reader.abort();
                let _ = caller.writer.shutdown().await;
                return Err(XsError::Timeout {
                    request,
                    seconds: self.inner.timeout.as_secs_f64(),
                });
            }
        };
        match reply.header.kind {
            _ if reply.header.req_id != id => {
                self.inner.reader.abort();
                Err(XsError::Closed)
            }
            Kind::Error => Err(XsError::Refused {
                request,
                errno: wire::error_name(&reply.payload),
            }),
            k if k == kind => Ok(reply.payload),
            _ => Err(WireError::Malformed { what: "a request" }.into()),
        }
    }

    /// A node's value; `None` when it does not exist.
    pub async fn read(&self, tx: u32, path: &str) -> Result<Option<String>, XsError> {
        let payload = wire::path_payload(path)?;
        match self
            .call(Kind::Read, tx, payload, format!("read {path}"))
            .await
        {
            Ok(value) => Ok(Some(wire::value(&value)?.to_string())),
            Err(e) if e.is("ENOENT") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A node's children's names; empty when it does not exist.
    pub async fn directory(&self, tx: u32, path: &str) -> Result<Vec<String>, XsError> {
        let payload = wire::path_payload(path)?;
        match self
            .call(Kind::Directory, tx, payload, format!("list {path}"))
            .await
        {
            Ok(names) => Ok(wire::strings(&names, "a directory")?
                .into_iter()
                .map(String::from)
                .collect()),
            Err(e) if e.is("ENOENT") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Write `value` to a node (created if missing).
    pub async fn write(&self, tx: u32, path: &str, value: &str) -> Result<(), XsError> {
        let payload = wire::write_payload(path, value)?;
        self.call(Kind::Write, tx, payload, format!("write {path}"))
            .await?;
        Ok(())
    }

    /// Remove a node and its children; one already gone is fine.
    pub async fn rm(&self, tx: u32, path: &str) -> Result<(), XsError> {
        let payload = wire::path_payload(path)?;
        match self
            .call(Kind::Rm, tx, payload, format!("remove {path}"))
            .await
        {
            Err(e) if !e.is("ENOENT") => Err(e),
            _ => Ok(()),
        }
    }

    /// Watch `path` (and what is under it) under `token`; xenstored fires it once at once.
    pub async fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let payload = wire::watch_payload(path, token)?;
        self.call(Kind::Watch, 0, payload, format!("watch {path}"))
            .await?;
        Ok(())
    }

    /// Stop watching `path` under `token`; a watch already gone is fine.
    pub async fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let payload = wire::watch_payload(path, token)?;
        match self
            .call(Kind::Unwatch, 0, payload, format!("unwatch {path}"))
            .await
        {
            Err(e) if !e.is("ENOENT") => Err(e),
            _ => Ok(()),
        }
    }

    /// Start a transaction: reads in it see one snapshot, writes land together or not.
    pub async fn transaction_start(&self) -> Result<u32, XsError> {
        let reply = self
            .call(
                Kind::TransactionStart,
                0,
                vec![0],
                "start a transaction".into(),
            )
            .await?;
        let id = wire::strings(&reply, "a transaction start")?;
        match id[..] {
            [id] => id.parse().map_err(|_| {
                WireError::Malformed {
                    what: "a transaction start",
                }
                .into()
            }),
            _ => Err(WireError::Malformed {
                what: "a transaction start",
            }
            .into()),
        }
    }

    /// End transaction `tx`: commit it, or abandon it (`commit = false`). `Ok(false)`: a
    /// commit lost to a concurrent change (`EAGAIN`); read again and retry.
    pub async fn transaction_end(&self, tx: u32, commit: bool) -> Result<bool, XsError> {
        let payload = if commit { b"T\0" } else { b"F\0" }.to_vec();
        match self
            .call(
                Kind::TransactionEnd,
                tx,
                payload,
                "end a transaction".into(),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is("EAGAIN") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Read messages until the connection ends or sends something malformed.
async fn read_messages(
    mut read: OwnedReadHalf,
    replies: mpsc::Sender<Reply>,
    events: mpsc::Sender<WatchEvent>,
) -> Result<(), XsError> {
    loop {
        let mut head = [0u8; HEADER_LEN];
        read.read_exact(&mut head)
            .await
            .map_err(|_| XsError::Closed)?;
        let header = Header::parse(&head)?;
        let mut payload = vec![0u8; header.len as usize];
        read.read_exact(&mut payload)
            .await
            .map_err(|_| XsError::Closed)?;
        if header.kind == Kind::WatchEvent {
            let (path, token) = wire::watch_event(&payload)?;
            // Full: events only say "look again", and those queued will say it.
            let _ = events.try_send(WatchEvent {
                path: path.into(),
                token: token.into(),
            });
        } else if replies.send(Reply { header, payload }).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
