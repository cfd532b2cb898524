//! The toggle service's listeners: TCP on loopback, one serial link per VM (QEMU
//! connects to us as a chardev socket client), and a hook for the control socket.
//!
//! Every connection is read line by line with a bounded buffer, an idle timeout and a
//! rate limit. Replies are written with `try_write` only: a client that never reads
//! (the netcat one-liner, PowerShell writing to COM1) can never stall the service;
//! once its socket buffer is full it simply stops getting replies.

use super::dispatch::{handle_line, Access, RoutingControl, Session};
use super::protocol::{Reply, MAX_LINE};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The routing, shared by every listener.
pub type SharedControl = Arc<Mutex<dyn RoutingControl>>;

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ToggleError {
    /// Not `IP:PORT`.
    #[error("Toggle listener address `{0}` is not IP:PORT (such as 127.0.0.1:4510)")]
    BadAddress(String),
    /// A non-loopback address without a secret.
    #[error("Refusing to listen on {0}: it is not a loopback address, and anyone who can reach it could switch your USB ports. Set `secret = \"...\"` in [toggle] (clients then send `auth SECRET` first), or listen on 127.0.0.1")]
    NonLoopbackWithoutSecret(SocketAddr),
    /// bind() failed.
    #[error("Cannot listen on {addr} ({origin})")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        origin: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Hang up after this long without a line; `None` for links that stay up (serial).
    pub idle_timeout: Option<Duration>,
    /// Commands per second a connection may send (bursts of the same size); 0 = no limit.
    pub rate_per_second: u32,
    /// Connections at once per listener; more are told `err busy` and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: Some(Duration::from_secs(300)),
            rate_per_second: 20,
            max_connections: 32,
        }
    }
}

/// Failed `auth` attempts before the connection is closed.
const MAX_FAILED_AUTHS: u32 = 3;

/// Check an address for a listener: loopback, or anything when there is a secret.
pub fn check_listen_address(addr: &str, has_secret: bool) -> Result<SocketAddr, ToggleError> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| ToggleError::BadAddress(addr.to_string()))?;
    if !parsed.ip().is_loopback() && !has_secret {
        return Err(ToggleError::NonLoopbackWithoutSecret(parsed));
    }
    Ok(parsed)
}

/// Bind a listener after [`check_listen_address`].
pub async fn bind(
    addr: &str,
    secret: Option<&str>,
    origin: &str,
) -> Result<TcpListener, ToggleError> {
    let parsed = check_listen_address(addr, secret.is_some())?;
    TcpListener::bind(parsed)
        .await
        .map_err(|source| ToggleError::Bind {
            addr: parsed,
            origin: origin.to_string(),
            source,
        })
}

/// The line service over a shared routing.
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
    pub fn handle_line(
        &self,
        access: &Access,
        session: &mut Session,
        line: &[u8],
    ) -> Option<Reply> {
        // A panic elsewhere while holding the lock leaves the routing readable: the
        // registers themselves are the truth, not the guarded value.
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        handle_line(&mut *control, access, session, line)
    }

    /// Accept connections on `listener` forever.
    pub async fn serve(self, listener: TcpListener, access: Access, limits: Limits) {
        let access = Arc::new(access);
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(origin = %access.origin, "toggle accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let _ = stream.try_write(b"err busy: too many connections\n");
                continue;
            };
            tracing::debug!(origin = %access.origin, %peer, "toggle client connected");
            let service = self.clone();
            let access = access.clone();
            tokio::spawn(async move {
                service.connection(stream, &access, limits).await;
                drop(permit);
            });
        }
    }

    async fn connection(&self, stream: TcpStream, access: &Access, limits: Limits) {
        let _ = stream.set_nodelay(true);
        let (mut reader, writer) = stream.into_split();
        let mut out = ReplyWriter::new(writer);
        let mut session = Session::default();
        let mut bucket = RateLimit::new(limits.rate_per_second);
        let mut lines = LineSplitter::default();
        let mut chunk = [0u8; 1024];
        loop {
            let read = match limits.idle_timeout {
                Some(t) => match tokio::time::timeout(t, reader.read(&mut chunk)).await {
                    Ok(r) => r,
                    Err(_) => {
                        out.send(&Reply::Err("idle timeout, closing".into()));
                        return;
                    }
                },
                None => reader.read(&mut chunk).await,
            };
            let n = match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &byte in &chunk[..n] {
                let keep_going = match lines.push(byte) {
                    None => true,
                    Some(Line::Complete(line)) => {
                        self.process(&line, access, &mut session, &mut bucket, &mut out)
                    }
                    Some(Line::TooLong) => {
                        out.send(&Reply::Err(format!(
                            "line too long (at most {MAX_LINE} bytes)"
                        )));
                        true
                    }
                };
                if !keep_going {
                    return;
                }
            }
        }
        // `printf toggle | nc ...` ends without a newline: still a command.
        if let Some(line) = lines.finish() {
            self.process(&line, access, &mut session, &mut bucket, &mut out);
        }
    }

    /// One complete line; `false` to hang up.
    fn process(
        &self,
        line: &[u8],
        access: &Access,
        session: &mut Session,
        bucket: &mut RateLimit,
        out: &mut ReplyWriter,
    ) -> bool {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return true;
        }
        if !bucket.take() {
            out.send(&Reply::Err(format!(
                "rate limit: at most {} commands per second",
                bucket.per_second
            )));
            return true;
        }
        if let Some(reply) = self.handle_line(access, session, line) {
            if let Reply::Err(e) = &reply {
                tracing::info!(origin = %access.origin, "toggle: {e}");
            }
            out.send(&reply);
        }
        if session.failed_auths >= MAX_FAILED_AUTHS {
            out.send(&Reply::Err("too many wrong secrets, closing".into()));
            return false;
        }
        true
    }
}

/// What [`LineSplitter::push`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A whole line, without its LF.
    Complete(Vec<u8>),
    /// The line grew past the limit; the rest of it up to the next LF is skipped, so
    /// its tail is never taken for a command.
    TooLong,
}

/// Splits a byte stream into lines of bounded length, buffering at most one line.
#[derive(Debug, Default)]
struct LineSplitter {
    line: Vec<u8>,
    discarding: bool,
}

impl LineSplitter {
    fn push(&mut self, byte: u8) -> Option<Line> {
        if byte == b'\n' {
            let line = std::mem::take(&mut self.line);
            return (!std::mem::take(&mut self.discarding)).then_some(Line::Complete(line));
        }
        if self.discarding {
            return None;
        }
        // MAX_LINE + 1 bytes fit: room for the CR of a CRLF.
        if self.line.len() > MAX_LINE {
            self.line.clear();
            self.discarding = true;
            return Some(Line::TooLong);
        }
        self.line.push(byte);
        None
    }

    /// The unterminated last line at end of stream, if any.
    fn finish(self) -> Option<Vec<u8>> {
        (!self.discarding && !self.line.is_empty()).then_some(self.line)
    }
}

/// Writes replies without ever waiting on the client.
struct ReplyWriter {
    writer: OwnedWriteHalf,
    muted: bool,
}

impl ReplyWriter {
    fn new(writer: OwnedWriteHalf) -> Self {
        Self {
            writer,
            muted: false,
        }
    }

    fn send(&mut self, reply: &Reply) {
        if self.muted {
            return;
        }
        let line = format!("{reply}\n");
        // A full buffer (a client that does not read) or a half-written line mutes the
        // connection for good: better no replies than interleaved half lines.
        match self.writer.try_write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => self.muted = true,
        }
    }
}

/// A token bucket: `per_second` tokens a second, at most `per_second` saved up.
struct RateLimit {
    per_second: u32,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            tokens: f64::from(per_second),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let now = Instant::now();
        let cap = f64::from(self.per_second);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * cap).min(cap);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(bytes: &[u8]) -> (Vec<Line>, Option<Vec<u8>>) {
        let mut s = LineSplitter::default();
        let lines = bytes.iter().filter_map(|b| s.push(*b)).collect();
        (lines, s.finish())
    }

    #[test]
    fn lines_split_on_lf_and_keep_their_cr() {
        let (lines, rest) = split(b"toggle\r\nhost\nguest");

        assert_eq!(
            lines,
            vec![
                Line::Complete(b"toggle\r".to_vec()),
                Line::Complete(b"host".to_vec())
            ]
        );
        assert_eq!(rest, Some(b"guest".to_vec()));
    }

    #[test]
    fn an_overlong_line_is_reported_once_and_its_tail_dropped() {
        let mut input = vec![b'g'; 3 * MAX_LINE];
        input.extend_from_slice(b"\nstatus\n");

        let (lines, rest) = split(&input);

        assert_eq!(
            lines,
            vec![Line::TooLong, Line::Complete(b"status".to_vec())]
        );
        assert_eq!(rest, None);
    }

    #[test]
    fn a_line_of_exactly_the_limit_plus_cr_fits() {
        let mut input = vec![b'a'; MAX_LINE];
        input.extend_from_slice(b"\r\n");

        let (lines, _) = split(&input);

        assert!(matches!(lines.as_slice(), [Line::Complete(l)] if l.len() == MAX_LINE + 1));
    }
}
