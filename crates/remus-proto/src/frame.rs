//! Frames: the fixed header, the checksum, and the pure buffer codec.
//!
//! This module knows nothing about sockets. [`decode`] looks at a byte buffer
//! and says either "this many more bytes are needed" or "here is one verified
//! message, and it used this many bytes"; it never consumes anything on error
//! and never panics, whatever the input. [`read_frame`] and [`write_frame`]
//! are the blocking `std::io` front ends used by the handshake and the
//! agent's threads; an async reader can drive [`decode`] over its own buffer.
//!
//! Order of checks (see the crate documentation for the layout): magic and
//! payload length first, because they decide how much to read and must be
//! bounded before anything is allocated; then the CRC, so that a corrupted
//! type or flag field is reported as corruption rather than as a strange
//! message; then flags, type and payload.

use std::fmt;
use std::io::{self, Read, Write};

use thiserror::Error;

use crate::message::{Message, MsgType};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"RMS1";
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest payload a frame may carry (64 MiB). Page runs are split to fit.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Flag bits 8..15 are *critical*: a receiver that does not know a critical
/// bit must reject the frame. Bits 0..7 may be ignored when unknown. Version 1
/// defines no flags; senders set none.
pub const CRITICAL_FLAGS: u16 = 0xff00;

/// A message type number as it appeared on the wire, printed by name when
/// this build knows it ("PageRun (17)") and as "unknown type 99" otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeCode(pub u16);

impl fmt::Display for TypeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match MsgType::from_u16(self.0) {
            Some(t) => write!(f, "{t:?} ({})", self.0),
            None => write!(f, "unknown type {}", self.0),
        }
    }
}

/// Why a frame or its payload was rejected. Each variant says what failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error(
        "bad frame magic {found:02x?} (expected \"RMS1\"): the peer is not a remus agent, or the stream lost sync"
    )]
    BadMagic { found: [u8; 4] },
    #[error("frame of {msg_type} announces a {len}-byte payload, above the {max}-byte limit")]
    TooLarge {
        msg_type: TypeCode,
        len: u32,
        max: u32,
    },
    #[error(
        "checksum mismatch in a frame of {msg_type}: header says {expected:#010x}, contents give {computed:#010x} (corrupted in transit or in memory)"
    )]
    Checksum {
        msg_type: TypeCode,
        expected: u32,
        computed: u32,
    },
    #[error("frame of {msg_type} sets critical flags {flags:#06x} that this version does not know")]
    UnknownCriticalFlags { msg_type: TypeCode, flags: u16 },
    #[error("message type 0 is reserved as invalid")]
    InvalidType,
    #[error(
        "unknown message type {0} (sent by a newer peer? additive types need a peer that knows them)"
    )]
    UnknownType(u16),
    #[error("malformed {msg_type:?} payload: {what}")]
    Malformed { msg_type: MsgType, what: String },
    #[error("expected {expected}, got a frame of {msg_type}")]
    NotExpected {
        msg_type: TypeCode,
        expected: &'static str,
    },
}

/// Result of looking at a buffer that may hold a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer holds a prefix of a frame; at least `needed` more bytes
    /// must arrive before anything can be said. Nothing was consumed.
    Incomplete { needed: usize },
    /// One whole, verified frame: the message and the bytes it occupied.
    Frame { message: Message, consumed: usize },
}

/// The parsed fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub msg_type: u16,
    pub flags: u16,
    pub payload_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Checks the magic and the length bound of a raw header. Type, flags and
    /// CRC are checked later, once the payload is there.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
        let found = [raw[0], raw[1], raw[2], raw[3]];
        if found != MAGIC {
            return Err(DecodeError::BadMagic { found });
        }
        let header = FrameHeader {
            msg_type: u16::from_be_bytes([raw[4], raw[5]]),
            flags: u16::from_be_bytes([raw[6], raw[7]]),
            payload_len: u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]),
            crc: u32::from_be_bytes([raw[12], raw[13], raw[14], raw[15]]),
        };
        if header.payload_len > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge {
                msg_type: TypeCode(header.msg_type),
                len: header.payload_len,
                max: MAX_PAYLOAD,
            });
        }
        Ok(header)
    }

    fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// CRC32C over the header without its CRC field, then the payload.
fn frame_crc(header_without_crc: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header_without_crc), payload)
}

/// Verifies the CRC of a frame whose header passed [`FrameHeader::parse`],
/// then its flags and type, then decodes the payload.
fn verify_and_parse(
    header: &FrameHeader,
    raw_header: &[u8],
    payload: &[u8],
) -> Result<Message, DecodeError> {
    let computed = frame_crc(&raw_header[..12], payload);
    if computed != header.crc {
        return Err(DecodeError::Checksum {
            msg_type: TypeCode(header.msg_type),
            expected: header.crc,
            computed,
        });
    }
    if header.flags & CRITICAL_FLAGS != 0 {
        return Err(DecodeError::UnknownCriticalFlags {
            msg_type: TypeCode(header.msg_type),
            flags: header.flags,
        });
    }
    Message::decode_payload(header.msg_type, payload)
}

/// Looks at the front of `buf`: first checks that a whole frame is there,
/// then verifies and parses it. Never panics; consumes nothing on error.
pub fn decode(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let Some(raw) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let header = FrameHeader::parse(raw)?;
    let total = header.frame_len();
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    let message = verify_and_parse(&header, raw, &buf[HEADER_LEN..total])?;
    Ok(Decoded::Frame {
        message,
        consumed: total,
    })
}

/// Appends one frame of type `msg_type` with `payload` to `out`.
///
/// # Panics
/// If `payload` is longer than [`MAX_PAYLOAD`]: that is a bug in the sender
/// (page runs are split by [`crate::PageRun`]'s helpers), not an input error.
pub fn encode_raw(msg_type: u16, payload: &[u8], out: &mut Vec<u8>) {
    let header = raw_header(msg_type, &[payload]);
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// Builds the header of a frame whose payload is the concatenation of
/// `parts`, so large payloads need not be copied into one buffer.
pub(crate) fn raw_header(msg_type: u16, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    assert!(
        len <= MAX_PAYLOAD as usize,
        "frame payload of {len} bytes exceeds MAX_PAYLOAD; the sender must split it"
    );
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&msg_type.to_be_bytes());
    h[6..8].copy_from_slice(&0u16.to_be_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_be_bytes());
    let mut crc = crc32c::crc32c(&h[..12]);
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    h[12..16].copy_from_slice(&crc.to_be_bytes());
    h
}

/// Failure of [`read_frame`] / [`write_frame`].
#[derive(Debug, Error)]
pub enum WireError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the connection ended inside a frame ({got} of {expected} bytes received)")]
    Truncated { got: usize, expected: usize },
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

impl WireError {
    /// True when a socket read or write timeout expired.
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// Reads into `buf` until full; returns how many bytes arrived before EOF.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads exactly one frame and returns its message. Reads no byte past the
/// frame, so the stream can be handed to another reader afterwards. A clean
/// end of stream between frames is [`WireError::Closed`].
pub fn read_frame(r: &mut impl Read) -> Result<Message, WireError> {
    let (header, raw) = read_header(r)?;
    // The length was bounded by `parse`, so this allocation is at most 64 MiB.
    read_payload(r, &header, &raw)
}

/// Reads one frame like [`read_frame`], but decides from its header alone,
/// before reading or allocating its payload, whether it may come now: its
/// type must satisfy `accept` (else [`DecodeError::NotExpected`], naming
/// `expected`) and its payload must be at most `max_payload` bytes. This
/// is how a server bounds what an unauthenticated peer can make it do.
pub fn read_frame_bounded(
    r: &mut impl Read,
    max_payload: u32,
    expected: &'static str,
    accept: impl Fn(u16) -> bool,
) -> Result<Message, WireError> {
    let (header, raw) = read_header(r)?;
    if !accept(header.msg_type) {
        return Err(DecodeError::NotExpected {
            msg_type: TypeCode(header.msg_type),
            expected,
        }
        .into());
    }
    if header.payload_len > max_payload {
        return Err(DecodeError::TooLarge {
            msg_type: TypeCode(header.msg_type),
            len: header.payload_len,
            max: max_payload,
        }
        .into());
    }
    read_payload(r, &header, &raw)
}

/// Reads and parses one frame header. A clean end of stream before it is
/// [`WireError::Closed`]; garbage is reported as garbage even when it is
/// shorter than a header.
fn read_header(r: &mut impl Read) -> Result<(FrameHeader, [u8; HEADER_LEN]), WireError> {
    let mut raw = [0u8; HEADER_LEN];
    let got = read_full(r, &mut raw)?;
    if got == 0 {
        return Err(WireError::Closed);
    }
    if got < HEADER_LEN {
        if raw[..got.min(4)] != MAGIC[..got.min(4)] {
            let mut found = [0u8; 4];
            found[..got.min(4)].copy_from_slice(&raw[..got.min(4)]);
            return Err(DecodeError::BadMagic { found }.into());
        }
        return Err(WireError::Truncated {
            got,
            expected: HEADER_LEN,
        });
    }
    Ok((FrameHeader::parse(&raw)?, raw))
}

/// Reads the payload `header` announces (its length already bounded by
/// the caller or by [`FrameHeader::parse`]), then checks and decodes the
/// frame.
fn read_payload(
    r: &mut impl Read,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
) -> Result<Message, WireError> {
    let mut payload = vec![0u8; header.payload_len as usize];
    let got = read_full(r, &mut payload)?;
    if got < payload.len() {
        return Err(WireError::Truncated {
            got: HEADER_LEN + got,
            expected: header.frame_len(),
        });
    }
    Ok(verify_and_parse(header, raw, &payload)?)
}

/// Writes one frame carrying `message` (does not flush).
pub fn write_frame(w: &mut impl Write, message: &Message) -> Result<(), WireError> {
    message.write_to(w)
}
