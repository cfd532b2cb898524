//! xenstored's wire protocol, as pure encoding and decoding (Xen's
//! `xen/include/public/io/xs_wire.h`): every message is a 16-byte header of four
//! native-endian `u32`s (type, request id, transaction id, payload length) and a payload of
//! at most [`PAYLOAD_MAX`] bytes, mostly NUL-terminated strings. A reply echoes the
//! request's type and id, or is [`Kind::Error`] with an errno name (`ENOENT`); a watch
//! firing arrives unasked as [`Kind::WatchEvent`] (`path\0token\0`).
//!
//! What xenstored sends is bounded here: a header announcing more than [`PAYLOAD_MAX`] is
//! an error before anything is read, and every decoder takes any bytes without panicking.

/// The longest payload either side may send (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// The longest absolute path xenstored takes (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// The header's size.
pub const HEADER_LEN: usize = 16;

/// The message types usbroute sends or receives (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// List a node's children.
    Directory,
    /// Read a node.
    Read,
    /// Watch a path (and everything under it), or a special path like `@releaseDomain`.
    Watch,
    /// Stop a watch.
    Unwatch,
    /// Start a transaction; the reply is its id in decimal.
    TransactionStart,
    /// Commit (`T`) or abandon (`F`) a transaction.
    TransactionEnd,
    /// Write a node.
    Write,
    /// Remove a node and its children.
    Rm,
    /// A watch fired (sent by xenstored unasked).
    WatchEvent,
    /// A request failed; the payload is the errno's name.
    Error,
    /// Any other type number (never sent by usbroute).
    Other(u32),
}

impl Kind {
    /// Its number on the wire.
    pub fn number(self) -> u32 {
        match self {
            Kind::Directory => 1,
            Kind::Read => 2,
            Kind::Watch => 4,
            Kind::Unwatch => 5,
            Kind::TransactionStart => 6,
            Kind::TransactionEnd => 7,
            Kind::Write => 11,
            Kind::Rm => 13,
            Kind::WatchEvent => 15,
            Kind::Error => 16,
            Kind::Other(n) => n,
        }
    }

    /// The type of number `n`.
    pub fn from_number(n: u32) -> Kind {
        match n {
            1 => Kind::Directory,
            2 => Kind::Read,
            4 => Kind::Watch,
            5 => Kind::Unwatch,
            6 => Kind::TransactionStart,
            7 => Kind::TransactionEnd,
            11 => Kind::Write,
            13 => Kind::Rm,
            15 => Kind::WatchEvent,
            16 => Kind::Error,
            n => Kind::Other(n),
        }
    }
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its type.
    pub kind: Kind,
    /// The request id (echoed in the reply).
    pub req_id: u32,
    /// The transaction id, 0 outside one.
    pub tx_id: u32,
    /// The payload's length.
    pub len: u32,
}

/// What cannot be sent or was received malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A payload over [`PAYLOAD_MAX`] (either direction).
    #[error("a xenstore message of {0} bytes is over the protocol's limit of {PAYLOAD_MAX}")]
    TooLong(usize),
    /// A path with a NUL, not absolute, or over [`ABS_PATH_MAX`].
    #[error("`{0}` is not a xenstore path usbroute sends (absolute or @special, no NUL, at most {ABS_PATH_MAX} bytes)")]
    BadPath(String),
    /// A value with a NUL (xenstore values may hold one, ours never do).
    #[error("a xenstore value with a NUL byte")]
    BadValue,
    /// A reply that does not have the shape its request's reply has.
    #[error("xenstored's reply to {what} is malformed")]
    Malformed {
        /// The request.
        what: &'static str,
    },
}

impl Header {
    /// Reads a header; a length over [`PAYLOAD_MAX`] is refused before the payload is read.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let word =
            |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let header = Header {
            kind: Kind::from_number(word(0)),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        };
        if header.len as usize > PAYLOAD_MAX {
            return Err(WireError::TooLong(header.len as usize));
        }
        Ok(header)
    }
}

/// One whole message: header then payload.
pub fn encode(kind: Kind, req_id: u32, tx_id: u32, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    if payload.len() > PAYLOAD_MAX {
        return Err(WireError::TooLong(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    for word in [kind.number(), req_id, tx_id, payload.len() as u32] {
        out.extend_from_slice(&word.to_ne_bytes());
    }
    out.extend_from_slice(payload);
    Ok(out)
}

/// A path checked for sending: absolute (`/local/...`) or special (`@releaseDomain`).
fn path(p: &str) -> Result<&str, WireError> {
    let ok = (p.starts_with('/') || p.starts_with('@'))
        && p.len() <= ABS_PATH_MAX
        && !p.bytes().any(|b| b == 0);
    ok.then_some(p).ok_or_else(|| WireError::BadPath(p.into()))
}

/// The payload of a request naming one path (read, directory, rm): `path\0`.
pub fn path_payload(p: &str) -> Result<Vec<u8>, WireError> {
    let mut out = path(p)?.as_bytes().to_vec();
    out.push(0);
    Ok(out)
}

/// The payload of a write: `path\0value` (the value is not terminated).
pub fn write_payload(p: &str, value: &str) -> Result<Vec<u8>, WireError> {
    if value.bytes().any(|b| b == 0) {
        return Err(WireError::BadValue);
    }
    let mut out = path_payload(p)?;
    out.extend_from_slice(value.as_bytes());
    Ok(out)
}

/// The payload of a watch or unwatch: `path\0token\0`.
pub fn watch_payload(p: &str, token: &str) -> Result<Vec<u8>, WireError> {
    if token.bytes().any(|b| b == 0) {
        return Err(WireError::BadValue);
    }
    let mut out = path_payload(p)?;
    out.extend_from_slice(token.as_bytes());
    out.push(0);
    Ok(out)
}

/// The strings of a payload of NUL-terminated strings (a directory listing, a watch
/// event); a final unterminated piece counts too. Not UTF-8: malformed.
pub fn strings<'a>(payload: &'a [u8], what: &'static str) -> Result<Vec<&'a str>, WireError> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == 0)
        .map(|s| std::str::from_utf8(s).map_err(|_| WireError::Malformed { what }))
        .collect()
}

/// A read's value (not terminated; text for every node usbroute reads).
pub fn value(payload: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(payload).map_err(|_| WireError::Malformed { what: "a read" })
}

/// A watch event's path and token.
pub fn watch_event(payload: &[u8]) -> Result<(&str, &str), WireError> {
    match strings(payload, "a watch")?[..] {
        [path, token] => Ok((path, token)),
        _ => Err(WireError::Malformed { what: "a watch" }),
    }
}

/// The errno name of an error reply (`ENOENT`), bounded and printable.
pub fn error_name(payload: &[u8]) -> String {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    let name: String = String::from_utf8_lossy(&body[..body.len().min(32)])
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .collect();
    if name.is_empty() {
        "an unnamed error".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_read_request_is_the_header_and_the_terminated_path() {
        let payload = path_payload("/local/domain/3/name").unwrap();

        let bytes = encode(Kind::Read, 7, 0, &payload).unwrap();

        assert_eq!(&bytes[..4], &2u32.to_ne_bytes());
        assert_eq!(&bytes[4..8], &7u32.to_ne_bytes());
        assert_eq!(&bytes[12..16], &21u32.to_ne_bytes());
        assert_eq!(&bytes[16..], b"/local/domain/3/name\0");
    }

    #[test]
    fn a_write_leaves_its_value_unterminated_and_an_empty_value_is_just_the_path() {
        assert_eq!(write_payload("/a/b", "1-1").unwrap(), b"/a/b\x001-1");
        assert_eq!(write_payload("/a/b", "").unwrap(), b"/a/b\0");
    }

    #[test]
    fn a_watch_names_path_and_token() {
        assert_eq!(
            watch_payload("@releaseDomain", "usbroute").unwrap(),
            b"@releaseDomain\0usbroute\0"
        );
    }

    #[test]
    fn relative_paths_and_nuls_are_refused_before_sending() {
        assert!(matches!(
            path_payload("local/domain"),
            Err(WireError::BadPath(_))
        ));
        assert!(matches!(path_payload("/a\0b"), Err(WireError::BadPath(_))));
        assert_eq!(write_payload("/a", "x\0y"), Err(WireError::BadValue));
    }

    #[test]
    fn a_header_announcing_more_than_4096_bytes_is_refused() {
        let bytes: [u8; 16] = encode(Kind::Read, 1, 0, &[]).unwrap()[..16]
            .try_into()
            .unwrap();
        let mut long = bytes;
        long[12..16].copy_from_slice(&4097u32.to_ne_bytes());

        assert_eq!(Header::parse(&long), Err(WireError::TooLong(4097)));
        assert_eq!(Header::parse(&bytes).unwrap().kind, Kind::Read);
    }

    #[test]
    fn a_directory_listing_is_split_on_nuls_and_an_empty_one_is_empty() {
        assert_eq!(strings(b"0\x001\x00", "d").unwrap(), ["0", "1"]);
        assert!(strings(b"", "d").unwrap().is_empty());
    }

    #[test]
    fn a_watch_event_is_path_and_token() {
        assert_eq!(
            watch_event(b"@introduceDomain\0usbroute-domains\0").unwrap(),
            ("@introduceDomain", "usbroute-domains")
        );
        assert!(watch_event(b"only-a-path\0").is_err());
    }

    #[test]
    fn an_error_reply_is_named_and_garbage_is_made_printable() {
        assert_eq!(error_name(b"ENOENT\0"), "ENOENT");
        assert_eq!(error_name(b"\x01\x02"), "an unnamed error");
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = strings(&bytes, "x");
            let _ = value(&bytes);
            let _ = watch_event(&bytes);
            let _ = error_name(&bytes);
            if let Ok(header) = <[u8; 16]>::try_from(&bytes[..bytes.len().min(16)]) {
                let _ = Header::parse(&header);
            }
        }

        #[test]
        fn every_kind_round_trips_its_number(n in any::<u32>()) {
            prop_assert_eq!(Kind::from_number(n).number(), n);
        }
    }
}
