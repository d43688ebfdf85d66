//! Which LZ4 implementation encodes and which decodes checkpoint deltas:
//! `cargo bench -p remus-proto --bench lz4`.
//!
//! Both implementations of the one block format, `lz4_flex` (pure Rust,
//! its safe decoder) and liblz4 (`lz4` crate: `LZ4_compress_default`,
//! `LZ4_decompress_safe`), on runs of 64 pages (256 KiB) of three kinds,
//! in the same run:
//!
//! - a sparse XOR delta: 16 bytes changed per page (a counter, a pointer:
//!   most pages a guest dirties between two checkpoints);
//! - a dense XOR delta: 256 random bytes changed per page (the bench's
//!   `dirty` workload);
//! - incompressible pages (random bytes: a page seen for the first time).
//!
//! Each block produced by one encoder is decoded by both decoders and
//! checked against the input. Prints microseconds per page, the best of
//! five rounds, and the ratios; the delta module's choice (lz4_flex
//! encodes, liblz4 decodes) follows from them.

use std::hint::black_box;
use std::time::Instant;

const PAGE: usize = 4096;
const PAGES: usize = 64;
const ROUNDS: usize = 5;
const REPS: usize = 400;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `changed` random bytes at random places of every page, zero elsewhere.
fn run_of(changed: usize, seed: &mut u64) -> Vec<u8> {
    let mut data = vec![0u8; PAGES * PAGE];
    for p in 0..PAGES {
        for _ in 0..changed {
            let i = (xorshift(seed) % PAGE as u64) as usize;
            data[p * PAGE + i] = (xorshift(seed) as u8) | 1;
        }
    }
    data
}

/// Microseconds per page of `f` over one run, best of [`ROUNDS`].
fn per_page(mut f: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..REPS {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / (REPS * PAGES) as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn liblz4_encode(data: &[u8], out: &mut [u8]) -> usize {
    lz4::block::compress_to_buffer(data, Some(lz4::block::CompressionMode::DEFAULT), false, out)
        .expect("liblz4 compresses")
}

fn main() {
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let kinds = [
        ("sparse XOR delta (16 B/page)", 16),
        ("dense XOR delta (256 B/page)", 256),
        ("incompressible", PAGE * 4),
    ];
    println!(
        "{:<30} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7}",
        "run of 64 pages", "enc flex", "enc liblz4", "ratio", "dec flex", "dec liblz4", "ratio"
    );
    for (name, changed) in kinds {
        let data = run_of(changed, &mut seed);
        let flex_block = lz4_flex::block::compress(&data);
        let mut c_buf = vec![0u8; lz4::block::compress_bound(data.len()).expect("bound")];
        let c_len = liblz4_encode(&data, &mut c_buf);
        let mut out = vec![0u8; data.len()];
        for block in [&flex_block[..], &c_buf[..c_len]] {
            out.fill(0);
            lz4_flex::block::decompress_into(block, &mut out).expect("lz4_flex decodes");
            assert!(out == data, "lz4_flex decoded {name} wrong");
            out.fill(0);
            let n = lz4::block::decompress_to_buffer(block, Some(data.len() as i32), &mut out)
                .expect("liblz4 decodes");
            assert!(
                n == data.len() && out == data,
                "liblz4 decoded {name} wrong"
            );
        }
        let enc_flex = per_page(|| {
            black_box(lz4_flex::block::compress(black_box(&data)));
        });
        let enc_c = per_page(|| {
            black_box(liblz4_encode(black_box(&data), &mut c_buf));
        });
        let dec_flex = per_page(|| {
            lz4_flex::block::decompress_into(black_box(&flex_block), &mut out).expect("decodes");
        });
        let want = data.len() as i32;
        let dec_c = per_page(|| {
            lz4::block::decompress_to_buffer(black_box(&flex_block), Some(want), &mut out)
                .expect("decodes");
        });
        println!(
            "{name:<30} {enc_flex:>8.2}us {enc_c:>8.2}us {:>6.2}x {dec_flex:>8.2}us {dec_c:>8.2}us {:>6.2}x",
            enc_c / enc_flex,
            dec_c / dec_flex,
        );
        println!(
            "{:<30} block: {} bytes (lz4_flex), {} bytes (liblz4), of {}",
            "",
            flex_block.len(),
            c_len,
            data.len()
        );
    }
    println!("ratio: liblz4's time over lz4_flex's (below 1: liblz4 is faster)");
}
