//! The checkpoint pause cases. For each case (interval × workload) it
//! starts a backup and a primary agent on this machine, boots one guest
//! (256 MiB) with the workload, protects it with `remus protect --json`
//! for a fixed number of checkpoints, and records pause, dirty pages, bytes
//! sent and ack time per checkpoint. One VM at a time. A run without
//! `--suite`, `--disk` or `--net` measures an idle and a dirtying guest at
//! each `--intervals` value ([`pause_main`]); the suite's matrix, wire,
//! ram, boot and crypto sections run their cases through [`run_case`].

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, DiskHosts, GuestImage, last_tick};
use serde_json::{Value, json};

use crate::harness::{
    accel_of, achieved_interval_ms, console_numbers, create_vm, destroy_or_warn, event_col,
    event_phase, spawn_protect, tail,
};
use crate::opts::Opts;
use crate::report::{Machine, Stats, emit, r3, ratio, stats};

/// Targets from the issue: at about 1,500 dirty pages per epoch.
pub(crate) const TARGET_P50_MS: f64 = 5.0;
const TARGET_P99_MS: f64 = 15.0;
pub(crate) const TARGET_DIRTY_PAGES: u64 = 1_500;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Workload {
    Idle,
    /// `dirty` at N MiB/s, changing M bytes of each page it visits.
    Dirty(u64, u64),
    /// `cpumem` holding N MiB of data (the initial copy's throughput).
    Fill(u64),
}

impl Workload {
    pub(crate) fn label(&self) -> String {
        match self {
            Workload::Idle => "idle".into(),
            Workload::Dirty(mb, 1) => format!("dirty {mb} MB/s"),
            Workload::Dirty(mb, b) => format!("dirty {mb} MB/s ({b} B/page)"),
            Workload::Fill(mb) => format!("{mb} MiB of data"),
        }
    }
    pub(crate) fn cmdline(&self) -> String {
        match self {
            Workload::Idle => "remus.workload=tick".into(),
            Workload::Dirty(mb, b) => {
                format!("remus.workload=tick,dirty:--mb-per-s:{mb}:--write-bytes:{b}")
            }
            Workload::Fill(mb) => format!("remus.workload=tick,cpumem:--data-mb:{mb}"),
        }
    }
}

/// What one pause case runs: interval, guest workload and memory, and
/// extra `remus protect` arguments (e.g. `-u`).
#[derive(Debug, Clone)]
pub(crate) struct CaseSpec {
    pub(crate) interval_ms: u64,
    pub(crate) workload: Workload,
    pub(crate) memory_mib: u64,
    pub(crate) protect_args: Vec<String>,
    /// Boot this qcow2 image (a real distribution, through the firmware)
    /// from an overlay instead of the kernel+initramfs guest; the workload
    /// is then the distribution idling with its seqserver service.
    pub(crate) disk_boot: Option<PathBuf>,
}

impl CaseSpec {
    pub(crate) fn new(interval_ms: u64, workload: Workload) -> CaseSpec {
        CaseSpec {
            interval_ms,
            workload,
            memory_mib: 256,
            protect_args: Vec::new(),
            disk_boot: None,
        }
    }
    pub(crate) fn compressed(&self) -> bool {
        !self.protect_args.iter().any(|a| a == "-u")
    }
    pub(crate) fn encrypted(&self) -> bool {
        !self.protect_args.iter().any(|a| a == "--unencrypted")
    }
}

/// One case's measurements.
#[derive(Debug, Clone)]
pub(crate) struct CaseResult {
    pub(crate) interval_ms: u64,
    /// Booted a distribution from its disk (see [`CaseSpec::disk_boot`]).
    pub(crate) disk_boot: bool,
    pub(crate) workload: Workload,
    pub(crate) memory_mib: u64,
    pub(crate) compressed: bool,
    /// Over the encrypted link (else `--unencrypted`).
    pub(crate) encrypted: bool,
    pub(crate) pause: Vec<f64>,
    pub(crate) dirty: Vec<f64>,
    pub(crate) bytes: Vec<f64>,
    /// Bytes before compression (pages × 4096 + device state).
    pub(crate) raw_bytes: Vec<f64>,
    pub(crate) xor_pages: Vec<f64>,
    pub(crate) ack: Vec<f64>,
    /// Pause phases (ms): QMP stop, dirty scan, page copy, device state
    /// save, QMP cont.
    pub(crate) ph_stop: Vec<f64>,
    pub(crate) ph_scan: Vec<f64>,
    pub(crate) ph_copy: Vec<f64>,
    pub(crate) ph_devstate: Vec<f64>,
    pub(crate) ph_cont: Vec<f64>,
    /// Mean time between the measured checkpoints, ms.
    pub(crate) achieved_interval_ms: f64,
    pub(crate) initial_sync: Value,
    /// Median of the guest's own `dirty: N MB/s` lines while measured.
    pub(crate) guest_mb_per_s: Option<u64>,
    pub(crate) accel: String,
}

/// The `dirty: N MB/s` numbers on a console.
pub(crate) fn dirty_rates(console: &str) -> Vec<u64> {
    console_numbers(console, "dirty: ")
}

pub(crate) fn run_case(
    bins: &Binaries,
    img: &GuestImage,
    o: &Opts,
    spec: &CaseSpec,
) -> Result<CaseResult> {
    let (interval_ms, workload) = (spec.interval_ms, spec.workload);
    let hosts = DiskHosts::new()?;
    let key_s = hosts.key.to_str().context("key path")?;
    let peer = hosts.listen.clone();
    let backup = match &spec.disk_boot {
        // A disk-booted VM: the backup sees a directory of its own at the
        // primary's image directory (as a second host would).
        Some(_) => hosts.backup(bins),
        // A case in the clear needs a backup that allows it.
        None if !spec.encrypted() => Agent::start(
            bins,
            None,
            &[
                "--listen",
                &peer,
                "--key",
                key_s,
                "--allow-unencrypted-peers",
            ],
        ),
        None => Agent::start(bins, None, &["--listen", &peer, "--key", key_s]),
    }
    .context("start backup agent")?;
    let primary = hosts.primary(bins).context("start primary agent")?;
    let vm = format!(
        "bench-i{interval_ms}-{}",
        match (workload, &spec.disk_boot) {
            (_, Some(_)) => "disk",
            (Workload::Idle, None) => "idle",
            (Workload::Dirty(..), None) => "dirty",
            (Workload::Fill(_), None) => "fill",
        }
    );
    let cfg = match &spec.disk_boot {
        Some(base) => {
            let overlay = hosts.pdir.path().join("vda.qcow2");
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(base)
                .arg(&overlay)
                .output()
                .context("qemu-img")?;
            if !out.status.success() {
                bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
            }
            GuestImage::disk_boot_config(&vm, &overlay, "qcow2", "")
        }
        None => img.config(&vm, &workload.cmdline(), ""),
    }
    .replace("memory = 256", &format!("memory = {}", spec.memory_mib));
    let cfg = primary.write_file("vm.toml", &cfg);
    create_vm(&primary, &vm, &cfg)?;
    let boot = Duration::from_secs(300);
    match (workload, &spec.disk_boot) {
        (_, Some(_)) => primary.wait_console(&vm, boot, "the seqserver service", |c| {
            c.contains("seqserver: listening")
        })?,
        (Workload::Idle, None) => {
            primary.wait_console(&vm, boot, "tick 3", |c| last_tick(c) >= Some(3))?
        }
        (Workload::Dirty(..), None) => {
            primary.wait_console(&vm, boot, "a 'dirty:' line", |c| !dirty_rates(c).is_empty())?
        }
        (Workload::Fill(_), None) => {
            primary.wait_console(&vm, boot, "the data filled", |c| c.contains("cpumem:"))?
        }
    };
    let accel = accel_of(&primary, &vm);
    let rates_before = dirty_rates(&primary.console(&vm)).len();

    let measured = (o.seconds * 1000 / interval_ms).max(1) as usize;
    let wanted = o.warmup + measured;
    let (mut follow, rx, reader) = spawn_protect(
        bins,
        &primary,
        &vm,
        &peer,
        interval_ms,
        o,
        &spec.protect_args,
    )?;
    let collected = (|| -> Result<(Value, Vec<Value>)> {
        let mut initial = Value::Null;
        let mut cps = Vec::new();
        let quiet = Duration::from_secs(30).max(Duration::from_millis(20 * interval_ms));
        let deadline = Instant::now()
            + Duration::from_millis(wanted as u64 * interval_ms * 5)
            + Duration::from_secs(120);
        while cps.len() < wanted {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {wanted} checkpoints before the deadline",
                    cps.len()
                );
            }
            let line = match rx.recv_timeout(quiet) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "no event from remus protect for {quiet:?} ({} checkpoints so far)",
                        cps.len()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("remus protect ended after {} checkpoints", cps.len())
                }
            };
            let ev: Value = serde_json::from_str(&line)
                .with_context(|| format!("remus protect printed a non-JSON line: {line}"))?;
            match ev["event"].as_str() {
                Some("initial_sync") => initial = ev,
                Some("checkpoint") => cps.push(ev),
                Some("backup_lost") | Some("failed") => bail!("protection ended: {ev}"),
                _ => {}
            }
        }
        Ok((initial, cps))
    })();
    let console = primary.console(&vm);
    let stop = primary.cli(&["protect", "--stop", &vm]);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) && matches!(follow.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(follow.try_wait(), Ok(None)) {
        let _ = follow.kill();
    }
    let status = follow.wait();
    drop(rx);
    let _ = reader.join();
    let (initial_sync, cps) = match collected {
        Ok(c) => c,
        Err(e) => {
            let mut err_text = String::new();
            if let Some(mut se) = follow.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut se, &mut err_text);
            }
            bail!(
                "{vm}: {e:#}\nremus protect ({status:?}): {}\nprimary log (tail):\n{}\nbackup log (tail):\n{}",
                err_text.trim(),
                tail(&primary.log_text(), 15),
                tail(&backup.log_text(), 15)
            );
        }
    };
    if !stop.ok {
        eprintln!(
            "remus-bench: warning: protect --stop {vm}: {}",
            stop.stderr.trim()
        );
    }
    destroy_or_warn(&primary, &vm);
    drop(primary);
    drop(backup);

    let cps = &cps[o.warmup.min(cps.len().saturating_sub(1))..];
    let col = |k: &str| event_col(cps, k);
    let phase = |k: &str| event_phase(cps, k);
    let achieved_interval_ms = achieved_interval_ms(cps);
    let mut rates: Vec<u64> = dirty_rates(&console)
        .into_iter()
        .skip(rates_before)
        .collect();
    rates.sort_unstable();
    Ok(CaseResult {
        interval_ms,
        disk_boot: spec.disk_boot.is_some(),
        workload,
        memory_mib: spec.memory_mib,
        compressed: spec.compressed(),
        encrypted: spec.encrypted(),
        pause: col("pause_ms"),
        dirty: col("dirty_pages"),
        bytes: col("bytes"),
        raw_bytes: col("raw_bytes"),
        xor_pages: col("xor_pages"),
        ack: col("ack_ms"),
        ph_stop: phase("stop"),
        ph_scan: phase("scan"),
        ph_copy: phase("copy"),
        ph_devstate: phase("devstate"),
        ph_cont: phase("cont"),
        achieved_interval_ms,
        initial_sync,
        guest_mb_per_s: rates.get(rates.len() / 2).copied(),
        accel,
    })
}

/// How a value compares with a target ("met" or "MISSED by ...").
fn verdict(value: f64, target: f64) -> String {
    if value <= target {
        format!("met ({value:.2} ms ≤ {target} ms)")
    } else {
        format!(
            "**MISSED** by {:.2} ms ({value:.2} ms, {:.1}× the {target} ms target)",
            value - target,
            value / target
        )
    }
}

/// The idle case at the same interval, if measured.
fn idle_of<'a>(all: &'a [CaseResult], c: &CaseResult) -> Option<&'a CaseResult> {
    all.iter()
        .find(|b| b.interval_ms == c.interval_ms && b.workload == Workload::Idle)
}

fn case_name(c: &CaseResult) -> String {
    format!("-i {} ms, {}", c.interval_ms, c.workload.label())
}

fn render_md(date: &str, m: &Machine, profile: &str, o: &Opts, all: &[CaseResult]) -> String {
    let accel: Vec<String> = {
        let mut v: Vec<String> = all.iter().map(|c| c.accel.clone()).collect();
        v.dedup();
        v
    };
    let mut s = format!(
        "## {date}\n\n\
         {}\
         - guest: 256 MiB, 1 vCPU; idle = `remus.workload=tick`, dirty = `tick,dirty:--mb-per-s:{}` (64 MiB working set, 1 MB = 1 MiB)\n\
         - per case: two agents on this machine (backup on 127.0.0.1), one VM, `remus protect -i I --timeout {} --json`; \
         {} s of checkpoints measured after {} warm-up checkpoints; percentiles are nearest-rank \
         (with fewer than 100 samples p99 is the maximum)\n\
         - targets (issue): pause p50 ≤ {TARGET_P50_MS} ms and p99 ≤ {TARGET_P99_MS} ms at about {TARGET_DIRTY_PAGES} dirty pages per epoch; \
         ×idle = this case's pause over the idle case's at the same interval\n\n",
        m.md(&accel.join(", "), profile),
        o.mb_per_s,
        o.timeout_ms,
        o.seconds,
        o.warmup,
    );
    s.push_str("| case | checkpoints | pause p50 ms | p99 | max | ×idle p50 / p99 | dirty pages p50 | ack p50 ms | interval achieved ms | guest MB/s |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in all {
        let p = stats(&c.pause);
        let (r50, r99) = idle_of(all, c)
            .map(|b| {
                let bp = stats(&b.pause);
                (ratio(p.p50, bp.p50), ratio(p.p99, bp.p99))
            })
            .unwrap_or((f64::NAN, f64::NAN));
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.0} | {:.2} | {:.1} | {} |\n",
            case_name(c),
            c.pause.len(),
            p.p50,
            p.p99,
            p.max,
            r50,
            r99,
            stats(&c.dirty).p50,
            stats(&c.ack).p50,
            c.achieved_interval_ms,
            c.guest_mb_per_s
                .map(|r| r.to_string())
                .unwrap_or_else(|| "—".into()),
        ));
    }
    s.push('\n');
    for c in all {
        s.push_str(&format!("### {}\n\n", case_name(c)));
        s.push_str("| metric | p50 | p99 | max | mean | ×idle p50 | ×idle p99 | ×idle max |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
        let idle = idle_of(all, c);
        type Column = fn(&CaseResult) -> &Vec<f64>;
        let rows: [(&str, Column); 10] = [
            ("pause (ms)", |x| &x.pause),
            ("… QMP stop (ms)", |x| &x.ph_stop),
            ("… dirty scan (ms)", |x| &x.ph_scan),
            ("… page copy (ms)", |x| &x.ph_copy),
            ("… device state, from the stop (ms)", |x| &x.ph_devstate),
            ("… QMP cont (ms)", |x| &x.ph_cont),
            ("dirty pages", |x| &x.dirty),
            ("bytes sent", |x| &x.bytes),
            ("… uncompressed", |x| &x.raw_bytes),
            ("ack (ms)", |x| &x.ack),
        ];
        for (name, get) in rows {
            let st = stats(get(c));
            let b = idle.map(|i| stats(get(i)));
            let r = |f: fn(&Stats) -> f64| {
                b.map(|b| format!("{:.2}", ratio(f(&st), f(&b))))
                    .unwrap_or_else(|| "—".into())
            };
            let d = if name.contains("ms") { 2 } else { 0 };
            s.push_str(&format!(
                "| {name} | {:.d$} | {:.d$} | {:.d$} | {:.d$} | {} | {} | {} |\n",
                st.p50,
                st.p99,
                st.max,
                st.mean,
                r(|x| x.p50),
                r(|x| x.p99),
                r(|x| x.max),
            ));
        }
        let p = stats(&c.pause);
        let dp = stats(&c.dirty).p50;
        s.push_str(&format!(
            "\nTargets: p50 {}; p99 {}; at {:.0} dirty pages per epoch (p50; the target is stated at about {TARGET_DIRTY_PAGES}). \
             Initial sync: {} pages in {:.0} ms. Checkpoints every {:.1} ms on average (asked {}).\n\n",
            verdict(p.p50, TARGET_P50_MS),
            verdict(p.p99, TARGET_P99_MS),
            dp,
            c.initial_sync["pages"].as_u64().unwrap_or(0),
            c.initial_sync["ms"].as_f64().unwrap_or(f64::NAN),
            c.achieved_interval_ms,
            c.interval_ms,
        ));
    }
    s
}

pub(crate) fn case_json(all: &[CaseResult], c: &CaseResult) -> Value {
    let p = stats(&c.pause);
    let vs_idle = idle_of(all, c).map(|b| {
        let bp = stats(&b.pause);
        json!({"p50": r3(ratio(p.p50, bp.p50)), "p99": r3(ratio(p.p99, bp.p99)), "max": r3(ratio(p.max, bp.max))})
    });
    json!({
        "name": case_name(c),
        "interval_ms": c.interval_ms,
        "workload": match c.workload { Workload::Idle => "idle", Workload::Dirty(..) => "dirty", Workload::Fill(_) => "fill" },
        "mb_per_s": match c.workload { Workload::Dirty(mb, _) => mb, _ => 0 },
        "write_bytes_per_page": match c.workload { Workload::Dirty(_, b) => b, _ => 0 },
        "fill_mib": match c.workload { Workload::Fill(mb) => mb, _ => 0 },
        "memory_mib": c.memory_mib,
        "compressed": c.compressed,
        "encrypted": c.encrypted,
        "raw_bytes": stats(&c.raw_bytes).json(),
        "xor_pages": stats(&c.xor_pages).json(),
        "wire_over_raw": r3(ratio(c.bytes.iter().sum(), c.raw_bytes.iter().sum())),
        "accel": c.accel,
        "checkpoints": c.pause.len(),
        "achieved_interval_ms": r3(c.achieved_interval_ms),
        "guest_mb_per_s": c.guest_mb_per_s,
        "initial_sync": c.initial_sync,
        "pause_ms": p.json(),
        "dirty_pages": stats(&c.dirty).json(),
        "bytes": stats(&c.bytes).json(),
        "ack_ms": stats(&c.ack).json(),
        "pause_phases_ms": {
            "stop": stats(&c.ph_stop).json(),
            "scan": stats(&c.ph_scan).json(),
            "copy": stats(&c.ph_copy).json(),
            "devstate": stats(&c.ph_devstate).json(),
            "cont": stats(&c.ph_cont).json(),
        },
        "pause_vs_idle": vs_idle,
        "targets": {
            "p50_ms": TARGET_P50_MS,
            "p99_ms": TARGET_P99_MS,
            "dirty_pages": TARGET_DIRTY_PAGES,
            "p50_met": p.p50 <= TARGET_P50_MS,
            "p99_met": p.p99 <= TARGET_P99_MS,
            "p50_over_ms": r3((p.p50 - TARGET_P50_MS).max(0.0)),
            "p99_over_ms": r3((p.p99 - TARGET_P99_MS).max(0.0)),
        },
    })
}

/// The default run: an idle and a dirtying (`--mb-per-s`) guest at each
/// interval, one case after the other.
pub(crate) fn pause_main(
    o: &Opts,
    bins: &Binaries,
    profile: &str,
    img: &GuestImage,
    m: &Machine,
    date: &str,
) -> Result<()> {
    let cases: Vec<(u64, Workload)> = o
        .intervals
        .iter()
        .flat_map(|&i| [(i, Workload::Idle), (i, Workload::Dirty(o.mb_per_s, 1))])
        .collect();
    let mut all = Vec::new();
    for (i, w) in cases {
        eprintln!("remus-bench: -i {i} ms, {} ...", w.label());
        let c = run_case(bins, img, o, &CaseSpec::new(i, w))?;
        let p = stats(&c.pause);
        eprintln!(
            "remus-bench:   {} checkpoints ({}), pause p50 {:.2} p99 {:.2} max {:.2} ms, dirty pages p50 {:.0}",
            c.pause.len(),
            c.accel,
            p.p50,
            p.p99,
            p.max,
            stats(&c.dirty).p50
        );
        all.push(c);
    }
    let (md, run) = pause_report(date, m, profile, o, &all);
    emit(o, &md, run)
}

/// The default run's report: markdown and JSON run.
fn pause_report(
    date: &str,
    m: &Machine,
    profile: &str,
    o: &Opts,
    all: &[CaseResult],
) -> (String, Value) {
    let md = render_md(date, m, profile, o, all);
    let run = json!({
        "date": date,
        "machine": m.json(),
        "profile": profile,
        "settings": {"seconds": o.seconds, "warmup": o.warmup, "timeout_ms": o.timeout_ms, "memory_mib": 256, "working_set_mb": 64},
        "cases": all.iter().map(|c| case_json(all, c)).collect::<Vec<_>>(),
    });
    (md, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_rates_and_verdicts() {
        assert_eq!(
            dirty_rates("tick 1\ndirty: 50 MB/s\nx# dirty: 49 MB/s\r\ndirty: x\n"),
            vec![50, 49]
        );
        assert!(verdict(4.0, 5.0).starts_with("met"));
        assert!(verdict(7.5, 5.0).contains("MISSED** by 2.50 ms"));
    }
}
