//! Property tests of the frame codec: it never panics, round-trips every
//! message, detects every single-bit corruption and never mistakes a
//! truncated frame for anything but "incomplete".

use proptest::prelude::*;
use remus_proto::{
    CheckpointEnd, CheckpointKind, DecodeError, Decoded, DeviceStateDelta, DiskCompat, DiskDigests,
    DiskOp, DiskRecord, DiskSeal, DiskSyncRuns, Epoch, ErrorCode, Hello, HelloAck, MAX_DELTA_PAGES,
    Message, MsgType, PAGE_SIZE, PageDelta, PageRun, Purpose, VmCompat, WireError, decode,
    encode_raw, read_frame, write_page_run,
};

fn arb_compat() -> impl Strategy<Value = VmCompat> {
    (
        any::<u64>(),
        any::<u32>(),
        ".{0,12}",
        ".{0,12}",
        prop::collection::vec((".{0,8}", any::<u64>()), 0..3),
        prop::collection::vec(any::<[u8; 6]>(), 0..3),
    )
        .prop_map(
            |(memory_mib, vcpus, machine, cpu_model, disks, macs)| VmCompat {
                memory_mib,
                vcpus,
                machine,
                cpu_model,
                disks: disks
                    .into_iter()
                    .map(|(target, size_bytes)| DiskCompat { target, size_bytes })
                    .collect(),
                macs,
            },
        )
}

fn arb_kind() -> impl Strategy<Value = CheckpointKind> {
    prop_oneof![
        Just(CheckpointKind::InitialSync),
        Just(CheckpointKind::Round),
        Just(CheckpointKind::Checkpoint)
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
            ".{0,16}",
            arb_compat(),
            any::<[u8; 32]>()
        )
            .prop_map(
                |(max_version, min_version, migrate, vm_name, compat, client_nonce)| {
                    Message::Hello(Hello {
                        max_version,
                        min_version,
                        purpose: if migrate {
                            Purpose::Migrate
                        } else {
                            Purpose::Protect
                        },
                        vm_name,
                        compat,
                        client_nonce,
                    })
                }
            ),
        (any::<u16>(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(v, n, p)| {
            Message::HelloAck(HelloAck {
                chosen_version: v,
                server_nonce: n,
                server_proof: p,
            })
        }),
        any::<[u8; 32]>().prop_map(|client_proof| Message::AuthProof { client_proof }),
        Just(Message::Ready),
        Just(Message::Done),
        // Printable text: control characters, and line and paragraph
        // separators, are escaped on arrival (see
        // `error_text_arrives_without_control_characters`).
        (any::<u16>(), "[^\\p{C}\\p{Zl}\\p{Zp}]{0,40}").prop_map(|(c, message)| Message::Error {
            code: ErrorCode::from_u16(c),
            message
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(seq, sent_at_us)| Message::Heartbeat { seq, sent_at_us }),
        any::<u64>().prop_map(|e| Message::Ack { epoch: Epoch(e) }),
        ".{0,200}".prop_map(|json| Message::VmConfig { json }),
        any::<u64>().prop_map(|e| Message::SwitchOver { epoch: Epoch(e) }),
        (remus_proto::MIN_TUNE_TIMEOUT_MS..=remus_proto::MAX_TUNE_TIMEOUT_MS)
            .prop_map(|timeout_ms| Message::Tune { timeout_ms }),
        (
            1u64..,
            remus_proto::MIN_SUSPEND_GRACE_MS..=remus_proto::MAX_SUSPEND_GRACE_MS
        )
            .prop_map(|(e, grace_ms)| Message::Suspend {
                epoch: Epoch(e),
                grace_ms
            }),
        any::<u64>().prop_map(|resumed_at| Message::Resumable { resumed_at }),
        Just(Message::Restarting),
        Just(Message::DevicesOnlyState),
        (any::<u64>(), arb_kind()).prop_map(|(e, kind)| Message::CheckpointBegin {
            epoch: Epoch(e),
            kind
        }),
        (0u64..u64::MAX / 2, 1usize..3, any::<u8>(), any::<u8>()).prop_map(
            |(first_page, n, a, b)| {
                let data = (0..n * PAGE_SIZE)
                    .map(|i| (i as u8).wrapping_mul(a) ^ b)
                    .collect();
                Message::PageRun(PageRun { first_page, data })
            }
        ),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(|data| Message::DeviceState { data }),
        (
            0u64..u64::MAX / 2,
            1u32..=MAX_DELTA_PAGES,
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 1..100)
        )
            .prop_map(|(first_page, page_count, bits, compressed)| {
                let mut xor: Vec<u8> = (0..(page_count as usize).div_ceil(8))
                    .map(|i| (bits >> (i % 8 * 8)) as u8)
                    .collect();
                if page_count % 8 != 0 {
                    let last = xor.len() - 1;
                    xor[last] &= (1u8 << (page_count % 8)) - 1;
                }
                Message::PageDelta(PageDelta {
                    first_page,
                    page_count,
                    xor,
                    compressed,
                })
            }),
        (
            0u64..(remus_proto::MAX_DEVICE_STATE - remus_proto::delta::DEVICE_CHUNK as u64),
            1u32..=remus_proto::delta::DEVICE_CHUNK as u32,
            prop::collection::vec(any::<u8>(), 1..100)
        )
            .prop_map(|(offset, len, compressed)| {
                Message::DeviceStateDelta(DeviceStateDelta {
                    offset,
                    len,
                    compressed,
                })
            }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<[u8; 16]>()).prop_map(
            |(e, p, d, digest)| {
                Message::CheckpointEnd(CheckpointEnd {
                    epoch: Epoch(e),
                    page_count: p,
                    device_state_len: d,
                    digest,
                })
            }
        ),
        arb_disk_record().prop_map(Message::Disk),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<[u8; 16]>()).prop_map(
            |(e, records, bytes, digest)| Message::DiskSeal(DiskSeal {
                epoch: Epoch(e),
                records,
                bytes,
                digest
            })
        ),
        (
            any::<u16>(),
            1u32..,
            any::<u64>(),
            prop::collection::vec(any::<[u8; 16]>(), 1..5)
        )
            .prop_map(|(disk, chunk_size, first_chunk, digests)| {
                Message::DiskDigests(DiskDigests {
                    disk,
                    chunk_size,
                    first_chunk,
                    digests,
                })
            }),
        (
            any::<u16>(),
            1u32..,
            prop::collection::vec((0u64..1000, 1u64..1000), 0..6)
        )
            .prop_map(|(disk, chunk_size, gaps)| {
                // Gaps and lengths to ascending, disjoint runs.
                let mut next = 0;
                let runs = gaps
                    .into_iter()
                    .map(|(gap, count)| {
                        let first = next + gap;
                        next = first + count;
                        (first, count)
                    })
                    .collect();
                Message::DiskSyncRuns(DiskSyncRuns {
                    disk,
                    chunk_size,
                    runs,
                })
            }),
        ".*".prop_map(|json| Message::SyncPlan { json }),
    ]
}

fn arb_disk_record() -> impl Strategy<Value = DiskRecord> {
    let op = prop_oneof![
        (
            0u64..u64::MAX / 2,
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 1..300)
        )
            .prop_map(|(offset, fua, data)| DiskOp::Write { offset, fua, data }),
        (
            0u64..u64::MAX / 2,
            1u64..u64::MAX / 2,
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(offset, len, trim, fua)| DiskOp::Zero {
                offset,
                len,
                trim,
                fua
            }),
        Just(DiskOp::Flush),
    ];
    (any::<u64>(), any::<u16>(), op).prop_map(|(e, disk, op)| DiskRecord {
        epoch: Epoch(e),
        disk,
        op,
    })
}

fn encoded(m: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut v);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&buf);
        let _ = read_frame(&mut &buf[..]);
    }

    #[test]
    fn arbitrary_payloads_with_valid_frames_never_panic(t in 0u16..40, payload in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = Vec::new();
        encode_raw(t, &payload, &mut buf);
        let _ = decode(&buf);
    }

    #[test]
    fn every_message_round_trips(m in arb_message(), tail in prop::collection::vec(any::<u8>(), 0..20)) {
        let mut buf = encoded(&m);
        let len = buf.len();
        buf.extend_from_slice(&tail);
        prop_assert_eq!(decode(&buf), Ok(Decoded::Frame { message: m.clone(), consumed: len }));
        // The streaming writer and reader agree with the buffer codec.
        let mut w = Vec::new();
        m.write_to(&mut w).unwrap();
        prop_assert_eq!(&w[..], &buf[..len]);
        prop_assert_eq!(m.wire_len(), len as u64);
        prop_assert_eq!(read_frame(&mut &buf[..]).unwrap(), m);
    }

    #[test]
    fn any_single_bit_flip_is_detected(m in arb_message(), bit in any::<prop::sample::Index>()) {
        let mut buf = encoded(&m);
        let i = bit.index(buf.len() * 8);
        buf[i / 8] ^= 1 << (i % 8);
        match decode(&buf) {
            Ok(Decoded::Frame { message, .. }) => prop_assert!(false, "flip of bit {} accepted as {:?}", i, message),
            // A flipped length bit can make the frame look longer: the
            // receiver then waits, and the next bytes fail the CRC.
            Ok(Decoded::Incomplete { .. }) => prop_assert!((64..96).contains(&i)),
            Err(_) => {}
        }
    }

    #[test]
    fn truncated_frames_are_incomplete(m in arb_message(), cut in any::<prop::sample::Index>()) {
        let buf = encoded(&m);
        let n = cut.index(buf.len());
        prop_assert_eq!(decode(&buf[..n]), Ok(Decoded::Incomplete { needed: if n < 16 { 16 - n } else { buf.len() - n } }));
        if n > 0 {
            let r = read_frame(&mut &buf[..n]);
            prop_assert!(matches!(r, Err(WireError::Truncated { .. })), "{:?}", r);
        }
    }
}

/// A device-state delta announcing more bytes than a sender ever puts in
/// one frame is refused by the decoder, before anything is allocated for
/// it (the backup would otherwise allocate what the frame claims).
#[test]
fn oversized_device_state_deltas_are_refused() {
    for (offset, len) in [
        (0u64, remus_proto::delta::DEVICE_CHUNK as u32 + 1),
        (remus_proto::MAX_DEVICE_STATE, 1),
        (0, 0),
    ] {
        let mut p = Vec::new();
        p.extend_from_slice(&offset.to_be_bytes());
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[1, 2, 3]);
        let mut buf = Vec::new();
        encode_raw(MsgType::DeviceStateDelta as u16, &p, &mut buf);
        match decode(&buf) {
            Err(DecodeError::Malformed { what, .. }) => {
                assert!(what.contains("device state range"), "{what}")
            }
            other => panic!("{offset}+{len} accepted: {other:?}"),
        }
    }
}

#[test]
fn errors_name_what_failed() {
    let mut buf = encoded(&Message::Ack { epoch: Epoch(3) });
    let last = buf.len() - 1;
    buf[last] ^= 1;
    let e = decode(&buf).unwrap_err();
    assert!(matches!(e, DecodeError::Checksum { .. }));
    assert!(e.to_string().contains("Ack (7)"), "{e}");

    let e = decode(b"GET / HTTP/1.1\r\n\r\n").unwrap_err().to_string();
    assert!(e.contains("bad frame magic"), "{e}");

    let mut buf = Vec::new();
    encode_raw(999, b"", &mut buf);
    assert_eq!(decode(&buf), Err(DecodeError::UnknownType(999)));
    assert!(
        DecodeError::UnknownType(999)
            .to_string()
            .contains("unknown message type 999")
    );

    // A disk write must carry data; a zero range must not be empty.
    let mut buf = Vec::new();
    encode_raw(MsgType::DiskWrite as u16, &[0; 19], &mut buf);
    let e = decode(&buf).unwrap_err().to_string();
    assert!(e.contains("write of 0 bytes"), "{e}");
    let mut buf = Vec::new();
    encode_raw(MsgType::DiskZero as u16, &[0; 27], &mut buf);
    let e = decode(&buf).unwrap_err().to_string();
    assert!(e.contains("bad zero range"), "{e}");

    let mut buf = Vec::new();
    encode_raw(0, b"", &mut buf);
    assert_eq!(decode(&buf), Err(DecodeError::InvalidType));

    let mut buf = Vec::new();
    encode_raw(MsgType::Ack as u16, &[0; 9], &mut buf);
    let e = decode(&buf).unwrap_err().to_string();
    assert!(e.contains("malformed Ack payload: 1 trailing bytes"), "{e}");

    let mut buf = Vec::new();
    encode_raw(MsgType::PageRun as u16, &[0; 12], &mut buf);
    let e = decode(&buf).unwrap_err().to_string();
    assert!(e.contains("page_count is 0"), "{e}");
}

#[test]
fn oversized_length_is_rejected_before_reading_the_payload() {
    let mut buf = encoded(&Message::Ready);
    buf[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode(&buf), Err(DecodeError::TooLarge { .. })));
    assert!(matches!(
        read_frame(&mut &buf[..]),
        Err(WireError::Decode(DecodeError::TooLarge { .. }))
    ));
}

#[test]
fn unknown_critical_flags_are_rejected() {
    let mut buf = encoded(&Message::Ready);
    buf[6] = 0x80;
    // Recompute the CRC so only the flag is wrong.
    let crc = crc_of(&buf);
    buf[12..16].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(
        decode(&buf),
        Err(DecodeError::UnknownCriticalFlags { .. })
    ));
    // Advisory flags are ignored.
    buf[6] = 0;
    buf[7] = 0x01;
    let crc = crc_of(&buf);
    buf[12..16].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(
        decode(&buf),
        Ok(Decoded::Frame {
            message: Message::Ready,
            ..
        })
    ));
}

fn crc_of(frame: &[u8]) -> u32 {
    // Castagnoli CRC, bitwise: independent of the implementation under test.
    let mut crc = !0u32;
    for &b in frame[..12].iter().chain(&frame[16..]) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn large_page_ranges_are_split_into_frames() {
    let pages = remus_proto::MAX_PAGES_PER_RUN as usize + 3;
    let data: Vec<u8> = (0..pages * PAGE_SIZE)
        .map(|i| (i / PAGE_SIZE) as u8)
        .collect();
    let mut w = Vec::new();
    write_page_run(&mut w, 100, &data).unwrap();
    let mut r = &w[..];
    let Message::PageRun(a) = read_frame(&mut r).unwrap() else {
        panic!()
    };
    let Message::PageRun(b) = read_frame(&mut r).unwrap() else {
        panic!()
    };
    assert!(r.is_empty());
    assert_eq!(
        (a.first_page, a.page_count()),
        (100, remus_proto::MAX_PAGES_PER_RUN)
    );
    assert_eq!(
        (b.first_page, b.page_count()),
        (100 + remus_proto::MAX_PAGES_PER_RUN as u64, 3)
    );
    assert_eq!([a.data, b.data].concat(), data);
}

#[test]
fn clean_end_of_stream_is_closed() {
    assert!(matches!(read_frame(&mut &b""[..]), Err(WireError::Closed)));
}

/// A peer's error text cannot forge log lines or drive a terminal:
/// control characters arrive escaped.
#[test]
fn error_text_arrives_without_control_characters() {
    let m = remus_proto::Message::Error {
        code: remus_proto::ErrorCode::Internal,
        message: "bad\nINFO forged line\x1b[2J".into(),
    };
    let mut bytes = Vec::new();
    m.write_to(&mut bytes).unwrap();
    let got = remus_proto::read_frame(&mut bytes.as_slice()).unwrap();
    let remus_proto::Message::Error { message, .. } = got else {
        panic!("{got:?}")
    };
    assert_eq!(message, "bad\\nINFO forged line\\u{1b}[2J");
    assert!(!message.chars().any(char::is_control));
}

/// `printable` also escapes what a log viewer would show misleadingly:
/// line separators and bidirectional overrides.
#[test]
fn printable_escapes_separators_and_bidi_controls() {
    let p = remus_proto::printable("vm\u{2028}INFO x\u{202e}gnp.exe\u{2066}");
    assert_eq!(p, "vm\\u{2028}INFO x\\u{202e}gnp.exe\\u{2066}");
    assert_eq!(remus_proto::printable("plain vm-1 ü"), "plain vm-1 ü");
}
