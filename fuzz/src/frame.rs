//! `frame_decode`: [`remus_proto::decode`] over arbitrary bytes, as a
//! receiver's buffer would hold them.
//!
//! Asserted, besides "no panic":
//! - "incomplete" asks for exactly the bytes the header announces (never
//!   more than a 64 MiB payload);
//! - an accepted frame re-encodes through the public encoders
//!   ([`Message::encode`] and [`Message::write_to`], which take separate
//!   paths for page runs, device state and disk records) to the very bytes
//!   it was decoded from. Two differences are allowed: advisory flag bits
//!   (0..7), which a receiver ignores and a sender never sets, so the
//!   re-encoded frame has flags 0 (and its own CRC); and an Error whose
//!   text was escaped as it was decoded (`crate::escaped_error`);
//! - every proper prefix of an accepted frame is "incomplete";
//! - the blocking reader [`read_frame`] agrees with [`decode`]: the same
//!   message or the same error, and it reads no byte past the frame.

use remus_proto::{
    CRITICAL_FLAGS, DecodeError, Decoded, HEADER_LEN, MAX_PAYLOAD, WireError, decode, read_frame,
};

use crate::{check_message, escaped_error};

pub fn run(data: &[u8]) {
    let decoded = decode(data);
    let mut reader = data;
    let read = read_frame(&mut reader);
    match decoded {
        Ok(Decoded::Incomplete { needed }) => {
            assert!(needed > 0, "incomplete with nothing needed");
            if data.len() < HEADER_LEN {
                assert_eq!(needed, HEADER_LEN - data.len());
            } else {
                let len = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
                assert!(len <= MAX_PAYLOAD, "waits for a {len}-byte payload");
                assert_eq!(data.len() + needed, HEADER_LEN + len as usize);
            }
            match read {
                Err(WireError::Closed) => assert!(data.is_empty()),
                Err(WireError::Truncated { got, expected }) => {
                    assert_eq!((got, expected), (data.len(), data.len() + needed));
                }
                // Shorter than a header and not even a prefix of the magic.
                Err(WireError::Decode(DecodeError::BadMagic { .. })) => {
                    assert!(!data.is_empty() && data.len() < HEADER_LEN);
                }
                other => panic!("decode: incomplete, read_frame: {other:?}"),
            }
        }
        Ok(Decoded::Frame { message, consumed }) => {
            assert!((HEADER_LEN..=data.len()).contains(&consumed));
            check_message(&message);
            let frame = &data[..consumed];
            // An Error's text is escaped as it is decoded: it re-encodes
            // to other bytes, by design (see `crate::escaped_error`).
            let escaped = escaped_error(&message);
            if !escaped {
                assert_eq!(message.wire_len(), consumed as u64, "wire_len");
            }
            match read {
                Ok(m) => assert_eq!(m, message, "read_frame decoded another message"),
                Err(e) => panic!("decode accepted {message:?}, read_frame: {e:?}"),
            }
            assert_eq!(reader.len(), data.len() - consumed, "read past the frame");

            let mut encoded = Vec::new();
            message.encode(&mut encoded);
            let mut written = Vec::new();
            message
                .write_to(&mut written)
                .expect("writing to a Vec cannot fail");
            assert!(written == encoded, "write_to and encode disagree");
            assert_eq!(message.wire_len(), encoded.len() as u64, "wire_len");
            let flags = u16::from_be_bytes([frame[6], frame[7]]);
            if escaped {
                assert_eq!(flags & CRITICAL_FLAGS, 0, "accepted critical flags");
            } else if flags == 0 {
                assert!(encoded == frame, "re-encoded frame differs");
            } else {
                assert_eq!(flags & CRITICAL_FLAGS, 0, "accepted critical flags");
                assert_eq!(encoded.len(), frame.len());
                assert_eq!(encoded[..6], frame[..6]);
                assert_eq!(encoded[6..8], [0, 0]);
                assert_eq!(encoded[8..12], frame[8..12]);
                assert!(encoded[HEADER_LEN..] == frame[HEADER_LEN..]);
            }
            assert_eq!(
                decode(&encoded),
                Ok(Decoded::Frame {
                    message,
                    consumed: encoded.len()
                })
            );
            for cut in [0, HEADER_LEN - 1, HEADER_LEN, consumed - 1] {
                if cut < consumed {
                    let needed = if cut < HEADER_LEN {
                        HEADER_LEN - cut
                    } else {
                        consumed - cut
                    };
                    assert_eq!(
                        decode(&frame[..cut]),
                        Ok(Decoded::Incomplete { needed }),
                        "prefix of {cut} bytes"
                    );
                }
            }
        }
        Err(e) => {
            assert!(data.len() >= HEADER_LEN, "error before a whole header");
            let _ = e.to_string();
            match read {
                Err(WireError::Decode(r)) => assert_eq!(r, e, "read_frame's error differs"),
                other => panic!("decode: {e:?}, read_frame: {other:?}"),
            }
        }
    }
}

/// A frame of `msg_type` with `payload` and `flags` (which the encoders
/// never set), with a correct CRC: for seeds with advisory flags.
pub fn frame_with_flags(msg_type: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(&remus_proto::MAGIC);
    f.extend_from_slice(&msg_type.to_be_bytes());
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f), payload);
    f.extend_from_slice(&crc.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
