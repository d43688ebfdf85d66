//! `diskbench DEVICE [--block-kb 256] [--fsync-every 16] [--region-mb 256]`:
//! sequential write throughput and flush latency of a block device, for the
//! disk replication benchmark (`remus-bench --disk`).
//!
//! Writes blocks of `--block-kb` KiB with O_DIRECT, one after the other from
//! offset 0, wrapping to 0 at the end of the region (`--region-mb` MiB, cut
//! down to the device's size and to a whole number of blocks), forever.
//! After every `--fsync-every` blocks it calls `fdatasync` on the device (a
//! FLUSH to the virtual disk) and times it; 0 means never. If the device
//! refuses O_DIRECT (a tmpfs file in tests), writes go through the page
//! cache instead, and the start line says so.
//!
//! Console lines (stdout):
//! * `diskbench: DEVICE region N MiB block B KiB fsync every F blocks
//!   (O_DIRECT|cached)` at start;
//! * about once a second, over that second ([`Window::line`]):
//!   `diskbench: write MB/s X fsync_ms p50 Y max Z n K`, X = MiB written
//!   per second of wall time (fsyncs included), Y/Z = median
//!   (nearest-rank) and maximum fdatasync time in ms, K = fdatasyncs that
//!   completed in the second (with K = 0, Y and Z are `-`);
//! * `diskbench: error: ...` on a write or fsync error (then it exits).

use crate::disk_probe::{Aligned, open_direct, random_value};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// O_DIRECT alignment and the block-size granularity.
const ALIGN_KB: u64 = 4;
/// How often a line is printed.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
pub const LINE_PREFIX: &str = "diskbench: write MB/s ";

#[derive(Debug, Clone, PartialEq)]
struct Args {
    device: String,
    block_kb: u64,
    fsync_every: u64,
    region_mb: u64,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let a = parse_args(args)?;
    let mut bench = Bench::open(&a)?;
    say(&format!(
        "diskbench: {} region {} MiB block {} KiB fsync every {} blocks ({})",
        a.device,
        bench.region_blocks * bench.block_len() / MIB,
        a.block_kb,
        a.fsync_every,
        if bench.direct { "O_DIRECT" } else { "cached" }
    ));
    let mut win = Window::default();
    let mut start = Instant::now();
    loop {
        if let Err(e) = bench.step(&mut win) {
            let msg = format!("{} at byte {}: {e}", a.device, bench.offset());
            say(&format!("diskbench: error: {msg}"));
            return Err(msg);
        }
        let elapsed = start.elapsed();
        if elapsed >= REPORT_EVERY {
            say(&win.line(elapsed));
            win = Window::default();
            start = Instant::now();
        }
    }
}

/// Prints a line to the console; output errors are ignored.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let (mut block_kb, mut fsync_every, mut region_mb) = (256, 16, 256);
    let pos = crate::options::parse(
        args,
        &mut [
            ("--block-kb", &mut block_kb),
            ("--fsync-every", &mut fsync_every),
            ("--region-mb", &mut region_mb),
        ],
        &mut [],
    )?;
    let [device] = pos.as_slice() else {
        return Err(
            "usage: diskbench DEVICE [--block-kb 256] [--fsync-every 16] [--region-mb 256]".into(),
        );
    };
    if block_kb == 0 || block_kb % ALIGN_KB != 0 || block_kb > 64 * 1024 {
        return Err(format!(
            "--block-kb must be a multiple of {ALIGN_KB} between {ALIGN_KB} and 65536"
        ));
    }
    if region_mb == 0 || region_mb > 1 << 30 {
        return Err("--region-mb must be between 1 and 2^30".into());
    }
    Ok(Args {
        device: device.clone(),
        block_kb,
        fsync_every,
        region_mb,
    })
}

/// Nearest-rank median and maximum of `ms` (None when empty).
pub fn p50_max(ms: &[f64]) -> Option<(f64, f64)> {
    if ms.is_empty() {
        return None;
    }
    let mut s = ms.to_vec();
    s.sort_by(f64::total_cmp);
    Some((s[s.len().div_ceil(2) - 1], s[s.len() - 1]))
}

/// What happened during one report period.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Window {
    /// Bytes written.
    pub bytes: u64,
    /// Duration of each fdatasync, ms.
    pub fsync_ms: Vec<f64>,
}

impl Window {
    /// The report line for this window, `elapsed` being its wall time.
    pub fn line(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mb_s = self.bytes as f64 / MIB as f64 / secs;
        let (p50, max) = match p50_max(&self.fsync_ms) {
            Some((p, m)) => (format!("{p:.3}"), format!("{m:.3}")),
            None => ("-".into(), "-".into()),
        };
        format!(
            "{LINE_PREFIX}{mb_s:.1} fsync_ms p50 {p50} max {max} n {}",
            self.fsync_ms.len()
        )
    }
}

/// The writer: device, block buffer and position.
struct Bench {
    file: File,
    direct: bool,
    buf: Aligned,
    /// Blocks in the region.
    region_blocks: u64,
    fsync_every: u64,
    /// Next block to write (0-based, within the region).
    next: u64,
    /// Blocks written since the last fdatasync.
    unsynced: u64,
    /// Blocks written in all.
    written: u64,
}

impl Bench {
    fn open(a: &Args) -> Result<Bench, String> {
        let path = &a.device;
        let (mut file, direct) = open_direct(path, 0)?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("size of {path}: {e}"))?;
        let block = a.block_kb * KIB;
        let region_blocks = (a.region_mb * MIB).min(size) / block;
        if region_blocks == 0 {
            return Err(format!(
                "{path} ({size} bytes) has no room for one {} KiB block",
                a.block_kb
            ));
        }
        let mut buf = Aligned::new(block as usize);
        fill(buf.as_mut_slice(), random_value());
        Ok(Bench {
            file,
            direct,
            buf,
            region_blocks,
            fsync_every: a.fsync_every,
            next: 0,
            unsynced: 0,
            written: 0,
        })
    }

    fn block_len(&self) -> u64 {
        self.buf.as_slice().len() as u64
    }

    /// Byte offset of the next write.
    fn offset(&self) -> u64 {
        self.next * self.block_len()
    }

    /// Writes the next block (stamped with its sequence number, so no two
    /// writes carry the same data) and, when due, times an fdatasync;
    /// records both in `win`.
    fn step(&mut self, win: &mut Window) -> std::io::Result<()> {
        self.written += 1;
        self.buf.as_mut_slice()[..8].copy_from_slice(&self.written.to_le_bytes());
        self.file.write_all_at(self.buf.as_slice(), self.offset())?;
        win.bytes += self.block_len();
        self.next = (self.next + 1) % self.region_blocks;
        self.unsynced += 1;
        if self.fsync_every > 0 && self.unsynced >= self.fsync_every {
            let t = Instant::now();
            self.file.sync_data()?;
            win.fsync_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            self.unsynced = 0;
        }
        Ok(())
    }
}

/// Fills `buf` with pseudo-random bytes (incompressible, never all zero).
fn fill(buf: &mut [u8], seed: u64) {
    let mut state = seed;
    for chunk in buf.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let v = (z ^ (z >> 31)).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args() {
        assert_eq!(
            parse_args(&s(&["/dev/vda"])),
            Ok(Args {
                device: "/dev/vda".into(),
                block_kb: 256,
                fsync_every: 16,
                region_mb: 256
            })
        );
        let a = parse_args(&s(&[
            "/dev/vdb",
            "--block-kb",
            "64",
            "--fsync-every=0",
            "--region-mb",
            "8",
        ]))
        .unwrap();
        assert_eq!((a.block_kb, a.fsync_every, a.region_mb), (64, 0, 8));
        for bad in [
            &["/dev/vda", "--block-kb", "0"][..],
            &["/dev/vda", "--block-kb", "6"],
            &["/dev/vda", "--block-kb", "131072"],
            &["/dev/vda", "--region-mb", "0"],
            &["/dev/vda", "--bogus", "1"],
            &["/dev/vda", "/dev/vdb"],
            &[],
        ] {
            assert!(parse_args(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn median_and_max() {
        assert_eq!(p50_max(&[]), None);
        assert_eq!(p50_max(&[3.0]), Some((3.0, 3.0)));
        assert_eq!(p50_max(&[4.0, 1.0]), Some((1.0, 4.0)));
        assert_eq!(p50_max(&[5.0, 1.0, 9.0, 2.0, 7.0]), Some((5.0, 9.0)));
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(p50_max(&v), Some((50.0, 100.0)));
    }

    #[test]
    fn report_lines() {
        let w = Window {
            bytes: 96 << 20,
            fsync_ms: vec![2.0, 10.5, 1.25],
        };
        assert_eq!(
            w.line(Duration::from_millis(1500)),
            "diskbench: write MB/s 64.0 fsync_ms p50 2.000 max 10.500 n 3"
        );
        assert_eq!(
            Window::default().line(Duration::from_secs(1)),
            "diskbench: write MB/s 0.0 fsync_ms p50 - max - n 0"
        );
        assert!(w.line(Duration::ZERO).starts_with(LINE_PREFIX));
    }

    #[test]
    fn writes_wrap_and_fsyncs_are_counted_on_a_file() {
        let path = std::env::temp_dir().join(format!("remus-diskbench-{}", std::process::id()));
        // 1 MiB + 100 KiB: the region is cut to the 4 whole 256 KiB blocks.
        std::fs::write(&path, vec![0u8; (1 << 20) + 100 * 1024]).unwrap();
        let a = Args {
            device: path.to_str().unwrap().into(),
            block_kb: 256,
            fsync_every: 3,
            region_mb: 256,
        };
        let mut b = Bench::open(&a).unwrap();
        assert_eq!(b.region_blocks, 4);
        let mut w = Window::default();
        for _ in 0..7 {
            b.step(&mut w).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(w.bytes, 7 * 256 * 1024);
        assert_eq!(w.fsync_ms.len(), 2);
        assert!(w.fsync_ms.iter().all(|&ms| ms >= 0.0));
        assert_eq!((b.next, b.written, b.unsynced), (3, 7, 1));
        // Blocks 0..3 hold writes 5..7 (wrapped), block 3 write 4.
        let seq = |blk: usize| {
            let at = blk * 256 * 1024;
            u64::from_le_bytes(on_disk[at..at + 8].try_into().unwrap())
        };
        assert_eq!([seq(0), seq(1), seq(2), seq(3)], [5, 6, 7, 4]);
        assert!(on_disk[8..256 * 1024].iter().any(|&x| x != 0));
        assert!(on_disk[1 << 20..].iter().all(|&x| x == 0), "beyond region");
        // Too small for one block.
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let e = Bench::open(&a).err().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("no room"), "{e}");
    }
}
