//! `remus-bench`: checkpoint pause benchmark (not a test; nothing here
//! passes or fails on the numbers).
//!
//! For each case (interval × workload) it starts a backup and a primary
//! agent on this machine, boots one guest (256 MiB) with the workload,
//! protects it with `remus protect --json` for a fixed number of
//! checkpoints, and records pause, dirty pages, bytes sent and ack time per
//! checkpoint. Results are appended to `bench/results.md` and
//! `bench/results.json`. One VM at a time. Run it with `scripts/bench.sh`.
//!
//! It uses the `remus` and `remusd` binaries next to its own executable
//! (target/release or target/debug) and the guest image from
//! `scripts/build-guest.sh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, GuestImage, free_port, last_tick, workspace_root, write_key};
use serde_json::{Value, json};

/// Targets from the issue: at about 1,500 dirty pages per epoch.
const TARGET_P50_MS: f64 = 5.0;
const TARGET_P99_MS: f64 = 15.0;
const TARGET_DIRTY_PAGES: u64 = 1_500;

const USAGE: &str =
    "usage: remus-bench [--seconds 15] [--warmup 5] [--intervals 100,200] [--mb-per-s 50]
                   [--timeout MS] [--out DIR] [--no-write]
  --seconds N      measured checkpoints per case = N s / interval (default 15)
  --warmup N       checkpoints dropped at the start of each case (default 5)
  --intervals L    checkpoint intervals in ms (default 100,200)
  --mb-per-s N     the dirtying guest's rate (default 50)
  --timeout MS     protect --timeout (default 2000)
  --out DIR        where results.md / results.json go (default <workspace>/bench)
  --no-write       print the results, do not append them";

#[derive(Debug, Clone)]
struct Opts {
    seconds: u64,
    warmup: usize,
    intervals: Vec<u64>,
    mb_per_s: u64,
    timeout_ms: u64,
    out: PathBuf,
    write: bool,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        seconds: 15,
        warmup: 5,
        intervals: vec![100, 200],
        mb_per_s: 50,
        timeout_ms: 2000,
        out: workspace_root().join("bench"),
        write: true,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--no-write" {
            o.write = false;
            continue;
        }
        if a == "-h" || a == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = it
            .next()
            .with_context(|| format!("{a} needs a value\n{USAGE}"))?;
        let num = || -> Result<u64> { v.parse().with_context(|| format!("bad {a} '{v}'")) };
        match a.as_str() {
            "--seconds" => o.seconds = num()?,
            "--warmup" => o.warmup = num()? as usize,
            "--mb-per-s" => o.mb_per_s = num()?,
            "--timeout" => o.timeout_ms = num()?,
            "--out" => o.out = PathBuf::from(v),
            "--intervals" => {
                o.intervals = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .with_context(|| format!("bad interval '{s}'"))
                    })
                    .collect::<Result<_>>()?
            }
            _ => bail!("unexpected argument '{a}'\n{USAGE}"),
        }
    }
    if o.seconds == 0 || o.intervals.is_empty() || o.intervals.contains(&0) {
        bail!("--seconds and every interval must be > 0");
    }
    Ok(o)
}

/// `remus` and `remusd` next to this executable, or a clear error.
fn find_bins() -> Result<(Binaries, String)> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("executable has no directory")?;
    let profile = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "?".into());
    let bins = Binaries {
        remus: dir.join("remus"),
        remusd: dir.join("remusd"),
    };
    let missing: Vec<String> = [&bins.remus, &bins.remusd]
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing {} (remus-bench uses the binaries next to itself in {}); build them with `cargo build --release --workspace` (scripts/bench.sh does)",
            missing.join(" and "),
            dir.display()
        );
    }
    if !dir.join("libremus_dirty_preload.so").exists() {
        eprintln!(
            "remus-bench: warning: no libremus_dirty_preload.so in {}; remusd looks elsewhere in target/, and protect fails if it finds none",
            dir.display()
        );
    }
    Ok((bins, profile))
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(samples: &[f64]) -> Stats {
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
    fn json(&self) -> Value {
        json!({"p50": r3(self.p50), "p99": r3(self.p99), "max": r3(self.max), "mean": r3(self.mean)})
    }
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    Idle,
    Dirty(u64),
}

impl Workload {
    fn label(&self) -> String {
        match self {
            Workload::Idle => "idle".into(),
            Workload::Dirty(mb) => format!("dirty {mb} MB/s"),
        }
    }
    fn cmdline(&self) -> String {
        match self {
            Workload::Idle => "remus.workload=tick".into(),
            Workload::Dirty(mb) => format!("remus.workload=tick,dirty:--mb-per-s:{mb}"),
        }
    }
}

/// One case's measurements.
#[derive(Debug, Clone)]
struct CaseResult {
    interval_ms: u64,
    workload: Workload,
    pause: Vec<f64>,
    dirty: Vec<f64>,
    bytes: Vec<f64>,
    ack: Vec<f64>,
    /// Pause phases (ms): QMP stop, dirty scan, page copy, device state
    /// save, QMP cont.
    ph_stop: Vec<f64>,
    ph_scan: Vec<f64>,
    ph_copy: Vec<f64>,
    ph_devstate: Vec<f64>,
    ph_cont: Vec<f64>,
    /// Mean time between the measured checkpoints, ms.
    achieved_interval_ms: f64,
    initial_sync: Value,
    /// Median of the guest's own `dirty: N MB/s` lines while measured.
    guest_mb_per_s: Option<u64>,
    accel: String,
}

/// The `dirty: N MB/s` numbers on a console.
fn dirty_rates(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| {
            let at = l.rfind("dirty: ")?;
            l[at + 7..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn run_case(
    bins: &Binaries,
    img: &GuestImage,
    o: &Opts,
    interval_ms: u64,
    workload: Workload,
) -> Result<CaseResult> {
    let keydir = tempfile::tempdir()?;
    let key = write_key(keydir.path());
    let key_s = key.to_str().context("key path")?;
    let port = free_port();
    let peer = format!("127.0.0.1:{port}");
    let backup = Agent::start(bins, None, &["--listen", &peer, "--key", key_s])
        .context("start backup agent")?;
    let primary = Agent::start(bins, None, &["--key", key_s]).context("start primary agent")?;
    let vm = format!(
        "bench-i{interval_ms}-{}",
        match workload {
            Workload::Idle => "idle",
            Workload::Dirty(_) => "dirty",
        }
    );
    let cfg = primary.write_file("vm.toml", &img.config(&vm, &workload.cmdline(), ""));
    let out = primary.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
    let boot = Duration::from_secs(180);
    match workload {
        Workload::Idle => primary.wait_console(&vm, boot, "tick 3", |c| last_tick(c) >= Some(3))?,
        Workload::Dirty(_) => {
            primary.wait_console(&vm, boot, "a 'dirty:' line", |c| !dirty_rates(c).is_empty())?
        }
    };
    let accel = primary
        .list()
        .into_iter()
        .find(|v| v["name"] == vm.as_str())
        .and_then(|v| v["accel"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let rates_before = dirty_rates(&primary.console(&vm)).len();

    let measured = (o.seconds * 1000 / interval_ms).max(1) as usize;
    let wanted = o.warmup + measured;
    let mut follow = Command::new(&bins.remus)
        .arg("--socket")
        .arg(&primary.socket)
        .args(["protect", "-i", &interval_ms.to_string()])
        .args(["--timeout", &o.timeout_ms.to_string(), "--json", &vm, &peer])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run remus protect")?;
    let stdout = follow.stdout.take().context("protect stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
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
    let out = primary.cli(&["destroy", &vm]);
    if !out.ok {
        eprintln!("remus-bench: warning: destroy {vm}: {}", out.stderr.trim());
    }
    drop(primary);
    drop(backup);

    let cps = &cps[o.warmup.min(cps.len().saturating_sub(1))..];
    let col = |k: &str| -> Vec<f64> {
        cps.iter()
            .map(|e| e[k].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let phase = |k: &str| -> Vec<f64> {
        cps.iter()
            .map(|e| e["phases"][k].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let times: Vec<f64> = col("taken_at_ms");
    let achieved_interval_ms = if times.len() > 1 {
        (times[times.len() - 1] - times[0]) / (times.len() - 1) as f64
    } else {
        f64::NAN
    };
    let mut rates: Vec<u64> = dirty_rates(&console)
        .into_iter()
        .skip(rates_before)
        .collect();
    rates.sort_unstable();
    Ok(CaseResult {
        interval_ms,
        workload,
        pause: col("pause_ms"),
        dirty: col("dirty_pages"),
        bytes: col("bytes"),
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

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().rev().take(n).collect();
    v.into_iter().rev().collect::<Vec<_>>().join("\n")
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

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

struct Machine {
    kernel: String,
    nproc: usize,
    cpu: String,
    qemu: String,
    /// The 1/5/15-minute load averages when the run started.
    loadavg: String,
}

fn machine(qemu: String) -> Machine {
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
    }
}

/// UTC date and time as `YYYY-MM-DD HH:MM` (civil-from-days, no crate).
fn utc_now() -> String {
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
         - machine: Linux {}, {} CPUs, {}; load average at start {}\n\
         - QEMU: {}; accel: {}; build profile: {profile}\n\
         - guest: 256 MiB, 1 vCPU; idle = `remus.workload=tick`, dirty = `tick,dirty:--mb-per-s:{}` (64 MiB working set, 1 MB = 1 MiB)\n\
         - per case: two agents on this machine (backup on 127.0.0.1), one VM, `remus protect -i I --timeout {} --json`; \
         {} s of checkpoints measured after {} warm-up checkpoints; percentiles are nearest-rank \
         (with fewer than 100 samples p99 is the maximum)\n\
         - targets (issue): pause p50 ≤ {TARGET_P50_MS} ms and p99 ≤ {TARGET_P99_MS} ms at about {TARGET_DIRTY_PAGES} dirty pages per epoch; \
         ×idle = this case's pause over the idle case's at the same interval\n\n",
        m.kernel,
        m.nproc,
        m.cpu,
        m.loadavg,
        m.qemu,
        accel.join(", "),
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
        let rows: [(&str, Column); 9] = [
            ("pause (ms)", |x| &x.pause),
            ("… QMP stop (ms)", |x| &x.ph_stop),
            ("… dirty scan (ms)", |x| &x.ph_scan),
            ("… page copy (ms)", |x| &x.ph_copy),
            ("… device state (ms)", |x| &x.ph_devstate),
            ("… QMP cont (ms)", |x| &x.ph_cont),
            ("dirty pages", |x| &x.dirty),
            ("bytes sent", |x| &x.bytes),
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

fn case_json(all: &[CaseResult], c: &CaseResult) -> Value {
    let p = stats(&c.pause);
    let vs_idle = idle_of(all, c).map(|b| {
        let bp = stats(&b.pause);
        json!({"p50": r3(ratio(p.p50, bp.p50)), "p99": r3(ratio(p.p99, bp.p99)), "max": r3(ratio(p.max, bp.max))})
    });
    json!({
        "name": case_name(c),
        "interval_ms": c.interval_ms,
        "workload": match c.workload { Workload::Idle => "idle", Workload::Dirty(_) => "dirty" },
        "mb_per_s": match c.workload { Workload::Idle => 0, Workload::Dirty(mb) => mb },
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

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse_opts(&args)?;
    let (bins, profile) = find_bins()?;
    let img = GuestImage::find()?;
    let m = machine(qemu_version().unwrap_or_else(|| "?".into()));
    let date = utc_now();
    let cases: Vec<(u64, Workload)> = o
        .intervals
        .iter()
        .flat_map(|&i| [(i, Workload::Idle), (i, Workload::Dirty(o.mb_per_s))])
        .collect();
    let mut all = Vec::new();
    for (i, w) in cases {
        eprintln!("remus-bench: -i {i} ms, {} ...", w.label());
        let c = run_case(&bins, &img, &o, i, w)?;
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
    let md = render_md(&date, &m, &profile, &o, &all);
    print!("{md}");
    let run = json!({
        "date": date,
        "machine": {"kernel": m.kernel, "nproc": m.nproc, "cpu": m.cpu, "qemu": m.qemu, "loadavg": m.loadavg},
        "profile": profile,
        "settings": {"seconds": o.seconds, "warmup": o.warmup, "timeout_ms": o.timeout_ms, "memory_mib": 256, "working_set_mb": 64},
        "cases": all.iter().map(|c| case_json(&all, c)).collect::<Vec<_>>(),
    });
    if o.write {
        write_results(&o.out, &md, run)?;
    }
    Ok(())
}

/// `qemu-system-x86_64 --version`'s first line (the agents' default QEMU).
fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remus-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    fn dates() {
        assert_eq!(utc_string(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_string(951_782_400 + 3_661), "2000-02-29 01:01 UTC");
        assert_eq!(utc_string(1_795_000_000), "2026-11-18 11:06 UTC");
    }

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
