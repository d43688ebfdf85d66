//! Checkpoint compression (protocol version 3): pages XOR'd against the
//! version the receiver already holds, then LZ4.
//!
//! Most of a page the guest dirtied between two checkpoints is unchanged
//! (a counter, a list pointer, a few cache lines), so the XOR of the new
//! version with the previous one is mostly zero bytes, which LZ4 squeezes
//! to almost nothing. That is the idea of Xen Remus's checkpoint
//! compression (`xl remus -u` turns it off) and of QEMU's XBZRLE.
//!
//! **Sender.** [`DeltaEncoder`] keeps a bounded, direct-mapped cache of the
//! pages it sent last (QEMU's XBZRLE cache works the same way): page `p`
//! lives in slot `p mod slots`, tagged with `p`. A page whose slot holds
//! its own tag is sent as the XOR against that copy; any other page is sent
//! plain (still LZ4-compressed: zero and repetitive pages shrink too). Every
//! page sent replaces its slot, so a cached copy is always exactly the
//! version the receiver received last. A page sent twice within one
//! checkpoint is sent plain the second time: the receiver's base for a
//! delta is its committed copy, which the first one has not reached yet.
//! The device state is XOR'd against the previous checkpoint's device
//! state (QEMU's is about 300 KB on q35, most of it ROM that never
//! changes).
//!
//! **Receiver.** [`decode_pages`] and [`decode_device_state`] undo it with
//! the receiver's committed copy as base. The checkpoint digest covers the
//! decoded pages, so a wrong base or a garbled block is caught at End and
//! the checkpoint is never applied.
//!
//! LZ4 rather than zstd: on the sender it runs on the hot path of every
//! checkpoint (after `cont`, in the sender thread, competing with the
//! guest for CPU), and LZ4's block format compresses XOR deltas at several
//! GB/s.
//!
//! The LZ4 is liblz4, the reference C implementation, through the `lz4`
//! crate, rather than the pure-Rust `lz4_flex` the protocol began with:
//! measured on one machine (`cargo bench -p remus-proto --bench lz4`),
//! `LZ4_decompress_safe` decodes a mostly-zero XOR delta about ten times
//! faster (`lz4_flex`'s safe decoder copies overlapping matches, the zero
//! runs, a byte at a time) and `LZ4_compress_default` encodes deltas
//! 20-40 % faster and incompressible pages ten times faster. On the backup
//! the decode sits between a checkpoint's last frame and its ack, so it
//! delayed every release of buffered output and every `remus migrate`
//! switch-over; on the primary the encode runs in the sender after `cont`.
//! The block format is the same, so agents of either kind read each
//! other's blocks. `LZ4_decompress_safe` is the variant made for untrusted
//! input (it never reads outside its source nor writes outside its
//! destination, whatever the bytes), fuzzed continuously by OSS-Fuzz and by
//! our `delta_decode` target; it only sees frames that passed
//! authentication, and its output must fill the expected length exactly.

use crate::message::{DeviceStateDelta, PageDelta, PageRun};
pub use crate::wire::DEVICE_CHUNK;
use crate::wire::{MAX_DELTA_PAGES, PAGE_SIZE};

/// Why a delta frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("compressed block of pages {first}+{count} is corrupt: {why}")]
    Pages { first: u64, count: u32, why: String },
    #[error("compressed device state at offset {offset} is corrupt: {why}")]
    DeviceState { offset: u64, why: String },
    #[error("reading the base of page {page}: {why}")]
    Base { page: u64, why: String },
}

/// Cache sizing: the default, as QEMU's `xbzrle-cache-size`.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

const EMPTY: u64 = u64::MAX;

/// What the encoder did, for the operator's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Pages sent as XOR against the cached copy.
    pub xor_pages: u64,
    /// Pages sent plain (no cached copy).
    pub plain_pages: u64,
}

/// The sender's side: page cache, previous device state, scratch buffers.
pub struct DeltaEncoder {
    slots: u64,
    tags: Vec<u64>,
    /// The checkpoint in which each slot was last written.
    generation: Vec<u32>,
    pages: Vec<u8>,
    current: u32,
    device_prev: Vec<u8>,
    scratch: Vec<u8>,
    /// liblz4's output, sized to its bound once and reused.
    packed: Vec<u8>,
    stats: DeltaStats,
}

/// liblz4 takes `int` lengths and compresses at most this much
/// (`LZ4_MAX_INPUT_SIZE`); every block here is far smaller.
const LZ4_MAX_INPUT: usize = 0x7E00_0000;
const _: () = assert!(DEVICE_CHUNK <= LZ4_MAX_INPUT);
const _: () = assert!(MAX_DELTA_PAGES as usize * PAGE_SIZE <= LZ4_MAX_INPUT);

impl DeltaEncoder {
    /// An encoder whose page cache holds `cache_bytes` (rounded down to
    /// whole pages, at least one). The cache's memory is allocated zeroed,
    /// so the kernel backs it only as pages are cached.
    pub fn new(cache_bytes: u64) -> DeltaEncoder {
        let slots = (cache_bytes / PAGE_SIZE as u64).max(1);
        DeltaEncoder {
            slots,
            tags: vec![EMPTY; slots as usize],
            generation: vec![0; slots as usize],
            pages: vec![0; slots as usize * PAGE_SIZE],
            current: 1,
            device_prev: Vec::new(),
            scratch: Vec::new(),
            packed: Vec::new(),
            stats: DeltaStats::default(),
        }
    }

    /// Bytes of page cache.
    pub fn cache_bytes(&self) -> u64 {
        self.slots * PAGE_SIZE as u64
    }

    /// Counters since the last call (then reset).
    pub fn take_stats(&mut self) -> DeltaStats {
        std::mem::take(&mut self.stats)
    }

    /// Starts a new checkpoint: pages sent from now on may be XOR'd against
    /// those sent before.
    pub fn begin_checkpoint(&mut self) {
        self.current = self.current.wrapping_add(1).max(1);
    }

    /// Encodes the whole pages `first_page..` in `data` as delta frames of
    /// at most [`MAX_DELTA_PAGES`] pages each, and remembers them.
    pub fn encode_pages(&mut self, first_page: u64, data: &[u8]) -> Vec<PageDelta> {
        assert!(
            data.len().is_multiple_of(PAGE_SIZE),
            "{} bytes is not a whole number of pages",
            data.len()
        );
        data.chunks(MAX_DELTA_PAGES as usize * PAGE_SIZE)
            .enumerate()
            .map(|(i, part)| {
                self.encode_part(first_page + (i * MAX_DELTA_PAGES as usize) as u64, part)
            })
            .collect()
    }

    fn encode_part(&mut self, first_page: u64, data: &[u8]) -> PageDelta {
        let count = (data.len() / PAGE_SIZE) as u32;
        let mut xor = vec![0u8; (count as usize).div_ceil(8)];
        self.scratch.clear();
        self.scratch.reserve(data.len());
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let pfn = first_page + i as u64;
            let slot = (pfn % self.slots) as usize;
            let cached = &mut self.pages[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE];
            if self.tags[slot] == pfn && self.generation[slot] != self.current {
                xor[i / 8] |= 1 << (i % 8);
                self.scratch
                    .extend(page.iter().zip(cached.iter()).map(|(a, b)| a ^ b));
                self.stats.xor_pages += 1;
            } else {
                self.scratch.extend_from_slice(page);
                self.stats.plain_pages += 1;
            }
            cached.copy_from_slice(page);
            self.tags[slot] = pfn;
            self.generation[slot] = self.current;
        }
        PageDelta {
            first_page,
            page_count: count,
            xor,
            compressed: self.compress_scratch(),
        }
    }

    /// The scratch buffer as one LZ4 block.
    ///
    /// # Panics
    /// Never for the blocks this encoder makes: liblz4 compresses any
    /// input up to [`LZ4_MAX_INPUT`] (asserted above for the largest one)
    /// into a buffer of its bound.
    fn compress_scratch(&mut self) -> Vec<u8> {
        let bound = lz4::block::compress_bound(self.scratch.len())
            .expect("an LZ4 block below LZ4_MAX_INPUT has a bound");
        if self.packed.len() < bound {
            self.packed.resize(bound, 0);
        }
        let n = lz4::block::compress_to_buffer(
            &self.scratch,
            Some(lz4::block::CompressionMode::DEFAULT),
            false,
            &mut self.packed,
        )
        .expect("liblz4 compresses into its bound");
        self.packed[..n].to_vec()
    }

    /// Encodes a checkpoint's whole device state against the previous
    /// one, and remembers it.
    pub fn encode_device_state(&mut self, data: &[u8]) -> Vec<DeviceStateDelta> {
        let mut out = Vec::new();
        for (i, part) in data.chunks(DEVICE_CHUNK).enumerate() {
            let offset = i * DEVICE_CHUNK;
            self.scratch.clear();
            self.scratch.extend_from_slice(part);
            xor_with_base(&mut self.scratch, &self.device_prev, offset);
            out.push(DeviceStateDelta {
                offset: offset as u64,
                len: part.len() as u32,
                compressed: self.compress_scratch(),
            });
        }
        self.device_prev.clear();
        self.device_prev.extend_from_slice(data);
        out
    }

    /// Encodes `part`, the bytes at `offset` of a device state sent as
    /// it is produced (a migration's last checkpoint streams QEMU's save
    /// while QEMU writes it), against the previous state at that offset.
    /// The previous state stays the base: only for the session's last
    /// checkpoint, after which nothing is encoded against this one.
    pub fn encode_device_state_part(&mut self, offset: u64, part: &[u8]) -> Vec<DeviceStateDelta> {
        let mut out = Vec::new();
        let mut at = offset;
        for piece in part.chunks(DEVICE_CHUNK) {
            self.scratch.clear();
            self.scratch.extend_from_slice(piece);
            xor_with_base(
                &mut self.scratch,
                &self.device_prev,
                usize::try_from(at).unwrap_or(usize::MAX),
            );
            out.push(DeviceStateDelta {
                offset: at,
                len: piece.len() as u32,
                compressed: self.compress_scratch(),
            });
            at += piece.len() as u64;
        }
        out
    }
}

/// XORs `buf` with `base[offset..]` where base has bytes (beyond its end
/// the base reads as zero: nothing to undo).
fn xor_with_base(buf: &mut [u8], base: &[u8], offset: usize) {
    if let Some(b) = base.get(offset..) {
        for (x, y) in buf.iter_mut().zip(b) {
            *x ^= y;
        }
    }
}

/// Decodes a page delta. `base(page, buf)` fills `buf` with the receiver's
/// copy of `page` (its last committed version); it is called only for the
/// pages the frame marks as XOR'd.
pub fn decode_pages(
    d: &PageDelta,
    base: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<PageRun, DeltaError> {
    let bad = |why: String| DeltaError::Pages {
        first: d.first_page,
        count: d.page_count,
        why,
    };
    let mut data = vec![0u8; d.page_count as usize * PAGE_SIZE];
    lz4_decode(&d.compressed, &mut data).map_err(bad)?;
    let mut b = [0u8; PAGE_SIZE];
    for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
        if d.xor[i / 8] & (1 << (i % 8)) != 0 {
            let pfn = d.first_page + i as u64;
            base(pfn, &mut b).map_err(|e| DeltaError::Base {
                page: pfn,
                why: e.to_string(),
            })?;
            for (x, y) in page.iter_mut().zip(b.iter()) {
                *x ^= y;
            }
        }
    }
    Ok(PageRun {
        first_page: d.first_page,
        data,
    })
}

/// Decompresses one LZ4 block, which must fill `out` exactly (see the
/// module documentation for why liblz4).
fn lz4_decode(src: &[u8], out: &mut [u8]) -> Result<(), String> {
    // The C interface takes `int` lengths. Frames bound both far below
    // (a frame's payload in; at most DEVICE_CHUNK out), so these only
    // refuse what no frame can carry.
    let want = i32::try_from(out.len()).map_err(|_| format!("{} bytes is too large", out.len()))?;
    if i32::try_from(src.len()).is_err() {
        return Err(format!("a block of {} bytes is too large", src.len()));
    }
    let n = lz4::block::decompress_to_buffer(src, Some(want), out).map_err(|e| e.to_string())?;
    if n != out.len() {
        return Err(format!("decompresses to {n} bytes, {} expected", out.len()));
    }
    Ok(())
}

/// Decodes a device-state delta against `base`, the receiver's last
/// committed device state.
pub fn decode_device_state(d: &DeviceStateDelta, base: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let bad = |why: String| DeltaError::DeviceState {
        offset: d.offset,
        why,
    };
    let mut data = vec![0u8; d.len as usize];
    lz4_decode(&d.compressed, &mut data).map_err(bad)?;
    let offset = usize::try_from(d.offset).map_err(|_| bad("offset too large".into()))?;
    xor_with_base(&mut data, base, offset);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device state encoded in parts as it is produced decodes, part
    /// by part, to the whole, against the same base as the whole would.
    #[test]
    fn a_device_state_sent_in_parts_decodes_to_the_whole() {
        for prev in [Vec::new(), vec![9u8; 70_000]] {
            let mut enc = DeltaEncoder::new(1 << 20);
            enc.encode_device_state(&prev);
            let state: Vec<u8> = (0..150_000u32).map(|i| (i % 7) as u8).collect();
            let mut got = Vec::new();
            let mut offset = 0u64;
            for part in state.chunks(32 << 10) {
                for d in enc.encode_device_state_part(offset, part) {
                    assert_eq!(d.offset, got.len() as u64);
                    got.extend(decode_device_state(&d, &prev).unwrap());
                }
                offset += part.len() as u64;
            }
            assert_eq!(got, state);
        }
    }

    fn page(fill: u8, tweak: usize) -> Vec<u8> {
        let mut p = vec![fill; PAGE_SIZE];
        p[tweak % PAGE_SIZE] ^= 0x5a;
        p
    }

    /// A receiver: committed pages, applied at each "commit".
    struct Receiver {
        pages: std::collections::HashMap<u64, Vec<u8>>,
    }

    impl Receiver {
        fn decode(&self, d: &PageDelta) -> Result<PageRun, DeltaError> {
            decode_pages(d, &mut |pfn, buf| {
                match self.pages.get(&pfn) {
                    Some(p) => buf.copy_from_slice(p),
                    None => buf.fill(0),
                }
                Ok(())
            })
        }
        fn commit(&mut self, run: &PageRun) {
            for (i, p) in run.data.chunks(PAGE_SIZE).enumerate() {
                self.pages.insert(run.first_page + i as u64, p.to_vec());
            }
        }
    }

    #[test]
    fn a_changed_page_travels_as_a_small_xor_and_decodes_exactly() {
        let mut enc = DeltaEncoder::new(1 << 20);
        let mut rx = Receiver {
            pages: Default::default(),
        };
        let v1: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        enc.begin_checkpoint();
        let d1 = enc.encode_pages(9, &v1);
        assert_eq!(d1.len(), 1);
        assert_eq!(d1[0].xor, vec![0], "first time: plain");
        let r1 = rx.decode(&d1[0]).unwrap();
        assert_eq!(r1.data, v1);
        rx.commit(&r1);

        let mut v2 = v1.clone();
        v2[100] ^= 0xff;
        v2[4000] = 3;
        enc.begin_checkpoint();
        let d2 = enc.encode_pages(9, &v2);
        assert_eq!(d2[0].xor, vec![1], "second time: XOR against the copy");
        assert!(
            d2[0].compressed.len() < 64,
            "{} bytes for two changed bytes",
            d2[0].compressed.len()
        );
        assert_eq!(rx.decode(&d2[0]).unwrap().data, v2);
        assert_eq!(
            enc.take_stats(),
            DeltaStats {
                xor_pages: 1,
                plain_pages: 1
            }
        );
    }

    #[test]
    fn a_page_sent_twice_in_one_checkpoint_is_plain_the_second_time() {
        let mut enc = DeltaEncoder::new(1 << 20);
        enc.begin_checkpoint();
        enc.encode_pages(3, &page(1, 0));
        let again = enc.encode_pages(3, &page(2, 0));
        assert_eq!(again[0].xor, vec![0]);
        enc.begin_checkpoint();
        assert_eq!(enc.encode_pages(3, &page(3, 0))[0].xor, vec![1]);
    }

    #[test]
    fn pages_that_share_a_slot_evict_each_other_and_are_then_sent_plain() {
        // Two slots: pages 0 and 2 share slot 0.
        let mut enc = DeltaEncoder::new(2 * PAGE_SIZE as u64);
        let mut rx = Receiver {
            pages: Default::default(),
        };
        for (pfn, fill) in [(0u64, 1u8), (2, 2), (0, 3), (2, 4)] {
            enc.begin_checkpoint();
            let d = enc.encode_pages(pfn, &page(fill, 5)).remove(0);
            assert_eq!(d.xor, vec![0], "page {pfn} was evicted: plain");
            let r = rx.decode(&d).unwrap();
            assert_eq!(r.data, page(fill, 5));
            rx.commit(&r);
        }
        enc.begin_checkpoint();
        let d = enc.encode_pages(2, &page(9, 1)).remove(0);
        assert_eq!(d.xor, vec![1]);
        assert_eq!(rx.decode(&d).unwrap().data, page(9, 1));
    }

    #[test]
    fn a_wrong_base_gives_wrong_pages_which_only_the_digest_can_catch() {
        let mut enc = DeltaEncoder::new(1 << 20);
        enc.begin_checkpoint();
        enc.encode_pages(0, &page(1, 0));
        enc.begin_checkpoint();
        let d = enc.encode_pages(0, &page(1, 9)).remove(0);
        let r = decode_pages(&d, &mut |_, b| {
            b.fill(0xee);
            Ok(())
        })
        .unwrap();
        assert_ne!(r.data, page(1, 9));
    }

    #[test]
    fn corrupt_blocks_and_base_read_errors_are_errors_not_panics() {
        let mut enc = DeltaEncoder::new(1 << 20);
        enc.begin_checkpoint();
        let mut d = enc.encode_pages(0, &page(7, 3)).remove(0);
        let good = d.compressed.clone();
        d.compressed.truncate(good.len() / 2);
        assert!(matches!(
            decode_pages(&d, &mut |_, _| Ok(())),
            Err(DeltaError::Pages { .. })
        ));
        d.compressed = vec![0xff; 40];
        assert!(decode_pages(&d, &mut |_, _| Ok(())).is_err());
        // A block that decodes to fewer bytes than the pages need.
        d.compressed = lz4::block::compress(&[0u8; 100], None, false).unwrap();
        assert!(decode_pages(&d, &mut |_, _| Ok(())).is_err());
        enc.begin_checkpoint();
        let d = enc.encode_pages(0, &page(8, 3)).remove(0);
        let e = decode_pages(&d, &mut |_, _| Err(std::io::Error::other("disk gone"))).unwrap_err();
        assert!(e.to_string().contains("disk gone"), "{e}");
    }

    /// Agents before liblz4 encoded with lz4_flex and decoded with its
    /// safe decoder: blocks cross both ways, whatever their content.
    #[test]
    fn blocks_cross_between_liblz4_and_the_lz4_flex_of_earlier_agents() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut enc = DeltaEncoder::new(1 << 20);
        for changed in [0usize, 1, 16, 256, 4096, 40_000] {
            let pages = 1 + (next() % 40) as usize;
            let mut data = vec![0u8; pages * PAGE_SIZE];
            for _ in 0..changed.min(data.len() * 4) {
                let i = (next() as usize) % data.len();
                data[i] = next() as u8;
            }
            // Ours, read by an earlier agent.
            enc.begin_checkpoint();
            let first = 1000 * changed as u64;
            let ours = enc.encode_pages(first, &data).remove(0);
            assert_eq!(ours.xor, vec![0; pages.div_ceil(8)], "first sight: plain");
            let mut theirs = vec![0u8; data.len()];
            let n = lz4_flex::block::decompress_into(&ours.compressed, &mut theirs).unwrap();
            assert_eq!((n, &theirs), (data.len(), &data), "{changed} bytes changed");
            // An earlier agent's, read by ours.
            let old = PageDelta {
                first_page: first,
                page_count: pages as u32,
                xor: vec![0; pages.div_ceil(8)],
                compressed: lz4_flex::block::compress(&data),
            };
            let got = decode_pages(&old, &mut |_, _| unreachable!("plain pages")).unwrap();
            assert_eq!(got.data, data, "{changed} bytes changed");
            let dev = DeviceStateDelta {
                offset: 0,
                len: data.len() as u32,
                compressed: lz4_flex::block::compress(&data),
            };
            assert_eq!(decode_device_state(&dev, &[]).unwrap(), data);
        }
    }

    #[test]
    fn device_state_is_xored_with_the_previous_one_of_any_length() {
        let mut enc = DeltaEncoder::new(PAGE_SIZE as u64);
        let s1: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let d1 = enc.encode_device_state(&s1);
        let got1 = decode_device_state(&d1[0], &[]).unwrap();
        assert_eq!(got1, s1);
        let mut s2 = s1.clone();
        s2[1234] ^= 1;
        s2.extend_from_slice(b"longer now");
        let d2 = enc.encode_device_state(&s2);
        assert!(d2[0].compressed.len() < 2_000, "{}", d2[0].compressed.len());
        assert_eq!(decode_device_state(&d2[0], &s1).unwrap(), s2);
        let s3 = s2[..1000].to_vec();
        let d3 = enc.encode_device_state(&s3);
        assert_eq!(decode_device_state(&d3[0], &s2).unwrap(), s3);
        let empty = enc.encode_device_state(&[]);
        assert!(empty.is_empty());
    }

    #[test]
    fn runs_longer_than_one_frame_are_split() {
        let mut enc = DeltaEncoder::new(1 << 20);
        enc.begin_checkpoint();
        let n = MAX_DELTA_PAGES as usize + 3;
        let data = vec![1u8; n * PAGE_SIZE];
        let ds = enc.encode_pages(100, &data);
        assert_eq!(ds.len(), 2);
        assert_eq!(ds[1].first_page, 100 + u64::from(MAX_DELTA_PAGES));
        assert_eq!(ds[1].page_count, 3);
    }
}
