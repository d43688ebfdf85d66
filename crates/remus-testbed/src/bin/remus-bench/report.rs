//! What the reports share: statistics (nearest-rank percentiles), the
//! machine and the date, the pause cases' table as the suite's sections
//! show it, the suite's targets, and appending a run to `results.md` and
//! `results.json`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::opts::Opts;
use crate::pause::{CaseResult, case_json};

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stats {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn stats(samples: &[f64]) -> Stats {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    Stats {
        p50: percentile(&s, 50.0),
        p99: percentile(&s, 99.0),
        max: s.last().copied().unwrap_or(f64::NAN),
        mean: s.iter().sum::<f64>() / s.len().max(1) as f64,
    }
}

impl Stats {
    pub(crate) fn json(&self) -> Value {
        json!({"p50": r3(self.p50), "p99": r3(self.p99), "max": r3(self.max), "mean": r3(self.mean)})
    }
}

pub(crate) fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// Adds the members of `extra` (an object) to `v` (an object).
pub(crate) fn merge_json(v: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), extra) {
        a.extend(b);
    }
}

pub(crate) struct Machine {
    pub(crate) kernel: String,
    pub(crate) nproc: usize,
    pub(crate) cpu: String,
    pub(crate) qemu: String,
    /// The 1/5/15-minute load averages when the run started.
    pub(crate) loadavg: String,
    /// The file system the agents keep guest RAM on.
    pub(crate) ram_fs: String,
}

pub(crate) fn machine(qemu: String) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into()),
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu,
        qemu,
        loadavg: std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "?".into()),
        ram_fs: fs_type(
            &std::fs::read_to_string("/proc/self/mounts").unwrap_or_default(),
            // Where it really is (/dev/shm is a link to /run/shm on some
            // hosts).
            &std::fs::canonicalize(remus_testbed::RAM_DIR_PARENT)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| remus_testbed::RAM_DIR_PARENT.into()),
        ),
    }
}

/// The type of the file system `path` is on, from a mount table in the
/// format of /proc/self/mounts (the longest mount point above it).
fn fs_type(mounts: &str, path: &str) -> String {
    let under = |mount: &str| {
        mount == "/"
            || path == mount
            || path
                .strip_prefix(mount)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mount, kind) = (f.next()?, f.next()?, f.next()?);
            under(mount).then(|| (mount.len(), kind.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
        .unwrap_or_else(|| "?".into())
}

impl Machine {
    /// The report's lines about the machine, QEMU, `accel` and the build.
    pub(crate) fn md(&self, accel: &str, profile: &str) -> String {
        format!(
            "- machine: Linux {}, {} CPUs, {}; load average at start {}\n\
             - QEMU: {}; accel: {accel}; build profile: {profile}; guest RAM on {} ({}, as remusd's default `--ram-dir`)\n",
            self.kernel,
            self.nproc,
            self.cpu,
            self.loadavg,
            self.qemu,
            self.ram_fs,
            remus_testbed::RAM_DIR_PARENT,
        )
    }

    /// The JSON run's `machine`.
    pub(crate) fn json(&self) -> Value {
        json!({"kernel": self.kernel, "nproc": self.nproc, "cpu": self.cpu, "qemu": self.qemu, "loadavg": self.loadavg, "ram_fs": self.ram_fs})
    }
}

/// A machine for the reports' tests.
#[cfg(test)]
pub(crate) fn test_machine() -> Machine {
    Machine {
        kernel: "6".into(),
        nproc: 2,
        cpu: "cpu".into(),
        qemu: "QEMU 10".into(),
        loadavg: "0 0 0".into(),
        ram_fs: "tmpfs".into(),
    }
}

/// UTC date and time as `YYYY-MM-DD HH:MM` (civil-from-days, no crate).
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_string(secs)
}

fn utc_string(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        sod / 3600,
        (sod % 3600) / 60
    )
}

fn write_results(dir: &Path, md: &str, run: Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let md_path = dir.join("results.md");
    let mut text = std::fs::read_to_string(&md_path).unwrap_or_else(|_| {
        "# Checkpoint pause benchmark\n\n\
         Appended by `scripts/bench.sh` (`remus-bench`), newest last. \
         Machine-readable copy: `results.json`.\n\n"
            .to_string()
    });
    if !text.ends_with("\n\n") {
        text.push('\n');
    }
    text.push_str(md);
    std::fs::write(&md_path, text).with_context(|| format!("write {}", md_path.display()))?;
    let json_path = dir.join("results.json");
    let mut doc: Value = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({"runs": []}));
    match doc["runs"].as_array_mut() {
        Some(runs) => runs.push(run),
        None => doc = json!({"runs": [run]}),
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    eprintln!(
        "remus-bench: appended to {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

/// Prints a run's report and, unless `--no-write`, appends it to the
/// results files.
pub(crate) fn emit(o: &Opts, md: &str, run: Value) -> Result<()> {
    print!("{md}");
    if o.write {
        write_results(&o.out, md, run)?;
    }
    Ok(())
}

/// One target of the issue, as measured.
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
    /// When missed: by how much.
    pub(crate) note: String,
}

impl Target {
    /// Met when `value` ≤ `limit`; a miss is said as "by X" with
    /// `decimals` digits and `unit` appended (" ms", "×").
    pub(crate) fn at_most(
        what: String,
        measured: String,
        value: f64,
        limit: f64,
        unit: &str,
        decimals: usize,
    ) -> Target {
        Target::new(
            what,
            measured,
            value <= limit,
            value - limit,
            unit,
            decimals,
        )
    }

    /// Met when `value` ≥ `limit`.
    pub(crate) fn at_least(
        what: String,
        measured: String,
        value: f64,
        limit: f64,
        unit: &str,
        decimals: usize,
    ) -> Target {
        Target::new(
            what,
            measured,
            value >= limit,
            limit - value,
            unit,
            decimals,
        )
    }

    fn new(
        what: String,
        measured: String,
        met: bool,
        short: f64,
        unit: &str,
        decimals: usize,
    ) -> Target {
        Target {
            what,
            measured,
            met,
            note: if met {
                String::new()
            } else {
                // A miss too small for `decimals` is not said as "by 0.0".
                let decimals = if short < 0.5 * 10f64.powi(-(decimals as i32)) {
                    decimals + 2
                } else {
                    decimals
                };
                format!("by {short:.decimals$}{unit}")
            },
        }
    }

    pub(crate) fn json(&self) -> Value {
        json!({"what": self.what, "measured": self.measured, "met": self.met, "note": self.note})
    }
}

pub(crate) fn case_label(c: &CaseResult) -> String {
    let what = if c.disk_boot {
        "Debian 12 from its qcow2 disk, idle".to_string()
    } else {
        c.workload.label()
    };
    let mut s = format!("-i {}, {what}", c.interval_ms);
    if c.memory_mib != 256 {
        s.push_str(&format!(", {} MiB", c.memory_mib));
    }
    if !c.compressed {
        s.push_str(", -u");
    }
    if !c.encrypted {
        s.push_str(", --unencrypted");
    }
    s
}

pub(crate) fn wire_ratio(c: &CaseResult) -> f64 {
    ratio(c.bytes.iter().sum(), c.raw_bytes.iter().sum())
}

const CASE_HEADER: &str = "| case | checkpoints | pause p50 ms | p99 | max | dirty pages p50 | raw KiB/checkpoint p50 | wire KiB p50 | wire/raw | XOR pages % | ack p50 ms | guest MB/s |\n\
                           |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

fn case_row(c: &CaseResult) -> String {
    let p = stats(&c.pause);
    let dirty: f64 = c.dirty.iter().sum();
    let xor: f64 = c.xor_pages.iter().sum();
    format!(
        "| {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.3} | {:.0} | {:.2} | {} |\n",
        case_label(c),
        c.pause.len(),
        p.p50,
        p.p99,
        p.max,
        stats(&c.dirty).p50,
        stats(&c.raw_bytes).p50 / 1024.0,
        stats(&c.bytes).p50 / 1024.0,
        wire_ratio(c),
        if dirty > 0.0 {
            xor * 100.0 / dirty
        } else {
            0.0
        },
        stats(&c.ack).p50,
        c.guest_mb_per_s
            .map(|r| r.to_string())
            .unwrap_or_else(|| "—".into()),
    )
}

/// The case table: [`CASE_HEADER`] and a row per case.
pub(crate) fn case_table(cases: &[CaseResult]) -> String {
    let mut s = String::from(CASE_HEADER);
    for c in cases {
        s.push_str(&case_row(c));
    }
    s
}

/// The cases as a section's JSON: [`case_json`] of each.
pub(crate) fn cases_json(cases: &[CaseResult]) -> Value {
    json!(
        cases
            .iter()
            .map(|c| case_json(cases, c))
            .collect::<Vec<_>>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=150).map(f64::from).collect();
        let s = stats(&v);
        assert_eq!((s.p50, s.p99, s.max), (75.0, 149.0, 150.0));
        let v: Vec<f64> = (1..=75).rev().map(f64::from).collect();
        let s = stats(&v);
        assert_eq!((s.p50, s.p99, s.max, s.mean), (38.0, 75.0, 75.0, 38.0));
        assert_eq!(stats(&[2.5]).p99, 2.5);
    }

    #[test]
    fn the_file_system_of_a_path_is_its_longest_mount_point() {
        let mounts = "/dev/vda / ext4 rw 0 0\n\
                      tmpfs /dev/shm tmpfs rw,nosuid 0 0\n\
                      devtmpfs /dev devtmpfs rw 0 0\n\
                      tmpfs /dev/shmx tmpfs rw 0 0\n";
        assert_eq!(fs_type(mounts, "/dev/shm"), "tmpfs");
        assert_eq!(fs_type(mounts, "/dev/shm/remus-t1"), "tmpfs");
        assert_eq!(fs_type(mounts, "/dev/null"), "devtmpfs");
        assert_eq!(fs_type(mounts, "/tmp"), "ext4");
        assert_eq!(fs_type("", "/tmp"), "?");
    }

    #[test]
    fn dates() {
        assert_eq!(utc_string(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_string(951_782_400 + 3_661), "2000-02-29 01:01 UTC");
        assert_eq!(utc_string(1_795_000_000), "2026-11-18 11:06 UTC");
    }

    #[test]
    fn targets_say_met_or_by_how_much_they_were_missed() {
        let t = |v, l| Target::at_most("w".into(), "m".into(), v, l, " ms", 1);
        assert!(t(4.0, 5.0).met && t(4.0, 5.0).note.is_empty());
        assert!(t(5.0, 5.0).met);
        let miss = t(7.25, 5.0);
        assert!(!miss.met);
        assert_eq!(miss.note, "by 2.2 ms");
        let d = Target::at_least("w".into(), "m".into(), 0.6, 0.7, "×", 2);
        assert!(!d.met);
        assert_eq!(d.note, "by 0.10×");
        assert!(Target::at_least("w".into(), "m".into(), 0.78, 0.7, "×", 2).met);
        assert_eq!(t(9.0, 5.0).json()["met"], false);
        assert_eq!(t(2.903, 2.856).note, "by 0.047 ms", "not \"by 0.0\"");
    }
}
