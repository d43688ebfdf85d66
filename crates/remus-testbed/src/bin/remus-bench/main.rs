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
//! `--disk` runs the disk cases instead (and only them): guest sequential
//! write throughput and fdatasync latency, unprotected versus protected, in
//! one run on one VM. The guest (256 MiB) has a 512 MiB sparse raw disk in a
//! temp dir; the backup agent runs in a mount namespace where another
//! (initially absent) directory is bind-mounted at the same path, so it
//! creates and fills its own copy, as a second host would. The workload is
//! `tick,diskbench:/dev/vda` (256 KiB O_DIRECT writes over 256 MiB,
//! fdatasync every 16 blocks, one `diskbench: write MB/s ...` line a
//! second). Cases: first unprotected, then `remus protect -i I` for each
//! `--intervals` value (protection stopped between them); each measures
//! `--seconds` of the guest's own lines after dropping the first
//! [`DISK_WARMUP_LINES`], and the checkpoint events taken meanwhile (pause,
//! `disk_records`, `disk_bytes`). Reported: write MB/s, fsync p50/max, the
//! protected/unprotected throughput ratio against the issue's target
//! (≥ 0.7× at -i 200), pauses and disk bytes per checkpoint.
//!
//! `--net` runs the network cases instead (and only them): ping round-trip
//! time and TCP throughput between a client and the guest, unprotected,
//! protected with `--no-net` and protected with output buffering (output
//! commit), in one run on one VM. Three network namespaces on one bridged
//! LAN ([`Lan::standard`]): the primary agent in host a, the backup in b
//! (listening on 198.18.0.2), the client in c. The guest (256 MiB) has a
//! NIC on a's br0 and 198.18.0.10, and runs `tick,seqserver`. Cases, in
//! order: unprotected; `remus protect -i I --no-net` at the first
//! `--intervals` value; `remus protect -i I` (buffered) at each value;
//! protection is stopped in between and the backup's standby awaited. Each
//! protected case first lets `--warmup` checkpoints pass. Per case, from
//! c, one after the other: `ping -c N -i 0.02` (N = `--seconds` × 50; RTT
//! p50/p90/max over the replies, loss), then TCP guest→client (`send S` on
//! the guest's bulk port 7001, read to EOF: bytes over request-to-EOF
//! time), then TCP client→guest (`recv`, S seconds of writes, the guest's
//! byte count over request-to-answer time), S = `--seconds`; and the pause
//! and ack of the checkpoints taken meanwhile. Reported: RTT increase over
//! unprotected against the issue's target (buffered: p50 increase at most
//! interval/2 + 2 ms), throughput and its ratio to unprotected. Needs root
//! (namespaces, bridges, taps).
//!
//! `--suite` runs the whole benchmark instead (`suite.rs`, what
//! `scripts/bench.sh` runs): sections matrix, wire, ram, boot, slowdown,
//! failover, migrate, disk, net and resync (`--only` picks some), one
//! report with a table of the targets. `resync` measures the resync after
//! a failover through two agents (127.0.0.1, each with its own image
//! directory at the same path, B's through a mount namespace,
//! `--al-extents 16`): a guest rewrites 1% or 10%
//! of a 1, 4 or 16 GiB sparse raw disk (`diskbench --region-mb`), its
//! primary is killed, the backup takes over, the old primary's agent comes
//! back with a stale copy and is protected to again: a `changed` sync
//! (only the chunks the change records mark); then, in the same run, the
//! other way after `remus destroy` of the stale copy: a `full` digest
//! compare of every chunk. Reported per case: chunks compared, differing,
//! bytes sent, sync time and time to the first checkpoint of both, a full
//! copy's bytes (and its time at the run's measured send rate, derived),
//! and ratios changed/full.
//!
//! It uses the `remus` and `remusd` binaries next to its own executable
//! (target/release or target/debug) and the guest image from
//! `scripts/build-guest.sh`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use remus_testbed::{
    Agent, Binaries, DiskHosts, GuestImage, Lan, Netns, ProtectFollower, SeqClient, free_port,
    last_tick, now_ms, workspace_root, write_key,
};

mod suite;
use serde_json::{Value, json};

/// Targets from the issue: at about 1,500 dirty pages per epoch.
const TARGET_P50_MS: f64 = 5.0;
const TARGET_P99_MS: f64 = 15.0;
const TARGET_DIRTY_PAGES: u64 = 1_500;

/// Disk cases: the issue's target, protected write throughput at least
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

const USAGE: &str =
    "usage: remus-bench [--seconds 15] [--warmup 5] [--intervals 100,200] [--mb-per-s 50]
                   [--timeout MS] [--out DIR] [--no-write]
                   [--suite [--only SECTIONS] [--failover-rounds 12] | --disk | --net]
  --suite          the whole benchmark (what scripts/bench.sh runs): pause by
                   interval x dirty rate, wire vs raw bytes, pause vs RAM size,
                   a Debian VM booted from disk, guest slowdown (cpumem), failover times, remus migrate vs
                   QEMU's live migration, the disk and network cases, resync after a
                   failover (changed chunks only) against a full compare and a full
                   copy for 1/4/16 GiB disks with 1%/10% rewritten; one report
                   with every target met or missed (--seconds defaults to 8)
  --only L         with --suite: only these sections, comma-separated, of
                   matrix, wire, ram, boot, slowdown, failover, migrate, disk, net,
                   resync
  --failover-rounds N  failover rounds (every third one freezes the primary)
  --seconds N      measured checkpoints per case = N s / interval (default 15);
                   disk cases: N of the guest's once-a-second lines per case;
                   net cases: N s of pings (50/s), then N s of TCP each way
  --warmup N       checkpoints dropped at the start of each case (default 5;
                   disk cases drop their first 2 lines instead; net cases
                   let N checkpoints pass before measuring)
  --intervals L    checkpoint intervals in ms (default 100,200)
  --mb-per-s N     the dirtying guest's rate (default 50)
  --timeout MS     protect --timeout (default 2000)
  --out DIR        where results.md / results.json go (default <workspace>/bench)
  --no-write       print the results, do not append them
  --disk           run only the disk cases: one guest writing sequentially to a
                   replicated disk (diskbench), unprotected, then protected at
                   each interval; write MB/s, fsync latency, ratio (target
                   >= 0.7x unprotected at -i 200), pauses, disk bytes/checkpoint
  --net            run only the network cases: one guest on a LAN of network
                   namespaces (client c pings it and runs TCP bulk transfers),
                   unprotected, protected --no-net at the first interval, then
                   protected with output buffering at each interval; RTT
                   p50/p90/max and loss, RTT increase (target for buffered:
                   p50 +interval/2 + 2 ms at most), TCP MB/s both ways and
                   ratio to unprotected, pause p50, ack p50; needs root";

#[derive(Debug, Clone)]
struct Opts {
    seconds: u64,
    warmup: usize,
    intervals: Vec<u64>,
    mb_per_s: u64,
    timeout_ms: u64,
    out: PathBuf,
    write: bool,
    /// Run the disk cases (only).
    disk: bool,
    /// Run the network cases (only).
    net: bool,
    /// Run the whole suite (`suite.rs`).
    suite: bool,
    /// With `suite`: only these sections.
    only: Vec<String>,
    /// With `suite`: failover rounds.
    failover_rounds: u64,
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
        disk: false,
        net: false,
        suite: false,
        only: Vec::new(),
        failover_rounds: 12,
    };
    let mut seconds_given = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--no-write" {
            o.write = false;
            continue;
        }
        if a == "--disk" {
            o.disk = true;
            continue;
        }
        if a == "--net" {
            o.net = true;
            continue;
        }
        if a == "--suite" {
            o.suite = true;
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
            "--seconds" => {
                o.seconds = num()?;
                seconds_given = true;
            }
            "--failover-rounds" => o.failover_rounds = num()?,
            "--only" => {
                o.suite = true;
                o.only = v.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = o
                    .only
                    .iter()
                    .find(|s| !suite::SECTIONS.contains(&s.as_str()))
                {
                    bail!(
                        "unknown section '{bad}' (sections: {})",
                        suite::SECTIONS.join(", ")
                    );
                }
            }
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
    if [o.disk, o.net, o.suite].iter().filter(|x| **x).count() > 1 {
        bail!("--suite, --disk and --net are separate runs: give one of them");
    }
    if o.suite && !seconds_given {
        // Some 30 cases: 8 s each keeps the suite near 25 minutes.
        o.seconds = 8;
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
    // Next to this executable, in the same profile (scripts/bench.sh
    // builds them).
    let bins = Binaries::next_to_exe()?;
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
    /// `dirty` at N MiB/s, changing M bytes of each page it visits.
    Dirty(u64, u64),
    /// `cpumem` holding N MiB of data (the initial copy's throughput).
    Fill(u64),
}

impl Workload {
    fn label(&self) -> String {
        match self {
            Workload::Idle => "idle".into(),
            Workload::Dirty(mb, 1) => format!("dirty {mb} MB/s"),
            Workload::Dirty(mb, b) => format!("dirty {mb} MB/s ({b} B/page)"),
            Workload::Fill(mb) => format!("{mb} MiB of data"),
        }
    }
    fn cmdline(&self) -> String {
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
struct CaseSpec {
    interval_ms: u64,
    workload: Workload,
    memory_mib: u64,
    protect_args: Vec<String>,
    /// Boot this qcow2 image (a real distribution, through the firmware)
    /// from an overlay instead of the kernel+initramfs guest; the workload
    /// is then the distribution idling with its seqserver service.
    disk_boot: Option<PathBuf>,
}

impl CaseSpec {
    fn new(interval_ms: u64, workload: Workload) -> CaseSpec {
        CaseSpec {
            interval_ms,
            workload,
            memory_mib: 256,
            protect_args: Vec::new(),
            disk_boot: None,
        }
    }
    fn compressed(&self) -> bool {
        !self.protect_args.iter().any(|a| a == "-u")
    }
    fn encrypted(&self) -> bool {
        !self.protect_args.iter().any(|a| a == "--unencrypted")
    }
}

/// One case's measurements.
#[derive(Debug, Clone)]
struct CaseResult {
    interval_ms: u64,
    /// Booted a distribution from its disk (see [`CaseSpec::disk_boot`]).
    disk_boot: bool,
    workload: Workload,
    memory_mib: u64,
    compressed: bool,
    /// Over the encrypted link (else `--unencrypted`).
    encrypted: bool,
    pause: Vec<f64>,
    dirty: Vec<f64>,
    bytes: Vec<f64>,
    /// Bytes before compression (pages × 4096 + device state).
    raw_bytes: Vec<f64>,
    xor_pages: Vec<f64>,
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

/// The numbers that follow `label` on a console's lines (the last
/// occurrence on a line: a guest's lines can run into each other), those
/// that parse.
fn console_numbers<T: std::str::FromStr>(console: &str, label: &str) -> Vec<T> {
    console
        .lines()
        .filter_map(|l| {
            let at = l.rfind(label)?;
            l[at + label.len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The `dirty: N MB/s` numbers on a console.
fn dirty_rates(console: &str) -> Vec<u64> {
    console_numbers(console, "dirty: ")
}

fn run_case(bins: &Binaries, img: &GuestImage, o: &Opts, spec: &CaseSpec) -> Result<CaseResult> {
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
    let out = primary.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
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
        .args(["--timeout", &o.timeout_ms.to_string(), "--json"])
        .args(&spec.protect_args)
        .args([&vm, &peer])
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
        let rows: [(&str, Column); 10] = [
            ("pause (ms)", |x| &x.pause),
            ("… QMP stop (ms)", |x| &x.ph_stop),
            ("… dirty scan (ms)", |x| &x.ph_scan),
            ("… page copy (ms)", |x| &x.ph_copy),
            ("… device state (ms)", |x| &x.ph_devstate),
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

fn case_json(all: &[CaseResult], c: &CaseResult) -> Value {
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

// ---------------------------------------------------------------------------
// Disk cases (`--disk`)

/// One of the guest's `diskbench: write MB/s X fsync_ms p50 Y max Z n K`
/// lines (Y and Z are `-` when no fdatasync completed in that second).
#[derive(Debug, Clone, Copy, PartialEq)]
struct DiskSample {
    mb_s: f64,
    fsync_p50: Option<f64>,
    fsync_max: Option<f64>,
    fsyncs: u64,
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
fn disk_samples(console: &str) -> Vec<DiskSample> {
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
            Some(i) => format!("protected -i {i} ms"),
        }
    }
    fn col(&self, k: &str) -> Vec<f64> {
        self.cps
            .iter()
            .map(|e| e[k].as_f64().unwrap_or(f64::NAN))
            .collect()
    }
    fn phase(&self, k: &str) -> Vec<f64> {
        self.cps
            .iter()
            .map(|e| e["phases"][k].as_f64().unwrap_or(f64::NAN))
            .collect()
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
        let t = self.col("taken_at_ms");
        if t.len() > 1 {
            (t[t.len() - 1] - t[0]) / (t.len() - 1) as f64
        } else {
            f64::NAN
        }
    }
}

struct DiskRun {
    accel: String,
    cases: Vec<DiskCase>,
}

/// `remus protect --json` in the background, its events on a channel.
struct Protecting {
    child: std::process::Child,
    rx: mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    cps: Vec<Value>,
    initial_sync: Value,
    disk_synced: Value,
    sync_plan: Value,
}

impl Protecting {
    fn start(
        bins: &Binaries,
        primary: &Agent,
        vm: &str,
        peer: &str,
        interval_ms: u64,
        o: &Opts,
        extra: &[&str],
    ) -> Result<Protecting> {
        let mut child = Command::new(&bins.remus)
            .arg("--socket")
            .arg(&primary.socket)
            .args(["protect", "-i", &interval_ms.to_string()])
            .args(["--timeout", &o.timeout_ms.to_string(), "--json"])
            .args(extra)
            .args([vm, peer])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run remus protect")?;
        let stdout = child.stdout.take().context("protect stdout")?;
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Protecting {
            child,
            rx,
            reader: Some(reader),
            cps: Vec::new(),
            initial_sync: Value::Null,
            disk_synced: Value::Null,
            sync_plan: Value::Null,
        })
    }

    fn handle(&mut self, line: &str) -> Result<()> {
        let ev: Value = serde_json::from_str(line)
            .with_context(|| format!("remus protect printed a non-JSON line: {line}"))?;
        match ev["event"].as_str() {
            Some("initial_sync") => self.initial_sync = ev,
            Some("disk_synced") => self.disk_synced = ev,
            Some("sync_plan") => self.sync_plan = ev,
            Some("checkpoint") => self.cps.push(ev),
            Some("backup_lost") | Some("failed") => bail!("protection ended: {ev}"),
            _ => {}
        }
        Ok(())
    }

    /// Takes every event printed so far.
    fn drain(&mut self) -> Result<()> {
        loop {
            match self.rx.try_recv() {
                Ok(l) => self.handle(&l)?,
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => {
                    bail!("remus protect ended after {} checkpoints", self.cps.len())
                }
            }
        }
    }

    /// Waits for the first checkpoint (after the initial RAM and disk sync).
    fn first_checkpoint(&mut self, timeout: Duration) -> Result<()> {
        self.wait_checkpoints(1, timeout)
    }

    /// Waits until `n` checkpoints have been reported.
    fn wait_checkpoints(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.cps.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{} of {n} checkpoints within {timeout:?}", self.cps.len());
            }
            match self.rx.recv_timeout(left) {
                Ok(l) => self.handle(&l)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("remus protect ended after {} checkpoints", self.cps.len())
                }
            }
        }
        Ok(())
    }

    /// `protect --stop`, then waits for the CLI to end (killing it after
    /// 10 s); its stderr.
    fn stop(mut self, primary: &Agent, vm: &str) -> String {
        let stop = primary.cli(&["protect", "--stop", vm]);
        if !stop.ok {
            eprintln!(
                "remus-bench: warning: protect --stop {vm}: {}",
                stop.stderr.trim()
            );
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut se) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut se, &mut err);
        }
        drop(std::mem::replace(&mut self.rx, mpsc::channel().1));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        err
    }

    /// Ends the CLI at once (no `--stop`: protection goes on in the agent
    /// unless its session is over) and returns its stderr, which says why
    /// a session ended.
    fn abort(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut se) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut se, &mut err);
        }
        err
    }
}

impl Drop for Protecting {
    /// The CLI never outlives its follower (a no-op after `stop`/`abort`).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until the console holds at least `n` diskbench samples, calling
/// `poll` between looks; the samples.
fn wait_disk_samples(
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
        .backup(bins)
        .context("start backup agent (in a mount namespace of its own: needs root and unshare)")?;
    let primary = hosts.primary(bins).context("start primary agent")?;
    let vm = "bench-disk";
    let disk_toml = format!("[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n", vda.display());
    let cfg = primary.write_file("vm.toml", &img.config(vm, DISK_WORKLOAD, &disk_toml));
    let out = primary.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
    let logs = |e: anyhow::Error| {
        anyhow::anyhow!(
            "{e:#}\nconsole (tail):\n{}\nprimary log (tail):\n{}\nbackup log (tail):\n{}",
            tail(&primary.console(vm), 10),
            tail(&primary.log_text(), 15),
            tail(&backup.log_text(), 15)
        )
    };
    wait_disk_samples(&primary, vm, 1, Duration::from_secs(180), &mut || Ok(())).map_err(logs)?;
    let accel = primary
        .vm(vm)
        .and_then(|v| v["accel"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let seconds = o.seconds as usize;

    eprintln!("remus-bench: disk, unprotected ...");
    let (samples, t0, t1) = measure_disk(&primary, vm, seconds, &mut || Ok(())).map_err(logs)?;
    let mut cases = vec![DiskCase {
        interval_ms: None,
        samples,
        window_ms: (t1 - t0) as f64,
        cps: Vec::new(),
        initial_sync: Value::Null,
        disk_synced: Value::Null,
    }];
    report_disk_case(&cases[0], None);

    for &i in &o.intervals {
        eprintln!("remus-bench: disk, protected -i {i} ms ...");
        let mut p = Protecting::start(bins, &primary, vm, &peer, i, o, &[])?;
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
        let t = Instant::now();
        while backup.vm(vm).is_some() {
            if t.elapsed() > Duration::from_secs(60) {
                return Err(logs(anyhow::anyhow!(
                    "the backup still has {vm} 60 s after protect --stop"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let out = primary.cli(&["destroy", vm]);
    if !out.ok {
        eprintln!("remus-bench: warning: destroy {vm}: {}", out.stderr.trim());
    }
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

/// Protected throughput over unprotected, per protected case.
fn disk_ratios(run: &DiskRun) -> Vec<(u64, f64)> {
    let base = run
        .cases
        .iter()
        .find(|c| c.interval_ms.is_none())
        .map(|c| summarize_disk(&c.samples).mb_s.p50)
        .unwrap_or(f64::NAN);
    run.cases
        .iter()
        .filter_map(|c| {
            Some((
                c.interval_ms?,
                ratio(summarize_disk(&c.samples).mb_s.p50, base),
            ))
        })
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
         - machine: Linux {}, {} CPUs, {}; load average at start {}\n\
         - QEMU: {}; accel: {}; build profile: {profile}\n\
         - guest: 256 MiB, 1 vCPU, a {DISK_MIB} MiB sparse raw disk (vda, replicated) on the host's /tmp; \
         `{DISK_WORKLOAD}`: sequential {DISKBENCH_BLOCK_KB} KiB O_DIRECT writes over {DISKBENCH_REGION_MB} MiB, \
         fdatasync every {DISKBENCH_FSYNC_EVERY} blocks, one line a second (1 MB = 1 MiB)\n\
         - one VM for the whole run, two agents on this machine (backup on 127.0.0.1, its own image at the same path \
         through a mount namespace); unprotected first, then `remus protect -i I --timeout {} --json` per interval, \
         stopped in between; per case {} s of the guest's lines after {DISK_WARMUP_LINES} warm-up lines. \
         Write MB/s: median (min–max) of the per-second rates; fsync p50: median of the per-second medians, \
         max: the largest; checkpoint columns over the checkpoints taken in the window; replicated MB/s = \
         the window's `disk_bytes` per second; journal wait = share of the window guest writes waited for room \
         in the primary's 64 MiB disk journal\n\
         - target (issue): protected throughput ≥ {DISK_TARGET_RATIO}× unprotected at -i {DISK_TARGET_INTERVAL_MS}\n\n",
        m.kernel, m.nproc, m.cpu, m.loadavg, m.qemu, run.accel, o.timeout_ms, o.seconds,
    );
    let ratios = disk_ratios(run);
    s.push_str("| case | write MB/s p50 | min–max | ×unprotected | fsync p50 ms | fsync max ms | fsyncs | checkpoints | pause p50 ms | p99 | disk records/cp p50 | disk MiB/cp p50 | replicated MB/s | journal wait % | ack p50 ms | interval achieved ms |\n");
    s.push_str(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let dash = || "—".to_string();
    for c in &run.cases {
        let d = summarize_disk(&c.samples);
        let r = c
            .interval_ms
            .and_then(|i| ratios.iter().find(|x| x.0 == i))
            .map(|x| format!("{:.2}", x.1))
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
    let r = c
        .interval_ms
        .and_then(|i| disk_ratios(run).into_iter().find(|x| x.0 == i))
        .map(|x| r3(x.1));
    let mut v = json!({
        "name": c.name(),
        "protected": c.interval_ms.is_some(),
        "interval_ms": c.interval_ms,
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
        if let (Some(a), Value::Object(b)) = (v.as_object_mut(), extra) {
            a.extend(b);
        }
    }
    v
}

fn disk_main(
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
        "machine": {"kernel": m.kernel, "nproc": m.nproc, "cpu": m.cpu, "qemu": m.qemu, "loadavg": m.loadavg},
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

// ---------------------------------------------------------------------------
// Network cases (`--net`)

/// Net cases: the guest's address and MAC (hosts a, b, c are those of
/// [`Lan::standard`]), seqserver's bulk port, the backup's replication port
/// in host b.
const NET_VM_IP: &str = "198.18.0.10";
const NET_VM_MAC: &str = "52:54:00:c6:12:0a";
const NET_BULK_PORT: u16 = 7001;
const NET_REPL_PORT: u16 = 7100;
/// `ping -i 0.02`: 50 pings a second.
const PING_INTERVAL: &str = "0.02";
const PINGS_PER_S: u64 = 50;
/// The issue's target: with buffering, the median RTT at most
/// interval/2 + this over unprotected.
const NET_TARGET_SLACK_MS: f64 = 2.0;

fn net_workload() -> String {
    format!("remus.workload=tick,seqserver remus.ip={NET_VM_IP}/24")
}

/// The net cases' VM: seqserver, an address on the LAN, a NIC on the
/// host's br0 with a fixed MAC (it keeps MAC and IP across hosts).
fn net_vm_config(img: &GuestImage, vm: &str) -> String {
    let vif = format!("[[vif]]\nbridge = \"br0\"\nmac = \"{NET_VM_MAC}\"\n");
    img.config(vm, &net_workload(), &vif)
}

/// How a net case runs the VM.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NetMode {
    Unprotected,
    /// `remus protect -i I --no-net`: checkpoints, output not held.
    NoNet(u64),
    /// `remus protect -i I`: output held until the backup acks the
    /// checkpoint holding the state that sent it.
    Buffered(u64),
}

impl NetMode {
    fn name(&self) -> String {
        match self {
            NetMode::Unprotected => "unprotected".into(),
            NetMode::NoNet(i) => format!("protected -i {i} --no-net"),
            NetMode::Buffered(i) => format!("protected -i {i}, buffered"),
        }
    }
    fn key(&self) -> &'static str {
        match self {
            NetMode::Unprotected => "unprotected",
            NetMode::NoNet(_) => "no_net",
            NetMode::Buffered(_) => "buffered",
        }
    }
    fn interval_ms(&self) -> Option<u64> {
        match *self {
            NetMode::Unprotected => None,
            NetMode::NoNet(i) | NetMode::Buffered(i) => Some(i),
        }
    }
    /// The most the RTT p50 may rise over unprotected (buffered only).
    fn target_ms(&self) -> Option<f64> {
        match *self {
            NetMode::Buffered(i) => Some(i as f64 / 2.0 + NET_TARGET_SLACK_MS),
            _ => None,
        }
    }
}

/// The cases of a run, in order: unprotected, `--no-net` at the first
/// interval, buffered at each.
fn net_modes(intervals: &[u64]) -> Vec<NetMode> {
    let mut v = vec![NetMode::Unprotected];
    v.extend(intervals.first().map(|&i| NetMode::NoNet(i)));
    v.extend(intervals.iter().map(|&i| NetMode::Buffered(i)));
    v
}

/// What `ping` printed: each reply's RTT in ms (duplicates left out) and
/// the summary's counts (0 when it has none).
#[derive(Debug, Clone, Default, PartialEq)]
struct Ping {
    rtts: Vec<f64>,
    transmitted: u64,
    received: u64,
    duplicates: u64,
}

impl Ping {
    /// Unanswered pings, % of those sent (from the summary).
    fn loss_pct(&self) -> f64 {
        if self.transmitted > 0 {
            100.0 * self.transmitted.saturating_sub(self.received) as f64 / self.transmitted as f64
        } else {
            f64::NAN
        }
    }
}

/// iputils ping's output: `64 bytes from A: icmp_seq=1 ttl=64 time=0.345 ms`
/// per reply (`(DUP!)` appended to duplicates) and the summary
/// `N packets transmitted, M received, [+D duplicates, ]X% packet loss, ...`.
fn parse_ping(out: &str) -> Ping {
    let mut p = Ping::default();
    for line in out.lines() {
        if let Some(at) = line.find(" time=") {
            if line.contains("DUP!") {
                continue;
            }
            let v = line[at + 6..].split_whitespace().next().unwrap_or("");
            if let Ok(ms) = v.trim_end_matches("ms").parse::<f64>() {
                p.rtts.push(ms);
            }
        } else if line.contains("packets transmitted") {
            for part in line.split(',') {
                let w: Vec<&str> = part.split_whitespace().collect();
                let n = |s: &str| s.trim_start_matches('+').parse::<u64>().ok();
                match w.as_slice() {
                    [n_, "packets", "transmitted"] => p.transmitted = n(n_).unwrap_or(0),
                    [n_, "received"] => p.received = n(n_).unwrap_or(0),
                    [n_, "duplicates"] => p.duplicates = n(n_).unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    p
}

/// RTT percentiles (nearest-rank), ms.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rtt {
    p50: f64,
    p90: f64,
    max: f64,
    mean: f64,
}

fn rtt_stats(rtts: &[f64]) -> Rtt {
    let mut s = rtts.to_vec();
    s.sort_by(f64::total_cmp);
    let st = stats(&s);
    Rtt {
        p50: st.p50,
        p90: percentile(&s, 90.0),
        max: st.max,
        mean: st.mean,
    }
}

impl Rtt {
    fn json(&self) -> Value {
        json!({"p50": r3(self.p50), "p90": r3(self.p90), "max": r3(self.max), "mean": r3(self.mean)})
    }
}

/// One TCP bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Transfer {
    bytes: u64,
    secs: f64,
}

impl Transfer {
    /// MiB per second.
    fn mb_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / 1048576.0 / self.secs
        } else {
            f64::NAN
        }
    }
    fn json(&self, base: Option<&Transfer>) -> Value {
        json!({
            "bytes": self.bytes,
            "secs": r3(self.secs),
            "mb_s": r3(self.mb_s()),
            "vs_unprotected": base.map(|b| r3(ratio(self.mb_s(), b.mb_s()))),
        })
    }
}

/// `ping -n -c COUNT -i 0.02 -W 2 VM` in `ns`.
fn ping_from(ns: &Netns, count: u64) -> Result<Ping> {
    let n = count.to_string();
    let out = ns.exec(
        "ping",
        &["-n", "-c", &n, "-i", PING_INTERVAL, "-W", "2", NET_VM_IP],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let p = parse_ping(&text);
    if p.rtts.is_empty() {
        bail!(
            "no reply to {count} pings of {NET_VM_IP} ({}): {}{}",
            out.status,
            tail(&text, 3),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(p)
}

fn connect_vm(port: u16) -> Result<TcpStream> {
    let ip: Ipv4Addr = NET_VM_IP.parse().context("VM address")?;
    TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(10))
        .with_context(|| format!("connect to {NET_VM_IP}:{port}"))
}

/// Guest → client: `send SECONDS`, read to EOF; the bytes over the time
/// from the request to EOF.
fn tcp_from_guest(ns: &Netns, seconds: u64) -> Result<Transfer> {
    ns.run_in(|| -> Result<Transfer> {
        let mut s = connect_vm(NET_BULK_PORT)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let t = Instant::now();
        s.write_all(format!("send {seconds}\n").as_bytes())
            .context("send request")?;
        let mut buf = vec![0u8; 256 << 10];
        let mut bytes = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bytes += n as u64,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("read after {bytes} bytes")),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if bytes == 0 {
            bail!("the guest sent nothing");
        }
        Ok(Transfer { bytes, secs })
    })?
}

/// Client → guest: `recv`, SECONDS of writes, half-close; the guest's
/// count of bytes over the time from the request to its answer.
fn tcp_to_guest(ns: &Netns, seconds: u64) -> Result<Transfer> {
    ns.run_in(|| -> Result<Transfer> {
        let mut s = connect_vm(NET_BULK_PORT)?;
        let t = Instant::now();
        s.write_all(b"recv\n").context("recv request")?;
        s.set_write_timeout(Some(Duration::from_millis(200)))?;
        let buf = vec![0x5au8; 256 << 10];
        let d = Duration::from_secs(seconds);
        while t.elapsed() < d {
            match s.write(&buf) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("write"),
            }
        }
        s.shutdown(Shutdown::Write).context("half-close")?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .context("read the guest's answer")?;
        let secs = t.elapsed().as_secs_f64();
        let bytes = reply
            .trim()
            .strip_prefix("received ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the guest answered {reply:?}"))?;
        Ok(Transfer { bytes, secs })
    })?
}

/// One net case.
#[derive(Debug, Clone)]
struct NetCase {
    mode: NetMode,
    ping: Ping,
    /// Guest → client and client → guest.
    down: Transfer,
    up: Transfer,
    /// Host wall time of the measurements, ms.
    window_ms: f64,
    /// Checkpoint events taken during the measurements.
    cps: Vec<Value>,
    initial_sync: Value,
}

impl NetCase {
    fn col(&self, k: &str) -> Vec<f64> {
        self.cps
            .iter()
            .map(|e| e[k].as_f64().unwrap_or(f64::NAN))
            .collect()
    }
    fn rtt(&self) -> Rtt {
        rtt_stats(&self.ping.rtts)
    }
    fn achieved_interval_ms(&self) -> f64 {
        let t = self.col("taken_at_ms");
        if t.len() > 1 {
            (t[t.len() - 1] - t[0]) / (t.len() - 1) as f64
        } else {
            f64::NAN
        }
    }
}

struct NetRun {
    accel: String,
    cases: Vec<NetCase>,
}

impl NetRun {
    fn base(&self) -> Option<&NetCase> {
        self.cases.iter().find(|c| c.mode == NetMode::Unprotected)
    }
    /// RTT p50 and p90 over the unprotected case's, ms.
    fn rtt_increase(&self, c: &NetCase) -> (f64, f64) {
        match self.base() {
            Some(b) => {
                let (r, br) = (c.rtt(), b.rtt());
                (r.p50 - br.p50, r.p90 - br.p90)
            }
            None => (f64::NAN, f64::NAN),
        }
    }
    /// Whether a buffered case met the target (None: no target).
    fn target_met(&self, c: &NetCase) -> Option<bool> {
        c.mode.target_ms().map(|t| self.rtt_increase(c).0 <= t)
    }
}

/// Pings, then TCP each way, calling `poll` between them: the results and
/// the host's window (Unix ms).
fn measure_net(
    client: &Netns,
    seconds: u64,
    poll: &mut dyn FnMut() -> Result<()>,
) -> Result<(Ping, Transfer, Transfer, u64, u64)> {
    let t0 = now_ms();
    let ping = ping_from(client, seconds * PINGS_PER_S).context("ping")?;
    poll()?;
    let down = tcp_from_guest(client, seconds).context("TCP guest → client")?;
    poll()?;
    let up = tcp_to_guest(client, seconds).context("TCP client → guest")?;
    poll()?;
    Ok((ping, down, up, t0, now_ms()))
}

fn run_net(bins: &Binaries, img: &GuestImage, o: &Opts) -> Result<NetRun> {
    // Declared first, dropped last: after the agents living in its hosts.
    let lan = Lan::standard("bench")
        .context("LAN of network namespaces (needs root, ip and bridge support)")?;
    let keydir = tempfile::tempdir()?;
    let key = write_key(keydir.path());
    let key_s = key.to_str().context("key path")?;
    let peer = format!("{}:{NET_REPL_PORT}", lan.addr("b"));
    let backup = Agent::start(
        bins,
        Some(lan.host("b")),
        &["--listen", &peer, "--key", key_s],
    )
    .context("start backup agent in host b")?;
    let primary = Agent::start(bins, Some(lan.host("a")), &["--key", key_s])
        .context("start primary agent in host a")?;
    let vm = "bench-net";
    let cfg = primary.write_file("vm.toml", &net_vm_config(img, vm));
    let out = primary.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
    let logs = |e: anyhow::Error| {
        anyhow::anyhow!(
            "{e:#}\nconsole (tail):\n{}\nprimary log (tail):\n{}\nbackup log (tail):\n{}",
            tail(&primary.console(vm), 10),
            tail(&primary.log_text(), 15),
            tail(&backup.log_text(), 15)
        )
    };
    primary
        .wait_console(vm, Duration::from_secs(180), "seqserver: listening", |c| {
            c.contains("seqserver: listening")
        })
        .map_err(logs)?;
    let ip: Ipv4Addr = NET_VM_IP.parse().context("VM address")?;
    let t = Instant::now();
    while !lan.ping("c", ip) {
        if t.elapsed() > Duration::from_secs(60) {
            return Err(logs(anyhow::anyhow!(
                "{NET_VM_IP} does not answer pings from host c"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let accel = primary
        .vm(vm)
        .and_then(|v| v["accel"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let client = lan.host("c");
    let mut cases: Vec<NetCase> = Vec::new();
    for mode in net_modes(&o.intervals) {
        eprintln!("remus-bench: net, {} ...", mode.name());
        let c = match mode.interval_ms() {
            None => {
                let (ping, down, up, t0, t1) =
                    measure_net(client, o.seconds, &mut || Ok(())).map_err(logs)?;
                NetCase {
                    mode,
                    ping,
                    down,
                    up,
                    window_ms: (t1 - t0) as f64,
                    cps: Vec::new(),
                    initial_sync: Value::Null,
                }
            }
            Some(i) => {
                let extra: &[&str] = match mode {
                    NetMode::NoNet(_) => &["--no-net"],
                    _ => &[],
                };
                let mut p = Protecting::start(bins, &primary, vm, &peer, i, o, extra)?;
                let settle =
                    Duration::from_secs(60) + Duration::from_millis(5 * i * o.warmup as u64);
                let measured = p
                    .first_checkpoint(Duration::from_secs(300))
                    .and_then(|()| p.wait_checkpoints(1 + o.warmup, settle))
                    .and_then(|()| measure_net(client, o.seconds, &mut || p.drain()))
                    .and_then(|m| {
                        // Checkpoints of the window's end are reported at their ack.
                        std::thread::sleep(Duration::from_millis(2 * i + 500));
                        p.drain().map(|()| m)
                    });
                let initial_sync = p.initial_sync.clone();
                let cps = std::mem::take(&mut p.cps);
                let err = p.stop(&primary, vm);
                let (ping, down, up, t0, t1) = measured.map_err(|e| {
                    logs(e.context(format!("{}: remus protect: {}", mode.name(), err.trim())))
                })?;
                // The backup drops its standby when protection stops; the
                // next protect needs it gone.
                let t = Instant::now();
                while backup.vm(vm).is_some() {
                    if t.elapsed() > Duration::from_secs(60) {
                        return Err(logs(anyhow::anyhow!(
                            "the backup still has {vm} 60 s after protect --stop"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                NetCase {
                    mode,
                    ping,
                    down,
                    up,
                    window_ms: (t1 - t0) as f64,
                    cps: cps
                        .into_iter()
                        .filter(|e| (t0..=t1).contains(&e["taken_at_ms"].as_u64().unwrap_or(0)))
                        .collect(),
                    initial_sync,
                }
            }
        };
        report_net_case(&c, cases.first());
        cases.push(c);
    }
    let out = primary.cli(&["destroy", vm]);
    if !out.ok {
        eprintln!("remus-bench: warning: destroy {vm}: {}", out.stderr.trim());
    }
    drop(primary);
    drop(backup);
    drop(lan);
    Ok(NetRun { accel, cases })
}

fn report_net_case(c: &NetCase, unprotected: Option<&NetCase>) {
    let r = c.rtt();
    let mut line = format!(
        "remus-bench:   RTT p50 {:.2} p90 {:.2} max {:.2} ms ({} replies, loss {:.1}%), TCP guest→client {:.1} MB/s, client→guest {:.1} MB/s",
        r.p50,
        r.p90,
        r.max,
        c.ping.rtts.len(),
        c.ping.loss_pct(),
        c.down.mb_s(),
        c.up.mb_s()
    );
    if let Some(u) = unprotected {
        line.push_str(&format!(
            "; RTT p50 +{:.2} ms, TCP {:.2}× / {:.2}× unprotected; {} checkpoints, pause p50 {:.2} ms, ack p50 {:.2} ms",
            r.p50 - u.rtt().p50,
            ratio(c.down.mb_s(), u.down.mb_s()),
            ratio(c.up.mb_s(), u.up.mb_s()),
            c.cps.len(),
            stats(&c.col("pause_ms")).p50,
            stats(&c.col("ack_ms")).p50
        ));
    }
    eprintln!("{line}");
}

/// A throughput ratio: two decimals, three below 0.1 (so that a collapse
/// does not read as zero).
fn fmt_ratio(r: f64) -> String {
    if r < 0.1 {
        format!("{r:.3}")
    } else {
        format!("{r:.2}")
    }
}

/// The one-line verdict of a buffered case.
fn net_verdict(increase: f64, target: f64) -> String {
    if increase <= target {
        format!("met (+{increase:.2} ms ≤ {target} ms)")
    } else {
        format!(
            "**MISSED** by {:.2} ms (+{increase:.2} ms > {target} ms)",
            increase - target
        )
    }
}

fn render_net_md(date: &str, m: &Machine, profile: &str, o: &Opts, run: &NetRun) -> String {
    let mut s = format!(
        "## {date}: network RTT and TCP throughput, unprotected vs protected (--no-net, buffered)\n\n\
         - machine: Linux {}, {} CPUs, {}; load average at start {}\n\
         - QEMU: {}; accel: {}; build profile: {profile}\n\
         - three network namespaces on one bridged LAN: primary agent in host a, backup in b \
         (listening on 198.18.0.2), client c; one VM for the whole run: 256 MiB, 1 vCPU, a NIC on a's br0 \
         (through the agent's frame relay), {NET_VM_IP}, `{}`; cases in order: unprotected, \
         `remus protect -i I --timeout {} --no-net` at the first interval, `remus protect -i I --timeout {}` \
         (output buffered until the backup acks its checkpoint) at each; protection stopped in between; \
         a protected case is measured from its checkpoint {}\n\
         - per case, from c, one after the other: `ping -c {} -i {PING_INTERVAL}` (RTT percentiles nearest-rank \
         over the replies; loss = unanswered / sent); TCP guest→client: `send {}` to port {NET_BULK_PORT}, read \
         to EOF, bytes / time from request to EOF; TCP client→guest: `recv`, {} s of writes, the guest's byte \
         count / time from request to its answer (1 MB = 1 MiB); checkpoint columns over the checkpoints taken \
         meanwhile\n\
         - target (issue): with buffering, RTT p50 at most interval/2 + {NET_TARGET_SLACK_MS} ms over unprotected\n\n",
        m.kernel,
        m.nproc,
        m.cpu,
        m.loadavg,
        m.qemu,
        run.accel,
        net_workload(),
        o.timeout_ms,
        o.timeout_ms,
        o.warmup + 1,
        o.seconds * PINGS_PER_S,
        o.seconds,
        o.seconds,
    );
    s.push_str("| case | RTT p50 ms | p90 | max | loss % | RTT p50 increase ms | target ms | target | guest→client MB/s | ×unprotected | client→guest MB/s | ×unprotected | checkpoints | pause p50 ms | ack p50 ms |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let dash = || "—".to_string();
    let base = run.base();
    for c in &run.cases {
        let r = c.rtt();
        let protected = c.mode.interval_ms().is_some();
        let cp = |f: &dyn Fn() -> String| if protected { f() } else { dash() };
        let vs = |t: &Transfer, b: Option<&Transfer>| {
            b.map(|b| fmt_ratio(ratio(t.mb_s(), b.mb_s())))
                .unwrap_or_else(dash)
        };
        let (inc, _) = run.rtt_increase(c);
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {:.1} | {} | {:.1} | {} | {} | {} | {} |\n",
            c.mode.name(),
            r.p50,
            r.p90,
            r.max,
            c.ping.loss_pct(),
            cp(&|| format!("{inc:+.2}")),
            c.mode.target_ms().map(|t| format!("{t}")).unwrap_or_else(dash),
            match run.target_met(c) {
                Some(true) => "met".to_string(),
                Some(false) => "**missed**".to_string(),
                None => dash(),
            },
            c.down.mb_s(),
            vs(&c.down, base.map(|b| &b.down)),
            c.up.mb_s(),
            vs(&c.up, base.map(|b| &b.up)),
            cp(&|| c.cps.len().to_string()),
            cp(&|| format!("{:.2}", stats(&c.col("pause_ms")).p50)),
            cp(&|| format!("{:.2}", stats(&c.col("ack_ms")).p50)),
        ));
    }
    s.push_str(
        "\n`--no-net` trades safety for latency: the guest's output leaves before the backup holds the state \
         that sent it, so after a failover clients may have seen output the backup never produced and TCP \
         sessions can stall or reset (the project saw a session stall in the first `--no-net` failover round).\n",
    );
    let verdicts: Vec<String> = run
        .cases
        .iter()
        .filter_map(|c| {
            let t = c.mode.target_ms()?;
            Some(format!(
                "-i {}: {} (its pause p50 + ack p50: {:.2} ms)",
                c.mode.interval_ms()?,
                net_verdict(run.rtt_increase(c).0, t),
                stats(&c.col("pause_ms")).p50 + stats(&c.col("ack_ms")).p50
            ))
        })
        .collect();
    s.push_str(&format!(
        "\nTarget: buffered RTT p50 at most interval/2 + {NET_TARGET_SLACK_MS} ms over unprotected: {}. \
         A buffered reply waits for the end of its epoch (interval/2 on average), then for the checkpoint's \
         pause and the backup's ack, so the target holds only while pause + ack stay within about \
         {NET_TARGET_SLACK_MS} ms.\n\n",
        if verdicts.is_empty() {
            "not measured".to_string()
        } else {
            verdicts.join("; ")
        }
    ));
    s
}

fn net_case_json(run: &NetRun, c: &NetCase) -> Value {
    let base = run.base();
    let (inc50, inc90) = run.rtt_increase(c);
    let mut v = json!({
        "name": c.mode.name(),
        "mode": c.mode.key(),
        "protected": c.mode.interval_ms().is_some(),
        "interval_ms": c.mode.interval_ms(),
        "accel": run.accel,
        "window_ms": c.window_ms,
        "ping": {
            "replies": c.ping.rtts.len(),
            "transmitted": c.ping.transmitted,
            "received": c.ping.received,
            "duplicates": c.ping.duplicates,
            "loss_pct": r3(c.ping.loss_pct()),
            "rtt_ms": c.rtt().json(),
        },
        "rtt_increase_ms": base.map(|_| json!({"p50": r3(inc50), "p90": r3(inc90)})),
        "tcp": {
            "guest_to_client": c.down.json(base.map(|b| &b.down)),
            "client_to_guest": c.up.json(base.map(|b| &b.up)),
        },
    });
    if c.mode.interval_ms().is_some() {
        let extra = json!({
            "checkpoints": c.cps.len(),
            "achieved_interval_ms": r3(c.achieved_interval_ms()),
            "pause_ms": stats(&c.col("pause_ms")).json(),
            "ack_ms": stats(&c.col("ack_ms")).json(),
            "dirty_pages": stats(&c.col("dirty_pages")).json(),
            "bytes": stats(&c.col("bytes")).json(),
            "initial_sync": c.initial_sync,
            "target": c.mode.target_ms().map(|t| json!({"rtt_p50_increase_max_ms": t, "met": run.target_met(c)})),
        });
        if let (Some(a), Value::Object(b)) = (v.as_object_mut(), extra) {
            a.extend(b);
        }
    }
    v
}

fn net_main(
    o: &Opts,
    bins: &Binaries,
    profile: &str,
    img: &GuestImage,
    m: &Machine,
    date: &str,
) -> Result<()> {
    let run = run_net(bins, img, o)?;
    let (md, json_run) = net_report(date, m, profile, o, &run);
    emit(o, &md, json_run)
}

/// The net run's report: markdown and JSON run.
fn net_report(date: &str, m: &Machine, profile: &str, o: &Opts, run: &NetRun) -> (String, Value) {
    let md = render_net_md(date, m, profile, o, run);
    let target: Vec<Value> = run
        .cases
        .iter()
        .filter_map(|c| {
            let t = c.mode.target_ms()?;
            Some(json!({
                "interval_ms": c.mode.interval_ms(),
                "rtt_p50_increase_max_ms": t,
                "measured_ms": r3(run.rtt_increase(c).0),
                "met": run.target_met(c),
            }))
        })
        .collect();
    let json_run = json!({
        "date": date,
        "kind": "net",
        "machine": {"kernel": m.kernel, "nproc": m.nproc, "cpu": m.cpu, "qemu": m.qemu, "loadavg": m.loadavg},
        "profile": profile,
        "settings": {
            "seconds": o.seconds, "warmup_checkpoints": o.warmup, "timeout_ms": o.timeout_ms,
            "memory_mib": 256, "workload": net_workload(), "vm_ip": NET_VM_IP,
            "pings": o.seconds * PINGS_PER_S, "ping_interval_ms": 1000 / PINGS_PER_S,
            "intervals_ms": o.intervals, "no_net_interval_ms": o.intervals.first(),
        },
        "target": target,
        "cases": run.cases.iter().map(|c| net_case_json(run, c)).collect::<Vec<_>>(),
    });
    (md, json_run)
}

fn real_main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse_opts(&args)?;
    let (bins, profile) = find_bins()?;
    let img = GuestImage::find()?;
    let m = machine(qemu_version().unwrap_or_else(|| "?".into()));
    let date = utc_now();
    if o.disk {
        return disk_main(&o, &bins, &profile, &img, &m, &date);
    }
    if o.net {
        return net_main(&o, &bins, &profile, &img, &m, &date);
    }
    if o.suite {
        return suite::suite_main(&o, &bins, &profile, &img, &m, &date);
    }
    let cases: Vec<(u64, Workload)> = o
        .intervals
        .iter()
        .flat_map(|&i| [(i, Workload::Idle), (i, Workload::Dirty(o.mb_per_s, 1))])
        .collect();
    let mut all = Vec::new();
    for (i, w) in cases {
        eprintln!("remus-bench: -i {i} ms, {} ...", w.label());
        let c = run_case(&bins, &img, &o, &CaseSpec::new(i, w))?;
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
    let (md, run) = pause_report(&date, &m, &profile, &o, &all);
    emit(&o, &md, run)
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
        "machine": {"kernel": m.kernel, "nproc": m.nproc, "cpu": m.cpu, "qemu": m.qemu, "loadavg": m.loadavg},
        "profile": profile,
        "settings": {"seconds": o.seconds, "warmup": o.warmup, "timeout_ms": o.timeout_ms, "memory_mib": 256, "working_set_mb": 64},
        "cases": all.iter().map(|c| case_json(all, c)).collect::<Vec<_>>(),
    });
    (md, run)
}

/// Prints a run's report and, unless `--no-write`, appends it to the
/// results files.
fn emit(o: &Opts, md: &str, run: Value) -> Result<()> {
    print!("{md}");
    if o.write {
        write_results(&o.out, md, run)?;
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

    fn test_machine() -> Machine {
        Machine {
            kernel: "6".into(),
            nproc: 2,
            cpu: "cpu".into(),
            qemu: "QEMU 10".into(),
            loadavg: "0 0 0".into(),
        }
    }

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
    fn ping_output() {
        let out = "PING 198.18.0.10 (198.18.0.10) 56(84) bytes of data.\n\
            64 bytes from 198.18.0.10: icmp_seq=1 ttl=64 time=0.345 ms\n\
            64 bytes from 198.18.0.10: icmp_seq=2 ttl=64 time=51.2 ms\n\
            64 bytes from 198.18.0.10: icmp_seq=2 ttl=64 time=52.0 ms (DUP!)\n\
            From 198.18.0.3 icmp_seq=3 Destination Host Unreachable\n\
            64 bytes from 198.18.0.10: icmp_seq=4 ttl=64 time=7 ms\n\
            \n\
            --- 198.18.0.10 ping statistics ---\n\
            4 packets transmitted, 3 received, +1 duplicates, 25% packet loss, time 61ms\n\
            rtt min/avg/max/mdev = 0.345/19.5/51.2/22.6 ms\n";
        let p = parse_ping(out);
        assert_eq!(p.rtts, vec![0.345, 51.2, 7.0]);
        assert_eq!((p.transmitted, p.received, p.duplicates), (4, 3, 1));
        assert_eq!(p.loss_pct(), 25.0);
        let p = parse_ping(
            "64 bytes from 198.18.0.10: icmp_seq=1 ttl=64 time=1.5 ms\n\
             2 packets transmitted, 1 received, +1 errors, 50% packet loss, time 20ms\n",
        );
        assert_eq!((p.rtts.len(), p.transmitted, p.received), (1, 2, 1));
        assert!(parse_ping("").loss_pct().is_nan());
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        let r = rtt_stats(&v);
        assert_eq!((r.p50, r.p90, r.max), (100.0, 180.0, 200.0));
        let t = Transfer {
            bytes: 50 << 20,
            secs: 2.0,
        };
        assert_eq!(t.mb_s(), 25.0);
    }

    #[test]
    fn net_report() {
        assert_eq!(
            net_modes(&[100, 200]),
            vec![
                NetMode::Unprotected,
                NetMode::NoNet(100),
                NetMode::Buffered(100),
                NetMode::Buffered(200)
            ]
        );
        assert_eq!(NetMode::Buffered(100).target_ms(), Some(52.0));
        assert_eq!(NetMode::NoNet(100).target_ms(), None);
        let o = parse_opts(&["--net".to_string()]).unwrap();
        assert!(o.net && !o.disk);
        assert!(parse_opts(&["--net".to_string(), "--disk".to_string()]).is_err());
        let cp = |t: u64| {
            json!({"event": "checkpoint", "taken_at_ms": t, "pause_ms": 3.0, "dirty_pages": 100,
                   "bytes": 500000, "ack_ms": 1.5})
        };
        let case = |mode, rtt: f64, mb_s: u64| NetCase {
            mode,
            ping: Ping {
                rtts: vec![rtt; 10],
                transmitted: 10,
                received: 10,
                duplicates: 0,
            },
            down: Transfer {
                bytes: mb_s << 20,
                secs: 1.0,
            },
            up: Transfer {
                bytes: mb_s << 19,
                secs: 1.0,
            },
            window_ms: 1000.0,
            cps: if mode == NetMode::Unprotected {
                vec![]
            } else {
                vec![cp(100), cp(200)]
            },
            initial_sync: Value::Null,
        };
        let run = NetRun {
            accel: "kvm".into(),
            cases: vec![
                case(NetMode::Unprotected, 0.5, 100),
                case(NetMode::NoNet(100), 1.0, 90),
                case(NetMode::Buffered(100), 50.5, 20),
                case(NetMode::Buffered(200), 105.0, 10),
            ],
        };
        assert_eq!(run.rtt_increase(&run.cases[2]), (50.0, 50.0));
        assert_eq!(run.target_met(&run.cases[1]), None);
        assert_eq!(run.target_met(&run.cases[2]), Some(true));
        assert_eq!(run.target_met(&run.cases[3]), Some(false));
        let m = test_machine();
        let md = render_net_md("2026-01-01 00:00 UTC", &m, "release", &o, &run);
        assert!(
            md.contains("| protected -i 100, buffered | 50.50 | 50.50 | 50.50 | 0.0 | +50.00 | 52 | met | 20.0 | 0.20 | 10.0 | 0.20 | 2 | 3.00 | 1.50 |"),
            "{md}"
        );
        assert!(
            md.contains("| unprotected | 0.50 | 0.50 | 0.50 | 0.0 | — | — | — | 100.0 | 1.00 |"),
            "{md}"
        );
        assert!(
            md.contains("-i 100: met (+50.00 ms ≤ 52 ms) (its pause p50 + ack p50: 4.50 ms); -i 200: **MISSED** by 2.50 ms (+104.50 ms > 102 ms)"),
            "{md}"
        );
        let j = net_case_json(&run, &run.cases[3]);
        assert_eq!(j["mode"], "buffered");
        assert_eq!(j["target"]["met"], false);
        assert_eq!(j["rtt_increase_ms"]["p50"], 104.5);
        assert_eq!(j["tcp"]["guest_to_client"]["vs_unprotected"], 0.1);
        assert_eq!(
            (fmt_ratio(0.005), fmt_ratio(0.38)),
            ("0.005".into(), "0.38".into())
        );
        let j = net_case_json(&run, &run.cases[0]);
        assert!(j["pause_ms"].is_null() && j["target"].is_null());
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
        let case = |interval_ms, mb_s| DiskCase {
            interval_ms,
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
                case(None, 100.0),
                case(Some(100), 50.0),
                case(Some(200), 80.0),
            ],
        };
        assert_eq!(disk_ratios(&run), vec![(100, 0.5), (200, 0.8)]);
        assert_eq!(run.cases[2].replicated_mb_s(), 40.0);
        assert_eq!(run.cases[2].achieved_interval_ms(), 200.0);
        let m = test_machine();
        let o = parse_opts(&["--disk".to_string()]).unwrap();
        assert!(o.disk);
        let md = render_disk_md("2026-01-01 00:00 UTC", &m, "release", &o, &run);
        assert!(
            md.contains("| protected -i 200 ms | 80.0 | 80.0–80.0 | 0.80 |"),
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
