//! The bench suite (`remus-bench --suite`, what `scripts/bench.sh` runs
//! with no arguments): every measurement of the benchmark issue in one
//! run, one report section and one JSON run in `bench/`, and a summary of
//! the targets, each met or missed by how much.
//!
//! Sections (`--only` picks some, in this order):
//! - `matrix`: checkpoint pause p50/p99/max for every interval (25, 50,
//!   100, 200 ms) × guest dirty rate (idle, 10, 50, 200 MB/s), with wire
//!   and raw bytes per checkpoint.
//! - `wire`: bytes on the wire against raw dirty bytes as the share of
//!   each page the guest changes varies (1, 64, 256, 4096 bytes per page
//!   visit), and the reference case with compression off (`-u`).
//! - `ram`: pause against guest RAM size (256 MiB to 4 GiB) at the same
//!   dirty rate.
//! - `boot`: a real distribution booted from its disk (the Debian image
//!   of `scripts/build-debian-image.sh`, on qcow2, idle) against the
//!   kernel+initramfs guest idle, both with 512 MiB at -i 100: pause and
//!   device state per checkpoint.
//! - `slowdown`: a CPU and memory workload in the guest (`cpumem`),
//!   unprotected against protected at 25 and 40 checkpoints per second
//!   (and at 40 with `-u`), in one run on one VM; then the same guest in
//!   a QEMU driven over QMP alone, to locate QEMU's share.
//! - `failover`: repeated primary failures (SIGKILL; every third round
//!   frozen instead) on a LAN of network namespaces: time to the backup's
//!   running VM and to the first line a TCP client gets from it.
//! - `migrate`: `remus migrate` against QEMU's own live migration of the
//!   same guest over the same loopback link: total time, downtime, bytes.
//! - `disk`, `net`: the disk and network cases (`--disk`, `--net`).
//! - `resync`: after a failover, protecting back to the old primary
//!   (restarted on its state dir, its copy stale) compares only the chunks
//!   either side's change records mark; against a full digest compare of
//!   every chunk and a full copy (derived), in the same run, for 1, 4 and
//!   16 GiB sparse disks with 1% and 10% of the disk rewritten: chunks
//!   compared, differing, bytes sent, sync time and time to the first
//!   checkpoint, and their ratios.
//!
//! The reference workload (for the wire target) is `dirty` at 50 MB/s
//! changing 256 random bytes of each page it visits, checkpointed every
//! 100 ms (about 1,280 dirty pages per epoch).

use super::*;

pub(crate) const SECTIONS: &[&str] = &[
    "matrix", "wire", "ram", "boot", "slowdown", "failover", "migrate", "disk", "net", "resync",
    "crypto",
];

const MATRIX_INTERVALS: [u64; 4] = [25, 50, 100, 200];
const MATRIX_RATES: [u64; 3] = [10, 50, 200];
/// Bytes of each page the reference workload changes per visit.
const REF_WRITE_BYTES: u64 = 256;
const REF_INTERVAL_MS: u64 = 100;
const REF_MB_PER_S: u64 = 50;
const WIRE_WRITE_BYTES: [u64; 3] = [1, 64, 4096];
const RAM_SIZES_MIB: [u64; 4] = [256, 1024, 2048, 4096];

const TARGET_SLOWDOWN: f64 = 1.3;
const TARGET_FAILOVER_SLACK_MS: f64 = 300.0;
const TARGET_WIRE_RATIO: f64 = 0.5;
const TARGET_RAM_RATIO: f64 = 1.2;

fn reference() -> Workload {
    Workload::Dirty(REF_MB_PER_S, REF_WRITE_BYTES)
}

/// One target of the issue, as measured.
struct Target {
    what: String,
    measured: String,
    met: bool,
    /// When missed: by how much.
    note: String,
}

impl Target {
    /// Met when `value` ≤ `limit`; a miss is said as "by X" with
    /// `decimals` digits and `unit` appended (" ms", "×").
    fn at_most(
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
    fn at_least(
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
                format!("by {short:.decimals$}{unit}")
            },
        }
    }

    fn json(&self) -> Value {
        json!({"what": self.what, "measured": self.measured, "met": self.met, "note": self.note})
    }
}

/// The cases run since `start`, plus the reference case if it was run
/// before (by an earlier section), which this section would repeat.
fn with_reference(cases: &[CaseResult], start: usize) -> Vec<CaseResult> {
    let mut v = cases[start..].to_vec();
    if let Some(r) = cases[..start].iter().find(|c| is_reference(c)) {
        v.push(r.clone());
    }
    v
}

pub(crate) fn suite_main(
    o: &Opts,
    bins: &Binaries,
    profile: &str,
    img: &GuestImage,
    m: &Machine,
    date: &str,
) -> Result<()> {
    let only = |s: &str| o.only.is_empty() || o.only.iter().any(|x| x == s);
    let mut sections: Vec<String> = Vec::new();
    let mut runs = serde_json::Map::new();
    let mut targets: Vec<Target> = Vec::new();
    let mut cases: Vec<CaseResult> = Vec::new();
    let run_specs = |specs: Vec<CaseSpec>, cases: &mut Vec<CaseResult>| -> Result<()> {
        for spec in specs {
            eprintln!(
                "remus-bench: -i {} ms, {}, {} MiB{} ...",
                spec.interval_ms,
                spec.workload.label(),
                spec.memory_mib,
                if spec.compressed() { "" } else { ", -u" }
            );
            let c = run_case(bins, img, o, &spec)?;
            let p = stats(&c.pause);
            eprintln!(
                "remus-bench:   pause p50 {:.2} p99 {:.2} ms, dirty p50 {:.0}, wire/raw {:.3}",
                p.p50,
                p.p99,
                stats(&c.dirty).p50,
                wire_ratio(&c)
            );
            cases.push(c);
        }
        Ok(())
    };

    if only("matrix") {
        let mut specs = Vec::new();
        for &i in &MATRIX_INTERVALS {
            specs.push(CaseSpec::new(i, Workload::Idle));
            for &mb in &MATRIX_RATES {
                specs.push(CaseSpec::new(i, Workload::Dirty(mb, REF_WRITE_BYTES)));
            }
        }
        let start = cases.len();
        run_specs(specs, &mut cases)?;
        let matrix = &cases[start..];
        sections.push(render_matrix(matrix));
        runs.insert(
            "matrix".into(),
            json!(
                matrix
                    .iter()
                    .map(|c| case_json(matrix, c))
                    .collect::<Vec<_>>()
            ),
        );
        if let Some(c) = matrix
            .iter()
            .filter(|c| c.workload != Workload::Idle)
            .min_by_key(|c| (stats(&c.dirty).p50 - TARGET_DIRTY_PAGES as f64).abs() as u64)
        {
            let p = stats(&c.pause);
            targets.push(Target::at_most(
                format!("pause p50 ≤ {TARGET_P50_MS} ms at about {TARGET_DIRTY_PAGES} dirty pages per epoch"),
                format!("{:.2} ms at {:.0} pages ({})", p.p50, stats(&c.dirty).p50, case_label(c)),
                p.p50,
                TARGET_P50_MS,
                " ms",
                1,
            ));
        }
    }
    if only("wire") {
        let mut specs: Vec<CaseSpec> = WIRE_WRITE_BYTES
            .iter()
            .map(|&b| CaseSpec::new(REF_INTERVAL_MS, Workload::Dirty(REF_MB_PER_S, b)))
            .collect();
        let mut off = CaseSpec::new(REF_INTERVAL_MS, reference());
        off.protect_args = vec!["-u".into()];
        specs.push(off);
        if !cases.iter().any(is_reference) {
            specs.push(CaseSpec::new(REF_INTERVAL_MS, reference()));
        }
        let start = cases.len();
        run_specs(specs, &mut cases)?;
        let mut wire = with_reference(&cases, start);
        wire.sort_by_key(|c| {
            (
                !c.compressed,
                match c.workload {
                    Workload::Dirty(_, b) => b,
                    _ => 0,
                },
            )
        });
        sections.push(render_wire(&wire));
        runs.insert(
            "wire".into(),
            json!(wire.iter().map(|c| case_json(&wire, c)).collect::<Vec<_>>()),
        );
        if let Some(r) = wire.iter().find(|c| is_reference(c)) {
            let w = wire_ratio(r);
            targets.push(Target::at_most(
                format!(
                    "wire bytes ≤ {TARGET_WIRE_RATIO}× raw dirty bytes on the reference workload"
                ),
                format!("{w:.3}× ({})", case_label(r)),
                w,
                TARGET_WIRE_RATIO,
                "×",
                3,
            ));
        }
    }
    if only("ram") {
        let specs: Vec<CaseSpec> = RAM_SIZES_MIB
            .iter()
            .filter(|&&mib| mib != 256 || !cases.iter().any(is_reference))
            .map(|&mib| {
                let mut s = CaseSpec::new(REF_INTERVAL_MS, reference());
                s.memory_mib = mib;
                s
            })
            .collect();
        let start = cases.len();
        run_specs(specs, &mut cases)?;
        let mut ram = with_reference(&cases, start);
        ram.sort_by_key(|c| c.memory_mib);
        sections.push(render_ram(&ram));
        runs.insert(
            "ram".into(),
            json!(ram.iter().map(|c| case_json(&ram, c)).collect::<Vec<_>>()),
        );
        if let (Some(small), Some(big)) = (ram.first(), ram.last())
            && big.memory_mib > small.memory_mib
        {
            let (b, sm) = (stats(&big.pause).p50, stats(&small.pause).p50);
            let r = ratio(b, sm);
            targets.push(Target::at_most(
                format!(
                    "pause at {} MiB ≤ {TARGET_RAM_RATIO}× the pause at {} MiB (p50, same dirty rate)",
                    big.memory_mib, small.memory_mib
                ),
                format!("{r:.2}× ({b:.2} / {sm:.2} ms)"),
                r,
                TARGET_RAM_RATIO,
                "×",
                2,
            ));
        }
    }
    if only("boot") {
        eprintln!("remus-bench: a distribution booted from disk against the initramfs guest ...");
        let debian = workspace_root().join("target/debian-image/debian.qcow2");
        if !debian.exists() {
            bail!(
                "{} is missing: run scripts/build-debian-image.sh (scripts/bench.sh does)",
                debian.display()
            );
        }
        let mut specs = Vec::new();
        for disk in [None, Some(debian)] {
            let mut s = CaseSpec::new(REF_INTERVAL_MS, Workload::Idle);
            s.memory_mib = 512;
            s.disk_boot = disk;
            specs.push(s);
        }
        let start = cases.len();
        run_specs(specs, &mut cases)?;
        let boot = cases[start..].to_vec();
        sections.push(render_boot(&boot));
        runs.insert(
            "boot".into(),
            json!(boot.iter().map(|c| case_json(&boot, c)).collect::<Vec<_>>()),
        );
    }
    if only("slowdown") {
        eprintln!("remus-bench: slowdown (cpumem) ...");
        let s = run_slowdown(bins, img, o)?;
        sections.push(render_slowdown(&s));
        runs.insert("slowdown".into(), s.json());
        if let Some(c) = s
            .cases
            .iter()
            .find(|c| c.interval_ms == Some(40) && c.compressed)
        {
            let sd = s.slowdown(c);
            targets.push(Target::at_most(
                format!("guest slowdown ≤ {TARGET_SLOWDOWN}× at 25 checkpoints per second"),
                format!("{sd:.2}× (cpumem, -i 40)"),
                sd,
                TARGET_SLOWDOWN,
                "×",
                2,
            ));
        }
    }
    if only("failover") {
        eprintln!("remus-bench: failover rounds ...");
        let f = run_failover(bins, img, o)?;
        sections.push(render_failover(&f));
        runs.insert("failover".into(), f.json());
        let frozen: Vec<f64> = f
            .rounds
            .iter()
            .filter(|r| r.frozen)
            .map(|r| r.response_ms)
            .collect();
        if !frozen.is_empty() {
            let st = stats(&frozen);
            let limit = f.timeout_ms as f64 + TARGET_FAILOVER_SLACK_MS;
            targets.push(Target::at_most(
                format!(
                    "failover within timeout + {TARGET_FAILOVER_SLACK_MS} ms (frozen primary, --timeout {})",
                    f.timeout_ms
                ),
                format!(
                    "to first client line: p50 {:.0}, max {:.0} ms over {} rounds",
                    st.p50,
                    st.max,
                    frozen.len()
                ),
                st.max,
                limit,
                " ms",
                1,
            ));
        }
    }
    if only("migrate") {
        eprintln!("remus-bench: remus migrate against QEMU's live migration ...");
        let mg = run_migrate(bins, img)?;
        sections.push(render_migrate(&mg));
        runs.insert(
            "migrate".into(),
            json!(mg.iter().map(MigrateCase::json).collect::<Vec<_>>()),
        );
        for c in &mg {
            targets.push(Target::at_most(
                format!(
                    "`remus migrate` downtime no worse than QEMU's own ({})",
                    c.workload.label()
                ),
                format!(
                    "{:.0} ms against {:.0} ms",
                    c.remus.downtime_ms, c.qemu.downtime_ms
                ),
                c.remus.downtime_ms,
                c.qemu.downtime_ms,
                " ms",
                1,
            ));
        }
    }
    if only("disk") {
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
    }
    if only("net") {
        eprintln!("remus-bench: network cases ...");
        let run = run_net(bins, img, o)?;
        sections.push(render_net_md(date, m, profile, o, &run).replacen("## ", "### Network: ", 1));
        runs.insert(
            "net".into(),
            json!(
                run.cases
                    .iter()
                    .map(|c| net_case_json(&run, c))
                    .collect::<Vec<_>>()
            ),
        );
        for c in &run.cases {
            if let Some(t) = c.mode.target_ms() {
                let (p50, _) = run.rtt_increase(c);
                targets.push(Target::at_most(
                    format!("ping RTT p50 increase ≤ {t:.0} ms ({})", c.mode.name()),
                    format!("+{p50:.1} ms"),
                    p50,
                    t,
                    " ms",
                    1,
                ));
            }
        }
    }

    if only("crypto") {
        // The encrypted link against the same sessions in the clear
        // (`--unencrypted`), in one run: pauses and acks on the reference
        // workload, and the initial copy of a guest holding
        // CRYPTO_FILL_MIB of data.
        let clear = |mut s: CaseSpec| {
            s.protect_args.push("--unencrypted".into());
            s
        };
        let fill = || {
            let mut s = CaseSpec::new(REF_INTERVAL_MS, Workload::Fill(CRYPTO_FILL_MIB));
            s.memory_mib = CRYPTO_FILL_GUEST_MIB;
            s
        };
        let mut specs = vec![clear(CaseSpec::new(REF_INTERVAL_MS, reference()))];
        if !cases.iter().any(is_reference) {
            specs.push(CaseSpec::new(REF_INTERVAL_MS, reference()));
        }
        specs.push(clear(fill()));
        specs.push(fill());
        let start = cases.len();
        run_specs(specs, &mut cases)?;
        let crypto = with_reference(&cases, start);
        sections.push(render_crypto(&crypto));
        runs.insert(
            "crypto".into(),
            json!(
                crypto
                    .iter()
                    .map(|c| case_json(&crypto, c))
                    .collect::<Vec<_>>()
            ),
        );
        targets.extend(crypto_targets(&crypto));
    }

    let mut other_accel: Vec<String> = Vec::new();
    if only("resync") {
        eprintln!("remus-bench: resync after a failover against a full compare ...");
        let run = run_resync(bins, img, o)?;
        sections.push(render_resync(&run));
        runs.insert("resync".into(), run.json());
        targets.extend(resync_targets(&run));
        other_accel.extend(run.ok().map(|(_, c)| c.accel.clone()));
    }

    let (md, run) = suite_report(
        date,
        m,
        profile,
        o,
        &cases,
        other_accel,
        &targets,
        &sections,
        runs,
    );
    emit(o, &md, run)
}

/// The suite's report, markdown and JSON run: a header, the table of the
/// targets, then the sections in the order they ran.
#[allow(clippy::too_many_arguments)]
fn suite_report(
    date: &str,
    m: &Machine,
    profile: &str,
    o: &Opts,
    cases: &[CaseResult],
    other_accel: Vec<String>,
    targets: &[Target],
    sections: &[String],
    runs: serde_json::Map<String, Value>,
) -> (String, Value) {
    let accel: Vec<String> = {
        let mut v: Vec<String> = cases.iter().map(|c| c.accel.clone()).collect();
        v.extend(other_accel);
        v.sort();
        v.dedup();
        v
    };
    let mut md = format!(
        "## {date} — bench suite\n\n\
         - machine: Linux {}, {} CPUs, {}; load average at start {}\n\
         - QEMU: {}; accel: {}; build profile: {profile}\n\
         - command: `scripts/bench.sh` (`remus-bench --suite{}`); {} s measured per pause case after {} warm-up checkpoints\n\
         - reference workload: `dirty` at {REF_MB_PER_S} MB/s changing {REF_WRITE_BYTES} random bytes of each page it visits, -i {REF_INTERVAL_MS}; \
         checkpoints compressed (the default) unless a row says `-u`\n\n\
         ### Targets\n\n| target | measured | verdict |\n|---|---|---|\n",
        m.kernel,
        m.nproc,
        m.cpu,
        m.loadavg,
        m.qemu,
        if accel.is_empty() {
            "?".to_string()
        } else {
            accel.join(", ")
        },
        if o.only.is_empty() {
            String::new()
        } else {
            format!(" --only {}", o.only.join(","))
        },
        o.seconds,
        o.warmup,
    );
    for t in targets {
        let v = if t.met {
            "met".to_string()
        } else {
            format!("**MISSED** {}", t.note)
        };
        md.push_str(&format!("| {} | {} | {} |\n", t.what, t.measured, v));
    }
    md.push('\n');
    for s in sections {
        md.push_str(s);
        if !md.ends_with("\n\n") {
            md.push('\n');
        }
    }
    let run = json!({
        "date": date,
        "kind": "suite",
        "machine": {"kernel": m.kernel, "nproc": m.nproc, "cpu": m.cpu, "qemu": m.qemu, "loadavg": m.loadavg},
        "accel": accel,
        "profile": profile,
        "settings": {"seconds": o.seconds, "warmup": o.warmup, "timeout_ms": o.timeout_ms, "only": o.only,
            "reference": {"interval_ms": REF_INTERVAL_MS, "mb_per_s": REF_MB_PER_S, "write_bytes_per_page": REF_WRITE_BYTES}},
        "targets": targets.iter().map(Target::json).collect::<Vec<_>>(),
        "sections": Value::Object(runs),
    });
    (md, run)
}

fn is_reference(c: &CaseResult) -> bool {
    c.interval_ms == REF_INTERVAL_MS
        && c.workload == reference()
        && c.memory_mib == 256
        && c.compressed
        && c.encrypted
}

fn wire_ratio(c: &CaseResult) -> f64 {
    ratio(c.bytes.iter().sum(), c.raw_bytes.iter().sum())
}

fn case_label(c: &CaseResult) -> String {
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

/// The crypto section's initial copy: a guest of this size holding this
/// much data (random, so neither zero pages nor compression shorten it).
const CRYPTO_FILL_MIB: u64 = 640;
const CRYPTO_FILL_GUEST_MIB: u64 = 1024;
/// Targets of the encrypted link against the clear one.
const TARGET_CRYPTO_PAUSE: f64 = 1.1;
const TARGET_CRYPTO_ACK: f64 = 1.1;
const TARGET_CRYPTO_SYNC: f64 = 0.8;

/// The initial copy's rate, MB/s (bytes over the time until acknowledged).
fn sync_mb_per_s(c: &CaseResult) -> f64 {
    let bytes = c.initial_sync["bytes"].as_f64().unwrap_or(0.0);
    let ms = c.initial_sync["ms"].as_f64().unwrap_or(f64::NAN);
    bytes / 1e6 / (ms / 1e3)
}

fn render_crypto(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### The encrypted link against the clear one\n\n\
         The same sessions over the encrypted link (protocol 6: Noise_NNpsk0_25519_AESGCM_SHA256, \
         AES-256-GCM records of up to 64 KiB) and in the clear (`--unencrypted`, protocol 5). \
         Pause and ack on the reference workload; the initial copy's rate on a 1 GiB guest holding \
         640 MiB of random data (bytes copied over the time until the backup acknowledged them).\n\n",
    );
    s.push_str(CASE_HEADER);
    for c in cases {
        s.push_str(&case_row(c));
    }
    s.push_str(
        "
| initial copy | MiB | ms | MB/s |
|---|---:|---:|---:|
",
    );
    for c in cases
        .iter()
        .filter(|c| matches!(c.workload, Workload::Fill(_)))
    {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} |
",
            if c.encrypted {
                "encrypted"
            } else {
                "in the clear"
            },
            c.initial_sync["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            c.initial_sync["ms"].as_f64().unwrap_or(f64::NAN),
            sync_mb_per_s(c)
        ));
    }
    s.push('\n');
    s
}

fn crypto_targets(cases: &[CaseResult]) -> Vec<Target> {
    let find = |fill: bool, enc: bool| {
        cases.iter().find(|c| {
            c.encrypted == enc
                && if fill {
                    matches!(c.workload, Workload::Fill(_))
                } else {
                    c.workload == reference() && c.memory_mib == 256 && c.compressed
                }
        })
    };
    let mut t = Vec::new();
    if let (Some(e), Some(p)) = (find(false, true), find(false, false)) {
        let (ep, pp) = (stats(&e.pause).p50, stats(&p.pause).p50);
        let r = ratio(ep, pp);
        t.push(Target::at_most(
            format!("encrypted checkpoint pause ≤ {TARGET_CRYPTO_PAUSE}× the clear one (p50, reference workload)"),
            format!("{r:.2}× ({ep:.2} / {pp:.2} ms)"),
            r,
            TARGET_CRYPTO_PAUSE,
            "×",
            2,
        ));
        let (ea, pa) = (stats(&e.ack).p50, stats(&p.ack).p50);
        let r = ratio(ea, pa);
        t.push(Target::at_most(
            format!(
                "encrypted ack time ≤ {TARGET_CRYPTO_ACK}× the clear one (p50, reference workload)"
            ),
            format!("{r:.2}× ({ea:.2} / {pa:.2} ms)"),
            r,
            TARGET_CRYPTO_ACK,
            "×",
            2,
        ));
    }
    if let (Some(e), Some(p)) = (find(true, true), find(true, false)) {
        let (es, ps) = (sync_mb_per_s(e), sync_mb_per_s(p));
        let r = ratio(es, ps);
        t.push(Target::at_least(
            format!("encrypted initial copy ≥ {TARGET_CRYPTO_SYNC}× the clear one's rate"),
            format!("{r:.2}× ({es:.0} / {ps:.0} MB/s)"),
            r,
            TARGET_CRYPTO_SYNC,
            "×",
            2,
        ));
    }
    t
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

fn render_matrix(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### Checkpoint pause: interval × dirty rate\n\n\
         256 MiB guest; `dirty` changes 256 bytes of each page it visits. Percentiles are nearest-rank.\n\n",
    );
    s.push_str(CASE_HEADER);
    for c in cases {
        s.push_str(&case_row(c));
    }
    s.push_str(
        "\nPause phases (p50 ms): QMP stop / dirty scan / page copy / device state / QMP cont\n\n",
    );
    for c in cases {
        s.push_str(&format!(
            "- {}: {:.2} / {:.2} / {:.2} / {:.2} / {:.2}\n",
            case_label(c),
            stats(&c.ph_stop).p50,
            stats(&c.ph_scan).p50,
            stats(&c.ph_copy).p50,
            stats(&c.ph_devstate).p50,
            stats(&c.ph_cont).p50
        ));
    }
    s.push('\n');
    s
}

fn render_wire(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### Bytes on the wire against raw dirty bytes\n\n\
         -i 100, `dirty` at 50 MB/s; the bytes of each page changed per visit vary. \
         raw = dirty pages × 4096 + device state; wire = page and device-state frames as sent (headers included). \
         Compression XORs each page against the copy the backup holds (64 MiB page cache on the primary), then LZ4.\n\n",
    );
    s.push_str(CASE_HEADER);
    for c in cases {
        s.push_str(&case_row(c));
    }
    s.push('\n');
    s
}

fn render_ram(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### Pause against guest RAM size\n\n-i 100, reference workload (the same dirty rate at every size).\n\n",
    );
    s.push_str(CASE_HEADER);
    for c in cases {
        s.push_str(&case_row(c));
    }
    s.push_str("\nDirty scan p50 (ms) by size: ");
    let scans: Vec<String> = cases
        .iter()
        .map(|c| format!("{} MiB {:.2}", c.memory_mib, stats(&c.ph_scan).p50))
        .collect();
    s.push_str(&scans.join(", "));
    s.push_str("\n\n");
    s
}

/// Device state per checkpoint: raw bytes less the dirty pages.
fn devstate_bytes(c: &CaseResult) -> Vec<f64> {
    c.raw_bytes
        .iter()
        .zip(&c.dirty)
        .map(|(raw, dirty)| raw - dirty * 4096.0)
        .collect()
}

fn render_boot(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### A distribution booted from disk\n\n\
         The Debian 12 image of `scripts/build-debian-image.sh` (systemd, Debian's cloud kernel, ext4 root; SeaBIOS and syslinux; \
         a qcow2 overlay served by qemu-storage-daemon) against the kernel+initramfs test guest, both idle with 512 MiB, -i 100.\n\n",
    );
    s.push_str(CASE_HEADER);
    for c in cases {
        s.push_str(&case_row(c));
    }
    let dev: Vec<String> = cases
        .iter()
        .map(|c| {
            format!(
                "{}: {:.0} KiB",
                if c.disk_boot {
                    "Debian"
                } else {
                    "initramfs guest"
                },
                stats(&devstate_bytes(c)).p50 / 1024.0
            )
        })
        .collect();
    s.push_str(&format!(
        "
Device state per checkpoint, p50 (raw bytes less dirty pages): {}

",
        dev.join(", ")
    ));
    s
}

// ---------------------------------------------------------------------------
// Guest slowdown

const SLOWDOWN_WORKLOAD: &str = "remus.workload=tick,cpumem";

struct SlowCase {
    /// None: unprotected.
    interval_ms: Option<u64>,
    compressed: bool,
    kops: Vec<f64>,
    pauses: Vec<f64>,
}

impl SlowCase {
    fn name(&self) -> String {
        match self.interval_ms {
            None => "unprotected".into(),
            Some(i) => format!(
                "protected -i {i} ({} checkpoints/s){}",
                1000 / i,
                if self.compressed { "" } else { ", -u" }
            ),
        }
    }
}

struct Slowdown {
    cases: Vec<SlowCase>,
    seconds: u64,
    /// The same workload in a QEMU driven directly over QMP (no remus):
    /// (what was done at which rate, kops/s p50), unprotected first.
    qemu_only: Vec<(String, f64)>,
}

impl Slowdown {
    fn base(&self) -> f64 {
        let v: Vec<f64> = self
            .cases
            .iter()
            .filter(|c| c.interval_ms.is_none())
            .map(|c| stats(&c.kops).p50)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
    fn qemu_only_base(&self) -> f64 {
        let v: Vec<f64> = self
            .qemu_only
            .iter()
            .filter(|(w, _)| w == "nothing")
            .map(|x| x.1)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
    /// Unprotected throughput over this case's (≥ 1 when slower).
    fn slowdown(&self, c: &SlowCase) -> f64 {
        ratio(self.base(), stats(&c.kops).p50)
    }
    fn json(&self) -> Value {
        json!({
            "workload": SLOWDOWN_WORKLOAD,
            "seconds": self.seconds,
            "qemu_only": self.qemu_only.iter().map(|(what, k)| json!({
                "what": what, "kops_per_s": r3(*k), "slowdown": r3(ratio(self.qemu_only_base(), *k)),
            })).collect::<Vec<_>>(),
            "cases": self.cases.iter().map(|c| json!({
                "name": c.name(), "interval_ms": c.interval_ms, "compressed": c.compressed,
                "kops_per_s": stats(&c.kops).json(), "slowdown": r3(self.slowdown(c)),
                "pause_ms": stats(&c.pauses).json(), "checkpoints": c.pauses.len(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The guest's `cpumem: N kops/s` numbers.
fn cpumem_rates(console: &str) -> Vec<f64> {
    console_numbers(console, "cpumem: ")
}

fn run_slowdown(bins: &Binaries, img: &GuestImage, o: &Opts) -> Result<Slowdown> {
    let seconds = o.seconds.max(5);
    let keydir = tempfile::tempdir()?;
    let key = write_key(keydir.path());
    let key_s = key.to_str().context("key path")?;
    let peer = format!("127.0.0.1:{}", free_port());
    let backup = Agent::start(bins, None, &["--listen", &peer, "--key", key_s])?;
    let primary = Agent::start(bins, None, &["--key", key_s])?;
    let vm = "bench-slowdown";
    let cfg = primary.write_file("vm.toml", &img.config(vm, SLOWDOWN_WORKLOAD, ""));
    let out = primary.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
    // The guest's rate climbs for its first 10-20 s under TCG (code
    // translation warming up): measure only after that.
    primary.wait_console(vm, Duration::from_secs(180), "cpumem lines", |c| {
        cpumem_rates(c).len() >= CPUMEM_WARMUP_LINES
    })?;
    // Measures `seconds` of the guest's lines from now (dropping the
    // first, which straddles the start).
    let window = || -> Result<Vec<f64>> {
        let before = cpumem_rates(&primary.console(vm)).len();
        std::thread::sleep(Duration::from_secs(seconds + 1));
        let v: Vec<f64> = cpumem_rates(&primary.console(vm))
            .into_iter()
            .skip(before + 1)
            .collect();
        if v.len() < 2 {
            bail!("only {} cpumem lines in {seconds} s", v.len());
        }
        Ok(v)
    };
    let mut cases = Vec::new();
    let kops = window()?;
    cases.push(SlowCase {
        interval_ms: None,
        compressed: true,
        kops,
        pauses: Vec::new(),
    });
    for (i, compressed) in [(40u64, true), (25, true), (25, false)] {
        let mut args = vec![
            "-i".to_string(),
            i.to_string(),
            "--timeout".into(),
            "2000".into(),
        ];
        if !compressed {
            args.push("-u".into());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut follow = ProtectFollower::start(&primary, vm, &peer, &argv)?;
        // Let the initial sync and its after-effects pass.
        for _ in 0..6 {
            follow.event("checkpoint")?;
        }
        // The events are read while the guest is measured (a full pipe
        // would stall the CLI): (taken at, pause) of every checkpoint.
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, f64)>::new()));
        let seen_t = seen.clone();
        let reader = std::thread::spawn(move || {
            while let Ok(ev) = follow.event("checkpoint") {
                let at = ev["taken_at_ms"].as_u64().unwrap_or(0);
                let pause = ev["pause_ms"].as_f64().unwrap_or(f64::NAN);
                seen_t
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((at, pause));
            }
        });
        let from = now_ms();
        let kops = window();
        let to = now_ms();
        // Stopped whatever the window gave: the follower's CLI then ends
        // (its stream closes) and the reader thread with it.
        let out = primary.cli(&["protect", "--stop", vm]);
        if out.ok {
            let _ = reader.join();
        }
        let kops = kops?;
        if !out.ok {
            bail!("protect --stop: {}", out.stderr.trim());
        }
        let pauses: Vec<f64> = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(at, _)| (from..=to).contains(at))
            .map(|x| x.1)
            .collect();
        let t = Instant::now();
        while backup.vm(vm).is_some() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the backup kept its standby after protect --stop");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "remus-bench:   -i {i}{}: cpumem p50 {:.0} kops/s",
            if compressed { "" } else { " -u" },
            stats(&kops).p50
        );
        cases.push(SlowCase {
            interval_ms: Some(i),
            compressed,
            kops,
            pauses,
        });
    }
    let kops = window()?;
    cases.push(SlowCase {
        interval_ms: None,
        compressed: true,
        kops,
        pauses: Vec::new(),
    });
    let _ = primary.cli(&["destroy", vm]);
    drop(primary);
    drop(backup);
    let qemu_only = qemu_only_slowdown(img, seconds)?;
    Ok(Slowdown {
        cases,
        seconds,
        qemu_only,
    })
}

const CPUMEM_WARMUP_LINES: usize = 15;

/// What QEMU alone costs the guest: the `cpumem` guest in a QEMU we start
/// and drive over QMP at a checkpoint rate, doing only `stop` + `cont`,
/// or `stop` + the device-state save remus does (`migrate` to a file with
/// `x-ignore-shared`) + `cont`; no remus, no copying, no backup.
fn qemu_only_slowdown(img: &GuestImage, seconds: u64) -> Result<Vec<(String, f64)>> {
    let dir = tempfile::tempdir()?;
    let q = own_qemu(dir.path(), "alone", img, SLOWDOWN_WORKLOAD, None)?;
    let qmp = remus_qmp::Qmp::connect(&q.qmp, Duration::from_secs(30))?;
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )?;
    let serial = q.serial.clone();
    let rates = || cpumem_rates(&std::fs::read_to_string(&serial).unwrap_or_default());
    let t = Instant::now();
    while rates().len() < CPUMEM_WARMUP_LINES {
        if t.elapsed() > Duration::from_secs(180) {
            bail!("the QEMU-only guest printed no cpumem lines");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let dev = dir.path().join("dev.out");
    let mut out = Vec::new();
    for (what, hz) in [
        ("nothing", 0u64),
        ("stop + cont at 25/s", 25),
        ("stop + device-state save + cont at 25/s", 25),
        ("stop + device-state save + cont at 40/s", 40),
        ("nothing", 0),
    ] {
        let before = rates().len();
        let end = Instant::now() + Duration::from_secs(seconds + 1);
        let mut next = Instant::now();
        while Instant::now() < end {
            if hz == 0 {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            // Fixed rate, missed slots skipped (as remus's epoch loop
            // does), never caught up in a burst.
            next += Duration::from_millis(1000 / hz);
            let now = Instant::now();
            match next.checked_duration_since(now) {
                Some(wait) => std::thread::sleep(wait),
                None => next = now,
            }
            qmp.execute("stop", None)?;
            if what.contains("device-state") {
                qmp.execute(
                    "migrate",
                    Some(json!({"uri": format!("file:{}", dev.display())})),
                )?;
                while qmp.status()? != "postmigrate" {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            qmp.execute("cont", None)?;
        }
        let mut v: Vec<f64> = rates().into_iter().skip(before + 1).collect();
        if v.is_empty() {
            bail!("no cpumem lines while measuring '{what}'");
        }
        v.sort_by(f64::total_cmp);
        eprintln!(
            "remus-bench:   QEMU only, {what}: cpumem p50 {:.0} kops/s",
            v[v.len() / 2]
        );
        out.push((what.to_string(), v[v.len() / 2]));
    }
    Ok(out)
}

fn render_slowdown(s: &Slowdown) -> String {
    let mut md = format!(
        "### Guest slowdown\n\n\
         One 256 MiB guest running `cpumem` (random 64-byte reads over 64 MiB, hashing, 8-byte writes to a 2 MiB table), \
         {} s per case, unprotected before and after the protected cases (the baseline is their mean). \
         slowdown = unprotected kops/s ÷ this case's (p50 of the guest's once-a-second counts).\n\n\
         | case | kops/s p50 | slowdown | checkpoints | pause p50 ms |\n|---|---:|---:|---:|---:|\n",
        s.seconds
    );
    for c in &s.cases {
        md.push_str(&format!(
            "| {} | {:.0} | {:.2}× | {} | {} |\n",
            c.name(),
            stats(&c.kops).p50,
            s.slowdown(c),
            c.pauses.len(),
            if c.pauses.is_empty() {
                "—".into()
            } else {
                format!("{:.2}", stats(&c.pauses).p50)
            }
        ));
    }
    md.push_str(&format!(
        "\nThe same workload in a QEMU started and driven over QMP by the bench (no remus: no dirty scan, no copy, no sending, \
         no backup), {} s per row:\n\n| QEMU only | kops/s p50 | slowdown |\n|---|---:|---:|\n",
        s.seconds
    ));
    for (what, k) in &s.qemu_only {
        md.push_str(&format!(
            "| {what} | {k:.0} | {:.2}× |\n",
            ratio(s.qemu_only_base(), *k)
        ));
    }
    md.push('\n');
    md
}

// ---------------------------------------------------------------------------
// Failover time

struct FailoverRound {
    frozen: bool,
    /// The agents' arbiter lease time (s), when they had one.
    arbiter_ttl_s: Option<u64>,
    /// Primary killed (or frozen) → the backup's VM runs (agent API).
    running_ms: f64,
    /// Primary killed → the first new line at the TCP client.
    response_ms: f64,
    /// The client's longest wait for a line over the whole round.
    longest_gap_ms: f64,
}

struct FailoverRun {
    rounds: Vec<FailoverRound>,
    timeout_ms: u64,
    interval_ms: u64,
}

impl FailoverRun {
    fn json(&self) -> Value {
        let col = |frozen: bool, f: fn(&FailoverRound) -> f64| -> Vec<f64> {
            self.rounds
                .iter()
                .filter(|r| r.frozen == frozen && r.arbiter_ttl_s.is_none())
                .map(f)
                .collect()
        };
        let arbiter: Vec<Value> = FAILOVER_ARBITER_TTLS
            .iter()
            .map(|ttl| {
                let rs: Vec<&FailoverRound> = self
                    .rounds
                    .iter()
                    .filter(|r| r.arbiter_ttl_s == Some(*ttl))
                    .collect();
                let run: Vec<f64> = rs.iter().map(|r| r.running_ms).collect();
                let resp: Vec<f64> = rs.iter().map(|r| r.response_ms).collect();
                json!({"ttl_s": ttl, "rounds": rs.len(), "running_ms": stats(&run).json(),
                    "first_response_ms": stats(&resp).json()})
            })
            .collect();
        json!({
            "timeout_ms": self.timeout_ms, "interval_ms": self.interval_ms,
            "killed": {"rounds": col(false, |r| r.running_ms).len(),
                "running_ms": stats(&col(false, |r| r.running_ms)).json(),
                "first_response_ms": stats(&col(false, |r| r.response_ms)).json()},
            "frozen": {"rounds": col(true, |r| r.running_ms).len(),
                "running_ms": stats(&col(true, |r| r.running_ms)).json(),
                "first_response_ms": stats(&col(true, |r| r.response_ms)).json()},
            "killed_with_arbiter": arbiter,
            "rounds": self.rounds.iter().map(|r| json!({"frozen": r.frozen, "arbiter_ttl_s": r.arbiter_ttl_s, "running_ms": r.running_ms,
                "first_response_ms": r.response_ms, "longest_gap_ms": r.longest_gap_ms})).collect::<Vec<_>>(),
        })
    }
}

/// Lease times (s) of the failover rounds with an arbiter: etcd 3.4's
/// practical minimum and remusd's default.
const FAILOVER_ARBITER_TTLS: [u64; 2] = [2, 5];

fn run_failover(bins: &Binaries, img: &GuestImage, o: &Opts) -> Result<FailoverRun> {
    const INTERVAL: u64 = 100;
    const TIMEOUT: u64 = 1000;
    const ETCD_IP: &str = "198.18.0.5";
    let lan = Lan::new(
        "bf",
        &[
            remus_testbed::lan::HostSpec::vm("a", "198.18.0.1/24"),
            remus_testbed::lan::HostSpec::vm("b", "198.18.0.2/24"),
            remus_testbed::lan::HostSpec::client("c", "198.18.0.3/24"),
            remus_testbed::lan::HostSpec::client("e", &format!("{ETCD_IP}/24")),
        ],
    )?;
    let keydir = tempfile::tempdir()?;
    let key = write_key(keydir.path());
    let key_s = key.to_str().context("key path")?;
    let listen = format!("{}:{NET_REPL_PORT}", lan.addr("b"));
    // Without an arbiter: every round; every third one frozen. With one
    // (a single etcd member on host e): a few killed rounds per lease time.
    let with_arbiter = (o.failover_rounds / 4).max(2);
    let mut plan: Vec<(Option<u64>, u64)> = vec![(None, o.failover_rounds)];
    plan.extend(
        FAILOVER_ARBITER_TTLS
            .iter()
            .map(|t| (Some(*t), with_arbiter)),
    );
    let mut etcd = None;
    let mut rounds = Vec::new();
    let mut n = 0u64;
    for (ttl, count) in plan {
        let mut arb_args: Vec<String> = Vec::new();
        if let Some(ttl) = ttl {
            let e = match &etcd {
                Some(e) => e,
                None => etcd.insert(remus_testbed::etcd::EtcdCluster::start(
                    1,
                    ETCD_IP,
                    Some(lan.host("e")),
                )?),
            };
            arb_args = vec![
                "--arbiter".into(),
                e.endpoints().join(","),
                "--arbiter-prefix".into(),
                "/remus-bench".into(),
                "--arbiter-ttl".into(),
                ttl.to_string(),
                "--arbiter-margin-ms".into(),
                (ttl * 1000 / 5).to_string(),
            ];
        }
        let agent_args = |host: &str, extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec!["--key".into(), key_s.into()];
            if ttl.is_some() {
                v.extend(arb_args.iter().cloned());
                v.extend(["--host-name".into(), host.into()]);
            }
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let b_args = agent_args("b", &["--listen", &listen]);
        let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
        let backup = Agent::start(bins, Some(lan.host("b")), &b_args)?;
        for k in 0..count {
            let frozen = ttl.is_none() && k % 3 == 2;
            let a_args = agent_args("a", &[]);
            let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
            let mut primary = Agent::start(bins, Some(lan.host("a")), &a_args)?;
            let vm = format!("fo{n}");
            let round = failover_round(
                &lan,
                &backup,
                &mut primary,
                img,
                &vm,
                &listen,
                n,
                frozen,
                INTERVAL,
                TIMEOUT,
            )?;
            eprintln!(
                "remus-bench:   round {n} ({}{}): running after {:.0} ms, first client line after {:.0} ms",
                if frozen { "frozen" } else { "killed" },
                ttl.map(|t| format!(", arbiter TTL {t} s"))
                    .unwrap_or_default(),
                round.0,
                round.1
            );
            rounds.push(FailoverRound {
                frozen,
                arbiter_ttl_s: ttl,
                running_ms: round.0,
                response_ms: round.1,
                longest_gap_ms: round.2,
            });
            let _ = backup.cli(&["destroy", &vm]);
            primary.kill_hard();
            n += 1;
        }
    }
    Ok(FailoverRun {
        rounds,
        timeout_ms: TIMEOUT,
        interval_ms: INTERVAL,
    })
}

/// One failover round: (running ms, first response ms, longest gap ms).
#[allow(clippy::too_many_arguments)]
fn failover_round(
    lan: &Lan,
    backup: &Agent,
    primary: &mut Agent,
    img: &GuestImage,
    vm: &str,
    listen: &str,
    n: u64,
    frozen: bool,
    interval: u64,
    timeout: u64,
) -> Result<(f64, f64, f64)> {
    let cfg = primary.write_file("vm.toml", &net_vm_config(img, vm));
    let out = primary.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
    primary.wait_console(vm, Duration::from_secs(120), "seqserver", |c| {
        c.contains("seqserver: listening")
    })?;
    let client = SeqClient::start(
        lan.host("c"),
        format!("{NET_VM_IP}:7000").parse()?,
        Duration::from_millis(5),
    )?;
    client.wait_received(50, Duration::from_secs(30))?;
    let args = [
        "-i",
        &interval.to_string(),
        "--timeout",
        &timeout.to_string(),
    ];
    let mut follow = ProtectFollower::start(primary, vm, listen, &args)?;
    follow.checkpoint_after(0)?;
    // A moment in the epoch that varies from round to round.
    std::thread::sleep(Duration::from_millis(500 + (n * 137) % 400));
    let at = client.received();
    let t0 = Instant::now();
    if frozen {
        primary.freeze();
    } else {
        primary.kill_hard();
    }
    // Lines already released were on their way: let them land, then
    // count from there (the backup cannot answer this early).
    std::thread::sleep(Duration::from_millis(20));
    let at = client.received().max(at);
    let running_ms = backup.wait_failover(vm, t0, Duration::from_secs(30))? as f64;
    client.wait_received(at + 1, Duration::from_secs(30))?;
    let response_ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(follow);
    client.wait_received(at + 100, Duration::from_secs(30))?;
    if let Some(e) = client.error() {
        bail!("round {n}: the TCP session broke: {e}");
    }
    Ok((
        running_ms,
        response_ms,
        client.longest_gap().as_secs_f64() * 1e3,
    ))
}

fn render_failover(f: &FailoverRun) -> String {
    let mut md = format!(
        "### Failover time\n\n\
         Hosts a (primary), b (backup) and c (client) as network namespaces on one LAN; the guest runs `seqserver` and c holds a TCP session \
         that gets a line every 5 ms. `remus protect -i {} --timeout {}`; after a varying moment the primary's agent and QEMU are killed \
         (SIGKILL: the backup sees the connection close) or, every third round, frozen (SIGSTOP: silence, so the backup waits for its timeout). \
         Then killed rounds with an arbiter (one etcd member on a fourth host; margin TTL/5): the backup resumes only once the dead primary's lease has lapsed. \
         running = failure → the backup's VM reported running; first response = failure → the first new line at the client.\n\n\
         | failure | rounds | running p50 ms | p90 | max | first response p50 ms | p90 | max |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        f.interval_ms, f.timeout_ms
    );
    let kinds = [(false, None), (true, None)]
        .into_iter()
        .chain(FAILOVER_ARBITER_TTLS.iter().map(|t| (false, Some(*t))));
    for (frozen, ttl) in kinds {
        let rs: Vec<&FailoverRound> = f
            .rounds
            .iter()
            .filter(|r| r.frozen == frozen && r.arbiter_ttl_s == ttl)
            .collect();
        if rs.is_empty() {
            continue;
        }
        let run: Vec<f64> = rs.iter().map(|r| r.running_ms).collect();
        let resp: Vec<f64> = rs.iter().map(|r| r.response_ms).collect();
        let (a, b) = (stats(&run), stats(&resp));
        let mut sorted = run.clone();
        sorted.sort_by(f64::total_cmp);
        let mut sorted_r = resp.clone();
        sorted_r.sort_by(f64::total_cmp);
        md.push_str(&format!(
            "| {}{} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            if frozen { "frozen" } else { "killed" },
            ttl.map(|t| format!(", arbiter TTL {t} s"))
                .unwrap_or_default(),
            rs.len(),
            a.p50,
            percentile(&sorted, 90.0),
            a.max,
            b.p50,
            percentile(&sorted_r, 90.0),
            b.max
        ));
    }
    md.push_str("\nPer round (ms, running / first response; F frozen, A arbiter TTL): ");
    let v: Vec<String> = f
        .rounds
        .iter()
        .map(|r| {
            format!(
                "{}{}{:.0}/{:.0}",
                if r.frozen { "F " } else { "" },
                r.arbiter_ttl_s
                    .map(|t| format!("A{t} "))
                    .unwrap_or_default(),
                r.running_ms,
                r.response_ms
            )
        })
        .collect();
    md.push_str(&v.join(", "));
    md.push_str("\n\n");
    md
}

// ---------------------------------------------------------------------------
// remus migrate against QEMU's live migration

#[derive(Debug, Clone, Copy)]
struct MigrationResult {
    total_ms: f64,
    /// Guest paused at the source → running at the destination.
    downtime_ms: f64,
    bytes: u64,
    /// QEMU only: `query-migrate`'s own downtime (source stop → end of
    /// the transfer, without the destination's start).
    reported_downtime_ms: Option<f64>,
}

/// The run with the median downtime.
fn median_run(mut v: Vec<MigrationResult>) -> MigrationResult {
    v.sort_by(|a, b| a.downtime_ms.total_cmp(&b.downtime_ms));
    v[v.len() / 2]
}

struct MigrateCase {
    workload: Workload,
    remus: MigrationResult,
    qemu: MigrationResult,
}

impl MigrateCase {
    fn json(&self) -> Value {
        let j = |r: &MigrationResult| {
            json!({"total_ms": r3(r.total_ms), "downtime_ms": r3(r.downtime_ms), "bytes": r.bytes,
            "reported_downtime_ms": r.reported_downtime_ms})
        };
        json!({"workload": self.workload.label(), "remus": j(&self.remus), "qemu": j(&self.qemu)})
    }
}

fn run_migrate(bins: &Binaries, img: &GuestImage) -> Result<Vec<MigrateCase>> {
    let mut out = Vec::new();
    for w in [Workload::Idle, reference()] {
        let mut rs = Vec::new();
        let mut qs = Vec::new();
        for _ in 0..MIGRATE_RUNS {
            rs.push(remus_migration(bins, img, w)?);
            qs.push(qemu_migration(img, w)?);
        }
        let (remus, qemu) = (median_run(rs), median_run(qs));
        eprintln!(
            "remus-bench:   {}: remus {:.0} ms total, {:.0} ms down; QEMU {:.0} ms total, {:.0} ms down",
            w.label(),
            remus.total_ms,
            remus.downtime_ms,
            qemu.total_ms,
            qemu.downtime_ms
        );
        out.push(MigrateCase {
            workload: w,
            remus,
            qemu,
        });
    }
    Ok(out)
}

/// Migrations per workload and kind; the one with the median downtime is
/// reported.
const MIGRATE_RUNS: usize = 3;

fn wait_workload(agent: &Agent, vm: &str, w: Workload) -> Result<String> {
    agent.wait_console(vm, Duration::from_secs(180), "the workload", |c| match w {
        Workload::Idle => last_tick(c) >= Some(3),
        Workload::Dirty(..) => dirty_rates(c).len() >= 2,
        Workload::Fill(_) => c.contains("cpumem:"),
    })
}

fn remus_migration(bins: &Binaries, img: &GuestImage, w: Workload) -> Result<MigrationResult> {
    let keydir = tempfile::tempdir()?;
    let key = write_key(keydir.path());
    let key_s = key.to_str().context("key path")?;
    let peer = format!("127.0.0.1:{}", free_port());
    let dest = Agent::start(bins, None, &["--listen", &peer, "--key", key_s])?;
    let src = Agent::start(bins, None, &["--key", key_s])?;
    let vm = "bench-migrate";
    let cfg = src.write_file("vm.toml", &img.config(vm, &w.cmdline(), ""));
    let o = src.cli(&["create", cfg.to_str().context("config path")?]);
    if !o.ok {
        bail!("create: {}", o.stderr.trim());
    }
    wait_workload(&src, vm, w)?;
    let o = src.cli(&["migrate", "--json", vm, &peer]);
    if !o.ok {
        bail!("remus migrate: {}", o.stderr.trim());
    }
    let done = o
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "done")
        .context("remus migrate printed no done event")?;
    wait_workload(&dest, vm, w)?;
    let _ = dest.cli(&["destroy", vm]);
    Ok(MigrationResult {
        total_ms: done["total_ms"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: done["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        bytes: done["bytes"].as_u64().unwrap_or(0),
        reported_downtime_ms: None,
    })
}

/// A QEMU we started ourselves; killed (by its PID) on drop.
struct OwnQemu {
    child: std::process::Child,
    qmp: PathBuf,
    serial: PathBuf,
}

impl Drop for OwnQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same guest as the agents run it (q35, TCG with `-cpu max`, RAM in a
/// shared file), started directly with `cmdline` on its kernel command
/// line; `incoming` adds `-incoming URI`.
fn own_qemu(
    dir: &Path,
    tag: &str,
    img: &GuestImage,
    cmdline: &str,
    incoming: Option<&str>,
) -> Result<OwnQemu> {
    let qmp = dir.join(format!("{tag}.qmp"));
    let serial = dir.join(format!("{tag}.serial"));
    let ram = dir.join(format!("{tag}.ram"));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-accel", "tcg", "-cpu", "max"])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=ram0,size=256M,mem-path={},share=on",
            ram.display()
        ))
        .args([
            "-machine",
            "q35,memory-backend=ram0",
            "-m",
            "256M",
            "-smp",
            "1",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet {cmdline}"));
    if let Some(uri) = incoming {
        cmd.args(["-incoming", uri]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-system-x86_64")?;
    Ok(OwnQemu { child, qmp, serial })
}

fn qemu_migration(img: &GuestImage, w: Workload) -> Result<MigrationResult> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let dst = own_qemu(dir.path(), "dst", img, &w.cmdline(), Some(&uri))?;
    let src = own_qemu(dir.path(), "src", img, &w.cmdline(), None)?;
    let wait = Duration::from_secs(30);
    let sq = remus_qmp::Qmp::connect(&src.qmp, wait).context("QMP of the source QEMU")?;
    let dq = remus_qmp::Qmp::connect(&dst.qmp, wait).context("QMP of the destination QEMU")?;
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&src.serial).unwrap_or_default();
        let ready = match w {
            Workload::Idle => last_tick(&text) >= Some(3),
            Workload::Dirty(..) => dirty_rates(&text).len() >= 2,
            Workload::Fill(_) => text.contains("cpumem:"),
        };
        if ready {
            break;
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("the source guest did not start its workload");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // No bandwidth cap (QEMU's default is 128 MiB/s; remus has none);
    // QEMU's default downtime limit (300 ms) stays.
    sq.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 100u64 << 30})),
    )
    .context("migrate-set-parameters")?;
    // Downtime as remus measures its own: the source's STOP event to the
    // destination's RESUME, by QEMU's event timestamps (one host clock).
    let src_events = sq.subscribe();
    let dst_events = dq.subscribe();
    sq.execute("migrate", Some(json!({"uri": uri})))
        .context("migrate")?;
    let t = Instant::now();
    let info = loop {
        let info = sq.execute("query-migrate", None).context("query-migrate")?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {info}"),
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("QEMU migration did not complete in 300 s: {info}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let event_at = |rx: &std::sync::mpsc::Receiver<remus_qmp::Event>, name: &str| {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(ev) if ev.name == name => return ev.timestamp_us,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    };
    let stop = event_at(&src_events, "STOP").context("no STOP event from the source")?;
    let resume = event_at(&dst_events, "RESUME").context("no RESUME event from the destination")?;
    Ok(MigrationResult {
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: resume.saturating_sub(stop) as f64 / 1e3,
        bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        reported_downtime_ms: info["downtime"].as_f64(),
    })
}

fn render_migrate(cases: &[MigrateCase]) -> String {
    let mut md = String::from(
        "### `remus migrate` against QEMU's live migration\n\n\
         The same 256 MiB guest (q35, TCG, RAM in a shared file) over 127.0.0.1. QEMU: `migrate` with `max-bandwidth` \
         raised to 100 GiB/s (its default caps at 128 MiB/s; remus has no cap) and its default 300 ms downtime limit; \
         its total time and bytes are `query-migrate`'s total-time and ram.transferred; its downtime is the source's STOP event \
         to the destination's RESUME event (QEMU's timestamps), as remus counts its own, with `query-migrate`'s downtime \
         (source stop → end of transfer) in brackets. remus: `remus migrate --json` between two agents; downtime is source \
         paused → destination running; bytes include device state (compressed). Each figure is the run with the median \
         downtime of three.\n\n\
         | workload | remus total ms | QEMU total ms | remus downtime ms | QEMU downtime ms | remus MiB | QEMU MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cases {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} ({:.0}) | {:.1} | {:.1} |\n",
            c.workload.label(),
            c.remus.total_ms,
            c.qemu.total_ms,
            c.remus.downtime_ms,
            c.qemu.downtime_ms,
            c.qemu.reported_downtime_ms.unwrap_or(f64::NAN),
            c.remus.bytes as f64 / 1048576.0,
            c.qemu.bytes as f64 / 1048576.0
        ));
    }
    md.push('\n');
    md
}

// ---------------------------------------------------------------------------
// Resync after a failover: changed chunks only, against a full compare

/// Disk sizes (GiB, sparse raw images) and shares of the disk the guest
/// rewrites (%): every size × share is a case.
const RESYNC_SIZES_GIB: [u64; 3] = [1, 4, 16];
const RESYNC_SHARES_PCT: [u64; 2] = [1, 10];
/// `--al-extents` of both agents: the old primary's activity log keeps at
/// most this many 4 MiB extents marked beyond unacknowledged writes.
const RESYNC_AL_EXTENTS: u64 = 16;
const AL_EXTENT_MIB: u64 = 4;
const RESYNC_CHUNK: u64 = 64 * 1024;
/// diskbench's block: one chunk, so that each write (stamped with its
/// sequence number) changes a whole chunk's content. (With its default
/// 256 KiB blocks only the first chunk of each block would differ after a
/// rewrite: the rest of a block is the same fill every time.)
const RESYNC_BLOCK_KB: u64 = 64;
const RESYNC_VM: &str = "bench-resync";
const RESYNC_INTERVAL_MS: u64 = 100;
const RESYNC_TIMEOUT_MS: u64 = 1000;
/// The target's case: the largest disk with the smallest share changed.
const TARGET_RESYNC_TIME_RATIO: f64 = 0.5;
/// Syncs that sent at least this much give the send rate of the derived
/// full-copy time.
const RATE_MIN_BYTES: u64 = 256 << 20;

/// One disk sync as `remus protect --json` reported it (`sync_plan`,
/// `disk_synced`), and the time from starting `protect` to its first
/// committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
struct SyncNumbers {
    mode: String,
    plan_mode: String,
    reason: String,
    chunks: u64,
    disk_chunks: u64,
    differing: u64,
    sent_bytes: u64,
    zeroed: u64,
    ms: f64,
    first_checkpoint_ms: f64,
}

impl SyncNumbers {
    fn of(plan: &Value, synced: &Value, first_checkpoint_ms: f64) -> Result<SyncNumbers> {
        if synced.is_null() {
            bail!("remus protect reported no disk_synced event (plan: {plan})");
        }
        let u = |k: &str| {
            synced[k]
                .as_u64()
                .with_context(|| format!("disk_synced has no {k}: {synced}"))
        };
        Ok(SyncNumbers {
            mode: synced["mode"].as_str().unwrap_or("?").to_string(),
            plan_mode: plan["mode"].as_str().unwrap_or("?").to_string(),
            reason: plan["reason"].as_str().unwrap_or("").to_string(),
            chunks: u("chunks")?,
            disk_chunks: u("disk_chunks")?,
            differing: u("differing_chunks")?,
            sent_bytes: u("sent_bytes")?,
            zeroed: u("zeroed_chunks")?,
            ms: synced["ms"].as_f64().unwrap_or(f64::NAN),
            first_checkpoint_ms,
        })
    }

    /// Bytes per ms (= kB/s ÷ 1000) the sync compared and queued its data at.
    fn send_rate(&self) -> f64 {
        ratio(self.sent_bytes as f64, self.ms)
    }

    fn json(&self) -> Value {
        json!({"mode": self.mode, "plan_mode": self.plan_mode, "reason": self.reason,
            "chunks": self.chunks, "disk_chunks": self.disk_chunks, "differing_chunks": self.differing,
            "sent_bytes": self.sent_bytes, "zeroed_chunks": self.zeroed, "ms": r3(self.ms),
            "first_checkpoint_ms": r3(self.first_checkpoint_ms)})
    }
}

/// What one case measured.
#[derive(Debug, Clone)]
struct ResyncCase {
    accel: String,
    /// The first protection (A → B, B has no image): the initial copy.
    initial: SyncNumbers,
    /// B → A after A died and came back stale: changed chunks only.
    changed: SyncNumbers,
    /// A → B after B died, came back stale and was destroyed (its record
    /// forgotten): every chunk compared.
    full: SyncNumbers,
    /// Kill → the backup's VM running, ms, for the two failovers.
    failover_ms: [u64; 2],
    /// MiB the guest wrote after each failover before the resync began
    /// (at least its region; from its once-a-second lines, the first one
    /// after the failover left out).
    rewritten_mib: [f64; 2],
    /// Anything unexpected (a sync in another mode than planned), with the
    /// agents' log lines about it.
    notes: Vec<String>,
    wall_s: f64,
}

#[derive(Debug, Clone)]
struct ResyncOutcome {
    size_gib: u64,
    share_pct: u64,
    region_mib: u64,
    result: std::result::Result<ResyncCase, String>,
}

impl ResyncOutcome {
    fn size_bytes(&self) -> u64 {
        self.size_gib << 30
    }

    /// The most chunks a changed resync needs to compare: the guest writes
    /// only its region (from offset 0), and every record (the survivor's
    /// change map, the old primary's activity log) lies within it, the
    /// log at 4 MiB-extent granularity.
    fn bound_chunks(&self) -> u64 {
        self.region_mib.div_ceil(AL_EXTENT_MIB) * AL_EXTENT_MIB * (1 << 20) / RESYNC_CHUNK
    }

    fn label(&self) -> String {
        format!(
            "{} GiB, {}% ({} MiB)",
            self.size_gib, self.share_pct, self.region_mib
        )
    }
}

struct ResyncRun {
    cases: Vec<ResyncOutcome>,
    wall_s: f64,
}

impl ResyncRun {
    fn ok(&self) -> impl Iterator<Item = (&ResyncOutcome, &ResyncCase)> {
        self.cases
            .iter()
            .filter_map(|o| o.result.as_ref().ok().map(|c| (o, c)))
    }

    /// The send rate (bytes per ms) the derived full-copy time uses, and
    /// which sync it came from: the fastest of the syncs that sent at least
    /// [`RATE_MIN_BYTES`] (well beyond the 64 MiB disk journal, so that
    /// their time is mostly the transfer), else the one that sent the most.
    fn link_rate(&self) -> Option<(f64, String)> {
        let syncs: Vec<(&SyncNumbers, String)> = self
            .ok()
            .flat_map(|(o, c)| {
                [
                    (&c.initial, "initial copy"),
                    (&c.changed, "changed resync"),
                    (&c.full, "full compare"),
                ]
                .map(|(s, what)| (s, format!("{what}, {}", o.label())))
            })
            .filter(|(s, _)| s.sent_bytes > 0 && s.ms > 0.0)
            .collect();
        let big = syncs
            .iter()
            .filter(|(s, _)| s.sent_bytes >= RATE_MIN_BYTES)
            .max_by(|x, y| x.0.send_rate().total_cmp(&y.0.send_rate()));
        match big {
            Some((s, what)) => Some((
                s.send_rate(),
                format!(
                    "the fastest of this run's syncs that sent at least {} MiB: the {what}",
                    RATE_MIN_BYTES >> 20
                ),
            )),
            None => syncs
                .iter()
                .max_by_key(|(s, _)| s.sent_bytes)
                .map(|(s, what)| {
                    (
                        s.send_rate(),
                        format!("the sync that sent the most in this run: the {what}"),
                    )
                }),
        }
    }

    /// A whole-disk copy of `o`'s disk at the link rate, ms (derived).
    fn copy_ms(&self, o: &ResyncOutcome) -> f64 {
        self.link_rate()
            .map(|(r, _)| o.size_bytes() as f64 / r)
            .unwrap_or(f64::NAN)
    }

    fn json(&self) -> Value {
        let rate = self.link_rate();
        json!({
            "al_extents": RESYNC_AL_EXTENTS,
            "interval_ms": RESYNC_INTERVAL_MS,
            "timeout_ms": RESYNC_TIMEOUT_MS,
            "chunk_size": RESYNC_CHUNK,
            "wall_s": r3(self.wall_s),
            "link_rate_mb_s": rate.as_ref().map(|(r, _)| r3(r * 1000.0 / 1048576.0)),
            "link_rate_from": rate.map(|(_, w)| w),
            "cases": self.cases.iter().map(|o| {
                let mut v = json!({"size_gib": o.size_gib, "share_pct": o.share_pct,
                    "region_mib": o.region_mib, "bound_chunks": o.bound_chunks(),
                    "full_copy_bytes": o.size_bytes(), "full_copy_ms_derived": r3(self.copy_ms(o))});
                match &o.result {
                    Ok(c) => {
                        v["accel"] = json!(c.accel);
                        v["initial"] = c.initial.json();
                        v["changed"] = c.changed.json();
                        v["full"] = c.full.json();
                        v["failover_ms"] = json!(c.failover_ms);
                        v["rewritten_mib"] = json!(c.rewritten_mib.map(r3));
                        v["ratios"] = json!({
                            "bytes_changed_over_full": r3(ratio(c.changed.sent_bytes as f64, c.full.sent_bytes as f64)),
                            "ms_changed_over_full": r3(ratio(c.changed.ms, c.full.ms)),
                            "first_checkpoint_changed_over_full": r3(ratio(c.changed.first_checkpoint_ms, c.full.first_checkpoint_ms)),
                            "bytes_changed_over_copy": r3(ratio(c.changed.sent_bytes as f64, o.size_bytes() as f64)),
                            "ms_changed_over_copy_derived": r3(ratio(c.changed.ms, self.copy_ms(o))),
                        });
                        v["notes"] = json!(c.notes);
                        v["wall_s"] = json!(r3(c.wall_s));
                    }
                    Err(e) => v["error"] = json!(e),
                }
                v
            }).collect::<Vec<_>>(),
        })
    }
}

fn run_resync(bins: &Binaries, img: &GuestImage, o: &Opts) -> Result<ResyncRun> {
    let t = Instant::now();
    let mut cases = Vec::new();
    for &size_gib in &RESYNC_SIZES_GIB {
        for &share_pct in &RESYNC_SHARES_PCT {
            // f × S, to the nearest MiB (diskbench's unit).
            let region_mib = ((size_gib * 1024 * share_pct) as f64 / 100.0).round() as u64;
            let case = ResyncOutcome {
                size_gib,
                share_pct,
                region_mib,
                result: Err(String::new()),
            };
            eprintln!("remus-bench: resync, {} ...", case.label());
            let started = Instant::now();
            let result = resync_case(bins, img, o, size_gib, region_mib)
                .map(|mut c| {
                    c.wall_s = started.elapsed().as_secs_f64();
                    c
                })
                .map_err(|e| format!("{e:#}"));
            match &result {
                Ok(c) => eprintln!(
                    "remus-bench:   changed: {} of {} chunks compared, {} differed, {:.1} MiB in {:.0} ms; full: {} compared, {} differed, {:.1} MiB in {:.0} ms ({:.0} s){}",
                    c.changed.chunks,
                    c.changed.disk_chunks,
                    c.changed.differing,
                    c.changed.sent_bytes as f64 / 1048576.0,
                    c.changed.ms,
                    c.full.chunks,
                    c.full.differing,
                    c.full.sent_bytes as f64 / 1048576.0,
                    c.full.ms,
                    c.wall_s,
                    if c.notes.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "\nremus-bench:   NOTE: {}",
                            c.notes.join("\nremus-bench:   NOTE: ")
                        )
                    }
                ),
                Err(e) => eprintln!("remus-bench:   FAILED: {e}"),
            }
            cases.push(ResyncOutcome { result, ..case });
        }
    }
    Ok(ResyncRun {
        cases,
        wall_s: t.elapsed().as_secs_f64(),
    })
}

/// The agents' log lines about copies, sync plans and failovers (the last
/// `n`), for a sync that went another way than planned.
fn resync_log_lines(who: &str, agent: &Agent, n: usize) -> String {
    let log = strip_ansi(&agent.log_text());
    let keep: Vec<&str> = log
        .lines()
        .filter(|l| {
            [
                "sync plan",
                "initial disk sync",
                "stale",
                "STALE",
                "forgetting",
                "generation",
                "resync",
                "FAILOVER",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    let from = keep.len().saturating_sub(n);
    format!("{who}'s log: {}", keep[from..].join(" / "))
}

/// `text` without ANSI escape sequences (the agents colour their logs).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, then a final letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Protects the VM from `from` to `peer` and waits for the first committed
/// checkpoint; the follower (still protecting) and the sync's numbers.
fn resync_protect(
    bins: &Binaries,
    o: &Opts,
    from: &Agent,
    peer: &str,
) -> Result<(Protecting, SyncNumbers)> {
    let opts = Opts {
        timeout_ms: RESYNC_TIMEOUT_MS,
        ..o.clone()
    };
    let t = Instant::now();
    let mut p = Protecting::start(bins, from, RESYNC_VM, peer, RESYNC_INTERVAL_MS, &opts, &[])?;
    if let Err(e) = p.first_checkpoint(Duration::from_secs(600)) {
        let err = p.abort();
        bail!("{e:#}; remus protect: {}", err.trim());
    }
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    let n = SyncNumbers::of(&p.sync_plan, &p.disk_synced, first_ms)?;
    Ok((p, n))
}

/// Kills `primary` (agent and QEMU, SIGKILL; its `protect` follower `p`
/// goes once `backup` runs the VM) and waits until `backup` runs the VM;
/// then until the guest there has rewritten its region; then restarts
/// `primary`'s agent on its state dir, which must list its copy stale.
/// `names`: the hosts as the errors call them. Returns the failover time
/// (ms) and the MiB rewritten.
fn resync_fail_over(
    primary: &mut Agent,
    backup: &Agent,
    p: Protecting,
    names: [&str; 2],
    region_mib: u64,
) -> Result<(u64, f64)> {
    let [dead, alive] = names;
    let killed = Instant::now();
    primary.kill_hard();
    let ms = backup
        .wait_failover(RESYNC_VM, killed, Duration::from_secs(60))
        .with_context(|| format!("failover to {alive}"))?;
    drop(p);
    let seen = disk_samples(&backup.console(RESYNC_VM)).len();
    let mib = wait_rewritten(backup, seen, region_mib)
        .with_context(|| format!("the guest on {alive}"))?;
    primary
        .restart()
        .with_context(|| format!("restart {dead}'s agent"))?;
    expect_stale(primary, dead)?;
    Ok((ms, mib))
}

/// Waits until the guest on `host` has written at least `region_mib` MiB
/// after its `after` first diskbench lines (the first later line, which
/// may count writes from before the failover, left out; each line counts
/// its MiB/s × 1 s, an undercount since a line covers at least a second).
fn wait_rewritten(host: &Agent, after: usize, region_mib: u64) -> Result<f64> {
    let timeout = Duration::from_secs(120 + region_mib / 10);
    let deadline = Instant::now() + timeout;
    loop {
        let s = disk_samples(&host.console(RESYNC_VM));
        let mib: f64 = s.iter().skip(after + 1).map(|x| x.mb_s).sum();
        if mib >= region_mib as f64 {
            return Ok(mib);
        }
        if Instant::now() > deadline {
            bail!(
                "the guest wrote {mib:.0} of {region_mib} MiB within {timeout:?} after the failover; console tail:\n{}",
                tail(&host.console(RESYNC_VM), 10)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The agent came back on its old state dir: the VM must be listed stale.
fn expect_stale(host: &Agent, who: &str) -> Result<()> {
    match host.vm(RESYNC_VM) {
        Some(v) if v["role"] == "stale" => Ok(()),
        other => {
            bail!("{who}'s agent restarted on its state dir does not list the VM stale: {other:?}")
        }
    }
}

/// One case: a `size_gib` GiB sparse disk, the guest rewriting its first
/// `region_mib` MiB; see [`render_resync`] for the steps.
fn resync_case(
    bins: &Binaries,
    img: &GuestImage,
    o: &Opts,
    size_gib: u64,
    region_mib: u64,
) -> Result<ResyncCase> {
    // Declared before the agents, so removed after them (and after their
    // mount namespaces are gone).
    let keydir = tempfile::tempdir_in("/tmp")?;
    let key = write_key(keydir.path());
    let key_s = key.to_str().context("key path")?;
    // Host A's image directory (`images`, where the CLI, which checks the
    // config here, sees it too), and host B's own image directory, where
    // B keeps its copy, as DiskHosts does.
    let images = tempfile::Builder::new()
        .prefix("remus-resync")
        .tempdir_in("/tmp")?;
    let b_store = tempfile::Builder::new()
        .prefix("remus-resync-b")
        .tempdir_in("/tmp")?;
    let vda = images.path().join("vda.img");
    std::fs::File::create(&vda)
        .and_then(|f| f.set_len(size_gib << 30))
        .with_context(|| format!("create {}", vda.display()))?;
    let port_a = free_port();
    let port_b = loop {
        let p = free_port();
        if p != port_a {
            break p;
        }
    };
    let addr = [format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}")];
    let al = RESYNC_AL_EXTENTS.to_string();
    let b_images = b_store.path().to_str().context("image dir")?;
    let start = |i: usize| {
        let extra = ["--listen", &addr[i], "--key", key_s, "--al-extents", &al];
        if i == 0 {
            Agent::start(bins, None, &extra).context("start agent A")
        } else {
            let mut extra = extra.to_vec();
            extra.extend(["--image-dir", b_images]);
            Agent::start(bins, None, &extra).context("start agent B")
        }
    };
    let mut hosts = [start(0)?, start(1)?];
    let res = resync_steps(bins, img, o, &mut hosts, &addr, &vda, region_mib);
    let [a, b] = hosts;
    let res = res.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\nA's log (tail):\n{}\nB's log (tail):\n{}",
            tail(&strip_ansi(&a.log_text()), 12),
            tail(&strip_ansi(&b.log_text()), 12)
        )
    });
    // B first: stopping a primary first would make its backup take over.
    drop(b);
    drop(a);
    res
}

fn resync_steps(
    bins: &Binaries,
    img: &GuestImage,
    o: &Opts,
    hosts: &mut [Agent; 2],
    addr: &[String; 2],
    vda: &Path,
    region_mib: u64,
) -> Result<ResyncCase> {
    let [a, b] = hosts;
    let vm = RESYNC_VM;
    let cfg = a.write_file(
        "vm.toml",
        &img.config(
            vm,
            &format!(
                "remus.workload=tick,diskbench:/dev/vda:--region-mb:{region_mib}:--block-kb:{RESYNC_BLOCK_KB}"
            ),
            &format!("[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n", vda.display()),
        ),
    );
    let out = a.cli(&["create", cfg.to_str().context("config path")?]);
    if !out.ok {
        bail!("create {vm}: {}", out.stderr.trim());
    }
    wait_disk_samples(a, vm, 1, Duration::from_secs(180), &mut || Ok(()))?;
    let accel = a
        .vm(vm)
        .and_then(|v| v["accel"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let mut notes = Vec::new();
    let mut check_mode = |what: &str, s: &SyncNumbers, want: &str, a: &Agent, b: &Agent| {
        if s.mode != want || s.plan_mode != want {
            notes.push(format!(
                "{what}: expected a {want} sync, got plan {} / sync {} ({}); {}; {}",
                s.plan_mode,
                s.mode,
                s.reason,
                resync_log_lines("A", a, 8),
                resync_log_lines("B", b, 8)
            ));
        }
    };

    // A → B: B has no image and no record, a full sync creates its copy.
    let (p, initial) = resync_protect(bins, o, a, &addr[1]).context("protect A → B")?;
    check_mode("initial copy A → B", &initial, "full", a, b);
    // A dies; B runs the VM and records what the guest changes.
    let (f1, rew1) = resync_fail_over(a, b, p, ["A", "B"], region_mib)?;

    // B → A: A's stale copy and B's records: only changed chunks.
    let (p, changed) = resync_protect(bins, o, b, &addr[0]).context("protect B → A (resync)")?;
    check_mode("resync B → A", &changed, "changed", a, b);

    // Baseline: B dies, A runs on; B comes back stale and its record is
    // forgotten (`remus destroy`), so protecting to it compares every chunk.
    let (f2, rew2) = resync_fail_over(b, a, p, ["B", "A"], region_mib)?;
    let out = b.cli(&["destroy", vm]);
    if !out.ok {
        bail!("destroy the stale copy on B: {}", out.stderr.trim());
    }
    if let Some(v) = b.vm(vm) {
        bail!("B still lists the VM after destroy: {v}");
    }
    let (p, full) = resync_protect(bins, o, a, &addr[1]).context("protect A → B (full)")?;
    check_mode("full compare A → B", &full, "full", a, b);
    drop(p);
    Ok(ResyncCase {
        accel,
        initial,
        changed,
        full,
        failover_ms: [f1, f2],
        rewritten_mib: [rew1, rew2],
        notes,
        wall_s: 0.0,
    })
}

fn fmt_mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

fn render_resync(run: &ResyncRun) -> String {
    let mut md = format!(
        "### Resync after a failover: changed chunks only, against a full compare\n\n\
         Per case, two agents on this machine listening on 127.0.0.1, each with its own image directory at the same path \
         (B's agent sees its own through a mount namespace; B's image is missing at first and B creates it), both with `--al-extents {RESYNC_AL_EXTENTS}` \
         (the old primary's activity log keeps at most {} MiB marked beyond its unacknowledged writes). \
         The initramfs guest (256 MiB, 1 vCPU) has a sparse raw image of the case's size as vda and runs \
         `diskbench:/dev/vda:--region-mb:R:--block-kb:{RESYNC_BLOCK_KB}` from boot ({RESYNC_BLOCK_KB} KiB O_DIRECT writes, one chunk each, each stamped with its \
         sequence number, from offset 0 over its first R MiB, R = the share × the disk size, round and round). Steps: `remus protect -i {RESYNC_INTERVAL_MS} --timeout {RESYNC_TIMEOUT_MS}` A → B (the initial copy) and a committed \
         checkpoint; A killed (SIGKILL of agent and QEMU), B fails over; the guest on B writes at least R MiB more (its whole region; \
         counted from its once-a-second lines); A's agent restarted on its state dir (the VM listed stale); **changed**: protect B → A. \
         Then the baseline in the same run: B killed, A fails over, the guest writes its region again, B's agent restarted and \
         `remus destroy` run on its stale copy (its record forgotten); **full compare**: protect A → B, a digest compare of every chunk \
         (chunks in holes of the sparse images are hashed as zeroes without being read). \
         Sync ms = the `disk_synced` event's time (compare, and data queued to the link); protect → first checkpoint = from starting \
         `remus protect` to its first committed checkpoint (session, standby QEMU, disk sync, 256 MiB RAM copy, the backup's flush of its image, \
         first checkpoint; the guest writes on meanwhile). \
         Both syncs should send about the region: the guest rewrote all of it, each chunk with new content, since the other copy last had it.\n\n",
        RESYNC_AL_EXTENTS * AL_EXTENT_MIB
    );
    let rate = run.link_rate();
    md.push_str(&match &rate {
        Some((r, what)) => format!(
            "**Full copy** rows are derived, not run: the bytes a copy of the whole disk sends (its size), and for time that size at \
             {:.0} MB/s, the send rate (sent bytes ÷ sync ms) of {what}. A lower estimate: it counts the transfer alone. \
             1 MB = 1 MiB.\n\n",
            r * 1000.0 / 1048576.0
        ),
        None => "**Full copy** rows are derived, not run: the bytes a copy of the whole disk sends (its size); no sync in this run sent data, so no time is derived.\n\n".into(),
    });
    md.push_str(
        "| disk | share rewritten | sync | chunks compared / on disk | differing | MiB sent | zeroed | sync ms | protect → first checkpoint ms |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in &run.cases {
        let Ok(c) = &o.result else {
            md.push_str(&format!(
                "| {} GiB | {}% ({} MiB) | **failed** (below) | | | | | | |\n",
                o.size_gib, o.share_pct, o.region_mib
            ));
            continue;
        };
        let row = |what: &str, want: &str, s: &SyncNumbers| {
            format!(
                "| {} GiB | {}% ({} MiB) | {what}{} | {} / {} | {} | {} | {} | {:.0} | {:.0} |\n",
                o.size_gib,
                o.share_pct,
                o.region_mib,
                if s.mode == want {
                    String::new()
                } else {
                    format!(" (**was {}**)", s.mode)
                },
                s.chunks,
                s.disk_chunks,
                s.differing,
                fmt_mib(s.sent_bytes),
                s.zeroed,
                s.ms,
                s.first_checkpoint_ms
            )
        };
        md.push_str(&row("changed", "changed", &c.changed));
        md.push_str(&row("full compare", "full", &c.full));
        let chunks = o.size_bytes() / RESYNC_CHUNK;
        md.push_str(&format!(
            "| {} GiB | {}% ({} MiB) | full copy (derived) | {chunks} / {chunks} | — | {} | — | {:.0} (derived) | — |\n",
            o.size_gib,
            o.share_pct,
            o.region_mib,
            fmt_mib(o.size_bytes()),
            run.copy_ms(o)
        ));
    }
    md.push_str(
        "\nRatios, changed over the baseline (same case, same run; < 1 = the changed resync did less):\n\n\
         | disk | share rewritten | compared chunks, changed / bound | bytes changed/full | sync time changed/full | to first checkpoint changed/full | bytes changed/full copy | sync time changed/full copy (derived) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (o, c) in run.ok() {
        md.push_str(&format!(
            "| {} GiB | {}% ({} MiB) | {} / {} | {:.3} | {:.3} | {:.3} | {:.4} | {:.4} |\n",
            o.size_gib,
            o.share_pct,
            o.region_mib,
            c.changed.chunks,
            o.bound_chunks(),
            ratio(c.changed.sent_bytes as f64, c.full.sent_bytes as f64),
            ratio(c.changed.ms, c.full.ms),
            ratio(c.changed.first_checkpoint_ms, c.full.first_checkpoint_ms),
            ratio(c.changed.sent_bytes as f64, o.size_bytes() as f64),
            ratio(c.changed.ms, run.copy_ms(o)),
        ));
    }
    md.push_str(&format!(
        "\nBound = the region rounded up to whole {AL_EXTENT_MIB} MiB extents, in chunks: the guest writes nothing else, and every \
         change record lies within it (the survivor's change map per chunk, the old primary's activity log per extent).\n\n\
         Per case: failovers (kill → VM running on the other host), MiB the guest wrote after each before the resync (at least the region), \
         the initial copy A → B, the plans' reasons, wall time:\n\n"
    ));
    for o in &run.cases {
        match &o.result {
            Ok(c) => {
                md.push_str(&format!(
                    "- {}: failovers {} / {} ms; rewritten {:.0} / {:.0} MiB; initial copy ({}) {} of {} chunks differed, {} MiB sent, {:.0} ms; \
                     changed plan: \"{}\"; full plan: \"{}\"; {:.0} s ({})\n",
                    o.label(),
                    c.failover_ms[0],
                    c.failover_ms[1],
                    c.rewritten_mib[0],
                    c.rewritten_mib[1],
                    c.initial.mode,
                    c.initial.differing,
                    c.initial.chunks,
                    fmt_mib(c.initial.sent_bytes),
                    c.initial.ms,
                    c.changed.reason,
                    c.full.reason,
                    c.wall_s,
                    c.accel
                ));
                for n in &c.notes {
                    md.push_str(&format!("  - **unexpected**: {n}\n"));
                }
            }
            Err(e) => md.push_str(&format!(
                "- {}: **failed**: {}\n",
                o.label(),
                e.lines().next().unwrap_or("")
            )),
        }
    }
    md.push_str(&format!("\nThe section took {:.0} s.\n\n", run.wall_s));
    md
}

/// The section's targets: the changed resync compares only what the guest
/// wrote (every case), and takes at most half the full compare's time on
/// the largest disk with the smallest share changed.
fn resync_targets(run: &ResyncRun) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some((o, c)) = run.ok().max_by(|x, y| {
        let r = |(o, c): &(&ResyncOutcome, &ResyncCase)| {
            c.changed.chunks as f64 / o.bound_chunks() as f64
        };
        r(x).total_cmp(&r(y))
    }) {
        let r = c.changed.chunks as f64 / o.bound_chunks() as f64;
        t.push(Target::at_most(
            "changed resync compares only the chunks the guest wrote (≤ its region rounded up to 4 MiB extents; every case)".into(),
            format!(
                "at most {r:.2}× the bound ({} / {} chunks at {})",
                c.changed.chunks,
                o.bound_chunks(),
                o.label()
            ),
            r,
            1.0,
            "×",
            2,
        ));
    }
    let biggest = RESYNC_SIZES_GIB.iter().max().copied();
    let smallest = RESYNC_SHARES_PCT.iter().min().copied();
    if let Some((o, c)) = run
        .ok()
        .find(|(o, _)| Some(o.size_gib) == biggest && Some(o.share_pct) == smallest)
    {
        let r = ratio(c.changed.ms, c.full.ms);
        t.push(Target::at_most(
            format!(
                "changed resync sync time ≤ {TARGET_RESYNC_TIME_RATIO}× a full compare's ({} GiB disk, {}% changed)",
                o.size_gib, o.share_pct
            ),
            format!("{r:.3}× ({:.0} / {:.0} ms)", c.changed.ms, c.full.ms),
            r,
            TARGET_RESYNC_TIME_RATIO,
            "×",
            3,
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpumem_lines_parse() {
        assert_eq!(
            cpumem_rates("tick 1\ncpumem: 1234 kops/s\nxx cpumem: 99 kops/s\r\ncpumem: x\n"),
            vec![1234.0, 99.0]
        );
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
    }

    #[test]
    fn resync_report_rows_ratios_and_targets() {
        let sync = |mode: &str, chunks, sent_mib: u64, ms| SyncNumbers {
            mode: mode.into(),
            plan_mode: mode.into(),
            reason: "why".into(),
            chunks,
            disk_chunks: 262144,
            differing: sent_mib * 16,
            sent_bytes: sent_mib << 20,
            zeroed: 0,
            ms,
            first_checkpoint_ms: ms + 1000.0,
        };
        let case = ResyncCase {
            accel: "tcg".into(),
            initial: sync("full", 262144, 164, 2000.0),
            changed: sync("changed", 2624, 164, 100.0),
            full: sync("full", 262144, 512, 2000.0),
            failover_ms: [100, 200],
            rewritten_mib: [170.0, 180.0],
            notes: Vec::new(),
            wall_s: 30.0,
        };
        let run = ResyncRun {
            cases: vec![
                ResyncOutcome {
                    size_gib: 16,
                    share_pct: 1,
                    region_mib: 164,
                    result: Ok(case),
                },
                ResyncOutcome {
                    size_gib: 16,
                    share_pct: 10,
                    region_mib: 1638,
                    result: Err("boom\nmore".into()),
                },
            ],
            wall_s: 60.0,
        };
        assert_eq!(run.cases[0].bound_chunks(), 2624);
        assert_eq!(run.cases[1].bound_chunks(), 1640 * 16);
        // 512 MiB in 2000 ms: the full compare gives the rate.
        let (rate, what) = run.link_rate().unwrap();
        assert!((rate - 512.0 * 1048576.0 / 2000.0).abs() < 1e-6, "{rate}");
        assert!(
            what.contains("full compare, 16 GiB, 1% (164 MiB)"),
            "{what}"
        );
        let md = render_resync(&run);
        assert!(
            md.contains("| 16 GiB | 1% (164 MiB) | changed | 2624 / 262144 | 2624 | 164.0 | 0 | 100 | 1100 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| full copy (derived) | 262144 / 262144 | — | 16384.0 | — | 64000 (derived) |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| 16 GiB | 1% (164 MiB) | 2624 / 2624 | 0.320 | 0.050 |"),
            "{md}"
        );
        assert!(
            md.contains("16 GiB, 10% (1638 MiB): **failed**: boom\n"),
            "{md}"
        );
        let t = resync_targets(&run);
        assert_eq!(t.len(), 2);
        assert!(
            t.iter().all(|t| t.met),
            "{:?}",
            t.iter().map(Target::json).collect::<Vec<_>>()
        );
        let j = run.json();
        assert_eq!(j["cases"][0]["changed"]["mode"], "changed");
        assert_eq!(j["cases"][1]["error"], "boom\nmore");
    }
}
