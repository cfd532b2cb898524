//! Bytes to lines and replies to bytes for a toggle connection: lines of bounded
//! length, and replies written only when the socket takes them at once.

use super::protocol::{Reply, MAX_LINE};

/// A socket's `try_write`: writes what fits now, never waits.
pub(super) type TryWrite = Box<dyn FnMut(&[u8]) -> std::io::Result<usize> + Send>;

/// Writes replies without ever waiting on the client.
pub(super) struct ReplyWriter {
    try_write: TryWrite,
    muted: bool,
}

impl ReplyWriter {
    pub(super) fn new(try_write: TryWrite) -> Self {
        Self {
            try_write,
            muted: false,
        }
    }

    pub(super) fn send(&mut self, reply: &Reply) {
        if self.muted {
            return;
        }
        let line = format!("{reply}\n");
        // A full buffer (a client that does not read) or a half-written line mutes the
        // connection for good: better no replies than interleaved half lines.
        match (self.try_write)(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => self.muted = true,
        }
    }
}

/// What [`LineSplitter::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A whole line, without its LF.
    Complete(Vec<u8>),
    /// The line grew past the limit; the rest of it up to the next LF is skipped, so
    /// its tail is never taken for a command.
    TooLong,
}

/// Splits a byte stream into lines of bounded length, buffering at most one line.
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    line: Vec<u8>,
    discarding: bool,
}

impl LineSplitter {
    pub(crate) fn push(&mut self, byte: u8) -> Option<Line> {
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
    pub(crate) fn finish(self) -> Option<Vec<u8>> {
        (!self.discarding && !self.line.is_empty()).then_some(self.line)
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
