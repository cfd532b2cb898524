//! The socket, its peer check and the one I/O task per connection: it writes calls, reads
//! packets (bounded: a length is judged from its 4 bytes before anything is allocated),
//! hands each reply to the call waiting on its serial, forwards events, and when the
//! socket ends fails every waiter and resolves `closed`.

use super::packet::{
    self, Kind, Packet, Status, KEEPALIVE_PROGRAM, REMOTE_PROGRAM, REMOTE_VERSION,
};
use super::procedures::{self, name};
use super::{DomainEvent, RpcError};
use crate::inventory::text::{capped, escaped};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

/// What the I/O task answers a waiting call with: the reply, or why the connection ended.
type Answer = Result<Packet, String>;

/// One call handed to the I/O task.
struct Outgoing {
    serial: u32,
    bytes: Vec<u8>,
    answer: oneshot::Sender<Answer>,
}

/// What every clone of a connection shares.
#[derive(Debug)]
pub(super) struct Shared {
    socket: PathBuf,
    calls: mpsc::UnboundedSender<Outgoing>,
    serial: AtomicU32,
    closed: watch::Receiver<bool>,
    /// Why the connection ended, once it has.
    reason: Arc<Mutex<Option<String>>>,
    timeout: Duration,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("serial", &self.serial)
            .finish()
    }
}

/// Connect to `socket` and check its peer: root, or our own uid (SO_PEERCRED).
pub(super) async fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, RpcError> {
    let connect_failed = |source| RpcError::Connect {
        socket: socket.to_owned(),
        source,
    };
    let stream = match tokio::time::timeout(timeout, UnixStream::connect(socket)).await {
        Ok(s) => s.map_err(connect_failed)?,
        Err(_) => {
            return Err(RpcError::Timeout {
                call: "connect",
                socket: socket.to_owned(),
                after: timeout,
            })
        }
    };
    let uid = stream.peer_cred().map_err(connect_failed)?.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return Err(RpcError::PeerNotTrusted {
            socket: socket.to_owned(),
            uid,
        });
    }
    Ok(stream)
}

impl Shared {
    /// Start the I/O task on `stream`; events go to `events`.
    pub(super) fn start(
        stream: UnixStream,
        socket: &Path,
        timeout: Duration,
        events: mpsc::UnboundedSender<DomainEvent>,
    ) -> Shared {
        let (calls, calls_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(false);
        let reason = Arc::new(Mutex::new(None));
        let task = IoTask {
            socket: socket.to_owned(),
            pending: HashMap::new(),
            events,
        };
        tokio::spawn(task.run(stream, calls_rx, closed_tx, reason.clone()));
        Shared {
            socket: socket.to_owned(),
            calls,
            serial: AtomicU32::new(1),
            closed,
            reason,
            timeout,
        }
    }

    /// The socket.
    pub(super) fn socket(&self) -> &Path {
        &self.socket
    }

    /// Resolves once the I/O task has ended.
    pub(super) async fn closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the task is gone, which is closed as well.
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Call `procedure` with `args`; the reply's payload, or libvirt's error, within the
    /// deadline.
    pub(super) async fn call(&self, procedure: i32, args: &[u8]) -> Result<Vec<u8>, RpcError> {
        let call = name(procedure);
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        let sent = self.calls.send(Outgoing {
            serial,
            bytes: packet::call(procedure, serial, args),
            answer,
        });
        if sent.is_err() {
            return Err(self.lost(call, None));
        }
        let packet = match tokio::time::timeout(self.timeout, answered).await {
            Err(_) => {
                return Err(RpcError::Timeout {
                    call,
                    socket: self.socket.clone(),
                    after: self.timeout,
                })
            }
            Ok(Err(_)) => return Err(self.lost(call, None)),
            Ok(Ok(Err(reason))) => return Err(self.lost(call, Some(reason))),
            Ok(Ok(Ok(packet))) => packet,
        };
        match packet.header.status {
            Status::Ok => Ok(packet.payload),
            Status::Error => {
                let e = procedures::remote_error(&packet.payload)
                    .map_err(|e| self.protocol(call, format!("its error reply: {e}")))?;
                let message = e.message.unwrap_or_else(|| "(no message)".into());
                Err(RpcError::Libvirt {
                    call,
                    code: e.code,
                    domain: e.domain,
                    message: escaped(&capped(&message, super::error::MESSAGE_SHOWN)).into_owned(),
                })
            }
            Status::Other(s) => Err(self.protocol(call, format!("reply status {s}"))),
        }
    }

    /// A protocol error in the reply to `call`.
    pub(super) fn protocol(&self, call: &'static str, what: String) -> RpcError {
        RpcError::Protocol {
            socket: self.socket.clone(),
            call,
            what,
        }
    }

    fn lost(&self, call: &'static str, reason: Option<String>) -> RpcError {
        let reason = reason
            .or_else(|| self.reason.lock().ok().and_then(|r| r.clone()))
            .unwrap_or_else(|| "the connection closed".into());
        RpcError::ConnectionLost {
            call,
            socket: self.socket.clone(),
            reason,
        }
    }
}

/// The I/O task's state.
struct IoTask {
    socket: PathBuf,
    pending: HashMap<u32, oneshot::Sender<Answer>>,
    events: mpsc::UnboundedSender<DomainEvent>,
}

impl IoTask {
    async fn run(
        mut self,
        stream: UnixStream,
        mut calls: mpsc::UnboundedReceiver<Outgoing>,
        closed: watch::Sender<bool>,
        reason_slot: Arc<Mutex<Option<String>>>,
    ) {
        let (mut read, mut write) = stream.into_split();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let reason = loop {
            tokio::select! {
                call = calls.recv() => {
                    // Every handle is gone: nobody can call or wait any more.
                    let Some(call) = call else { break "every handle was dropped".to_owned() };
                    // Waiters that timed out left their entry behind; clear them here.
                    self.pending.retain(|_, w| !w.is_closed());
                    self.pending.insert(call.serial, call.answer);
                    tracing::trace!(bytes = call.bytes.len(), serial = call.serial, "libvirt packet out");
                    if let Err(e) = write.write_all(&call.bytes).await {
                        break format!("writing to the socket failed: {e}");
                    }
                }
                n = read.read(&mut chunk) => match n {
                    Ok(0) => break "the daemon closed the connection".to_owned(),
                    Err(e) => break format!("reading the socket failed: {e}"),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if let Err(why) = self.dispatch(&mut buf) {
                            break why;
                        }
                    }
                },
            }
        };
        tracing::debug!(socket = %self.socket.display(), %reason, "libvirt connection ended");
        if let Ok(mut slot) = reason_slot.lock() {
            *slot = Some(reason.clone());
        }
        for (_, waiter) in self.pending.drain() {
            let _ = waiter.send(Err(reason.clone()));
        }
        let _ = closed.send(true);
    }

    /// Handle every whole packet in `buf`; an error ends the connection (its reason).
    fn dispatch(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        while let Some(p) = packet::take_packet(buf).map_err(|e| format!("protocol error: {e}"))? {
            let h = p.header;
            tracing::trace!(
                bytes = packet::LEN_SIZE + packet::HEADER_SIZE + p.payload.len(),
                procedure = h.procedure, kind = ?h.kind, serial = h.serial,
                "libvirt packet in"
            );
            if h.program == KEEPALIVE_PROGRAM {
                tracing::debug!(procedure = h.procedure, "libvirt keepalive packet ignored");
                continue;
            }
            if h.program != REMOTE_PROGRAM || h.version != REMOTE_VERSION {
                return Err(format!(
                    "protocol error: a packet of program {:#x} version {}, not libvirt's remote protocol",
                    h.program, h.version
                ));
            }
            match h.kind {
                Kind::Reply => match self.pending.remove(&h.serial) {
                    Some(waiter) => {
                        let _ = waiter.send(Ok(p));
                    }
                    None => tracing::debug!(
                        serial = h.serial,
                        "libvirt reply to no waiting call (timed out?)"
                    ),
                },
                Kind::Message => self.event(h.procedure, &p.payload),
                kind => tracing::debug!(?kind, procedure = h.procedure, "libvirt packet ignored"),
            }
        }
        Ok(())
    }

    fn event(&self, procedure: i32, payload: &[u8]) {
        match procedures::event(procedure, payload) {
            Ok(Some(event)) => {
                // A dropped receiver only means nobody listens for events any more.
                let _ = self.events.send(event);
            }
            Ok(None) => {
                tracing::debug!(procedure, "libvirt event we did not register for, dropped")
            }
            Err(e) => tracing::warn!(
                socket = %self.socket.display(), procedure, error = %e,
                "malformed libvirt event dropped"
            ),
        }
    }
}
