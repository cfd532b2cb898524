//! A QMP client of our own, on tokio.
//!
//! Why not the `qapi` crate: it is generated from one QEMU version's schema and drops the
//! connection on an event it does not know; QEMU adds events and enum values in every
//! release. Here commands are names plus JSON arguments, replies are JSON, and every event
//! is delivered, unknown ones as raw JSON.
//!
//! Shape: one reader task owns the read half and routes each reply to the command waiting
//! for its `id`, and each event to [`Qmp::events`] subscribers. Commands are written under
//! a lock, so a [`Qmp`] is shared by `&self` or cloned cheaply (clones share the
//! connection). Commands that need not wait for each other go out together in one write
//! ([`Qmp::execute_batch`]): QEMU answers them in order, so a batch costs one round trip.
//! Every command has a timeout. When the peer closes the stream or sends
//! something that is not QMP, every waiting and every later command fails with an error
//! that says so ([`QmpError::Closed`], [`QmpError::Garbage`]).

mod error;
pub(crate) mod reader;
mod writer;

pub use error::QmpError;
pub use reader::MAX_LINE;

use reader::{Line, Message};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use writer::Writer;

/// How long a command may wait for its reply unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Qmp::connect`] waits for QEMU's greeting. QEMU greets a client the moment
/// it accepts it, and it accepts one client per monitor: a socket that takes the
/// connection but stays silent this long is almost always held by another client
/// ([`QmpError::NoGreeting`]). Generous for a slow machine: the greeting costs QEMU
/// nothing once its main loop runs.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// How many events a slow subscriber may fall behind before it sees `Lagged`. Every
/// subscriber takes `Lagged` in its stride (a detach lists the VM, the known buses are
/// listed again, the end of the stream is all the connector waits for), and the channel
/// keeps this many slots for every VM: 256 cost the daemon about 35 KiB a VM. A slot
/// holds an `Arc` of its event, 8 bytes where the event itself is over 100.
const EVENT_BUFFER: usize = 16;

/// One asynchronous event from QEMU (`DEVICE_DELETED`, `STOP`, or one this code has never
/// heard of: all are delivered alike).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name (`DEVICE_DELETED`).
    pub name: String,
    /// Its `data` member, `Null` when absent.
    pub data: Value,
    /// When QEMU says it happened, `None` if QEMU's clock was unavailable or it gave none.
    pub timestamp: Option<SystemTime>,
    /// The whole message as received.
    pub raw: Value,
}

/// The process at the other end of a Unix socket (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Its process id, if the kernel told us.
    pub pid: Option<i32>,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

/// A QMP connection. Clones share it.
#[derive(Clone)]
pub struct Qmp {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("peer", &self.shared.peer)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

struct Shared {
    writer: tokio::sync::Mutex<Writer>,
    state: Arc<Mutex<State>>,
    next_id: AtomicU64,
    /// Held by an exchange that passes a file descriptor, until its replies are in.
    fd_gate: tokio::sync::Mutex<()>,
    commands_sent: AtomicU64,
    writes: AtomicU64,
    /// The greeting's `QMP` member as JSON text: parsed, its few small objects were
    /// about 2 KiB a connection, kept for as long as it lives.
    greeting: Box<str>,
    peer: Option<PeerCredentials>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What the reader task and the command side share.
pub(crate) struct State {
    pending: HashMap<u64, Pending>,
    /// Set once the connection is gone; every later command fails with it.
    broken: Option<QmpError>,
    /// `None` once the connection is gone, which ends every subscriber's stream.
    events: Option<broadcast::Sender<Arc<QmpEvent>>>,
}

struct Pending {
    command: String,
    reply: oneshot::Sender<Result<reader::Returned, QmpError>>,
}

impl Qmp {
    /// Connect to QEMU's QMP Unix socket, read the greeting (within
    /// [`GREETING_TIMEOUT`]) and enter command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Self::connect_with(path, Some(GREETING_TIMEOUT), DEFAULT_TIMEOUT).await
    }

    /// [`Qmp::connect`] with `timeout` for the greeting and, later, for every command.
    pub async fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        Self::connect_with(path, Some(timeout), timeout).await
    }

    /// [`Qmp::connect`] waiting `greeting` for the greeting (`None`: until QEMU greets,
    /// for a caller that keeps its place in QEMU's queue of clients on purpose) and
    /// `timeout` for every command.
    pub async fn connect_with(
        path: &Path,
        greeting: Option<Duration>,
        timeout: Duration,
    ) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| QmpError::Connect {
                path: path.to_path_buf(),
                source: std::sync::Arc::new(e),
            })?;
        let peer = stream.peer_cred().ok().map(|c| PeerCredentials {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        });
        let (read, write) = stream.into_split();
        let origin = path.display().to_string();
        let deadlines = Deadlines { greeting, timeout };
        Self::handshake(read, Writer::Unix(write), peer, deadlines, origin).await
    }

    /// Talk QMP over any byte stream (a serial tty, a pipe). File descriptors cannot be
    /// passed over it.
    pub async fn from_stream<S>(stream: S) -> Result<Qmp, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let origin = "a byte stream (not a socket)".to_string();
        let deadlines = Deadlines {
            greeting: Some(DEFAULT_TIMEOUT),
            timeout: DEFAULT_TIMEOUT,
        };
        Self::handshake(
            read,
            Writer::Stream(Box::new(write)),
            None,
            deadlines,
            origin,
        )
        .await
    }

    async fn handshake<R>(
        read: R,
        writer: Writer,
        peer: Option<PeerCredentials>,
        deadlines: Deadlines,
        origin: String,
    ) -> Result<Qmp, QmpError>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let mut reader = reader::LineReader::new(read);
        let greeting = match deadlines.greeting {
            Some(wait) => tokio::time::timeout(wait, read_greeting(&mut reader))
                .await
                .map_err(|_| QmpError::NoGreeting {
                    monitor: origin.clone(),
                    seconds: wait.as_secs_f64(),
                })??,
            None => read_greeting(&mut reader).await?,
        };
        let timeout = deadlines.timeout;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let state = Arc::new(Mutex::new(State {
            pending: HashMap::new(),
            broken: None,
            events: Some(events),
        }));
        let reader = tokio::spawn(reader::run(reader, state.clone(), origin));
        let qmp = Qmp {
            shared: Arc::new(Shared {
                writer: tokio::sync::Mutex::new(writer),
                state,
                next_id: AtomicU64::new(1),
                fd_gate: tokio::sync::Mutex::new(()),
                commands_sent: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                greeting: greeting.to_string().into_boxed_str(),
                peer,
                reader,
            }),
            timeout,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The same connection with another per-command timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Qmp {
        Qmp {
            shared: self.shared.clone(),
            timeout,
        }
    }

    /// The per-command timeout of this handle.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The `QMP` member of the greeting (`{"version": ..., "capabilities": [...]}`).
    pub fn greeting(&self) -> Value {
        serde_json::from_str(&self.shared.greeting).unwrap_or_default()
    }

    /// QEMU's version from the greeting, `(major, minor, micro)`.
    pub fn version(&self) -> Option<(u64, u64, u64)> {
        let greeting = self.greeting();
        let v = greeting.get("version")?.get("qemu")?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        Some((n("major")?, n("minor")?, n("micro")?))
    }

    /// Who is at the other end (the QEMU process), for a Unix socket.
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.shared.peer
    }

    /// `true` when file descriptors can be passed ([`Qmp::execute_with_fd`]).
    pub async fn can_pass_fds(&self) -> bool {
        self.shared.writer.lock().await.can_pass_fds()
    }

    /// Subscribe to events from now on. The stream ends (`RecvError::Closed`) when the
    /// connection does; a subscriber that falls more than 16 events behind sees `Lagged`.
    pub fn events(&self) -> broadcast::Receiver<Arc<QmpEvent>> {
        let st = self.lock_state();
        match &st.events {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Run `command` with `arguments` and return its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, None).await
    }

    /// Run `command` with `fd` passed alongside (`SCM_RIGHTS`), for `getfd` and `add-fd`.
    /// Needs a Unix socket connection.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        if !self.can_pass_fds().await {
            return Err(QmpError::FdPassingUnsupported {
                command: command.to_string(),
            });
        }
        self.send(command, arguments, Some(fd)).await
    }

    /// Run `commands` written together, in one write, and return each one's result in
    /// order: one round trip however many there are. QEMU runs a monitor's commands one
    /// after the other in the order received, so a later command sees what an earlier one
    /// did (`device_add` after the `add-fd` that passed its file). `fd`, when given, rides
    /// with the first command (`add-fd`, `getfd`) and needs a Unix socket. A failed command
    /// does not stop the ones after it: each has its own result.
    pub async fn execute_batch(
        &self,
        commands: Vec<(&str, Option<Value>)>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Vec<Result<Value, QmpError>> {
        if fd.is_some() && !self.can_pass_fds().await {
            let first = commands.first().map_or("", |c| c.0).to_string();
            return commands
                .iter()
                .map(|_| {
                    Err(QmpError::FdPassingUnsupported {
                        command: first.clone(),
                    })
                })
                .collect();
        }
        self.send_all(commands, fd).await
    }

    /// How many commands this connection has written, and in how many writes (each write
    /// waits for its replies: one round trip). Every clone of the connection counts.
    pub fn sent(&self) -> Sent {
        Sent {
            commands: self.shared.commands_sent.load(Ordering::Relaxed),
            writes: self.shared.writes.load(Ordering::Relaxed),
        }
    }

    async fn send(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let mut results = self.send_all(vec![(command, arguments)], fd).await;
        results.pop().expect("one result per command")
    }

    async fn send_all(
        &self,
        commands: Vec<(&str, Option<Value>)>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Vec<Result<Value, QmpError>> {
        let count = commands.len() as u64;
        let first = self.shared.next_id.fetch_add(count, Ordering::Relaxed);
        let names: Vec<String> = commands.iter().map(|(c, _)| c.to_string()).collect();
        let fail_all = |e: &QmpError| -> Vec<Result<Value, QmpError>> {
            names
                .iter()
                .map(|c| Err(e.clone().for_command(c)))
                .collect()
        };
        let mut bytes = Vec::new();
        let mut replies = Vec::with_capacity(commands.len());
        {
            let mut st = self.lock_state();
            if let Some(broken) = &st.broken {
                return fail_all(broken);
            }
            for (id, (command, arguments)) in (first..).zip(commands) {
                encode(&mut bytes, id, command, arguments);
                let (tx, rx) = oneshot::channel();
                st.pending.insert(
                    id,
                    Pending {
                        command: command.to_string(),
                        reply: tx,
                    },
                );
                replies.push(rx);
            }
        }
        // Forget the ids however this ends (replies, error, timeout, or the caller dropping
        // us).
        let _forget = ForgetOnDrop {
            state: &self.shared.state,
            ids: first..first + count,
        };
        // QEMU keeps a passed descriptor until a command takes it, and a second one arriving
        // first replaces (closes) it: one exchange carrying a descriptor at a time.
        let _gate = match fd {
            Some(_) => Some(self.shared.fd_gate.lock().await),
            None => None,
        };
        let exchange = async {
            let written = self
                .shared
                .writer
                .lock()
                .await
                .write_message(&bytes, fd)
                .await;
            self.shared.writes.fetch_add(1, Ordering::Relaxed);
            self.shared
                .commands_sent
                .fetch_add(count, Ordering::Relaxed);
            if let Err(e) = written {
                // A write error on a closed socket usually races the reader seeing the end;
                // prefer its clearer account when it has one.
                let fallback = if reader::is_peer_gone(&e) {
                    QmpError::Closed {
                        command: None,
                        partial: None,
                    }
                } else {
                    QmpError::Io {
                        command: None,
                        source: std::sync::Arc::new(e),
                    }
                };
                return fail_all(&self.broken_or(fallback));
            }
            let mut results = Vec::with_capacity(replies.len());
            for (rx, command) in replies.into_iter().zip(&names) {
                results.push(match rx.await {
                    // Parsed here, by the caller, one reply at a time.
                    Ok(result) => result.map(reader::Returned::value),
                    Err(_) => Err(self
                        .broken_or(QmpError::Closed {
                            command: None,
                            partial: None,
                        })
                        .for_command(command)),
                });
            }
            results
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(results) => results,
            Err(_) => names
                .iter()
                .map(|command| {
                    Err(QmpError::Timeout {
                        command: command.clone(),
                        seconds: self.timeout.as_secs_f64(),
                    })
                })
                .collect(),
        }
    }

    fn broken_or(&self, fallback: QmpError) -> QmpError {
        self.lock_state().broken.clone().unwrap_or(fallback)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long a handshake waits for the greeting, and every command for its reply.
struct Deadlines {
    greeting: Option<Duration>,
    timeout: Duration,
}

struct ForgetOnDrop<'a> {
    state: &'a Mutex<State>,
    ids: std::ops::Range<u64>,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for id in self.ids.clone() {
            st.pending.remove(&id);
        }
    }
}

/// Append `{"execute": command, "arguments": ..., "id": id}` and its line end to `bytes`.
fn encode(bytes: &mut Vec<u8>, id: u64, command: &str, arguments: Option<Value>) {
    let mut message = Map::new();
    message.insert("execute".into(), json!(command));
    if let Some(args) = arguments.filter(|a| !a.is_null()) {
        message.insert("arguments".into(), args);
    }
    message.insert("id".into(), json!(id));
    serde_json::to_writer(&mut *bytes, &message).expect("a JSON map always serialises");
    bytes.push(b'\n');
}

/// What a connection has written so far ([`Qmp::sent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sent {
    /// Commands written.
    pub commands: u64,
    /// Writes they went out in; each write then waits for its replies, so this counts
    /// round trips.
    pub writes: u64,
}

impl std::ops::Sub for Sent {
    type Output = Sent;

    fn sub(self, earlier: Sent) -> Sent {
        Sent {
            commands: self.commands - earlier.commands,
            writes: self.writes - earlier.writes,
        }
    }
}

async fn read_greeting<R: AsyncRead + Unpin>(
    reader: &mut reader::LineReader<R>,
) -> Result<Value, QmpError> {
    let line = match reader.read_line().await {
        Ok(Line::Complete(line)) => line,
        Ok(Line::End { partial }) => {
            return Err(QmpError::Closed {
                command: Some("(greeting)".into()),
                partial: (!partial.is_empty())
                    .then(|| error::shorten(&String::from_utf8_lossy(&partial), 200)),
            })
        }
        Err(e) => return Err(QmpError::Greeting { got: e.to_string() }),
    };
    match reader::parse_message(&line) {
        Ok(Message::Greeting(greeting)) => Ok(greeting),
        _ => Err(QmpError::Greeting {
            got: error::shorten(&String::from_utf8_lossy(&line), 200),
        }),
    }
}
