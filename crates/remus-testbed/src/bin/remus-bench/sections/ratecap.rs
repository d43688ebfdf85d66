//! `ratecap`: what another VM's initial copy does to a protected VM's
//! checkpoints, uncapped and under `remus protect --max-rate`, in one run.
//! VM1 (the reference workload) is protected throughout; VM2 (1 GiB
//! holding 640 MiB of random data, paused once filled so that only its
//! copy competes) is protected to the same backup over the same link, its
//! initial copy timed, then stopped; VM1's checkpoints taken during VM2's
//! copies are compared with VM1's alone (before and after).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use remus_testbed::{Agent, DiskHosts, now_ms};
use serde_json::{Value, json};

use crate::harness::{
    Protecting, Window, accel_of, create_vm, destroy_or_warn, logs_of, wait_standby_gone,
};
use crate::pause::{Workload, dirty_rates};
use crate::report::{Stats, r3, ratio, stats};
use crate::suite::{Ctx, REF_INTERVAL_MS, Report, reference};

/// The cap of VM2's capped copy, MiB/s (`--max-rate 50M`).
const CAP_MIB: u64 = 50;
/// VM2: a guest of this size holding this much random data (neither zero
/// pages nor compression shorten its copy).
const FILL_MIB: u64 = 640;
const FILL_GUEST_MIB: u64 = 1024;
/// VM2's uncapped copy is repeated until VM1 has taken this many
/// checkpoints during them, or this many copies.
const MIN_SAMPLES: usize = 100;
const MAX_COPIES: usize = 8;

/// The `ratecap` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    eprintln!(
        "remus-bench: rate caps: VM1's checkpoints during VM2's initial copy, uncapped and at --max-rate {CAP_MIB}M ..."
    );
    let rc = run_ratecap(cx)?;
    eprintln!(
        "remus-bench:   VM1 ack p50 alone {:.2} ms, uncapped {:.2} ms, capped {:.2} ms",
        stats(&rc.alone().ack).p50,
        stats(&rc.uncapped.ack).p50,
        stats(&rc.capped.ack).p50
    );
    r.sections.push(render(&rc));
    r.runs.insert("ratecap".into(), rc.json());
    r.other_accel.push(rc.accel.clone());
    Ok(())
}

/// One initial copy of VM2: when it ran (Unix ms) and what it moved.
#[derive(Debug, Clone, Copy)]
struct Copy {
    start_ms: f64,
    end_ms: f64,
    bytes: u64,
}

impl Copy {
    fn ms(&self) -> f64 {
        self.end_ms - self.start_ms
    }
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / (self.ms() / 1e3)
    }
}

struct RateCap {
    accel: String,
    /// VM1 alone, before and after VM2's copies (Unix ms).
    before_span: (f64, f64),
    after_span: (f64, f64),
    before: Window,
    after: Window,
    uncapped: Window,
    capped: Window,
    uncapped_copies: Vec<Copy>,
    capped_copy: Copy,
}

impl RateCap {
    /// VM1 alone: before and after VM2's copies, together.
    fn alone(&self) -> Window {
        let mut w = self.before.clone();
        w.pause.extend(&self.after.pause);
        w.ack.extend(&self.after.ack);
        w
    }

    fn json(&self) -> Value {
        let copy =
            |c: &Copy| json!({"bytes": c.bytes, "ms": r3(c.ms()), "mb_per_s": r3(c.mb_per_s())});
        json!({
            "cap_mib_per_s": CAP_MIB,
            "alone_before_s": r3((self.before_span.1 - self.before_span.0) / 1e3),
            "alone_after_s": r3((self.after_span.1 - self.after_span.0) / 1e3),
            "vm1": {"interval_ms": REF_INTERVAL_MS, "workload": reference().label()},
            "vm2": {"memory_mib": FILL_GUEST_MIB, "data_mib": FILL_MIB},
            "alone_before": self.before.json(),
            "alone_after": self.after.json(),
            "uncapped": self.uncapped.json(),
            "capped": self.capped.json(),
            "uncapped_copies": self.uncapped_copies.iter().map(copy).collect::<Vec<_>>(),
            "capped_copy": copy(&self.capped_copy),
        })
    }
}

fn run_ratecap(cx: &Ctx) -> Result<RateCap> {
    let Ctx { o, bins, img, .. } = *cx;
    let hosts = DiskHosts::new()?;
    let backup = hosts.backup(bins).context("start backup agent")?;
    let primary = hosts.primary(bins).context("start primary agent")?;
    let peer = hosts.listen.clone();
    let boot = Duration::from_secs(300);
    let cfg1 = primary.write_file("vm1.toml", &img.config("vm1", &reference().cmdline(), ""));
    create_vm(&primary, "vm1", &cfg1)?;
    let cfg2 = img
        .config("vm2", &Workload::Fill(FILL_MIB).cmdline(), "")
        .replace("memory = 256", &format!("memory = {FILL_GUEST_MIB}"));
    let cfg2 = primary.write_file("vm2.toml", &cfg2);
    create_vm(&primary, "vm2", &cfg2)?;
    primary.wait_console("vm1", boot, "a 'dirty:' line", |c| {
        !dirty_rates(c).is_empty()
    })?;
    primary.wait_console("vm2", boot, "the data filled", |c| c.contains("cpumem:"))?;
    // Its data in place, VM2 stops computing: only its copy competes.
    let out = primary.cli(&["pause", "vm2"]);
    if !out.ok {
        bail!("pause vm2: {}", out.stderr.trim());
    }
    let accel = accel_of(&primary, "vm1");
    let logs = logs_of(&primary, &backup, "vm1");

    let mut vm1 = Protecting::start(bins, &primary, "vm1", &peer, REF_INTERVAL_MS, o, &[])?;
    vm1.wait_checkpoints(o.warmup + 1, Duration::from_secs(180))
        .map_err(logs)?;
    let alone = |vm1: &mut Protecting| -> Result<(f64, f64)> {
        let t0 = now_ms() as f64;
        std::thread::sleep(Duration::from_secs(o.seconds));
        vm1.drain()?;
        Ok((t0, now_ms() as f64))
    };
    let before = alone(&mut vm1).map_err(logs)?;
    let mut uncapped_copies = Vec::new();
    loop {
        let c = copy_vm2(cx, &primary, &backup, &peer, &[]).map_err(logs)?;
        eprintln!(
            "remus-bench:   VM2 uncapped: {} MiB in {:.0} ms",
            c.bytes >> 20,
            c.ms()
        );
        uncapped_copies.push(c);
        vm1.drain().map_err(logs)?;
        let spans: Vec<(f64, f64)> = uncapped_copies
            .iter()
            .map(|c| (c.start_ms, c.end_ms))
            .collect();
        if Window::of(&vm1.cps, &spans).pause.len() >= MIN_SAMPLES
            || uncapped_copies.len() >= MAX_COPIES
        {
            break;
        }
    }
    let cap = format!("{CAP_MIB}M");
    let capped_copy =
        copy_vm2(cx, &primary, &backup, &peer, &["--max-rate", &cap]).map_err(logs)?;
    eprintln!(
        "remus-bench:   VM2 at --max-rate {cap}: {} MiB in {:.0} ms",
        capped_copy.bytes >> 20,
        capped_copy.ms()
    );
    // The backup has dropped VM2's standby; let its teardown (a 1 GiB
    // QEMU and RAM file) pass before VM1 is measured alone again.
    std::thread::sleep(Duration::from_secs(3));
    let after = alone(&mut vm1).map_err(logs)?;
    vm1.drain().map_err(logs)?;
    let cps = std::mem::take(&mut vm1.cps);
    let err = vm1.stop(&primary, "vm1");
    if !err.trim().is_empty() {
        eprintln!("remus-bench:   remus protect vm1: {}", err.trim());
    }
    destroy_or_warn(&primary, "vm1");
    destroy_or_warn(&primary, "vm2");
    let spans: Vec<(f64, f64)> = uncapped_copies
        .iter()
        .map(|c| (c.start_ms, c.end_ms))
        .collect();
    Ok(RateCap {
        accel,
        before_span: before,
        after_span: after,
        before: Window::of(&cps, &[before]),
        after: Window::of(&cps, &[after]),
        uncapped: Window::of(&cps, &spans),
        capped: Window::of(&cps, &[(capped_copy.start_ms, capped_copy.end_ms)]),
        uncapped_copies,
        capped_copy,
    })
}

/// Protects VM2 (with `extra` arguments) until its initial copy is
/// acknowledged, then stops and waits for the backup to drop its copy.
fn copy_vm2(cx: &Ctx, primary: &Agent, backup: &Agent, peer: &str, extra: &[&str]) -> Result<Copy> {
    // The backup may still be tearing down the last copy ("try again").
    let mut tries = 0;
    loop {
        tries += 1;
        let mut p = Protecting::start(cx.bins, primary, "vm2", peer, REF_INTERVAL_MS, cx.o, extra)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let got = loop {
            if let Err(e) = p.drain() {
                break Err(e);
            }
            if !p.initial_sync.is_null() {
                break Ok(now_ms() as f64);
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!("no initial copy of vm2 within 600 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match got {
            Ok(end_ms) => {
                let ms = p.initial_sync["ms"].as_f64().context("initial_sync ms")?;
                let bytes = p.initial_sync["bytes"]
                    .as_u64()
                    .context("initial_sync bytes")?;
                p.stop(primary, "vm2");
                wait_standby_gone(backup, "vm2")?;
                return Ok(Copy {
                    start_ms: end_ms - ms,
                    end_ms,
                    bytes,
                });
            }
            Err(e) => {
                let said = p.abort();
                if said.contains("try again") && tries < 10 {
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                bail!("protect vm2: {e:#}: {}", said.trim());
            }
        }
    }
}

fn render(rc: &RateCap) -> String {
    let alone = rc.alone();
    let (ap, aa) = (stats(&alone.pause), stats(&alone.ack));
    let secs = |(a, b): (f64, f64)| (b - a) / 1e3;
    let mut s = format!(
        "### Rate caps: a protected VM's checkpoints during another VM's initial copy\n\n\
         VM1 (256 MiB, the reference workload, -i {REF_INTERVAL_MS}) is protected throughout. VM2 ({FILL_GUEST_MIB} MiB \
         holding {FILL_MIB} MiB of random data, paused once filled so that only its copy competes) is protected \
         from the same primary agent to the same backup agent; its initial copy is timed (from the \
         `initial_sync` event), then its protection stopped. VM1's checkpoints whose pause began during \
         VM2's copies are compared with VM1's alone ({:.0} s before the copies and {:.0} s after, together), in \
         the same run. The uncapped copy is repeated ({} times) to collect checkpoints; the capped one \
         (`remus protect --max-rate {CAP_MIB}M`) runs once. Both hosts are agents on this machine: the \
         \"link\" is loopback, and what the two sessions share is its two cores (sender, encryption, \
         receiver).\n\n\
         | VM1's checkpoints | n | pause p50 ms | p99 | ack p50 ms | p99 | pause p50 × alone | pause p99 × alone | ack p50 × alone | ack p99 × alone |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        secs(rc.before_span),
        secs(rc.after_span),
        rc.uncapped_copies.len(),
    );
    let row = |name: &str, w: &Window| {
        let (p, a): (Stats, Stats) = (stats(&w.pause), stats(&w.ack));
        format!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            w.pause.len(),
            p.p50,
            p.p99,
            a.p50,
            a.p99,
            ratio(p.p50, ap.p50),
            ratio(p.p99, ap.p99),
            ratio(a.p50, aa.p50),
            ratio(a.p99, aa.p99)
        )
    };
    s.push_str(&row("alone (before and after)", &alone));
    s.push_str(&row("… before", &rc.before));
    s.push_str(&row("… after", &rc.after));
    s.push_str(&row("during VM2's copy, uncapped", &rc.uncapped));
    s.push_str(&row(
        &format!("during VM2's copy, --max-rate {CAP_MIB}M"),
        &rc.capped,
    ));
    s.push_str(
        "\nVM2's copies below: MiB and MB/s count the guest's pages (4 KiB each) as the `initial_sync` \
         event reports them; the cap counts the bytes on the link after compression, where VM2's random \
         data stays as it is and its other pages shrink, so the guest's bytes go a little faster than the cap.\n\n\
         | VM2's initial copy | copies | MiB | ms | MB/s |\n|---|---:|---:|---:|---:|\n",
    );
    let median = |v: &[Copy]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.ms().total_cmp(&b.ms()));
        v[v.len() / 2]
    };
    let m = median(&rc.uncapped_copies);
    s.push_str(&format!(
        "| uncapped (median) | {} | {:.0} | {:.0} | {:.0} |\n",
        rc.uncapped_copies.len(),
        m.bytes as f64 / 1048576.0,
        m.ms(),
        m.mb_per_s()
    ));
    let c = rc.capped_copy;
    s.push_str(&format!(
        "| --max-rate {CAP_MIB}M ({:.1} MB/s) | 1 | {:.0} | {:.0} | {:.1} |\n\n",
        (CAP_MIB << 20) as f64 / 1e6,
        c.bytes as f64 / 1048576.0,
        c.ms(),
        c.mb_per_s()
    ));
    s
}
