//! One packet of libvirt's RPC: a 4-byte length (counting itself), a 24-byte header, the
//! payload. From `src/rpc/virnetprotocol.x`: `VIR_NET_MESSAGE_MAX` = 16 MiB is the most a
//! whole message may be (the length word not counted), `virNetMessageHeader` is
//! `prog, vers, proc, type, serial, status` (six 4-byte words), `virNetMessageType` is
//! CALL 0, REPLY 1, MESSAGE 2, STREAM 3, CALL_WITH_FDS 4, REPLY_WITH_FDS 5, and
//! `virNetMessageStatus` is OK 0, ERROR 1, CONTINUE 2. A CALL's serial is chosen by the
//! client, a REPLY carries the call's serial, a MESSAGE (an event) has serial 0.

use super::xdr::{Decoder, Encoder, XdrError};

/// `REMOTE_PROGRAM` (`src/remote/remote_protocol.x`): the program every call of ours names.
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;
/// `REMOTE_PROTOCOL_VERSION`.
pub const REMOTE_VERSION: u32 = 1;
/// `KEEPALIVE_PROGRAM` (`src/rpc/virkeepaliveprotocol.x`, "keep"): only sent by a daemon to a
/// client that asked for keepalive, which we never do; tolerated and dropped if it comes.
pub const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;

/// The length word's size (`VIR_NET_MESSAGE_LEN_MAX`).
pub const LEN_SIZE: usize = 4;
/// The header's size (`VIR_NET_MESSAGE_HEADER_MAX`).
pub const HEADER_SIZE: usize = 24;
/// The largest message, length word included: `VIR_NET_MESSAGE_MAX` (16 MiB) + the word.
/// A length over it is refused before anything is allocated.
pub const MESSAGE_MAX: usize = 16 * 1024 * 1024 + LEN_SIZE;

/// `virNetMessageType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// VIR_NET_CALL
    Call,
    /// VIR_NET_REPLY
    Reply,
    /// VIR_NET_MESSAGE: an event.
    Message,
    /// Any other type (streams, fd passing), which our calls never start.
    Other(u32),
}

impl Kind {
    fn from_wire(v: u32) -> Kind {
        match v {
            0 => Kind::Call,
            1 => Kind::Reply,
            2 => Kind::Message,
            v => Kind::Other(v),
        }
    }

    fn to_wire(self) -> u32 {
        match self {
            Kind::Call => 0,
            Kind::Reply => 1,
            Kind::Message => 2,
            Kind::Other(v) => v,
        }
    }
}

/// `virNetMessageStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// VIR_NET_OK
    Ok,
    /// VIR_NET_ERROR: a `remote_error` follows.
    Error,
    /// VIR_NET_CONTINUE (streams only) or a value this build does not know.
    Other(u32),
}

impl Status {
    fn from_wire(v: u32) -> Status {
        match v {
            0 => Status::Ok,
            1 => Status::Error,
            v => Status::Other(v),
        }
    }

    fn to_wire(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::Error => 1,
            Status::Other(v) => v,
        }
    }
}

/// `virNetMessageHeader`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Which program (`REMOTE_PROGRAM` for every packet of ours).
    pub program: u32,
    /// The program's version.
    pub version: u32,
    /// The procedure (a `REMOTE_PROC_*`).
    pub procedure: i32,
    /// Call, reply or event.
    pub kind: Kind,
    /// Matches a reply to its call.
    pub serial: u32,
    /// OK or ERROR.
    pub status: Status,
}

/// A packet read off the socket: its header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The header.
    pub header: Header,
    /// The XDR payload after it.
    pub payload: Vec<u8>,
}

/// The whole packet of a CALL of `procedure` with serial `serial` and the encoded args.
pub fn call(procedure: i32, serial: u32, args: &[u8]) -> Vec<u8> {
    encode(
        Header {
            program: REMOTE_PROGRAM,
            version: REMOTE_VERSION,
            procedure,
            kind: Kind::Call,
            serial,
            status: Status::Ok,
        },
        args,
    )
}

/// Any packet, length word first (the fakes in the tests send replies with it).
pub fn encode(h: Header, payload: &[u8]) -> Vec<u8> {
    let len = LEN_SIZE + HEADER_SIZE + payload.len();
    let mut e = Encoder::new();
    e.u32(u32::try_from(len).unwrap_or(u32::MAX))
        .u32(h.program)
        .u32(h.version)
        .i32(h.procedure)
        .u32(h.kind.to_wire())
        .u32(h.serial)
        .u32(h.status.to_wire());
    let mut bytes = e.into_bytes();
    bytes.extend_from_slice(payload);
    bytes
}

/// What is wrong with a packet's framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length word says less than a header.
    #[error("packet length {0} is shorter than the {min}-byte header", min = LEN_SIZE + HEADER_SIZE)]
    TooShort(u32),
    /// The length word says more than libvirt ever sends.
    #[error("packet length {0} is over libvirt's maximum of {MESSAGE_MAX} bytes")]
    TooLarge(u32),
    /// The header did not decode.
    #[error("packet header: {0}")]
    Header(XdrError),
}

/// The total length (length word included) a packet starting with `word` announces,
/// checked before anything is allocated for it.
pub fn frame_len(word: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(word);
    if (len as usize) < LEN_SIZE + HEADER_SIZE {
        return Err(FrameError::TooShort(len));
    }
    if len as usize > MESSAGE_MAX {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len as usize)
}

/// Split the first whole packet off `buf`: `Ok(None)` while it is incomplete. The length
/// is judged as soon as its 4 bytes are in, so a bad length fails before more is read.
pub fn take_packet(buf: &mut Vec<u8>) -> Result<Option<Packet>, FrameError> {
    let Some(word) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = frame_len(*word)?;
    if buf.len() < len {
        return Ok(None);
    }
    let header =
        parse_header(&buf[LEN_SIZE..LEN_SIZE + HEADER_SIZE]).map_err(FrameError::Header)?;
    let payload = buf[LEN_SIZE + HEADER_SIZE..len].to_vec();
    buf.drain(..len);
    Ok(Some(Packet { header, payload }))
}

/// The 24 header bytes.
pub fn parse_header(bytes: &[u8]) -> Result<Header, XdrError> {
    let mut d = Decoder::new(bytes);
    let header = Header {
        program: d.u32("program")?,
        version: d.u32("version")?,
        procedure: d.i32("procedure")?,
        kind: Kind::from_wire(d.u32("type")?),
        serial: d.u32("serial")?,
        status: Status::from_wire(d.u32("status")?),
    };
    d.finish("header")?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_call_is_length_then_header_then_args() {
        let bytes = call(23, 7, &[0, 0, 0, 0]);
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[..4], &32u32.to_be_bytes());
        assert_eq!(&bytes[4..8], &0x2000_8086u32.to_be_bytes());
        let mut buf = bytes;
        let p = take_packet(&mut buf).unwrap().unwrap();
        assert_eq!(p.header.procedure, 23);
        assert_eq!(p.header.serial, 7);
        assert_eq!(p.header.kind, Kind::Call);
        assert_eq!(p.payload, [0, 0, 0, 0]);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_length_over_the_maximum_is_refused_from_the_length_word_alone() {
        let mut buf = 0x0100_0005u32.to_be_bytes().to_vec();
        assert_eq!(
            take_packet(&mut buf),
            Err(FrameError::TooLarge(0x0100_0005))
        );
    }

    #[test]
    fn a_length_under_the_header_is_refused() {
        let mut buf = 27u32.to_be_bytes().to_vec();
        assert_eq!(take_packet(&mut buf), Err(FrameError::TooShort(27)));
    }

    #[test]
    fn an_incomplete_packet_waits_for_more() {
        let mut buf = call(1, 1, &[1, 2, 3, 4]);
        buf.pop();
        assert_eq!(take_packet(&mut buf), Ok(None));
    }

    #[test]
    fn two_packets_in_one_read_come_out_one_at_a_time() {
        let mut buf = call(1, 1, &[]);
        buf.extend(call(2, 2, &[]));
        assert_eq!(take_packet(&mut buf).unwrap().unwrap().header.serial, 1);
        assert_eq!(take_packet(&mut buf).unwrap().unwrap().header.serial, 2);
        assert_eq!(take_packet(&mut buf), Ok(None));
    }

    proptest! {
        #[test]
        fn framing_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut buf = bytes;
            while let Ok(Some(_)) = take_packet(&mut buf) {}
        }
    }
}
