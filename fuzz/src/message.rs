//! `message_decode`: [`Message::decode_payload`] for every message type,
//! the type picked by the first input byte ([`crate::pick_type`]), the
//! rest being the payload (as if its frame's CRC had checked out).
//!
//! Asserted: an accepted payload yields a message of that type that
//! satisfies [`crate::check_message`] and re-encodes to exactly the same
//! payload (the module documentation promises that decoding is strict and
//! the exact inverse of encoding; the handshake authenticates the Hello it
//! re-encodes), except an Error whose text was escaped as it was decoded
//! ([`crate::escaped_error`]), decodes again to an equal message, and travels in a whole
//! frame unchanged. A rejected payload is rejected for the right reason:
//! unknown type, the reserved type 0, or malformed *for its type*.

use remus_proto::{DecodeError, Decoded, HEADER_LEN, Message, MsgType, decode};

use crate::{check_message, escaped_error, pick_type};

pub fn run(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (msg_type, skip) = pick_type(first, rest);
    let payload = &rest[skip..];
    match Message::decode_payload(msg_type, payload) {
        Ok(m) => {
            assert_eq!(m.msg_type() as u16, msg_type, "decoded as another type");
            check_message(&m);
            let encoded = m.encode_payload();
            let escaped = escaped_error(&m);
            assert!(
                encoded == payload || escaped,
                "{m:?} re-encodes to other bytes"
            );
            assert_eq!(Message::decode_payload(msg_type, &encoded).as_ref(), Ok(&m));
            assert_eq!(m.wire_len(), (HEADER_LEN + encoded.len()) as u64);
            let mut frame = Vec::new();
            m.encode(&mut frame);
            let consumed = frame.len();
            assert_eq!(
                decode(&frame),
                Ok(Decoded::Frame {
                    message: m,
                    consumed
                })
            );
        }
        Err(e) => {
            match MsgType::from_u16(msg_type) {
                None => assert_eq!(e, DecodeError::UnknownType(msg_type)),
                Some(MsgType::Invalid) => assert_eq!(e, DecodeError::InvalidType),
                Some(t) => assert!(
                    matches!(&e, DecodeError::Malformed { msg_type, .. } if *msg_type == t),
                    "{t:?} payload rejected with {e:?}"
                ),
            }
            let _ = e.to_string();
        }
    }
}

/// The input standing for `payload` as a message of type `msg_type`.
pub fn input(msg_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = match u8::try_from(msg_type) {
        Ok(b) if b < 0xf0 => vec![b],
        _ => {
            let [hi, lo] = msg_type.to_be_bytes();
            vec![0xf0, hi, lo]
        }
    };
    v.extend_from_slice(payload);
    v
}
