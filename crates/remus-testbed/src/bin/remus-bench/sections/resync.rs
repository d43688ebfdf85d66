//! `resync` measures the resync after a failover through two agents
//! (127.0.0.1, each with its own image directory at the same path, B's
//! through a mount namespace, `--al-extents 16`): a guest rewrites 1% or
//! 10% of a 1, 4 or 16 GiB sparse raw disk (`diskbench --region-mb`), its
//! primary is killed, the backup takes over, the old primary's agent comes
//! back with a stale copy and is protected to again: a `changed` sync (only
//! the chunks the change records mark); then, in the same run, the other
//! way after `remus destroy` of the stale copy: a `full` digest compare of
//! every chunk. Reported per case: chunks compared, differing, bytes sent,
//! sync time and time to the first checkpoint of both, a full copy's bytes
//! (and its time at the run's measured send rate, derived), and ratios
//! changed/full.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, GuestImage, free_port, write_key};
use serde_json::{Value, json};

use crate::harness::{Protecting, accel_of, create_vm, tail};
use crate::opts::Opts;
use crate::report::{Target, r3, ratio};
use crate::sections::disk::{disk_samples, wait_disk_samples};
use crate::suite::{Ctx, Report};

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

/// The `resync` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Ctx { o, bins, img, .. } = *cx;
    let Report {
        sections,
        runs,
        targets,
        other_accel,
        ..
    } = r;
    eprintln!("remus-bench: resync after a failover against a full compare ...");
    let run = run_resync(bins, img, o)?;
    sections.push(render_resync(&run));
    runs.insert("resync".into(), run.json());
    targets.extend(resync_targets(&run));
    other_accel.extend(run.ok().map(|(_, c)| c.accel.clone()));
    Ok(())
}

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
    create_vm(a, vm, &cfg)?;
    wait_disk_samples(a, vm, 1, Duration::from_secs(180), &mut || Ok(()))?;
    let accel = accel_of(a, vm);
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
