//! `slowdown`: a CPU and memory workload in the guest (`cpumem`),
//! unprotected against protected at the defaults (the rate the adaptive
//! policy picks for a guest without output), at 25 and 40 checkpoints
//! per second (and at 40 with `-u`), in one run on one VM; then the same
//! guest in a QEMU driven over QMP alone, to locate QEMU's share.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, Binaries, GuestImage, ProtectFollower, free_port, now_ms, write_key};
use serde_json::{Value, json};

use crate::harness::{accel_of, console_numbers, create_vm, own_qemu};
use crate::opts::Opts;
use crate::report::{Target, r3, ratio, stats};
use crate::suite::{Ctx, Report};

const TARGET_SLOWDOWN: f64 = 1.3;
/// Issue 22: the slowdown at the checkpoint rate the adaptive policy
/// picks (`remus protect` without -i, --min-interval or --max-latency).
const TARGET_SLOWDOWN_ADAPTIVE: f64 = 1.5;

/// The `slowdown` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Ctx { o, bins, img, .. } = *cx;
    let Report {
        sections,
        runs,
        targets,
        other_accel,
        ..
    } = r;
    eprintln!("remus-bench: slowdown (cpumem) ...");
    let s = run_slowdown(bins, img, o)?;
    other_accel.push(s.accel.clone());
    sections.push(render_slowdown(&s));
    runs.insert("slowdown".into(), s.json());
    if let Some(c) = s.cases.iter().find(|c| c.mode == Mode::Defaults) {
        let sd = s.slowdown(c);
        targets.push(Target::at_most(
            format!(
                "guest slowdown ≤ {TARGET_SLOWDOWN_ADAPTIVE}× at the checkpoint rate the adaptive policy picks (defaults)"
            ),
            format!(
                "{sd:.2}× (cpumem, {:.1} checkpoints/s)",
                c.pauses.len() as f64 / s.seconds as f64
            ),
            sd,
            TARGET_SLOWDOWN_ADAPTIVE,
            "×",
            2,
        ));
    }
    if let Some(c) = s
        .cases
        .iter()
        .find(|c| c.mode == Mode::Interval(40) && c.compressed)
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
    Ok(())
}

const SLOWDOWN_WORKLOAD: &str = "remus.workload=tick,cpumem";

/// How a case runs the guest.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Unprotected,
    /// `remus protect` with no -i, --min-interval or --max-latency: the
    /// adaptive policy picks the rate (for a guest with no network
    /// output, one checkpoint every default -i).
    Defaults,
    /// `remus protect -i N`.
    Interval(u64),
}

struct SlowCase {
    mode: Mode,
    compressed: bool,
    kops: Vec<f64>,
    pauses: Vec<f64>,
}

impl SlowCase {
    fn name(&self) -> String {
        match self.mode {
            Mode::Unprotected => "unprotected".into(),
            Mode::Defaults => "protected, defaults (the adaptive policy)".into(),
            Mode::Interval(i) => format!(
                "protected -i {i} ({} checkpoints/s){}",
                1000 / i,
                if self.compressed { "" } else { ", -u" }
            ),
        }
    }
}

struct Slowdown {
    /// The protected guest's accelerator.
    accel: String,
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
            .filter(|c| c.mode == Mode::Unprotected)
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
            "accel": self.accel,
            "seconds": self.seconds,
            "qemu_only": self.qemu_only.iter().map(|(what, k)| json!({
                "what": what, "kops_per_s": r3(*k), "slowdown": r3(ratio(self.qemu_only_base(), *k)),
            })).collect::<Vec<_>>(),
            "cases": self.cases.iter().map(|c| json!({
                "name": c.name(),
                "interval_ms": match c.mode { Mode::Interval(i) => Some(i), _ => None },
                "defaults": c.mode == Mode::Defaults, "compressed": c.compressed,
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
    create_vm(&primary, vm, &cfg)?;
    let accel = accel_of(&primary, vm);
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
        mode: Mode::Unprotected,
        compressed: true,
        kops,
        pauses: Vec::new(),
    });
    for (mode, compressed) in [
        (Mode::Defaults, true),
        (Mode::Interval(40), true),
        (Mode::Interval(25), true),
        (Mode::Interval(25), false),
    ] {
        let mut args = vec!["--timeout".to_string(), "2000".into()];
        if let Mode::Interval(i) = mode {
            args.extend(["-i".to_string(), i.to_string()]);
        }
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
        let case = SlowCase {
            mode,
            compressed,
            kops,
            pauses,
        };
        eprintln!(
            "remus-bench:   {}: cpumem p50 {:.0} kops/s",
            case.name(),
            stats(&case.kops).p50
        );
        cases.push(case);
    }
    let kops = window()?;
    cases.push(SlowCase {
        mode: Mode::Unprotected,
        compressed: true,
        kops,
        pauses: Vec::new(),
    });
    let _ = primary.cli(&["destroy", vm]);
    drop(primary);
    drop(backup);
    let qemu_only = qemu_only_slowdown(img, &accel, seconds)?;
    Ok(Slowdown {
        accel,
        cases,
        seconds,
        qemu_only,
    })
}

const CPUMEM_WARMUP_LINES: usize = 15;

/// What QEMU alone costs the guest: the `cpumem` guest in a QEMU we start
/// and drive over QMP at a checkpoint rate, doing only `stop` + `cont`,
/// or `stop` + a device-state save remus does (QEMU's full stream:
/// `migrate` to a file with `x-ignore-shared`; or device-only state:
/// `xen-save-devices-state`) + `cont`; no remus, no copying, no backup.
fn qemu_only_slowdown(img: &GuestImage, accel: &str, seconds: u64) -> Result<Vec<(String, f64)>> {
    // On tmpfs, as the agents' RAM: QEMU alone on the same file system,
    // on the protected guest's accelerator.
    let dir = remus_testbed::ram_tempdir()?;
    let q = own_qemu(dir.path(), "alone", img, accel, SLOWDOWN_WORKLOAD, None)?;
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
        ("stop + device-only save + cont at 25/s", 25),
        ("stop + device-only save + cont at 40/s", 40),
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
            if what.contains("device-only") {
                qmp.execute(
                    "xen-save-devices-state",
                    Some(json!({"filename": dev.display().to_string(), "live": false})),
                )?;
            } else if what.contains("device-state") {
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
}
