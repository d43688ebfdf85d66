//! `cpumem [--data-mb 64] [--table-mb 2]`: a CPU and memory workload whose
//! throughput is the measure of guest slowdown under protection.
//!
//! Each operation reads a random 64-byte line of a `--data-mb` array
//! (filled once, then only read), mixes it into a running hash and writes
//! the 8-byte result to a random slot of a `--table-mb` table: mostly
//! computation and cache misses, with a hot written set of `--table-mb`
//! (the pages a checkpoint has to copy). Prints `cpumem: N kops/s` once a
//! second, N being the thousands of operations done in that second.

use std::io::Write;
use std::time::{Duration, Instant};

const LINE: usize = 64;

pub fn run(args: &[String]) -> Result<(), String> {
    let mut data_mb = 64u64;
    let mut table_mb = 2u64;
    crate::options::parse_u64(
        args,
        &mut [("--data-mb", &mut data_mb), ("--table-mb", &mut table_mb)],
    )?;
    if !(1..=4096).contains(&data_mb) || !(1..=4096).contains(&table_mb) {
        return Err("--data-mb and --table-mb must be 1..=4096".into());
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let data: Vec<u64> = (0..(data_mb << 20) as usize / 8).map(|_| next()).collect();
    let mut table = vec![0u64; (table_mb << 20) as usize / 8];
    let lines = data.len() / (LINE / 8);
    let stdout = std::io::stdout();
    let mut hash = 0u64;
    let mut ops = 0u64;
    let mut report_at = Instant::now() + Duration::from_secs(1);
    loop {
        for _ in 0..4096 {
            let r = next();
            let line = (r as usize % lines) * (LINE / 8);
            for w in &data[line..line + LINE / 8] {
                hash = (hash ^ w)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .rotate_left(29);
            }
            let slot = (r >> 32) as usize % table.len();
            table[slot] = hash;
        }
        ops += 4096;
        let now = Instant::now();
        if now >= report_at {
            std::hint::black_box(&table);
            let mut out = stdout.lock();
            writeln!(out, "cpumem: {} kops/s", ops / 1000)
                .and_then(|()| out.flush())
                .map_err(|e| format!("write stdout: {e}"))?;
            ops = 0;
            report_at += Duration::from_secs(1);
            while report_at <= now {
                report_at += Duration::from_secs(1);
            }
        }
    }
}
