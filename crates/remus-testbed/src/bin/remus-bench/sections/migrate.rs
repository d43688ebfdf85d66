//! `migrate`: `remus migrate` against QEMU's own live migration of the
//! same guest over the same loopback link: total time, downtime, bytes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, GuestImage, free_port, last_tick, resumed_at_us, write_key};
use serde_json::{Value, json};

use crate::harness::{accel_of, own_qemu};
use crate::pause::{Workload, dirty_rates};
use crate::report::{Target, r3};
use crate::suite::{Ctx, Report, reference};

/// The `migrate` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Ctx { bins, img, .. } = *cx;
    let Report {
        sections,
        runs,
        targets,
        other_accel,
        ..
    } = r;
    eprintln!("remus-bench: remus migrate against QEMU's live migration ...");
    let mg = run_migrate(bins, img)?;
    other_accel.extend(mg.iter().map(|c| c.accel.clone()));
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
                "{:.1} ms (remus's own count {:.1}) against {:.1} ms (default limit) and {} (downtime-limit {TIGHT_DOWNTIME_MS} ms), STOP → RESUME by QEMU's events",
                c.remus.downtime_ms,
                c.remus.reported_downtime_ms.unwrap_or(f64::NAN),
                c.qemu.downtime_ms,
                c.qemu_tight
                    .map_or("none completed".into(), |t| format!("{:.1} ms", t.downtime_ms))
            ),
            c.remus.downtime_ms,
            c.qemu_best_downtime_ms(),
            " ms",
            1,
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct MigrationResult {
    total_ms: f64,
    /// Guest paused at the source → running at the destination, for both
    /// by QEMU's event timestamps (the source's STOP to the destination's
    /// RESUME, one host clock).
    downtime_ms: f64,
    bytes: u64,
    /// The tool's own figure. QEMU: `query-migrate`'s downtime (source
    /// stop → end of the transfer, without the destination's start).
    /// remus: its `done` event's (from its `stop` command until the
    /// destination's confirmation, sent once it has resumed the VM,
    /// reaches the source).
    reported_downtime_ms: Option<f64>,
}

/// The run with the median downtime.
fn median_run(mut v: Vec<MigrationResult>) -> MigrationResult {
    v.sort_by(|a, b| a.downtime_ms.total_cmp(&b.downtime_ms));
    v[v.len() / 2]
}

struct MigrateCase {
    workload: Workload,
    /// The accelerator the agents ran the guest on (QEMU's own runs use
    /// it too).
    accel: String,
    remus: MigrationResult,
    /// QEMU at its default downtime limit (300 ms).
    qemu: MigrationResult,
    /// QEMU with `downtime-limit` [`TIGHT_DOWNTIME_MS`]; `None` when no
    /// run completed (none converged in [`TIGHT_TIMEOUT`], or QEMU failed:
    /// the bench's log says which).
    qemu_tight: Option<MigrationResult>,
}

/// QEMU's downtime limit for its second series: what an operator who
/// wants the shortest pause sets. QEMU then stops the guest only once it
/// estimates that the rest fits in that time (at its default, 300 ms, it
/// may stop early and copy much of RAM while the guest is stopped).
const TIGHT_DOWNTIME_MS: u64 = 5;

/// How long a QEMU migration under the tight limit may iterate before
/// it counts as not converging (it is cancelled).
const TIGHT_TIMEOUT: Duration = Duration::from_secs(60);

impl MigrateCase {
    /// QEMU's better downtime: at its default limit, or at the tight one
    /// when it converged under it.
    fn qemu_best_downtime_ms(&self) -> f64 {
        self.qemu_tight.map_or(self.qemu.downtime_ms, |t| {
            t.downtime_ms.min(self.qemu.downtime_ms)
        })
    }

    fn json(&self) -> Value {
        let j = |r: &MigrationResult| {
            json!({"total_ms": r3(r.total_ms), "downtime_ms": r3(r.downtime_ms), "bytes": r.bytes,
            "reported_downtime_ms": r.reported_downtime_ms})
        };
        json!({"workload": self.workload.label(), "accel": self.accel, "remus": j(&self.remus), "qemu": j(&self.qemu),
            "qemu_tight": self.qemu_tight.as_ref().map(j), "qemu_tight_downtime_limit_ms": TIGHT_DOWNTIME_MS})
    }
}

fn run_migrate(bins: &Binaries, img: &GuestImage) -> Result<Vec<MigrateCase>> {
    let mut out = Vec::new();
    for w in [Workload::Idle, reference()] {
        let mut rs = Vec::new();
        let mut qs = Vec::new();
        let mut ts = Vec::new();
        let mut accel = String::new();
        for _ in 0..MIGRATE_RUNS {
            let (r, a) = remus_migration(bins, img, w)?;
            rs.push(r);
            accel = a;
            qs.push(qemu_migration(img, &accel, w, None)?);
            match qemu_migration(img, &accel, w, Some(TIGHT_DOWNTIME_MS)) {
                Ok(t) => ts.push(t),
                Err(e) => {
                    eprintln!("remus-bench:   QEMU at downtime-limit {TIGHT_DOWNTIME_MS} ms: {e:#}")
                }
            }
        }
        let (remus, qemu) = (median_run(rs), median_run(qs));
        let qemu_tight = (!ts.is_empty()).then(|| median_run(ts));
        eprintln!(
            "remus-bench:   {}: remus {:.0} ms total, {:.1} ms down; QEMU {:.0} ms total, {:.1} ms down; at downtime-limit {TIGHT_DOWNTIME_MS}: {}",
            w.label(),
            remus.total_ms,
            remus.downtime_ms,
            qemu.total_ms,
            qemu.downtime_ms,
            qemu_tight.map_or("none completed".into(), |t| format!(
                "{:.0} ms total, {:.1} ms down",
                t.total_ms, t.downtime_ms
            ))
        );
        out.push(MigrateCase {
            workload: w,
            accel,
            remus,
            qemu,
            qemu_tight,
        });
    }
    Ok(out)
}

/// Migrations per workload and kind; the one with the median downtime is
/// reported.
const MIGRATE_RUNS: usize = 5;

/// Whether a console shows `w` under way.
fn workload_ready(w: Workload, console: &str) -> bool {
    match w {
        Workload::Idle => last_tick(console) >= Some(3),
        Workload::Dirty(..) => dirty_rates(console).len() >= 2,
        Workload::Fill(_) => console.contains("cpumem:"),
    }
}

fn wait_workload(agent: &Agent, vm: &str, w: Workload) -> Result<String> {
    agent.wait_console(vm, Duration::from_secs(180), "the workload", |c| {
        workload_ready(w, c)
    })
}

/// One `remus migrate` of a fresh guest; with the accelerator it ran on.
fn remus_migration(
    bins: &Binaries,
    img: &GuestImage,
    w: Workload,
) -> Result<(MigrationResult, String)> {
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
    let accel = accel_of(&src, vm);
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
    // The same clock as QEMU's own figure below: the source QEMU's STOP
    // (the `done` event) to the destination QEMU's RESUME (its agent's
    // log), both QEMU's timestamps on this one host.
    let stop = done["stopped_at_us"]
        .as_u64()
        .context("remus migrate's done event has no stopped_at_us")?;
    let resume = resumed_at_us(&dest.log_text())
        .context("the destination agent logged no resumed_at_us at its switch-over")?;
    let r = MigrationResult {
        total_ms: done["total_ms"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: resume.saturating_sub(stop) as f64 / 1e3,
        bytes: done["bytes"].as_u64().unwrap_or(0),
        reported_downtime_ms: done["downtime_ms"].as_f64(),
    };
    Ok((r, accel))
}

/// QEMU's own migration of the guest; `downtime_limit` (ms) replaces its
/// default of 300 ms, and a run that has not converged under it within
/// [`TIGHT_TIMEOUT`] is cancelled and is an error.
fn qemu_migration(
    img: &GuestImage,
    accel: &str,
    w: Workload,
    downtime_limit: Option<u64>,
) -> Result<MigrationResult> {
    // On tmpfs, as the agents' RAM: QEMU alone on the same file system.
    let dir = remus_testbed::ram_tempdir()?;
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let dst = own_qemu(dir.path(), "dst", img, accel, &w.cmdline(), Some(&uri))?;
    let src = own_qemu(dir.path(), "src", img, accel, &w.cmdline(), None)?;
    let wait = Duration::from_secs(30);
    let sq = remus_qmp::Qmp::connect(&src.qmp, wait).context("QMP of the source QEMU")?;
    let dq = remus_qmp::Qmp::connect(&dst.qmp, wait).context("QMP of the destination QEMU")?;
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&src.serial).unwrap_or_default();
        if workload_ready(w, &text) {
            break;
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("the source guest did not start its workload");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // No bandwidth cap (QEMU's default is 128 MiB/s; remus has none).
    let mut params = json!({"max-bandwidth": 100u64 << 30});
    if let Some(ms) = downtime_limit {
        params["downtime-limit"] = json!(ms);
    }
    sq.execute("migrate-set-parameters", Some(params))
        .context("migrate-set-parameters")?;
    let give_up = downtime_limit.map_or(Duration::from_secs(300), |_| TIGHT_TIMEOUT);
    // Downtime by QEMU's event timestamps, as remus's: the source's STOP
    // to the destination's RESUME (one host clock).
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
        if t.elapsed() > give_up {
            let _ = sq.execute("migrate_cancel", None);
            bail!(
                "QEMU migration did not complete in {} s: {info}",
                give_up.as_secs()
            );
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
    let mut md = format!(
        "### `remus migrate` against QEMU's live migration\n\n\
         The same 256 MiB guest (q35, {}, RAM in a shared file) over 127.0.0.1. QEMU: `migrate` with `max-bandwidth` \
         raised to 100 GiB/s (its default caps at 128 MiB/s; remus has no cap) and its default 300 ms downtime limit (QEMU stops the guest \
         once it estimates the rest fits in that limit, so it may copy much of RAM while the guest is stopped), then again \
         with `downtime-limit` {TIGHT_DOWNTIME_MS} ms (what an operator who wants the shortest pause sets; such a run that has not \
         converged in {} s is cancelled); \
         its total time and bytes are `query-migrate`'s total-time and ram.transferred; its downtime is the source's STOP event \
         to the destination's RESUME event (QEMU's timestamps), with `query-migrate`'s downtime \
         (source stop → end of transfer) in brackets. remus: `remus migrate --json` between two agents; downtime by the same clock, \
         the source QEMU's STOP event (`stopped_at_us` in the `done` event) to the destination QEMU's RESUME event (`resumed_at_us` \
         in the destination agent's log), with remus's own figure in brackets (the `done` event's: from its `stop` command until \
         the destination's confirmation that it runs the VM reaches the source, so also the command's round trip and the \
         confirmation's way back); bytes include device state (compressed). Each figure is the run with the median \
         downtime of five; the target compares remus with the better of QEMU's two.\n\n\
         | workload | remus total ms | QEMU total ms | remus downtime ms | QEMU downtime ms | QEMU at {TIGHT_DOWNTIME_MS} ms: total ms | downtime ms | remus MiB | QEMU MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        cases
            .first()
            .map_or("?", |c| c.accel.as_str())
            .to_uppercase(),
        TIGHT_TIMEOUT.as_secs()
    );
    for c in cases {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.1} ({:.1}) | {:.1} ({:.0}) | {} | {} | {:.1} | {:.1} |\n",
            c.workload.label(),
            c.remus.total_ms,
            c.qemu.total_ms,
            c.remus.downtime_ms,
            c.remus.reported_downtime_ms.unwrap_or(f64::NAN),
            c.qemu.downtime_ms,
            c.qemu.reported_downtime_ms.unwrap_or(f64::NAN),
            c.qemu_tight
                .map_or("—".into(), |t| format!("{:.0}", t.total_ms)),
            c.qemu_tight.map_or("none completed".into(), |t| format!(
                "{:.1} ({:.0})",
                t.downtime_ms,
                t.reported_downtime_ms.unwrap_or(f64::NAN)
            )),
            c.remus.bytes as f64 / 1048576.0,
            c.qemu.bytes as f64 / 1048576.0
        ));
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(downtime_ms: f64) -> MigrationResult {
        MigrationResult {
            total_ms: 300.0,
            downtime_ms,
            bytes: 64 << 20,
            reported_downtime_ms: Some(downtime_ms - 1.0),
        }
    }

    fn case(qemu: f64, tight: Option<f64>) -> MigrateCase {
        MigrateCase {
            workload: Workload::Idle,
            accel: "kvm".into(),
            remus: result(6.0),
            qemu: result(qemu),
            qemu_tight: tight.map(result),
        }
    }

    #[test]
    fn remus_is_compared_with_the_better_of_qemus_two_limits() {
        assert_eq!(case(77.0, Some(9.0)).qemu_best_downtime_ms(), 9.0);
        assert_eq!(case(4.0, Some(9.0)).qemu_best_downtime_ms(), 4.0);
        assert_eq!(case(77.0, None).qemu_best_downtime_ms(), 77.0);
    }

    #[test]
    fn the_table_shows_both_qemu_series_and_a_tight_series_that_never_completed() {
        let md = render_migrate(&[case(77.0, Some(9.0)), case(170.0, None)]);
        assert!(md.contains("with `downtime-limit` 5 ms"), "{md}");
        assert!(md.contains("(q35, KVM, RAM in a shared file)"), "{md}");
        assert!(
            md.contains("| 6.0 (5.0) | 77.0 (76) | 300 | 9.0 (8) |"),
            "{md}"
        );
        assert!(
            md.contains("| 6.0 (5.0) | 170.0 (169) | — | none completed |"),
            "{md}"
        );
    }
}
