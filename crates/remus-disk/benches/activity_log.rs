//! What the primary's activity log costs guest writes: `cargo bench -p
//! remus-disk --bench activity_log`.
//!
//! A [`DiskPort`] in journal mode over a file on this machine's disk (the
//! journal drained by a thread, as the sender does; an epoch cut and
//! acknowledged every 100 ms, as checkpoints do), written with and
//! without an activity log, in the same run:
//!
//! - sequential 256 KiB writes over 4 GiB (each 4 MiB extent is new once;
//!   1024 extents fit the default limit of 1237);
//! - random 4 KiB writes over 4 GiB (1024 extents: all fit the default
//!   limit of 1237, so each pays its sync once);
//! - random 4 KiB writes over 16 GiB with the default limit (1237 extents
//!   kept, 4096 touched: extents keep being cleared and marked again, the
//!   worst case), and with a limit of 4096 (all kept).
//!
//! Each case runs twice, alternating with and without, after a sync(2),
//! and the faster of each pair is kept. Writes are buffered (no FUA), so the syncs the log adds are measured
//! against the cheapest writes there are: the ratio is an upper bound of
//! its cost for a guest whose writes reach the disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use remus_disk::activity::{ActivityLog, DEFAULT_LIMIT};
use remus_disk::{DiskPort, Journal};
use remus_nbd::{BlockBackend, FileBackend};

use remus_proto::Epoch;

const GIB: u64 = 1 << 30;

struct Case {
    disk: u64,
    block: usize,
    random: bool,
    limit: Option<usize>,
}

/// Cheap deterministic pseudo-random numbers (xorshift).
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn run(dir: &std::path::Path, c: &Case, seconds: f64) -> (f64, u64, u64) {
    let img = dir.join("img");
    let _ = std::fs::remove_file(&img);
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(c.disk))
        .expect("image");
    let backend = Arc::new(FileBackend::open(&img, false).expect("open image"));
    let port = Arc::new(DiskPort::new("vda", backend));
    let bell = Arc::new(remus_disk::Doorbell::new());
    let journal = Arc::new(Journal::new(Epoch(1), 64 << 20, bell.clone()));
    port.journal_to(journal.clone(), 0);
    let al = c.limit.map(|limit| {
        let p = dir.join("al");
        let _ = std::fs::remove_file(&p);
        Arc::new(ActivityLog::open(&p, c.disk, limit).expect("activity log"))
    });
    port.set_activity_log(al.clone());
    let done = Arc::new(AtomicBool::new(false));
    // The sender: takes what the guest writes.
    let drain = {
        let (j, d, bell) = (journal.clone(), done.clone(), bell.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                let seen = bell.rings();
                drop(j.take());
                bell.wait(seen, Duration::from_millis(10));
            }
        })
    };
    // The checkpoints: cut an epoch every 100 ms, acknowledge the one
    // before.
    let ticker = {
        let (j, d, al) = (journal.clone(), done.clone(), al.clone());
        std::thread::spawn(move || {
            let mut e = 1;
            while !d.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                j.cut(Epoch(e)).expect("cut");
                if let Some(al) = &al {
                    al.acked(Epoch(e - 1)).expect("ack");
                }
                e += 1;
            }
        })
    };
    // Earlier runs' dirty pages are written back before this one starts.
    // SAFETY: sync(2) has no memory effects.
    unsafe { libc::sync() };
    let buf = vec![0x5au8; c.block];
    let blocks = c.disk / c.block as u64;
    let mut seed = 0x9e3779b97f4a7c15u64;
    let t = Instant::now();
    let mut written = 0u64;
    let mut i = 0u64;
    while t.elapsed().as_secs_f64() < seconds && (c.random || i < blocks) {
        let b = if c.random {
            next(&mut seed) % blocks
        } else {
            i
        };
        port.write_at(&buf, b * c.block as u64, false)
            .expect("write");
        written += c.block as u64;
        i += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    journal.close();
    let _ = drain.join();
    let _ = ticker.join();
    let (syncs, marked) = al.map(|a| (a.syncs(), a.count())).unwrap_or((0, 0));
    let _ = std::fs::remove_file(&img);
    (written as f64 / secs / 1e6, syncs, marked)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let seconds: f64 = std::env::var("AL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let cases = [
        (
            "sequential 256 KiB over 4 GiB",
            4 * GIB,
            256 << 10,
            false,
            DEFAULT_LIMIT,
        ),
        (
            "random 4 KiB over 4 GiB",
            4 * GIB,
            4096,
            true,
            DEFAULT_LIMIT,
        ),
        (
            "random 4 KiB over 16 GiB",
            16 * GIB,
            4096,
            true,
            DEFAULT_LIMIT,
        ),
        ("random 4 KiB over 16 GiB", 16 * GIB, 4096, true, 4096),
    ];
    println!(
        "| workload | activity log | MB/s without | MB/s with | ratio | syncs | extents marked at the end |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (name, disk, block, random, limit) in cases {
        // Each twice, alternating, the faster run kept: the page cache's
        // writeback makes single runs noisy.
        let case = |limit| Case {
            disk,
            block,
            random,
            limit,
        };
        let best = |a: (f64, u64, u64), b: (f64, u64, u64)| if b.0 > a.0 { b } else { a };
        let mut without = run(dir.path(), &case(None), seconds);
        let mut with = run(dir.path(), &case(Some(limit)), seconds);
        without = best(without, run(dir.path(), &case(None), seconds));
        with = best(with, run(dir.path(), &case(Some(limit)), seconds));
        println!(
            "| {name} | limit {limit} | {:.1} | {:.1} | {:.2}× | {} | {} |",
            without.0,
            with.0,
            with.0 / without.0,
            with.1,
            with.2
        );
    }
}
