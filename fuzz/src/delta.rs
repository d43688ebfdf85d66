//! `delta_decode`: the receiver's side of checkpoint compression
//! ([`remus_proto::delta`]), decoding against a reference copy.
//!
//! The first input byte picks one of three modes:
//!
//! - **pages** (`0`): `seed`, `fail` (two bytes), then a PageDelta payload,
//!   decoded by [`Message::decode_payload`] as a receiver would, then by
//!   [`decode_pages`] against a base copy derived from `seed` (page `p`
//!   is [`base_page`]`(seed, p)`); when `fail` is odd, reading the base of
//!   the page at index `fail / 2 % count` fails. Asserted: the output is
//!   exactly `page_count` pages from `first_page`, never more; the base is
//!   read once for each page the bitmap marks, in order, and for no other
//!   page; the output is the raw block (what decoding against a zero base
//!   gives) XOR'd with the base on exactly the marked pages; a corrupt
//!   block reads no base at all, and a failing base read is reported for
//!   the page that failed.
//! - **device state** (`1`): base length (u16), base seed, then a
//!   DeviceStateDelta payload, decoded by [`decode_device_state`].
//!   Asserted: exactly `len` bytes, equal to the raw block XOR'd with the
//!   base from `offset` on (zero past its end).
//! - **round trip** (`2`): a cache size, then a script of checkpoints
//!   (page runs and device states, see [`RoundTrip`]) sent through a
//!   [`DeltaEncoder`] as the sender's [`remus_proto::CheckpointWriter`]
//!   drives it, over the wire encoding, into a receiver that decodes each
//!   frame against its last committed copy and commits at the end of each
//!   checkpoint. Asserted: the receiver gets back exactly what was sent.

use std::collections::HashMap;

use remus_proto::delta::{DeltaEncoder, DeltaError, decode_device_state, decode_pages};
use remus_proto::{MAX_DELTA_PAGES, Message, MsgType, PAGE_SIZE};

use crate::Reader;

pub const MODE_PAGES: u8 = 0;
pub const MODE_DEVICE_STATE: u8 = 1;
pub const MODE_ROUND_TRIP: u8 = 2;

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    match r.u8() {
        Some(MODE_PAGES) => pages(&mut r),
        Some(MODE_DEVICE_STATE) => device_state(&mut r),
        Some(MODE_ROUND_TRIP) => round_trip(&mut r),
        _ => {}
    }
}

/// The receiver's copy of page `pfn` in the pages mode.
pub fn base_page(seed: u8, pfn: u64, buf: &mut [u8]) {
    let x = pfn.to_le_bytes();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = seed ^ x[i % 8] ^ (i as u8).wrapping_mul(31);
    }
}

fn pages(r: &mut Reader) {
    let (Some(seed), Some(fail)) = (r.u8(), r.u8()) else {
        return;
    };
    let Ok(Message::PageDelta(d)) = Message::decode_payload(MsgType::PageDelta as u16, r.rest())
    else {
        return;
    };
    let count = d.page_count as usize;
    let fail_page = (fail % 2 == 1).then(|| d.first_page + (usize::from(fail / 2) % count) as u64);
    let marked: Vec<u64> = (0..count)
        .filter(|i| d.xor[i / 8] & (1 << (i % 8)) != 0)
        .map(|i| d.first_page + i as u64)
        .collect();
    let mut reads = Vec::new();
    let result = decode_pages(&d, &mut |pfn, buf| {
        assert_eq!(buf.len(), PAGE_SIZE, "base buffer of another size");
        reads.push(pfn);
        if Some(pfn) == fail_page {
            return Err(std::io::Error::other("injected base read failure"));
        }
        base_page(seed, pfn, buf);
        Ok(())
    });
    match result {
        Ok(run) => {
            assert_eq!(run.first_page, d.first_page);
            assert_eq!(run.data.len(), count * PAGE_SIZE, "output size");
            assert_eq!(reads, marked, "base pages read");
            assert!(
                fail_page.is_none_or(|p| !marked.contains(&p)),
                "a failed base read was ignored"
            );
            if marked.is_empty() {
                // No base read (checked above): the output is the block.
                return;
            }
            let raw = decode_pages(&d, &mut |_, buf| {
                buf.fill(0);
                Ok(())
            })
            .expect("decodes against a zero base as against any other");
            let mut base = vec![0u8; PAGE_SIZE];
            for (i, (out, raw)) in run
                .data
                .chunks_exact(PAGE_SIZE)
                .zip(raw.data.chunks_exact(PAGE_SIZE))
                .enumerate()
            {
                let pfn = d.first_page + i as u64;
                if marked.contains(&pfn) {
                    base_page(seed, pfn, &mut base);
                    assert!(
                        out.iter()
                            .zip(raw)
                            .zip(&base)
                            .all(|((o, r), b)| *o == r ^ b),
                        "page {pfn}: not the block XOR its base"
                    );
                } else {
                    assert!(out == raw, "page {pfn}: XOR'd without its bit");
                }
            }
        }
        Err(DeltaError::Pages {
            first, count: c, ..
        }) => {
            assert_eq!((first, c), (d.first_page, d.page_count));
            assert!(reads.is_empty(), "base read for a corrupt block");
        }
        Err(DeltaError::Base { page, why }) => {
            assert_eq!(Some(page), fail_page, "{why}");
            assert_eq!(reads.last(), Some(&page));
            assert!(marked.starts_with(&reads), "base pages read");
        }
        Err(e @ DeltaError::DeviceState { .. }) => panic!("pages decoded as device state: {e}"),
    }
}

fn device_state(r: &mut Reader) {
    let (Some(base_len), Some(seed)) = (r.u16(), r.u8()) else {
        return;
    };
    let Ok(Message::DeviceStateDelta(d)) =
        Message::decode_payload(MsgType::DeviceStateDelta as u16, r.rest())
    else {
        return;
    };
    let base: Vec<u8> = (0..usize::from(base_len))
        .map(|i| seed ^ (i as u8).wrapping_mul(7))
        .collect();
    match decode_device_state(&d, &base) {
        Ok(out) => {
            assert_eq!(out.len(), d.len as usize, "output size");
            let raw = decode_device_state(&d, &[]).expect("decodes against an empty base");
            let offset = d.offset as usize;
            for (i, (o, r)) in out.iter().zip(&raw).enumerate() {
                let b = base.get(offset + i).copied().unwrap_or(0);
                assert_eq!(*o, r ^ b, "byte {i}: not the block XOR the base");
            }
        }
        Err(DeltaError::DeviceState { offset, .. }) => {
            assert_eq!(offset, d.offset);
            assert!(
                decode_device_state(&d, &[]).is_err(),
                "the base made it fail"
            );
        }
        Err(e) => panic!("device state failed as pages: {e}"),
    }
}

/// The round-trip script: after the mode byte, the cache size in pages
/// (`cache % 8 + 1`: small, so pages evict each other), then records of
/// four bytes `[op, a, b, c]`:
/// - `op % 4 == 0`: end the checkpoint (the receiver commits);
/// - `op % 4 == 1`: a device state of `(a << 8 | b) % 20000` bytes made
///   from `c` (one per checkpoint; the last one given counts);
/// - otherwise a run of pages from page `a % 32`, `b % 3 + 1` pages long
///   (`b == 255`, once per script: 257 pages, one more than a frame
///   holds), contents made from `c` and the page number.
///
/// Pages and device state of a checkpoint are sent when it ends; a script
/// that stops mid-checkpoint ends it there. At most 64 checkpoints and
/// about 64 pages (plus the long run) are sent: decompressing is slow
/// under the fuzzer's instrumentation.
pub struct RoundTrip;

impl RoundTrip {
    pub fn run_pages(a: u8, b: u8, long_allowed: bool) -> (u64, usize) {
        let count = if b == 255 && long_allowed {
            MAX_DELTA_PAGES as usize + 1
        } else {
            usize::from(b % 3) + 1
        };
        (u64::from(a % 32), count)
    }

    pub fn page(pfn: u64, c: u8, buf: &mut [u8]) {
        // Mostly constant (so a new version XORs to few bytes), with a
        // stripe that depends on the fill byte and the page.
        buf.fill(c);
        let at = (pfn as usize * 97 + usize::from(c) * 13) % (PAGE_SIZE - 64);
        for (i, b) in buf[at..at + 64].iter_mut().enumerate() {
            *b = (pfn as u8) ^ (i as u8) ^ c.rotate_left(3);
        }
    }

    pub fn device_state(a: u8, b: u8, c: u8) -> Vec<u8> {
        let len = (usize::from(a) << 8 | usize::from(b)) % 20000;
        (0..len)
            .map(|i| if i % 251 < 200 { c } else { (i as u8) ^ c })
            .collect()
    }
}

#[derive(Default)]
struct Checkpoint {
    runs: Vec<(u64, Vec<u8>)>,
    device_state: Option<Vec<u8>>,
}

/// Pages a round trip sends at most (the script stops there), so that
/// one input costs milliseconds, not seconds.
const PAGE_BUDGET: usize = 64;

struct Receiver {
    pages: HashMap<u64, Vec<u8>>,
    device_state: Vec<u8>,
}

fn round_trip(r: &mut Reader) {
    let Some(cache) = r.u8() else {
        return;
    };
    let mut enc = DeltaEncoder::new((u64::from(cache % 8) + 1) * PAGE_SIZE as u64);
    let mut rx = Receiver {
        pages: HashMap::new(),
        device_state: Vec::new(),
    };
    let mut cp = Checkpoint::default();
    let mut checkpoints = 0;
    let mut pages_sent = 0;
    let mut long_sent = false;
    while pages_sent < PAGE_BUDGET
        && let Some(rec) = r.take(4)
    {
        let [op, a, b, c] = [rec[0], rec[1], rec[2], rec[3]];
        match op % 4 {
            0 => {
                send(&mut enc, &mut rx, std::mem::take(&mut cp));
                checkpoints += 1;
                if checkpoints == 64 {
                    return;
                }
            }
            1 => cp.device_state = Some(RoundTrip::device_state(a, b, c)),
            _ => {
                let (first, count) = RoundTrip::run_pages(a, b, !long_sent);
                long_sent |= count > MAX_DELTA_PAGES as usize;
                pages_sent += count;
                let mut data = vec![0u8; count * PAGE_SIZE];
                for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    RoundTrip::page(first + i as u64, c, page);
                }
                cp.runs.push((first, data));
            }
        }
    }
    send(&mut enc, &mut rx, cp);
}

/// Sends one checkpoint the way [`remus_proto::CheckpointWriter`] does
/// with an encoder, through the wire encoding; the receiver decodes each
/// frame against its committed copy, then commits.
fn send(enc: &mut DeltaEncoder, rx: &mut Receiver, cp: Checkpoint) {
    enc.begin_checkpoint();
    let mut received: Vec<(u64, Vec<u8>)> = Vec::new();
    for (first, data) in &cp.runs {
        let mut got = Vec::new();
        for d in enc.encode_pages(*first, data) {
            let m = wire(Message::PageDelta(d));
            let Message::PageDelta(d) = m else {
                unreachable!("wire() keeps the type")
            };
            let run = decode_pages(&d, &mut |pfn, buf| {
                match rx.pages.get(&pfn) {
                    Some(p) => buf.copy_from_slice(p),
                    // The sender XORs only pages it sent before, which the
                    // receiver committed.
                    None => panic!("base of page {pfn} read, but it was never sent"),
                }
                Ok(())
            })
            .expect("the encoder's output decodes");
            assert_eq!(run.first_page, *first + (got.len() / PAGE_SIZE) as u64);
            got.extend_from_slice(&run.data);
        }
        assert!(&got == data, "pages from {first} came back different");
        received.push((*first, got));
    }
    let device_state = cp.device_state.map(|state| {
        let mut got = Vec::new();
        // An empty state yields no frame (the writer sends it plain) and
        // the encoder forgets the previous one, as the receiver does.
        for d in enc.encode_device_state(&state) {
            let Message::DeviceStateDelta(d) = wire(Message::DeviceStateDelta(d)) else {
                unreachable!("wire() keeps the type")
            };
            assert_eq!(d.offset, got.len() as u64);
            got.extend(decode_device_state(&d, &rx.device_state).expect("decodes"));
        }
        assert!(got == state, "device state came back different");
        got
    });
    for (first, data) in received {
        for (i, p) in data.chunks_exact(PAGE_SIZE).enumerate() {
            rx.pages.insert(first + i as u64, p.to_vec());
        }
    }
    if let Some(s) = device_state {
        rx.device_state = s;
    }
}

/// A message through its payload encoding and back, as over the wire.
fn wire(m: Message) -> Message {
    let t = m.msg_type() as u16;
    let back = Message::decode_payload(t, &m.encode_payload()).expect("own encoding decodes");
    assert_eq!(back, m);
    back
}
