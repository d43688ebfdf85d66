//! The disk cases, the `disk` section of the suite and the `--disk` run
//! (only them): guest sequential write throughput and fdatasync latency,
//! unprotected versus protected, in one run on one VM. The guest (256 MiB)
//! has a 512 MiB sparse raw disk in a temp dir; the backup agent runs in a
//! mount namespace where another (initially absent) directory is
//! bind-mounted at the same path, so it creates and fills its own copy, as
//! a second host would. The workload is `tick,diskbench:/dev/vda` (256 KiB
//! O_DIRECT writes over 256 MiB, fdatasync every 16 blocks, one `diskbench:
//! write MB/s ...` line a second). Cases: first unprotected, then `remus
//! protect -i I` for each `--intervals` value (protection stopped between
//! them), and at -i 200 once more with `--unencrypted` (what the encrypted
//! link costs this workload); each measures `--seconds` of the guest's own lines after dropping
//! the first [`DISK_WARMUP_LINES`], and the checkpoint events taken
//! meanwhile (pause, `disk_records`, `disk_bytes`). Reported: write MB/s,
//! fsync p50/max, the protected/unprotected throughput ratio against the
//! issue's target (≥ 0.7× at -i 200), pauses and disk bytes per checkpoint.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, DiskHosts, GuestImage, now_ms};
use serde_json::{Value, json};

use crate::harness::{
    Protecting, accel_of, achieved_interval_ms, create_vm, destroy_or_warn, event_col, event_phase,
    logs_of, tail, wait_standby_gone,
};
use crate::opts::Opts;
use crate::report::{Machine, Stats, Target, emit, merge_json, r3, ratio, stats};
use crate::suite::{Ctx, Report};

/// Disk cases: the target, protected write throughput at least
/// this fraction of the unprotected one, at [`DISK_TARGET_INTERVAL_MS`].
const DISK_TARGET_RATIO: f64 = 0.7;
const DISK_TARGET_INTERVAL_MS: u64 = 200;
/// Disk cases: the guest's disk (sparse raw image), and its workload.
const DISK_MIB: u64 = 512;
const DISK_WORKLOAD: &str = "remus.workload=tick,diskbench:/dev/vda";
/// diskbench's defaults, as used here (for the report).
const DISKBENCH_BLOCK_KB: u64 = 256;
const DISKBENCH_FSYNC_EVERY: u64 = 16;
const DISKBENCH_REGION_MB: u64 = 256;
/// Disk cases: once-a-second guest lines dropped at the start of each case.
const DISK_WARMUP_LINES: usize = 2;

/// The `disk` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Ctx {
        o,
        bins,
        profile,
        img,
        m,
        date,
    } = *cx;
    let Report {
        sections,
        runs,
        targets,
        ..
    } = r;
    eprintln!("remus-bench: disk cases ...");
    let run = run_disk(bins, img, o)?;
    sections.push(render_disk_md(date, m, profile, o, &run).replacen("## ", "### Disk: ", 1));
    runs.insert(
        "disk".into(),
        json!(
            run.cases
                .iter()
                .map(|c| disk_case_json(&run, c))
                .collect::<Vec<_>>()
        ),
    );
    if let Some((_, r)) = disk_ratios(&run)
        .into_iter()
        .find(|x| x.0 == DISK_TARGET_INTERVAL_MS)
    {
        targets.push(Target::at_least(
            format!(
                "disk write throughput ≥ {DISK_TARGET_RATIO}× unprotected at -i {DISK_TARGET_INTERVAL_MS}"
            ),
            format!("{r:.2}×"),
            r,
            DISK_TARGET_RATIO,
            "×",
            2,
        ));
    }
    Ok(())
}

pub(crate) fn disk_main(
    o: &Opts,
    bins: &Binaries,
    profile: &str,
    img: &GuestImage,
    m: &Machine,
    date: &str,
) -> Result<()> {
    let run = run_disk(bins, img, o)?;
    let (md, json_run) = disk_report(date, m, profile, o, &run);
    emit(o, &md, json_run)
}

/// The disk run's report: markdown and JSON run.
fn disk_report(date: &str, m: &Machine, profile: &str, o: &Opts, run: &DiskRun) -> (String, Value) {
    let md = render_disk_md(date, m, profile, o, run);
    let target = disk_ratios(run)
        .into_iter()
        .find(|x| x.0 == DISK_TARGET_INTERVAL_MS)
        .map(|(_, r)| json!({"interval_ms": DISK_TARGET_INTERVAL_MS, "ratio": DISK_TARGET_RATIO, "measured": r3(r), "met": r >= DISK_TARGET_RATIO}));
    let json_run = json!({
        "date": date,
        "kind": "disk",
        "machine": m.json(),
        "profile": profile,
        "settings": {
            "seconds": o.seconds, "warmup_lines": DISK_WARMUP_LINES, "timeout_ms": o.timeout_ms,
            "memory_mib": 256, "disk_mib": DISK_MIB, "workload": DISK_WORKLOAD,
            "block_kb": DISKBENCH_BLOCK_KB, "fsync_every": DISKBENCH_FSYNC_EVERY, "region_mb": DISKBENCH_REGION_MB,
        },
        "target": target,
        "cases": run.cases.iter().map(|c| disk_case_json(run, c)).collect::<Vec<_>>(),
    });
    (md, json_run)
}

/// One of the guest's `diskbench: write MB/s X fsync_ms p50 Y max Z n K`
/// lines (Y and Z are `-` when no fdatasync completed in that second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DiskSample {
    pub(crate) mb_s: f64,
    pub(crate) fsync_p50: Option<f64>,
    pub(crate) fsync_max: Option<f64>,
    pub(crate) fsyncs: u64,
}

const DISKBENCH_PREFIX: &str = "diskbench: write MB/s ";

fn parse_disk_line(line: &str) -> Option<DiskSample> {
    let rest = &line[line.rfind(DISKBENCH_PREFIX)? + DISKBENCH_PREFIX.len()..];
    let w: Vec<&str> = rest.split_whitespace().collect();
    let [x, "fsync_ms", "p50", y, "max", z, "n", k, ..] = w.as_slice() else {
        return None;
    };
    Some(DiskSample {
        mb_s: x.parse().ok()?,
        fsync_p50: y.parse().ok(),
        fsync_max: z.parse().ok(),
        fsyncs: k.parse().ok()?,
    })
}

/// The diskbench samples on a console, in order.
pub(crate) fn disk_samples(console: &str) -> Vec<DiskSample> {
    console.lines().filter_map(parse_disk_line).collect()
}

/// What the guest measured over a case's window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DiskSummary {
    /// Per-second write rates (MiB/s): median, min, max, mean.
    mb_s: Stats,
    mb_s_min: f64,
    /// Median of the per-second fsync medians; max of the per-second maxima.
    fsync_p50: f64,
    fsync_max: f64,
    fsyncs: u64,
}

fn summarize_disk(samples: &[DiskSample]) -> DiskSummary {
    let rates: Vec<f64> = samples.iter().map(|s| s.mb_s).collect();
    let p50s: Vec<f64> = samples.iter().filter_map(|s| s.fsync_p50).collect();
    DiskSummary {
        mb_s: stats(&rates),
        mb_s_min: rates.iter().copied().fold(f64::NAN, f64::min),
        fsync_p50: stats(&p50s).p50,
        fsync_max: samples
            .iter()
            .filter_map(|s| s.fsync_max)
            .fold(f64::NAN, f64::max),
        fsyncs: samples.iter().map(|s| s.fsyncs).sum(),
    }
}

/// One disk case: unprotected (`interval_ms` None) or protected.
#[derive(Debug, Clone)]
struct DiskCase {
    interval_ms: Option<u64>,
    /// Protected with `remus protect --unencrypted` (the clear link).
    unencrypted: bool,
    samples: Vec<DiskSample>,
    /// Host wall time of the measured window, ms.
    window_ms: f64,
    /// Checkpoint events taken during the window.
    cps: Vec<Value>,
    initial_sync: Value,
    disk_synced: Value,
}

impl DiskCase {
    fn name(&self) -> String {
        match self.interval_ms {
            None => "unprotected".into(),
            Some(i) if self.unencrypted => format!("protected -i {i} ms, --unencrypted"),
            Some(i) => format!("protected -i {i} ms"),
        }
    }
    fn col(&self, k: &str) -> Vec<f64> {
        event_col(&self.cps, k)
    }
    fn phase(&self, k: &str) -> Vec<f64> {
        event_phase(&self.cps, k)
    }
    /// Disk bytes the checkpoints of the window carried, per second of it
    /// (MiB/s): what replication moved, to set against the guest's rate.
    fn replicated_mb_s(&self) -> f64 {
        let total: f64 = self.col("disk_bytes").iter().sum();
        if self.window_ms > 0.0 && !self.cps.is_empty() {
            total / 1048576.0 / (self.window_ms / 1000.0)
        } else {
            f64::NAN
        }
    }
    /// Share of the window (%) guest writes spent waiting for room in the
    /// primary's disk journal (replication falling behind).
    fn journal_wait_pct(&self) -> f64 {
        let total: f64 = self
            .col("disk_wait_ms")
            .iter()
            .filter(|x| x.is_finite())
            .sum();
        if self.window_ms > 0.0 && !self.cps.is_empty() {
            100.0 * total / self.window_ms
        } else {
            f64::NAN
        }
    }
    fn achieved_interval_ms(&self) -> f64 {
        achieved_interval_ms(&self.cps)
    }
}

struct DiskRun {
    accel: String,
    cases: Vec<DiskCase>,
}

/// Waits until the console holds at least `n` diskbench samples, calling
/// `poll` between looks; the samples.
pub(crate) fn wait_disk_samples(
    primary: &Agent,
    vm: &str,
    n: usize,
    timeout: Duration,
    poll: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<DiskSample>> {
    let deadline = Instant::now() + timeout;
    loop {
        poll()?;
        let s = disk_samples(&primary.console(vm));
        if s.len() >= n {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "{} diskbench lines on {vm}'s console after {timeout:?}, waiting for {n}; last lines:\n{}",
                s.len(),
                tail(&primary.console(vm), 10)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Drops DISK_WARMUP_LINES new lines, then measures `seconds` lines: the
/// samples and the host's window (Unix ms) they cover, approximately.
fn measure_disk(
    primary: &Agent,
    vm: &str,
    seconds: usize,
    poll: &mut dyn FnMut() -> Result<()>,
) -> Result<(Vec<DiskSample>, u64, u64)> {
    let have = disk_samples(&primary.console(vm)).len();
    let slack = |n: usize| Duration::from_secs(60 + 5 * n as u64);
    let base = have + DISK_WARMUP_LINES;
    wait_disk_samples(primary, vm, base, slack(DISK_WARMUP_LINES), poll)?;
    let t0 = now_ms();
    let all = wait_disk_samples(primary, vm, base + seconds, slack(seconds), poll)?;
    let t1 = now_ms();
    Ok((all[base..base + seconds].to_vec(), t0, t1))
}

fn run_disk(bins: &Binaries, img: &GuestImage, o: &Opts) -> Result<DiskRun> {
    // Declared first, dropped last: after the agents.
    let hosts = DiskHosts::new()?;
    let vda = hosts.pdir.path().join("vda.img");
    std::fs::File::create(&vda)
        .and_then(|f| f.set_len(DISK_MIB << 20))
        .with_context(|| format!("create {}", vda.display()))?;
    let peer = hosts.listen.clone();
    let backup = hosts
        .backup_with(bins, &["--allow-unencrypted-peers"])
        .context("start backup agent (in a mount namespace of its own: needs root and unshare)")?;
    let primary = hosts.primary(bins).context("start primary agent")?;
    let vm = "bench-disk";
    let disk_toml = format!("[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n", vda.display());
    let cfg = primary.write_file("vm.toml", &img.config(vm, DISK_WORKLOAD, &disk_toml));
    create_vm(&primary, vm, &cfg)?;
    let logs = logs_of(&primary, &backup, vm);
    wait_disk_samples(&primary, vm, 1, Duration::from_secs(180), &mut || Ok(())).map_err(logs)?;
    let accel = accel_of(&primary, vm);
    let seconds = o.seconds as usize;

    eprintln!("remus-bench: disk, unprotected ...");
    let (samples, t0, t1) = measure_disk(&primary, vm, seconds, &mut || Ok(())).map_err(logs)?;
    let mut cases = vec![DiskCase {
        interval_ms: None,
        unencrypted: false,
        samples,
        window_ms: (t1 - t0) as f64,
        cps: Vec::new(),
        initial_sync: Value::Null,
        disk_synced: Value::Null,
    }];
    report_disk_case(&cases[0], None);

    // The target's interval once more on the clear link, when measured.
    let clear = o
        .intervals
        .contains(&DISK_TARGET_INTERVAL_MS)
        .then_some((DISK_TARGET_INTERVAL_MS, true));
    let runs = o.intervals.iter().map(|&i| (i, false)).chain(clear);
    for (i, unencrypted) in runs {
        let extra: &[&str] = if unencrypted { &["--unencrypted"] } else { &[] };
        eprintln!(
            "remus-bench: disk, protected -i {i} ms{} ...",
            if unencrypted { ", --unencrypted" } else { "" }
        );
        let mut p = Protecting::start(bins, &primary, vm, &peer, i, o, extra)?;
        let measured = p
            .first_checkpoint(Duration::from_secs(300))
            .and_then(|()| measure_disk(&primary, vm, seconds, &mut || p.drain()))
            .and_then(|m| {
                // Checkpoints of the window's end are reported at their ack.
                std::thread::sleep(Duration::from_millis(2 * i + 500));
                p.drain().map(|()| m)
            });
        let (initial_sync, disk_synced) = (p.initial_sync.clone(), p.disk_synced.clone());
        let cps = std::mem::take(&mut p.cps);
        let err = p.stop(&primary, vm);
        let (samples, t0, t1) = measured.map_err(|e| {
            logs(e.context(format!("protected -i {i}: remus protect: {}", err.trim())))
        })?;
        let c = DiskCase {
            interval_ms: Some(i),
            unencrypted,
            samples,
            window_ms: (t1 - t0) as f64,
            cps: cps
                .into_iter()
                .filter(|e| (t0..=t1).contains(&e["taken_at_ms"].as_u64().unwrap_or(0)))
                .collect(),
            initial_sync,
            disk_synced,
        };
        report_disk_case(&c, Some(&cases[0]));
        cases.push(c);
        // The backup drops its standby when protection stops; the next
        // protect needs it gone.
        wait_standby_gone(&backup, vm).map_err(logs)?;
    }
    destroy_or_warn(&primary, vm);
    drop(primary);
    drop(backup);
    Ok(DiskRun { accel, cases })
}

fn report_disk_case(c: &DiskCase, unprotected: Option<&DiskCase>) {
    let d = summarize_disk(&c.samples);
    let mut line = format!(
        "remus-bench:   write {:.1} MB/s (p50 of {} s), fsync p50 {:.2} max {:.2} ms",
        d.mb_s.p50,
        c.samples.len(),
        d.fsync_p50,
        d.fsync_max
    );
    if let Some(u) = unprotected {
        let p = stats(&c.col("pause_ms"));
        line.push_str(&format!(
            ", {:.2}× unprotected; {} checkpoints, pause p50 {:.2} p99 {:.2} ms, disk {:.2} MiB/checkpoint",
            ratio(d.mb_s.p50, summarize_disk(&u.samples).mb_s.p50),
            c.cps.len(),
            p.p50,
            p.p99,
            stats(&c.col("disk_bytes")).p50 / 1048576.0
        ));
    }
    eprintln!("{line}");
}

/// This case's throughput over the unprotected case's (None for that one).
fn case_ratio(run: &DiskRun, c: &DiskCase) -> Option<f64> {
    c.interval_ms?;
    let base = run
        .cases
        .iter()
        .find(|c| c.interval_ms.is_none())
        .map(|c| summarize_disk(&c.samples).mb_s.p50)
        .unwrap_or(f64::NAN);
    Some(ratio(summarize_disk(&c.samples).mb_s.p50, base))
}

/// Protected throughput over unprotected, per protected case on the
/// encrypted link (the default, which the target is about).
fn disk_ratios(run: &DiskRun) -> Vec<(u64, f64)> {
    run.cases
        .iter()
        .filter(|c| !c.unencrypted)
        .filter_map(|c| Some((c.interval_ms?, case_ratio(run, c)?)))
        .collect()
}

fn ratio_verdict(r: f64) -> String {
    if r >= DISK_TARGET_RATIO {
        format!("met ({r:.2}× ≥ {DISK_TARGET_RATIO}×)")
    } else {
        format!("**MISSED** ({r:.2}× < {DISK_TARGET_RATIO}×)")
    }
}

fn render_disk_md(date: &str, m: &Machine, profile: &str, o: &Opts, run: &DiskRun) -> String {
    let mut s = format!(
        "## {date}: disk write throughput, protected vs unprotected\n\n\
         {}\
         - guest: 256 MiB, 1 vCPU, a {DISK_MIB} MiB sparse raw disk (vda, replicated) on the host's /tmp; \
         `{DISK_WORKLOAD}`: sequential {DISKBENCH_BLOCK_KB} KiB O_DIRECT writes over {DISKBENCH_REGION_MB} MiB, \
         fdatasync every {DISKBENCH_FSYNC_EVERY} blocks, one line a second (1 MB = 1 MiB)\n\
         - one VM for the whole run, two agents on this machine (backup on 127.0.0.1, its own image at the same path \
         through a mount namespace); unprotected first, then `remus protect -i I --timeout {} --json` per interval, \
         and at -i {DISK_TARGET_INTERVAL_MS} once more with `--unencrypted` (the clear link: what encryption costs), \
         stopped in between; per case {} s of the guest's lines after {DISK_WARMUP_LINES} warm-up lines. \
         Write MB/s: median (min–max) of the per-second rates; fsync p50: median of the per-second medians, \
         max: the largest; checkpoint columns over the checkpoints taken in the window; replicated MB/s = \
         the window's `disk_bytes` per second; journal wait = share of the window guest writes waited for room \
         in the primary's 64 MiB disk journal\n\
         - target (issue): protected throughput ≥ {DISK_TARGET_RATIO}× unprotected at -i {DISK_TARGET_INTERVAL_MS}\n\n",
        m.md(&run.accel, profile),
        o.timeout_ms,
        o.seconds,
    );
    let ratios = disk_ratios(run);
    s.push_str("| case | write MB/s p50 | min–max | ×unprotected | fsync p50 ms | fsync max ms | fsyncs | checkpoints | pause p50 ms | p99 | disk records/cp p50 | disk MiB/cp p50 | replicated MB/s | journal wait % | ack p50 ms | interval achieved ms |\n");
    s.push_str(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let dash = || "—".to_string();
    for c in &run.cases {
        let d = summarize_disk(&c.samples);
        let r = case_ratio(run, c)
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "1.00".into());
        let cp = |f: &dyn Fn() -> String| if c.interval_ms.is_some() { f() } else { dash() };
        s.push_str(&format!(
            "| {} | {:.1} | {:.1}–{:.1} | {r} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.name(),
            d.mb_s.p50,
            d.mb_s_min,
            d.mb_s.max,
            d.fsync_p50,
            d.fsync_max,
            d.fsyncs,
            cp(&|| c.cps.len().to_string()),
            cp(&|| format!("{:.2}", stats(&c.col("pause_ms")).p50)),
            cp(&|| format!("{:.2}", stats(&c.col("pause_ms")).p99)),
            cp(&|| format!("{:.0}", stats(&c.col("disk_records")).p50)),
            cp(&|| format!("{:.2}", stats(&c.col("disk_bytes")).p50 / 1048576.0)),
            cp(&|| format!("{:.1}", c.replicated_mb_s())),
            cp(&|| format!("{:.1}", c.journal_wait_pct())),
            cp(&|| format!("{:.2}", stats(&c.col("ack_ms")).p50)),
            cp(&|| format!("{:.1}", c.achieved_interval_ms())),
        ));
    }
    let protected: Vec<&DiskCase> = run
        .cases
        .iter()
        .filter(|c| c.interval_ms.is_some())
        .collect();
    if !protected.is_empty() {
        s.push_str("\nPause phases of the protected cases, p50 / p99 (ms):\n\n");
        s.push_str("| case | QMP stop (disk flush) | dirty scan | page copy | device state | QMP cont | dirty pages p50 |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for c in &protected {
            let ph = |k: &str| {
                let st = stats(&c.phase(k));
                format!("{:.2} / {:.2}", st.p50, st.p99)
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {:.0} |\n",
                c.name(),
                ph("stop"),
                ph("scan"),
                ph("copy"),
                ph("devstate"),
                ph("cont"),
                stats(&c.col("dirty_pages")).p50,
            ));
        }
        s.push('\n');
        for c in &protected {
            let ds = &c.disk_synced;
            s.push_str(&format!(
                "- {}: initial disk sync {} of {} chunks differed, {:.1} MiB sent, {:.0} ms; initial RAM sync {} pages in {:.0} ms\n",
                c.name(),
                ds["differing_chunks"].as_u64().unwrap_or(0),
                ds["chunks"].as_u64().unwrap_or(0),
                ds["sent_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                ds["ms"].as_f64().unwrap_or(f64::NAN),
                c.initial_sync["pages"].as_u64().unwrap_or(0),
                c.initial_sync["ms"].as_f64().unwrap_or(f64::NAN),
            ));
        }
    }
    let target = match ratios.iter().find(|x| x.0 == DISK_TARGET_INTERVAL_MS) {
        Some((_, r)) => ratio_verdict(*r),
        None => format!("not measured (no -i {DISK_TARGET_INTERVAL_MS} case)"),
    };
    let others: Vec<String> = ratios
        .iter()
        .filter(|x| x.0 != DISK_TARGET_INTERVAL_MS)
        .map(|(i, r)| format!("at -i {i}: {r:.2}×"))
        .collect();
    s.push_str(&format!(
        "\nTarget: protected ≥ {DISK_TARGET_RATIO}× unprotected throughput at -i {DISK_TARGET_INTERVAL_MS}: {target}{}.\n\n",
        if others.is_empty() {
            String::new()
        } else {
            format!(" (other intervals: {})", others.join(", "))
        }
    ));
    s
}

fn disk_case_json(run: &DiskRun, c: &DiskCase) -> Value {
    let d = summarize_disk(&c.samples);
    let r = case_ratio(run, c).map(r3);
    let mut v = json!({
        "name": c.name(),
        "protected": c.interval_ms.is_some(),
        "interval_ms": c.interval_ms,
        "unencrypted": c.unencrypted,
        "accel": run.accel,
        "seconds": c.samples.len(),
        "window_ms": c.window_ms,
        "write_mb_s": {"p50": r3(d.mb_s.p50), "min": r3(d.mb_s_min), "max": r3(d.mb_s.max), "mean": r3(d.mb_s.mean)},
        "fsync_ms": {"p50": r3(d.fsync_p50), "max": r3(d.fsync_max)},
        "fsyncs": d.fsyncs,
        "vs_unprotected": r,
    });
    if c.interval_ms.is_some() {
        let extra = json!({
            "checkpoints": c.cps.len(),
            "achieved_interval_ms": r3(c.achieved_interval_ms()),
            "pause_ms": stats(&c.col("pause_ms")).json(),
            "pause_phases_ms": {
                "stop": stats(&c.phase("stop")).json(),
                "scan": stats(&c.phase("scan")).json(),
                "copy": stats(&c.phase("copy")).json(),
                "devstate": stats(&c.phase("devstate")).json(),
                "cont": stats(&c.phase("cont")).json(),
            },
            "disk_records": stats(&c.col("disk_records")).json(),
            "disk_bytes": stats(&c.col("disk_bytes")).json(),
            "replicated_mb_s": r3(c.replicated_mb_s()),
            "journal_wait_pct": r3(c.journal_wait_pct()),
            "dirty_pages": stats(&c.col("dirty_pages")).json(),
            "bytes": stats(&c.col("bytes")).json(),
            "ack_ms": stats(&c.col("ack_ms")).json(),
            "initial_sync": c.initial_sync,
            "disk_synced": c.disk_synced,
            "target": {
                "ratio": DISK_TARGET_RATIO,
                "applies": c.interval_ms == Some(DISK_TARGET_INTERVAL_MS),
                "met": r.is_some_and(|r| r >= DISK_TARGET_RATIO),
            },
        });
        merge_json(&mut v, extra);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::test_machine;

    #[test]
    fn disk_lines_and_summary() {
        let console = "tick 5\n\
            diskbench: /dev/vda region 256 MiB block 256 KiB fsync every 16 blocks (O_DIRECT)\n\
            diskbench: write MB/s 120.5 fsync_ms p50 3.250 max 9.000 n 7\r\n\
            tick 6diskbench: write MB/s 80.0 fsync_ms p50 - max - n 0\n\
            diskbench: write MB/s x fsync_ms p50 1 max 1 n 1\n\
            diskbench: write MB/s 100.0 fsync_ms p50 5.000 max 20.000 n 6\n";
        let s = disk_samples(console);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            DiskSample {
                mb_s: 120.5,
                fsync_p50: Some(3.25),
                fsync_max: Some(9.0),
                fsyncs: 7
            }
        );
        assert_eq!(
            (s[1].fsync_p50, s[1].fsync_max, s[1].fsyncs),
            (None, None, 0)
        );
        let d = summarize_disk(&s);
        assert_eq!((d.mb_s.p50, d.mb_s_min, d.mb_s.max), (100.0, 80.0, 120.5));
        assert_eq!((d.fsync_p50, d.fsync_max, d.fsyncs), (3.25, 20.0, 13));
        assert!(ratio_verdict(0.7).starts_with("met"));
        assert!(ratio_verdict(0.42).contains("MISSED** (0.42×"));
    }

    #[test]
    fn disk_report() {
        let sample = |mb_s| DiskSample {
            mb_s,
            fsync_p50: Some(2.0),
            fsync_max: Some(4.0),
            fsyncs: 5,
        };
        let cp = |t: u64| {
            json!({"event": "checkpoint", "taken_at_ms": t, "pause_ms": 8.0, "dirty_pages": 100,
                   "bytes": 500000, "ack_ms": 3.0, "disk_records": 40, "disk_bytes": 8u64 << 20,
                   "phases": {"stop": 2.0, "scan": 0.3, "copy": 0.2, "devstate": 4.0, "cont": 0.5}})
        };
        let case = |interval_ms, mb_s, unencrypted| DiskCase {
            interval_ms,
            unencrypted,
            samples: vec![sample(mb_s); 3],
            window_ms: 1000.0,
            cps: if interval_ms.is_some() {
                vec![cp(1000), cp(1200), cp(1400), cp(1600), cp(1800)]
            } else {
                vec![]
            },
            initial_sync: Value::Null,
            disk_synced: json!({"chunks": 8192, "differing_chunks": 4096, "sent_bytes": 256u64 << 20, "ms": 900.0}),
        };
        let run = DiskRun {
            accel: "tcg".into(),
            cases: vec![
                case(None, 100.0, false),
                case(Some(100), 50.0, false),
                case(Some(200), 80.0, false),
                case(Some(200), 90.0, true),
            ],
        };
        // The clear link's row has its own ratio, never the target's.
        assert_eq!(disk_ratios(&run), vec![(100, 0.5), (200, 0.8)]);
        assert_eq!(case_ratio(&run, &run.cases[3]), Some(0.9));
        assert_eq!(run.cases[2].replicated_mb_s(), 40.0);
        assert_eq!(run.cases[2].achieved_interval_ms(), 200.0);
        let m = test_machine();
        let o = Opts::try_parse_from(["remus-bench", "--disk"]).unwrap();
        assert!(o.disk);
        let md = render_disk_md("2026-01-01 00:00 UTC", &m, "release", &o, &run);
        assert!(
            md.contains("| protected -i 200 ms | 80.0 | 80.0–80.0 | 0.80 |"),
            "{md}"
        );
        assert!(
            md.contains("| protected -i 200 ms, --unencrypted | 90.0 | 90.0–90.0 | 0.90 |"),
            "{md}"
        );
        assert!(
            md.contains("at -i 200: met (0.80× ≥ 0.7×) (other intervals: at -i 100: 0.50×)"),
            "{md}"
        );
        assert!(
            md.contains("4096 of 8192 chunks differed, 256.0 MiB sent"),
            "{md}"
        );
        let j = disk_case_json(&run, &run.cases[1]);
        assert_eq!(j["vs_unprotected"], 0.5);
        assert_eq!(j["target"]["met"], false);
        assert_eq!(j["disk_bytes"]["p50"], (8u64 << 20) as f64);
        assert!(disk_case_json(&run, &run.cases[0])["pause_ms"].is_null());
    }
}
