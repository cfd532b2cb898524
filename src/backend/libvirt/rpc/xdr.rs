//! XDR (RFC 4506) as libvirt's remote protocol uses it, only the parts our calls need:
//! big-endian 32-bit ints, strings and variable opaque data as a length then the bytes
//! padded to 4, fixed opaque data (the 16-byte UUID) padded likewise, and an optional
//! value (`T *` in the `.x` files) as a bool then the value when present.
//!
//! Decoding reads untrusted bytes: every length is checked against what remains and
//! against a cap before anything is allocated, and no input can make it panic.

use std::fmt;

/// The longest string libvirt sends (`REMOTE_STRING_MAX` in `src/remote/remote_protocol.x`:
/// 4 MiB).
pub const STRING_MAX: usize = 4 * 1024 * 1024;

/// Why some bytes are not the XDR value expected; says what and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdrError {
    /// What was being read (`domain name`, `error message`).
    pub what: &'static str,
    /// The byte offset in the payload.
    pub at: usize,
    /// What was wrong.
    pub problem: XdrProblem,
}

/// What was wrong with an XDR value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdrProblem {
    /// The payload ended inside it.
    Truncated,
    /// A length over the cap for the field.
    TooLong(u32),
    /// A bool neither 0 nor 1.
    BadBool(u32),
    /// A string that is not UTF-8.
    NotUtf8,
    /// A padding byte that is not zero.
    BadPadding,
    /// Bytes left over after the last field.
    Trailing(usize),
}

impl fmt::Display for XdrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = self.what;
        let at = self.at;
        match self.problem {
            XdrProblem::Truncated => write!(f, "{what} at byte {at}: the payload ends inside it"),
            XdrProblem::TooLong(n) => write!(f, "{what} at byte {at}: length {n} over the cap"),
            XdrProblem::BadBool(v) => write!(f, "{what} at byte {at}: bool {v} is not 0 or 1"),
            XdrProblem::NotUtf8 => write!(f, "{what} at byte {at}: not UTF-8"),
            XdrProblem::BadPadding => write!(f, "{what} at byte {at}: padding is not zero"),
            XdrProblem::Trailing(n) => {
                write!(f, "{what}: {n} bytes left over after the last field")
            }
        }
    }
}

impl std::error::Error for XdrError {}

/// Writes XDR values into a buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty buffer.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// An `int`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// An `unsigned int`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A `bool`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Fixed-length opaque data (`opaque x[N]`): the bytes, padded to 4.
    pub fn fixed_opaque(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad(bytes.len())
    }

    /// A `string<>`: its length, its bytes, padded to 4. Our own strings are short (names,
    /// aliases, device XML); a length over `u32` cannot be sent and is cut, which the
    /// daemon then rejects as malformed rather than us panicking.
    pub fn string(&mut self, s: &str) -> &mut Self {
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf
            .extend_from_slice(&s.as_bytes()[..s.len().min(len as usize)]);
        self.pad(s.len())
    }

    /// An optional string (`remote_string`, `string *`): a bool, then the string if any.
    pub fn opt_string(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.bool(true).string(s),
            None => self.bool(false),
        }
    }

    fn pad(&mut self, len: usize) -> &mut Self {
        let pad = (4 - len % 4) % 4;
        self.buf.extend_from_slice(&[0; 3][..pad]);
        self
    }
}

/// Reads XDR values from a payload, bounded by it.
#[derive(Debug)]
pub struct Decoder<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Decoder<'a> {
    /// Start at the first byte of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Decoder<'a> {
        Decoder { bytes, at: 0 }
    }

    fn fail(&self, what: &'static str, problem: XdrProblem) -> XdrError {
        XdrError {
            what,
            at: self.at,
            problem,
        }
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], XdrError> {
        let rest = &self.bytes[self.at..];
        if rest.len() < n {
            return Err(self.fail(what, XdrProblem::Truncated));
        }
        self.at += n;
        Ok(&rest[..n])
    }

    /// An `unsigned int`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, XdrError> {
        let b = self.take(what, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An `int`.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, XdrError> {
        let b = self.take(what, 4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `bool`: 0 or 1, anything else is malformed.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, XdrError> {
        let start = self.at;
        match self.u32(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => {
                self.at = start;
                Err(self.fail(what, XdrProblem::BadBool(v)))
            }
        }
    }

    /// `opaque x[N]`: N bytes and their padding.
    pub fn fixed_opaque<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], XdrError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        self.padding(what, N)?;
        Ok(out)
    }

    /// A `string<max>`, at most `max` bytes and UTF-8. The length is checked against the
    /// cap and against what remains before any allocation.
    pub fn string(&mut self, what: &'static str, max: usize) -> Result<String, XdrError> {
        let start = self.at;
        let len = self.u32(what)?;
        if len as usize > max {
            self.at = start;
            return Err(self.fail(what, XdrProblem::TooLong(len)));
        }
        let bytes = self.take(what, len as usize)?;
        let text = std::str::from_utf8(bytes).map_err(|_| XdrError {
            what,
            at: start + 4,
            problem: XdrProblem::NotUtf8,
        })?;
        self.padding(what, len as usize)?;
        Ok(text.to_owned())
    }

    /// An optional value (`T *`): a bool, then `T` when it is true.
    pub fn optional<T>(
        &mut self,
        what: &'static str,
        read: impl FnOnce(&mut Self) -> Result<T, XdrError>,
    ) -> Result<Option<T>, XdrError> {
        if self.bool(what)? {
            read(self).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Everything was read: bytes left over mean the value is not what we think it is.
    pub fn finish(&self, what: &'static str) -> Result<(), XdrError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            n => Err(self.fail(what, XdrProblem::Trailing(n))),
        }
    }

    fn padding(&mut self, what: &'static str, len: usize) -> Result<(), XdrError> {
        let pad = (4 - len % 4) % 4;
        let start = self.at;
        if self.take(what, pad)?.iter().any(|&b| b != 0) {
            self.at = start;
            return Err(self.fail(what, XdrProblem::BadPadding));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_string_is_its_length_then_its_bytes_padded_to_four() {
        let mut e = Encoder::new();
        e.string("abcde");
        assert_eq!(
            e.into_bytes(),
            [0, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0]
        );
    }

    #[test]
    fn an_optional_string_is_a_bool_then_the_string() {
        let mut e = Encoder::new();
        e.opt_string(Some("ab")).opt_string(None);
        assert_eq!(
            e.into_bytes(),
            [0, 0, 0, 1, 0, 0, 0, 2, b'a', b'b', 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn a_string_longer_than_its_cap_is_refused_before_reading_it() {
        let bytes = [0, 0, 0, 9, b'x'];
        let err = Decoder::new(&bytes).string("name", 8).unwrap_err();
        assert_eq!(err.problem, XdrProblem::TooLong(9));
    }

    #[test]
    fn a_length_past_the_end_is_truncated_not_an_allocation() {
        let bytes = [0x7f, 0xff, 0xff, 0xff];
        let err = Decoder::new(&bytes).string("name", usize::MAX).unwrap_err();
        assert_eq!(err.problem, XdrProblem::Truncated);
    }

    #[test]
    fn a_bool_other_than_zero_or_one_is_malformed() {
        let err = Decoder::new(&[0, 0, 0, 2]).bool("flag").unwrap_err();
        assert_eq!(err.problem, XdrProblem::BadBool(2));
    }

    #[test]
    fn nonzero_padding_is_malformed() {
        let bytes = [0, 0, 0, 1, b'a', 0, 1, 0];
        let err = Decoder::new(&bytes).string("name", 8).unwrap_err();
        assert_eq!(err.problem, XdrProblem::BadPadding);
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let bytes = [0, 0, 0, 1, 0xff, 0, 0, 0];
        let err = Decoder::new(&bytes).string("name", 8).unwrap_err();
        assert_eq!(err.problem, XdrProblem::NotUtf8);
    }

    proptest! {
        #[test]
        fn values_round_trip(
            a in any::<i32>(), b in any::<u32>(), s in ".{0,40}", o in proptest::option::of(".{0,9}"),
            uuid in any::<[u8; 16]>(),
        ) {
            let mut e = Encoder::new();
            e.i32(a).u32(b).string(&s).opt_string(o.as_deref()).fixed_opaque(&uuid);
            let bytes = e.into_bytes();
            prop_assert_eq!(bytes.len() % 4, 0);
            let mut d = Decoder::new(&bytes);
            prop_assert_eq!(d.i32("a").unwrap(), a);
            prop_assert_eq!(d.u32("b").unwrap(), b);
            prop_assert_eq!(d.string("s", STRING_MAX).unwrap(), s);
            prop_assert_eq!(d.optional("o", |d| d.string("o", 64)).unwrap(), o);
            prop_assert_eq!(d.fixed_opaque::<16>("uuid").unwrap(), uuid);
            prop_assert!(d.finish("all").is_ok());
        }

        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut d = Decoder::new(&bytes);
            let _ = d.string("s", 16);
            let _ = d.optional("o", |d| d.fixed_opaque::<16>("u"));
            let _ = d.bool("b");
            let _ = d.finish("all");
        }
    }
}
