//! The remus fuzz targets, as plain functions.
//!
//! Each module has a `run(data)` that decodes `data` the way one of the
//! project's decoders would receive it and asserts what must hold for
//! every input (never a panic, and more: round trips, bounds, agreement
//! with a reference model). `fuzz_targets/*.rs` only hand libFuzzer's
//! input to these functions; the corpus generator (`examples/gen_corpus.rs`)
//! runs every seed through them too, and writes the input layouts with the
//! encoders defined next to the readers here, so the two cannot drift.

pub mod assembler;
pub mod channel;
pub mod config;
pub mod delta;
pub mod frame;
pub mod handshake;
pub mod libvirt;
pub mod message;
pub mod nbd;

use remus_proto::delta::DEVICE_CHUNK;
use remus_proto::{
    DIGEST_LEN, DiskOp, MAX_DELTA_PAGES, MAX_DEVICE_STATE, MAX_PAGES_PER_RUN, Message, PAGE_SIZE,
};

/// A cursor over the fuzz input; every read is `None` once it runs out.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The message type an input starting with `first` stands for, and how
/// many bytes of `rest` that took: the byte itself for 0..=0xef (every
/// known type is below 40), else a big-endian u16 from the next two
/// bytes, so that unknown and large type numbers are reachable too.
pub fn pick_type(first: u8, rest: &[u8]) -> (u16, usize) {
    match rest {
        [hi, lo, ..] if first >= 0xf0 => (u16::from_be_bytes([*hi, *lo]), 2),
        _ => (u16::from(first), 0),
    }
}

/// Whether `m` is an Error whose text was escaped as it was decoded (a
/// peer's words reach logs and terminals with their control, line
/// separator and bidi characters escaped): such a message re-encodes to
/// other bytes than it came from, by design. Its text then holds none of
/// those characters (an incompatibility keeps its newlines, one field per
/// line).
pub fn escaped_error(m: &Message) -> bool {
    let Message::Error { code, message } = m else {
        return false;
    };
    for c in message.chars() {
        let hidden = c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        assert!(
            !hidden || (c == '\n' && *code == remus_proto::ErrorCode::Incompatible),
            "{c:?} passed unescaped in {message:?}"
        );
    }
    true
}

/// What every decoded message must satisfy, whatever bytes it came from:
/// the bounds the protocol documents for each payload (see
/// `remus_proto`'s crate documentation), which the receiver relies on.
pub fn check_message(m: &Message) {
    match m {
        Message::PageRun(r) => {
            assert!(!r.data.is_empty(), "empty page run");
            assert!(r.data.len().is_multiple_of(PAGE_SIZE), "partial page");
            assert!(r.page_count() <= MAX_PAGES_PER_RUN);
            assert!(
                r.first_page
                    .checked_add(u64::from(r.page_count()))
                    .is_some(),
                "page numbers overflow"
            );
        }
        Message::PageDelta(d) => {
            assert!((1..=MAX_DELTA_PAGES).contains(&d.page_count));
            assert!(
                d.first_page.checked_add(u64::from(d.page_count)).is_some(),
                "page numbers overflow"
            );
            assert_eq!(d.xor.len(), (d.page_count as usize).div_ceil(8));
            let tail = d.page_count % 8;
            if tail != 0 {
                assert_eq!(d.xor[d.xor.len() - 1] >> tail, 0, "xor bits past the pages");
            }
            assert!(!d.compressed.is_empty());
        }
        Message::DeviceStateDelta(d) => {
            assert!(d.len >= 1 && d.len as usize <= DEVICE_CHUNK);
            assert!(
                d.offset
                    .checked_add(u64::from(d.len))
                    .is_some_and(|end| end <= MAX_DEVICE_STATE)
            );
            assert!(!d.compressed.is_empty());
        }
        Message::Disk(r) => match &r.op {
            DiskOp::Write { offset, data, .. } => {
                assert!(!data.is_empty(), "empty write");
                assert!(offset.checked_add(data.len() as u64).is_some());
            }
            DiskOp::Zero { offset, len, .. } => {
                assert!(*len >= 1, "empty zero range");
                assert!(offset.checked_add(*len).is_some());
            }
            DiskOp::Flush => {}
        },
        Message::DiskDigests(d) => {
            assert!(d.chunk_size > 0);
            assert!(!d.digests.is_empty());
            assert!(d.digests.iter().all(|x| x.len() == DIGEST_LEN));
        }
        Message::DiskSyncRuns(r) => {
            assert!(r.chunk_size > 0);
            let mut next = 0u64;
            for &(first, count) in &r.runs {
                assert!(count >= 1, "empty run");
                assert!(first >= next, "runs out of order or overlapping");
                next = first.checked_add(count).expect("run overflows");
            }
        }
        Message::Hello(h) => {
            assert!(h.vm_name.len() <= usize::from(u16::MAX));
            assert!(h.compat.disks.len() <= usize::from(u16::MAX));
            assert!(h.compat.macs.len() <= usize::from(u16::MAX));
        }
        _ => {}
    }
}
