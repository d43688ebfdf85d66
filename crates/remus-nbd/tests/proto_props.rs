//! Property tests for the wire decoders: arbitrary bytes never panic, and
//! encoding then decoding gives back what was encoded.

use proptest::prelude::*;
use remus_nbd::proto::{
    self, Command, ExportInfoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply,
};

fn command() -> impl Strategy<Value = Command> {
    any::<u16>().prop_map(Command::from_wire)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = Request::decode(&bytes);
        let _ = OptionHeader::decode(&bytes);
        let _ = OptionReplyHeader::decode(&bytes);
        let _ = SimpleReply::decode(&bytes);
        let _ = ExportInfoRequest::decode(&bytes);
        let _ = proto::validate_string(&bytes);
    }

    #[test]
    fn option_decoding_never_panics(option in prop_oneof![0u32..16, any::<u32>()],
                                    data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = proto::decode_option(option, &data);
    }

    #[test]
    fn go_payloads_with_bogus_lengths_never_panic(name_len in any::<u32>(), count in any::<u16>(),
                                                  tail in proptest::collection::vec(any::<u8>(), 0..32)) {
        let mut data = name_len.to_be_bytes().to_vec();
        data.extend_from_slice(&tail);
        data.extend_from_slice(&count.to_be_bytes());
        prop_assert!(ExportInfoRequest::decode(&data).is_err() || (name_len as usize) <= tail.len());
    }

    #[test]
    fn request_round_trip(flags in any::<u16>(), command in command(), cookie in any::<u64>(),
                          offset in any::<u64>(), length in any::<u32>()) {
        let r = Request { flags, command, cookie, offset, length };
        let bytes = r.encode();
        prop_assert_eq!(Request::decode(&bytes), Ok(r));
        // Every 28-byte buffer with the right magic decodes, and re-encodes to itself.
        prop_assert_eq!(Request::decode(&bytes).map(|d| d.encode()), Ok(bytes));
    }

    #[test]
    fn request_decode_reencodes_any_valid_buffer(rest in proptest::collection::vec(any::<u8>(), 24)) {
        let mut bytes = 0x2560_9513u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&rest);
        let r = Request::decode(&bytes).expect("right magic and length decode");
        prop_assert_eq!(&r.encode()[..], &bytes[..]);
    }

    #[test]
    fn truncated_or_extended_requests_are_rejected(cut in 0usize..28, extra in 1usize..8) {
        let bytes = Request { flags: 0, command: Command::Read, cookie: 1, offset: 2, length: 3 }.encode();
        prop_assert!(Request::decode(&bytes[..cut]).is_err());
        let mut long = bytes.to_vec();
        long.extend(std::iter::repeat_n(0u8, extra));
        prop_assert!(Request::decode(&long).is_err());
    }

    #[test]
    fn option_header_round_trip(option in any::<u32>(), length in any::<u32>()) {
        let h = OptionHeader { option, length };
        prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
        let r = SimpleReply { error, cookie };
        prop_assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn export_info_request_round_trip(name in "[^\u{0}]{0,64}",
                                      infos in proptest::collection::vec(any::<u16>(), 0..8)) {
        let r = ExportInfoRequest { name, info_requests: infos };
        let bytes = r.encode();
        prop_assert_eq!(ExportInfoRequest::decode(&bytes), Ok(r.clone()));
        prop_assert_eq!(proto::decode_option(proto::OPT_GO, &bytes), Ok(proto::ClientOption::Go(r.clone())));
        prop_assert_eq!(proto::decode_option(proto::OPT_INFO, &bytes), Ok(proto::ClientOption::Info(r)));
    }

    #[test]
    fn export_name_option_accepts_valid_strings(name in "[^\u{0}]{0,64}") {
        prop_assert_eq!(proto::decode_option(proto::OPT_EXPORT_NAME, name.as_bytes()),
                        Ok(proto::ClientOption::ExportName(name)));
    }

    #[test]
    fn option_reply_encoding_decodes(option in any::<u32>(), reply in any::<u32>(),
                                     data in proptest::collection::vec(any::<u8>(), 0..32)) {
        let bytes = proto::encode_option_reply(option, reply, &data);
        let h = OptionReplyHeader::decode(&bytes[..OptionReplyHeader::LEN]).unwrap();
        prop_assert_eq!((h.option, h.reply_type, h.length as usize), (option, reply, data.len()));
        prop_assert_eq!(&bytes[OptionReplyHeader::LEN..], &data[..]);
    }
}

#[test]
fn export_name_padding_follows_no_zeroes() {
    assert_eq!(proto::encode_export_name_reply(1, 1, true).len(), 10);
    let padded = proto::encode_export_name_reply(1, 1, false);
    assert_eq!(padded.len(), 134);
    assert!(padded[10..].iter().all(|&b| b == 0));
}

#[test]
fn strings_are_checked() {
    assert!(proto::validate_string(b"ok").is_ok());
    assert!(proto::validate_string(b"a\0").is_err());
    assert!(proto::validate_string(&[0xff]).is_err());
    assert!(proto::validate_string(&[b'a'; 4097]).is_err());
    assert!(proto::validate_string(&[b'a'; 4096]).is_ok());
}
