//! `nbd_request`: the NBD server's wire decoders ([`remus_nbd::proto`]),
//! which the server's connection threads call on every header and option
//! payload a client sends (`server.rs` reads fixed-size headers and
//! length-checked payloads off the socket and hands them to these).
//!
//! The first input byte picks the decoder, the rest is its buffer.
//! Asserted for each: what decodes re-encodes to the same bytes (headers
//! have exactly one encoding), what is refused is refused for a reason the
//! bytes show (wrong size, wrong magic), and option payloads decode to
//! options whose contents are exactly the bytes sent.

use remus_nbd::ProtoError;
use remus_nbd::proto::{
    self, ClientOption, Command, ExportInfoRequest, IHAVEOPT, OPTION_REPLY_MAGIC, OptionHeader,
    OptionReplyHeader, REQUEST_MAGIC, Request, SIMPLE_REPLY_MAGIC, SimpleReply,
};

use crate::Reader;

pub const REQUEST: u8 = 0;
pub const OPTION_HEADER: u8 = 1;
pub const OPTION: u8 = 2;
pub const INFO_REQUEST: u8 = 3;
pub const SIMPLE_REPLY: u8 = 4;
pub const OPTION_REPLY: u8 = 5;
pub const STRING: u8 = 6;
const MODES: u8 = 7;

pub fn run(data: &[u8]) {
    let Some((&mode, buf)) = data.split_first() else {
        return;
    };
    match mode % MODES {
        REQUEST => request(buf),
        OPTION_HEADER => option_header(buf),
        OPTION => {
            let mut r = Reader::new(buf);
            if let Some(option) = r.u32() {
                option_payload(option, r.rest());
            }
        }
        INFO_REQUEST => info_request(buf),
        SIMPLE_REPLY => simple_reply(buf),
        OPTION_REPLY => option_reply(buf),
        _ => string(buf),
    }
}

fn be32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn be64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// A fixed-size header decoder: accepts exactly `len` bytes with `magic`.
fn fixed(buf: &[u8], len: usize, magic_ok: bool, result: Result<Vec<u8>, ProtoError>) {
    match result {
        Ok(encoded) => {
            assert_eq!(buf.len(), len, "accepted {} bytes", buf.len());
            assert!(magic_ok, "accepted a wrong magic");
            assert!(encoded == buf, "re-encodes to other bytes");
        }
        Err(e) => {
            let _ = e.to_string();
            match e {
                ProtoError::Short { need, got } => {
                    assert_eq!(got, buf.len());
                    assert!(got < need && need == len);
                }
                ProtoError::Trailing { extra } => assert_eq!(buf.len(), len + extra),
                ProtoError::BadMagic { got, .. } => {
                    assert_eq!(buf.len(), len);
                    assert!(!magic_ok, "refused its own magic {got:#x}");
                }
                e => panic!("fixed-size header refused with {e:?}"),
            }
        }
    }
}

fn request(buf: &[u8]) {
    let magic_ok = be32_at(buf, 0) == Some(REQUEST_MAGIC);
    let decoded = Request::decode(buf);
    if let Ok(r) = &decoded {
        assert_eq!(Command::from_wire(r.command.to_wire()), r.command);
    }
    fixed(
        buf,
        Request::LEN,
        magic_ok,
        decoded.map(|r| r.encode().to_vec()),
    );
}

fn option_header(buf: &[u8]) {
    let magic_ok = be64_at(buf, 0) == Some(IHAVEOPT);
    let decoded = OptionHeader::decode(buf).map(|h| h.encode().to_vec());
    fixed(buf, OptionHeader::LEN, magic_ok, decoded);
}

fn simple_reply(buf: &[u8]) {
    let magic_ok = be32_at(buf, 0) == Some(SIMPLE_REPLY_MAGIC);
    let decoded = SimpleReply::decode(buf).map(|r| r.encode().to_vec());
    fixed(buf, SimpleReply::LEN, magic_ok, decoded);
}

/// The client's reader of option replies: the header of what
/// [`proto::encode_option_reply`] writes (the data follows it).
fn option_reply(buf: &[u8]) {
    let magic_ok = be64_at(buf, 0) == Some(OPTION_REPLY_MAGIC);
    match OptionReplyHeader::decode(buf) {
        Ok(h) => {
            assert!(buf.len() >= OptionReplyHeader::LEN && magic_ok);
            let data = &buf[OptionReplyHeader::LEN..];
            let reply = proto::encode_option_reply(h.option, h.reply_type, data);
            assert_eq!(reply[..16], buf[..16]);
            let back = OptionReplyHeader::decode(&reply).expect("own reply decodes");
            assert_eq!((back.option, back.reply_type), (h.option, h.reply_type));
            assert_eq!(back.length as usize, data.len());
        }
        Err(ProtoError::Short { need, got }) => {
            assert!(got == buf.len() && got < need && need == OptionReplyHeader::LEN);
        }
        Err(ProtoError::BadMagic { .. }) => assert!(!magic_ok),
        Err(e) => panic!("option reply header refused with {e:?}"),
    }
}

/// What an option's payload decodes to is what the client sent.
fn option_payload(option: u32, data: &[u8]) {
    match proto::decode_option(option, data) {
        Ok(ClientOption::ExportName(name)) => {
            assert_eq!(option, proto::OPT_EXPORT_NAME);
            assert!(name.as_bytes() == data);
            check_string(&name);
        }
        Ok(ClientOption::Abort) => assert_eq!(option, proto::OPT_ABORT),
        Ok(ClientOption::List) => {
            assert_eq!(option, proto::OPT_LIST);
            assert!(data.is_empty());
        }
        Ok(ClientOption::Info(req)) => {
            assert_eq!(option, proto::OPT_INFO);
            assert!(req.encode() == data);
            check_string(&req.name);
        }
        Ok(ClientOption::Go(req)) => {
            assert_eq!(option, proto::OPT_GO);
            assert!(req.encode() == data);
            check_string(&req.name);
        }
        Ok(ClientOption::Unsupported(o)) => {
            assert_eq!(o, option);
            assert!(
                ![
                    proto::OPT_EXPORT_NAME,
                    proto::OPT_ABORT,
                    proto::OPT_LIST,
                    proto::OPT_INFO,
                    proto::OPT_GO
                ]
                .contains(&o)
            );
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(
                [
                    proto::OPT_EXPORT_NAME,
                    proto::OPT_LIST,
                    proto::OPT_INFO,
                    proto::OPT_GO
                ]
                .contains(&option),
                "option {option} refused: {e:?}"
            );
        }
    }
}

fn info_request(data: &[u8]) {
    match ExportInfoRequest::decode(data) {
        Ok(req) => {
            assert!(req.encode() == data, "{req:?} re-encodes to other bytes");
            check_string(&req.name);
            assert_eq!(data.len(), 6 + req.name.len() + 2 * req.info_requests.len());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn check_string(s: &str) {
    assert!(s.len() <= proto::MAX_STRING_LEN && !s.contains('\0'));
}

fn string(data: &[u8]) {
    match proto::validate_string(data) {
        Ok(s) => {
            assert!(s.as_bytes() == data);
            check_string(s);
        }
        Err(ProtoError::BadString(_)) => {
            assert!(
                data.len() > proto::MAX_STRING_LEN
                    || data.contains(&0)
                    || std::str::from_utf8(data).is_err()
            );
        }
        Err(e) => panic!("string refused with {e:?}"),
    }
}

/// The input for `mode` with buffer `buf`.
pub fn input(mode: u8, buf: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(buf);
    v
}
