//! Pacing the bulk transfers (`--max-rate`): the initial copy of a
//! protection session (its disk sync and its copy of RAM) and a
//! migration's pre-copy, so that the checkpoints of other VMs sharing the
//! link keep their pace. Checkpoints themselves, and the guest's disk
//! writes that travel with them, are never paced.
//!
//! [`Pacer`] is a token bucket counted in bytes: it fills at the rate, up
//! to a burst of 100 ms worth, and each write takes its bytes out. A write
//! may take more than the bucket holds; the bucket then goes into debt
//! and the writer waits until it is paid off, so a long transfer averages
//! the rate whatever the sizes of its writes. Writers cut their data into
//! [`Pacer::piece_bytes`] so that no wait is long: the peer's silence
//! timeout keeps counting while a paced writer waits.
//!
//! Hand-written rather than a crate: the well-kept rate limiters
//! (`governor`, `leaky-bucket`) are built for async code or count cells
//! of at most the burst per call, and none takes its clock as an
//! argument; this one is a few lines of arithmetic on an [`Instant`] the
//! caller passes, which is what makes it testable without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How much the bucket holds, in time at the rate.
const BURST: Duration = Duration::from_millis(100);

/// How long a writer's piece takes at the rate (see
/// [`Pacer::piece_bytes`]).
const PIECE: Duration = Duration::from_millis(25);

/// A token bucket of bytes; see the module docs.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Bytes per second.
    rate: f64,
    /// The most the bucket holds, in bytes.
    burst: f64,
    /// What it holds now; below zero while in debt.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl Pacer {
    /// A full bucket at `now`, filling at `rate` bytes per second (at
    /// least one).
    pub fn new(rate: u64, now: Instant) -> Pacer {
        let rate = rate.max(1) as f64;
        let burst = rate * BURST.as_secs_f64();
        Pacer {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// The rate, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// The most to write between two waits: 25 ms at the rate, in whole
    /// pages of `page` bytes, at least one page.
    pub fn piece_bytes(&self, page: usize) -> usize {
        let bytes = (self.rate * PIECE.as_secs_f64()) as usize;
        (bytes / page).max(1) * page
    }

    /// Takes `bytes` (just written, or about to be) out of the bucket at
    /// `now`; returns how long the writer waits before it writes more
    /// (zero while the bucket holds enough).
    pub fn charge(&mut self, bytes: u64, now: Instant) -> Duration {
        // A clock that went backwards (a caller's stale `now`) adds
        // nothing.
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// [`charge`](Self::charge) at the present time, then waits as long as
    /// it says.
    pub fn pace(&mut self, bytes: u64) {
        let wait = self.charge(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// A [`Pacer`] for threads that take turns with it (a protection
/// session's disk sync, then its copy of RAM on the sender): one bucket
/// for the whole initial copy. The wait happens outside the lock.
#[derive(Debug)]
pub struct SharedPacer(Mutex<Pacer>);

impl SharedPacer {
    /// A full bucket, filling at `rate` bytes per second.
    pub fn new(rate: u64) -> SharedPacer {
        SharedPacer(Mutex::new(Pacer::new(rate, Instant::now())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pacer> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See [`Pacer::piece_bytes`].
    pub fn piece_bytes(&self, page: usize) -> usize {
        self.lock().piece_bytes(page)
    }

    /// See [`Pacer::pace`].
    pub fn pace(&self, bytes: u64) {
        let wait = self.lock().charge(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// How a bulk copy's pages are paced: the bucket, and whether to give the
/// copy up (the session is ending), asked between pieces.
#[derive(Clone, Copy)]
pub(crate) struct Paced<'a> {
    pub(crate) pacer: &'a SharedPacer,
    pub(crate) give_up: &'a dyn Fn() -> bool,
}

/// What a disk record costs on the wire, near enough for pacing: the data
/// it writes (a zeroed range travels as its bounds only), its fields and
/// its frame header.
pub(crate) fn record_bytes(r: &remus_proto::DiskRecord) -> u64 {
    let data = match &r.op {
        remus_proto::DiskOp::Write { data, .. } => data.len() as u64,
        _ => 0,
    };
    data + 32 + remus_proto::HEADER_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Within a microsecond (the arithmetic is in f64 seconds).
    fn about(got: Duration, want: Duration) -> bool {
        got.abs_diff(want) <= Duration::from_micros(1)
    }

    #[test]
    fn a_full_bucket_lets_its_burst_through_then_makes_writers_wait() {
        let t0 = Instant::now();
        // 10 MiB/s: the bucket holds 1 MiB (100 ms).
        let mut p = Pacer::new(10 * MIB, t0);
        assert_eq!(p.charge(MIB / 2, t0), Duration::ZERO);
        assert_eq!(p.charge(MIB / 2, t0), Duration::ZERO);
        // Empty now: 1 MiB more at once is 100 ms of debt.
        let w = p.charge(MIB, t0);
        assert!(about(w, ms(100)), "{w:?}");
        // The writer waited exactly that: the debt is paid, nothing more.
        assert!(about(p.charge(0, t0 + ms(100)), Duration::ZERO));
        // And the next write waits for its own bytes only.
        let w = p.charge(MIB / 10, t0 + ms(100));
        assert!(about(w, ms(10)), "{w:?}");
    }

    #[test]
    fn it_refills_at_the_rate_but_never_beyond_the_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10 * MIB, t0);
        assert_eq!(p.charge(MIB, t0), Duration::ZERO);
        // 50 ms later half the bucket is back.
        assert_eq!(p.charge(MIB / 2, t0 + ms(50)), Duration::ZERO);
        let w = p.charge(MIB / 10, t0 + ms(50));
        assert!(about(w, ms(10)), "{w:?}");
        // Idle for ten seconds: still only one burst's worth.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(p.charge(MIB, t1), Duration::ZERO);
        let w = p.charge(MIB, t1);
        assert!(about(w, ms(100)), "{w:?}");
    }

    #[test]
    fn a_long_transfer_in_writes_of_any_size_averages_the_rate() {
        let t0 = Instant::now();
        let rate = 20 * MIB;
        let mut p = Pacer::new(rate, t0);
        // A writer that waits as told: 200 MiB in uneven writes (some
        // larger than the bucket).
        let sizes = [4096u64, 65_536, 3 * MIB, 300_000, MIB];
        let (mut now, mut sent) = (t0, 0u64);
        while sent < 200 * MIB {
            let n = sizes[(sent / 4096) as usize % sizes.len()];
            now += p.charge(n, now);
            sent += n;
        }
        // The bytes beyond the first burst went at the rate (give or
        // take one write).
        let took = now.duration_since(t0).as_secs_f64();
        let least = (sent - rate / 10 - 3 * MIB) as f64 / rate as f64;
        let most = sent as f64 / rate as f64;
        assert!(
            took >= least && took <= most,
            "{took} s not in {least}..{most}"
        );
    }

    #[test]
    fn a_stale_clock_adds_nothing() {
        let t0 = Instant::now();
        let later = t0 + ms(500);
        let mut p = Pacer::new(10 * MIB, t0);
        assert_eq!(p.charge(MIB, later), Duration::ZERO);
        // `now` from before the last charge: no refill, no panic.
        let w = p.charge(MIB / 10, t0);
        assert!(about(w, ms(10)), "{w:?}");
    }

    #[test]
    fn pieces_are_25_ms_of_whole_pages_and_at_least_one() {
        let t0 = Instant::now();
        assert_eq!(Pacer::new(40 * MIB, t0).piece_bytes(4096), MIB as usize);
        // 25 ms at 1 MB/s is 25,000 bytes: six pages.
        assert_eq!(Pacer::new(1_000_000, t0).piece_bytes(4096), 6 * 4096);
        assert_eq!(Pacer::new(1000, t0).piece_bytes(4096), 4096);
        assert_eq!(Pacer::new(10 * MIB, t0).rate(), 10 * MIB);
    }
}
