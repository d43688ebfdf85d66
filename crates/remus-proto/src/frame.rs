//! Frames: reading and checking whole frames, and the pure buffer codec
//! (the header layout and its limits are in `wire`).
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

use std::io::{self, Read, Write};

use crate::message::Message;
pub use crate::wire::{
    CRITICAL_FLAGS, DecodeError, FrameHeader, HEADER_LEN, MAGIC, MAX_PAYLOAD, TypeCode, WireError,
    encode_raw,
};

/// Result of looking at a buffer that may hold a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer holds a prefix of a frame; at least `needed` more bytes
    /// must arrive before anything can be said. Nothing was consumed.
    Incomplete { needed: usize },
    /// One whole, verified frame: the message and the bytes it occupied.
    Frame { message: Message, consumed: usize },
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

impl Message {
    /// Reads one frame and returns its message (see [`read_frame`]).
    pub fn read_from(r: &mut impl Read) -> Result<Message, WireError> {
        read_frame(r)
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
