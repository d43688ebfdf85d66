//! `dirty [--mb-per-s 50] [--working-set-mb 64] [--write-bytes 1]`: dirty
//! memory at a steady rate, for checkpoint benchmarks.
//!
//! Allocates the working set (touching every page once so it is resident),
//! then every [`STEP`] writes one byte into each of the next pages in a
//! rotating order through the working set, so that about `--mb-per-s` MiB
//! of *distinct* 4 KiB pages are dirtied per second (as long as the working
//! set holds more than a second's worth; otherwise a page is dirtied again
//! before the rotation comes back to it). Prints `dirty: N MB/s` once a
//! second, N being what was actually dirtied in that second (1 MB = 1 MiB).
//!
//! Pacing is against an absolute schedule from the start (pages due =
//! elapsed × rate), so rounding does not drift. If the process falls far
//! behind (the VM was paused, the vCPU starved), the backlog beyond
//! [`MAX_BACKLOG`] is dropped instead of being written in one burst.
//!
//! `--write-bytes N` sets how much of each page a visit changes: N bytes of
//! pseudo-random data at a rotating offset (default 1: one byte, the best
//! case for checkpoint compression; 4096: the whole page, the worst).

use std::io::Write;
use std::time::{Duration, Instant};

pub const PAGE: usize = 4096;
const MIB: u64 = 1 << 20;
/// Pacing step.
pub const STEP: Duration = Duration::from_millis(10);
/// The most the pacer catches up in one step after falling behind.
pub const MAX_BACKLOG: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq)]
struct Args {
    mb_per_s: u64,
    working_set_mb: u64,
    write_bytes: u64,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let a = parse_args(args)?;
    let pages = (a.working_set_mb * MIB) as usize / PAGE;
    let mut ws = vec![0u8; pages * PAGE];
    // Make the working set resident up front: afterwards each write
    // dirties an existing page rather than faulting in a fresh one.
    for p in 0..pages {
        touch(&mut ws, p);
    }
    let mut pacer = Pacer::new(pages_per_sec(a.mb_per_s));
    let stdout = std::io::stdout();
    let start = Instant::now();
    let mut cursor = 0usize;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut visit = 0usize;
    let mut next = start;
    let mut report_at = start + Duration::from_secs(1);
    let mut since_report = 0u64;
    loop {
        let now = Instant::now();
        let n = pacer.due(now - start);
        for _ in 0..n {
            if a.write_bytes <= 1 {
                touch(&mut ws, cursor);
            } else {
                scribble(&mut ws, cursor, a.write_bytes as usize, visit, &mut rng);
            }
            cursor = (cursor + 1) % pages;
            visit = visit.wrapping_add(1);
        }
        since_report += n;
        if now >= report_at {
            let mut out = stdout.lock();
            writeln!(out, "dirty: {} MB/s", mb_of_pages(since_report))
                .and_then(|()| out.flush())
                .map_err(|e| format!("write stdout: {e}"))?;
            since_report = 0;
            report_at += Duration::from_secs(1);
            while report_at <= now {
                report_at += Duration::from_secs(1);
            }
        }
        next += STEP;
        let now = Instant::now();
        while next <= now {
            next += STEP;
        }
        std::thread::sleep(next - now);
    }
}

/// Writes one byte into page `p` (a changing value, volatile so the write
/// is really done).
fn touch(ws: &mut [u8], p: usize) {
    let b = &mut ws[p * PAGE];
    // SAFETY: `b` is a valid, exclusive reference to a byte.
    unsafe { std::ptr::write_volatile(b, b.wrapping_add(1)) };
}

/// Overwrites `len` bytes of page `p` with xorshift output, starting at an
/// offset that moves with each visit (wrapping within the page).
fn scribble(ws: &mut [u8], p: usize, len: usize, visit: usize, rng: &mut u64) {
    let page = &mut ws[p * PAGE..(p + 1) * PAGE];
    let start = (visit * 64) % PAGE;
    for i in 0..len.min(PAGE) {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        page[(start + i) % PAGE] = *rng as u8;
    }
    std::hint::black_box(&page[start]);
}

/// 4 KiB pages per second for a rate in MiB/s.
pub fn pages_per_sec(mb_per_s: u64) -> u64 {
    mb_per_s * MIB / PAGE as u64
}

/// Whole MiB (rounded) in `pages` 4 KiB pages.
pub fn mb_of_pages(pages: u64) -> u64 {
    (pages * PAGE as u64 + MIB / 2) / MIB
}

/// Pages due by `elapsed` at `pps` pages per second (floor).
pub fn pages_due(elapsed: Duration, pps: u64) -> u64 {
    (elapsed.as_nanos() * pps as u128 / 1_000_000_000) as u64
}

/// Counts pages against an absolute schedule.
#[derive(Debug)]
pub struct Pacer {
    pps: u64,
    /// Pages written, plus pages skipped after falling behind.
    done: u64,
}

impl Pacer {
    pub fn new(pps: u64) -> Pacer {
        Pacer { pps, done: 0 }
    }

    /// How many pages to write now, `elapsed` after the start. More than
    /// [`MAX_BACKLOG`]'s worth of backlog is skipped, not written.
    pub fn due(&mut self, elapsed: Duration) -> u64 {
        let target = pages_due(elapsed, self.pps);
        let cap = pages_due(MAX_BACKLOG, self.pps).max(1);
        let n = target.saturating_sub(self.done).min(cap);
        // Everything up to `target` counts as done: written now or skipped.
        self.done = self.done.max(target);
        n
    }
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        mb_per_s: 50,
        working_set_mb: 64,
        write_bytes: 1,
    };
    crate::options::parse_u64(
        args,
        &mut [
            ("--mb-per-s", &mut a.mb_per_s),
            ("--working-set-mb", &mut a.working_set_mb),
            ("--write-bytes", &mut a.write_bytes),
        ],
    )?;
    if !(1..=PAGE as u64).contains(&a.write_bytes) {
        return Err(format!("--write-bytes must be 1..={PAGE}"));
    }
    if a.working_set_mb == 0 {
        return Err("--working-set-mb must be > 0".into());
    }
    if a.working_set_mb > 1 << 20 || a.mb_per_s > 1 << 20 {
        return Err("--working-set-mb and --mb-per-s must be at most 1048576".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args() {
        let d = Args {
            mb_per_s: 50,
            working_set_mb: 64,
            write_bytes: 1,
        };
        assert_eq!(parse_args(&s(&[])), Ok(d));
        assert_eq!(
            parse_args(&s(&["--mb-per-s", "20", "--working-set-mb=8"])),
            Ok(Args {
                mb_per_s: 20,
                working_set_mb: 8,
                write_bytes: 1,
            })
        );
        assert_eq!(
            parse_args(&s(&["--write-bytes", "4096"])).map(|a| a.write_bytes),
            Ok(4096)
        );
        assert!(parse_args(&s(&["--write-bytes", "0"])).is_err());
        assert!(parse_args(&s(&["--write-bytes", "4097"])).is_err());
        assert_eq!(
            parse_args(&s(&["--mb-per-s", "0"])).map(|a| a.mb_per_s),
            Ok(0)
        );
        assert!(parse_args(&s(&["--working-set-mb", "0"])).is_err());
        assert!(parse_args(&s(&["--mb-per-s"])).is_err());
        assert!(parse_args(&s(&["--mb-per-s", "x"])).is_err());
        assert!(parse_args(&s(&["x", "1"])).is_err());
    }

    #[test]
    fn rate_arithmetic() {
        // 50 MiB/s = 12,800 pages/s: 1,280 per 100 ms epoch, 128 per step.
        assert_eq!(pages_per_sec(50), 12_800);
        assert_eq!(pages_due(Duration::from_millis(100), 12_800), 1_280);
        assert_eq!(pages_due(STEP, 12_800), 128);
        assert_eq!(pages_due(Duration::from_secs(1), 12_800), 12_800);
        assert_eq!(pages_due(Duration::ZERO, 12_800), 0);
        // Floors: 1 page/s is due only after a whole second.
        assert_eq!(pages_due(Duration::from_millis(999), 1), 0);
        assert_eq!(pages_due(Duration::from_millis(1000), 1), 1);
        assert_eq!(mb_of_pages(12_800), 50);
        assert_eq!(mb_of_pages(12_700), 50);
        assert_eq!(mb_of_pages(0), 0);
    }

    #[test]
    fn pacer_keeps_the_rate_without_drift() {
        // Steps of 10 ms with an odd rate: the total after 1 s is exact.
        let mut p = Pacer::new(pages_per_sec(3) + 7); // 775 pages/s
        let mut total = 0;
        for i in 1..=100 {
            let n = p.due(STEP * i);
            assert!((7..=8).contains(&n), "step {i}: {n}");
            total += n;
        }
        assert_eq!(total, 775);
    }

    #[test]
    fn pacer_drops_a_long_backlog() {
        let mut p = Pacer::new(12_800);
        assert_eq!(p.due(Duration::from_millis(10)), 128);
        // 2 s late (the VM was paused): catch up at most 100 ms' worth...
        assert_eq!(p.due(Duration::from_millis(2010)), 1_280);
        // ...and carry on from the schedule, not from the backlog.
        assert_eq!(p.due(Duration::from_millis(2020)), 128);
        // A short lag is fully caught up.
        assert_eq!(p.due(Duration::from_millis(2050)), 384);
        // Zero rate: nothing, ever.
        let mut z = Pacer::new(0);
        assert_eq!(z.due(Duration::from_secs(5)), 0);
    }
}
