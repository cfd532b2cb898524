//! The reader task: owns the read half, splits lines, routes replies to the commands
//! waiting for them (by `id`) and events to subscribers.

use super::error::shorten;
use super::{QmpError, QmpEvent, State};
use serde_json::Value;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, ReadBuf};

/// The longest QMP line (one reply or one event) read. QEMU's largest reply,
/// `query-qmp-schema`, is about 240 KB (QEMU 10.0); usbroute's own are far smaller. A
/// longer line is a peer gone wrong: the connection is closed once this much arrived,
/// so nothing more is buffered, and a line is never parsed past it (a parsed JSON value
/// takes tens of times its text in memory).
pub const MAX_LINE: usize = 1024 * 1024;

/// How much of a bad message an error message shows.
const SHOWN: usize = 200;

/// What one attempt to read a line gave.
pub(crate) enum Line {
    /// A whole line, without its line end.
    Complete(Vec<u8>),
    /// The peer closed the stream; `partial` holds an unfinished line, if any.
    End { partial: Vec<u8> },
}

/// A line ran past [`MAX_LINE`]; carried inside the `io::Error` of [`read_line`].
#[derive(Debug)]
pub(crate) struct LineTooLong {
    /// How it started (shortened), to recognise the peer.
    pub(crate) start: String,
}

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a line longer than {MAX_LINE} bytes, starting {}",
            self.start
        )
    }
}

impl std::error::Error for LineTooLong {}

/// The most read from the socket at a time. Read into the stack, so an idle connection
/// holds no buffer: at 64 VMs, a 2 KiB buffer each was 128 KiB of the daemon's heap.
pub(crate) const READ_CHUNK: usize = 2048;

/// Splits a stream into lines. Holds memory only for what has arrived and is not yet a
/// whole line: nothing, between QEMU's messages.
pub(crate) struct LineReader<R> {
    read: R,
    /// Bytes read and not yet returned.
    pending: Vec<u8>,
    /// How far `pending` is known to hold no line end.
    scanned: usize,
    /// How much one read asks for (at most [`READ_CHUNK`]; less splits lines across
    /// reads, for the fuzzer).
    chunk: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Lines of `read`.
    pub(crate) fn new(read: R) -> Self {
        Self::with_chunk(read, READ_CHUNK)
    }

    /// Lines of `read`, read `chunk` bytes at a time at most.
    pub(crate) fn with_chunk(read: R, chunk: usize) -> Self {
        LineReader {
            read,
            pending: Vec::new(),
            scanned: 0,
            chunk: chunk.clamp(1, READ_CHUNK),
        }
    }

    /// Read one `\n`-terminated line, at most [`MAX_LINE`] bytes (then [`LineTooLong`]).
    pub(crate) async fn read_line(&mut self) -> io::Result<Line> {
        loop {
            let unscanned = &self.pending[self.scanned..];
            let end = match unscanned.iter().position(|b| *b == b'\n') {
                Some(i) => Some(self.scanned + i),
                None => {
                    self.scanned = self.pending.len();
                    None
                }
            };
            if end.unwrap_or(self.pending.len()) > MAX_LINE {
                let start = shorten(&String::from_utf8_lossy(&self.pending[..SHOWN]), SHOWN);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    LineTooLong { start },
                ));
            }
            if let Some(end) = end {
                let rest = self.pending.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.pending, rest);
                self.scanned = 0;
                line.truncate(end);
                while line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Line::Complete(line));
            }
            if self.read_some().await? == 0 {
                self.scanned = 0;
                return Ok(Line::End {
                    partial: std::mem::take(&mut self.pending),
                });
            }
        }
    }

    /// One read onto the end of `pending`; 0 at the end of the stream.
    async fn read_some(&mut self) -> io::Result<usize> {
        let (read, pending, chunk) = (&mut self.read, &mut self.pending, self.chunk);
        std::future::poll_fn(|cx| {
            let mut buffer = [0u8; READ_CHUNK];
            let mut got = ReadBuf::new(&mut buffer[..chunk]);
            ready!(Pin::new(&mut *read).poll_read(cx, &mut got))?;
            pending.extend_from_slice(got.filled());
            Poll::Ready(Ok(got.filled().len()))
        })
        .await
    }
}

/// What a line of QMP is.
pub(crate) enum Message {
    /// `{"QMP": ...}`.
    Greeting(Value),
    /// `{"return": ...}` or `{"error": ...}`, with the `id` if there was one.
    Reply {
        id: Option<Value>,
        result: Result<Returned, (String, String)>,
    },
    /// `{"event": ...}`.
    Event(QmpEvent),
}

/// What a command returned: a reply's line as QEMU sent it, parsed only when its caller
/// takes it. A `qom-list`'s reply is a few KiB of text but tens of KiB as a tree of JSON
/// objects (each a map node of its own); 64 VMs answering at once held them all, most of
/// the daemon's peak heap (heaptrack), where the caller keeps a few names of each.
#[derive(Debug, PartialEq)]
pub(crate) enum Returned {
    /// The whole reply line, `{"return": ..., "id": ...}`.
    Line(Box<str>),
    /// The `return` member, already parsed.
    Parsed(Value),
}

impl Returned {
    /// The `return` member.
    pub(crate) fn value(self) -> Value {
        match self {
            Returned::Parsed(value) => value,
            Returned::Line(line) => match serde_json::from_str::<Value>(&line) {
                Ok(Value::Object(mut map)) => map.remove("return").unwrap_or_default(),
                _ => Value::Null, // it parsed as a reply once: cannot happen
            },
        }
    }
}

/// The members of a reply that route it, nothing else kept (`IgnoredAny` allocates
/// nothing): a line with a `return`, no `QMP` and no `event` is a reply.
#[derive(serde::Deserialize)]
struct Routing {
    #[serde(rename = "QMP")]
    greeting: Option<serde::de::IgnoredAny>,
    event: Option<serde::de::IgnoredAny>,
    #[serde(rename = "return")]
    returned: Option<serde::de::IgnoredAny>,
    id: Option<Value>,
}

/// Classify one line; `Err` carries a description of the garbage.
pub(crate) fn parse_message(line: &[u8]) -> Result<Message, String> {
    let text = String::from_utf8_lossy(line);
    if let Ok(Routing {
        greeting: None,
        event: None,
        returned: Some(_),
        id,
    }) = serde_json::from_str(&text)
    {
        let result = Ok(Returned::Line(text.into()));
        return Ok(Message::Reply { id, result });
    }
    let value: Value = serde_json::from_str(&text).map_err(|_| shorten(&text, SHOWN))?;
    // Taken apart, not copied.
    let Value::Object(mut map) = value else {
        return Err(format!(
            "{} (JSON, but not an object)",
            shorten(&text, SHOWN)
        ));
    };
    if let Some(greeting) = map.remove("QMP") {
        return Ok(Message::Greeting(greeting));
    }
    if let Some(Value::String(name)) = map.get("event") {
        return Ok(Message::Event(QmpEvent {
            name: name.clone(),
            data: map.get("data").cloned().unwrap_or(Value::Null),
            timestamp: map.get("timestamp").and_then(timestamp),
            raw: Value::Object(map),
        }));
    }
    let id = map.remove("id");
    if let Some(ret) = map.remove("return") {
        let result = Ok(Returned::Parsed(ret));
        return Ok(Message::Reply { id, result });
    }
    if let Some(error) = map.get("error") {
        let field = |k: &str| {
            error
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("(none given)")
                .to_string()
        };
        return Ok(Message::Reply {
            id,
            result: Err((field("class"), field("desc"))),
        });
    }
    Err(format!(
        "{} (a JSON object with none of `QMP`, `return`, `error`, `event`)",
        shorten(&text, SHOWN)
    ))
}

/// QEMU's `{"seconds": s, "microseconds": us}`; `-1` means "clock unavailable".
fn timestamp(v: &Value) -> Option<SystemTime> {
    let seconds = u64::try_from(v.get("seconds")?.as_i64()?).ok()?;
    let micros = u64::try_from(v.get("microseconds")?.as_i64()?).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds) + Duration::from_micros(micros))
}

/// Run until the stream ends or turns bad; then fail every waiting command and close the
/// event channel, so nobody waits for an answer that cannot come.
///
/// `peer` names the other end (the socket path) for errors.
pub(crate) async fn run<R: AsyncRead + Unpin>(
    mut reader: LineReader<R>,
    state: Arc<Mutex<State>>,
    peer: String,
) {
    let broken = loop {
        let line = match reader.read_line().await {
            Ok(Line::Complete(line)) if line.is_empty() => continue,
            Ok(Line::Complete(line)) => line,
            Ok(Line::End { partial }) => {
                let partial = (!partial.is_empty())
                    .then(|| shorten(&String::from_utf8_lossy(&partial), SHOWN));
                break QmpError::Closed {
                    command: None,
                    partial,
                };
            }
            // A peer that dies with our command unread in its buffer resets the connection.
            Err(e) if is_peer_gone(&e) => {
                break QmpError::Closed {
                    command: None,
                    partial: None,
                }
            }
            Err(e) if e.get_ref().is_some_and(|inner| inner.is::<LineTooLong>()) => {
                break QmpError::TooLong {
                    peer,
                    limit: MAX_LINE,
                    command: None,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                break QmpError::Garbage {
                    got: e.to_string(),
                    command: None,
                }
            }
            Err(e) => {
                break QmpError::Io {
                    command: None,
                    source: std::sync::Arc::new(e),
                }
            }
        };
        match parse_message(&line) {
            Ok(message) => dispatch(&state, message),
            Err(got) => break QmpError::Garbage { got, command: None },
        }
    };
    tracing::debug!("QMP connection ended: {broken}");
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    for (_, pending) in st.pending.drain() {
        let _ = pending
            .reply
            .send(Err(broken.clone().for_command(&pending.command)));
    }
    st.broken = Some(broken);
    // Dropping the only sender ends every subscriber's stream with `RecvError::Closed`.
    st.events = None;
}

/// Errors that only mean "the other end is gone".
pub(crate) fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn dispatch(state: &Mutex<State>, message: Message) {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    match message {
        Message::Event(event) => {
            tracing::trace!(event = %event.name, "QMP event");
            if let Some(tx) = &st.events {
                // No subscriber is fine: events nobody waits for are dropped.
                let _ = tx.send(Arc::new(event));
            }
        }
        Message::Greeting(_) => tracing::warn!("QMP peer sent a second greeting; ignored"),
        Message::Reply { id, result } => {
            let key = match id.as_ref().and_then(Value::as_u64) {
                Some(id) => Some(id),
                // QEMU leaves the id out only when it could not parse the command at all;
                // with one command in flight that reply can only be its answer.
                None if id.is_none() && st.pending.len() == 1 => st.pending.keys().next().copied(),
                None => None,
            };
            match key.and_then(|k| st.pending.remove(&k)) {
                Some(pending) => {
                    let result = result.map_err(|(class, desc)| QmpError::Command {
                        command: pending.command.clone(),
                        class,
                        desc,
                    });
                    let _ = pending.reply.send(result);
                }
                None => tracing::debug!(?id, "QMP reply nobody waits for (timed out?); dropped"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_message, Line, LineReader, Message, Returned, MAX_LINE};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn lines_split_across_reads_come_whole_and_nothing_is_held_between_them() {
        let (mut qemu, ours) = tokio::io::duplex(64);
        let mut reader = LineReader::new(ours);
        qemu.write_all(b"{\"return\": {}, ").await.unwrap();
        qemu.write_all(b"\"id\": 1}\r\n{\"ev").await.unwrap();

        let Line::Complete(first) = reader.read_line().await.unwrap() else {
            panic!("a whole line")
        };
        assert_eq!(first, b"{\"return\": {}, \"id\": 1}");
        assert_eq!(reader.pending, b"{\"ev", "the next line's start is kept");
        qemu.write_all(b"ent\": \"STOP\"}\n").await.unwrap();
        let Line::Complete(second) = reader.read_line().await.unwrap() else {
            panic!("a whole line")
        };
        assert_eq!(second, b"{\"event\": \"STOP\"}");
        assert_eq!(
            reader.pending.capacity(),
            0,
            "an idle connection holds no buffer"
        );

        qemu.write_all(b"{\"cut").await.unwrap();
        drop(qemu);
        let Line::End { partial } = reader.read_line().await.unwrap() else {
            panic!("the end")
        };
        assert_eq!(partial, b"{\"cut");
    }

    #[tokio::test]
    async fn a_line_past_the_limit_is_refused_whole_or_in_part() {
        for ends in [true, false] {
            let mut stream = vec![b'x'; MAX_LINE + 1];
            if ends {
                stream.push(b'\n');
            }
            let mut reader = LineReader::new(&stream[..]);
            let refused = reader.read_line().await.err().expect("refused");
            assert!(refused.to_string().contains("longer than"), "{refused}");
        }
    }

    #[test]
    fn parse_unknown_event_keeps_raw_json() {
        let line = br#"{"event": "SOMETHING_NEW_IN_QEMU_12", "data": {"x": [1]}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}"#;

        let message = parse_message(line);

        let Ok(Message::Event(event)) = message else {
            panic!("not an event")
        };
        assert_eq!(event.name, "SOMETHING_NEW_IN_QEMU_12");
        assert_eq!(event.data["x"][0], 1);
        assert_eq!(event.raw["timestamp"]["microseconds"], 5);
        assert!(event.timestamp.is_some());
    }

    #[test]
    fn parse_object_without_qmp_members_is_garbage_naming_it() {
        let err = parse_message(br#"{"hello": 1}"#).err().expect("garbage");

        assert!(err.contains("hello"), "{err}");
    }

    #[test]
    fn parse_error_reply_keeps_class_and_desc() {
        let line = br#"{"id": 7, "error": {"class": "GenericError", "desc": "no"}}"#;

        let Ok(Message::Reply { id, result }) = parse_message(line) else {
            panic!("not a reply")
        };

        assert_eq!(id, Some(serde_json::json!(7)));
        assert_eq!(result, Err(("GenericError".into(), "no".into())));
    }

    #[test]
    fn a_reply_is_kept_as_its_line_and_gives_its_return_when_taken() {
        let line = br#"{"return": [{"name": "xhci.0", "type": "child<usb-bus>"}], "id": 3}"#;

        let Ok(Message::Reply { id, result }) = parse_message(line) else {
            panic!("not a reply")
        };

        assert_eq!(id, Some(serde_json::json!(3)));
        assert!(matches!(result, Ok(Returned::Line(_))));
        assert_eq!(
            result.map(Returned::value),
            Ok(serde_json::json!([{"name": "xhci.0", "type": "child<usb-bus>"}]))
        );
    }

    #[test]
    fn a_reply_with_a_repeated_member_is_still_a_reply() {
        // serde's derive refuses a repeated field; the whole-tree parse takes the last.
        let line = br#"{"return": 1, "return": 2, "id": 4}"#;

        let Ok(Message::Reply { id, result }) = parse_message(line) else {
            panic!("not a reply")
        };

        assert_eq!(id, Some(serde_json::json!(4)));
        assert_eq!(result.map(Returned::value), Ok(serde_json::json!(2)));
    }
}
