//! `scale`: one protected VM's checkpoints as more protected VMs share
//! its hosts (1, 2 and 4), in one run. VM1 (the reference workload) is
//! protected throughout and measured in four windows of time: alone on
//! the hosts; with three more VMs of the same workload running
//! unprotected (what their guests alone cost, on the machine's cores);
//! with one of them protected too (2 protected); with all of them
//! protected (4). The other VMs' own checkpoints in the last window are
//! reported beside VM1's.

use std::time::Duration;

use anyhow::{Context, Result};
use remus_testbed::{Agent, DiskHosts, now_ms};
use serde_json::{Value, json};

use crate::harness::{Protecting, Window, accel_of, create_vm, destroy_or_warn, logs_of};
use crate::pause::dirty_rates;
use crate::report::{Stats, r3, ratio, stats};
use crate::suite::{Ctx, REF_INTERVAL_MS, Report, reference};

/// VMs on the primary in all (VM1 and the others), each 256 MiB with the
/// reference workload.
const VMS: usize = 4;

/// The `scale` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    eprintln!(
        "remus-bench: scale: VM1's checkpoints with 1, 2 and {VMS} protected VMs on the same hosts ..."
    );
    let sc = run_scale(cx)?;
    for p in &sc.phases {
        eprintln!(
            "remus-bench:   {}: VM1 pause p50 {:.2} ms, ack p50 {:.2} ms",
            p.label(),
            stats(&p.vm1.pause).p50,
            stats(&p.vm1.ack).p50
        );
    }
    r.sections.push(render(&sc));
    r.runs.insert("scale".into(), sc.json());
    r.other_accel.push(sc.accel.clone());
    Ok(())
}

/// One window of time: how many VMs ran and were protected, VM1's
/// checkpoints in it and the other protected VMs' (together).
struct Phase {
    running: usize,
    protected: usize,
    span: (f64, f64),
    vm1: Window,
    others: Window,
}

impl Phase {
    fn label(&self) -> String {
        if self.running == self.protected {
            format!("{} protected", self.protected)
        } else {
            format!("{} protected, {} running", self.protected, self.running)
        }
    }

    fn json(&self) -> Value {
        json!({
            "running": self.running,
            "protected": self.protected,
            "seconds": r3((self.span.1 - self.span.0) / 1e3),
            "vm1": self.vm1.json(),
            "others": self.others.json(),
        })
    }
}

struct Scale {
    accel: String,
    phases: Vec<Phase>,
}

impl Scale {
    fn json(&self) -> Value {
        json!({
            "vms": VMS,
            "memory_mib": 256,
            "interval_ms": REF_INTERVAL_MS,
            "workload": reference().label(),
            "phases": self.phases.iter().map(Phase::json).collect::<Vec<_>>(),
        })
    }
}

fn name(i: usize) -> String {
    format!("vm{}", i + 1)
}

fn run_scale(cx: &Ctx) -> Result<Scale> {
    let Ctx { o, bins, img, .. } = *cx;
    let hosts = DiskHosts::new()?;
    let backup = hosts.backup(bins).context("start backup agent")?;
    let primary = hosts.primary(bins).context("start primary agent")?;
    let peer = hosts.listen.clone();
    let boot = Duration::from_secs(300);
    let wait_booted = |vm: &str| -> Result<()> {
        primary.wait_console(vm, boot, "a 'dirty:' line", |c| !dirty_rates(c).is_empty())?;
        Ok(())
    };
    let create = |i: usize| -> Result<()> {
        let vm = name(i);
        let cfg = primary.write_file(
            &format!("{vm}.toml"),
            &img.config(&vm, &reference().cmdline(), ""),
        );
        create_vm(&primary, &vm, &cfg)
    };
    create(0)?;
    wait_booted("vm1")?;
    let accel = accel_of(&primary, "vm1");
    let logs = logs_of(&primary, &backup, "vm1");
    let protect = |i: usize| -> Result<Protecting> {
        let mut p = Protecting::start(bins, &primary, &name(i), &peer, REF_INTERVAL_MS, o, &[])?;
        p.wait_checkpoints(o.warmup + 1, Duration::from_secs(300))
            .map_err(logs_of(&primary, &backup, &name(i)))?;
        Ok(p)
    };
    let mut vm1 = protect(0)?;
    let mut others: Vec<Protecting> = Vec::new();
    // One window: `o.seconds` of everything as it is, then the events so
    // far taken from every follower (a session that ended fails the run).
    let window = |vm1: &mut Protecting, others: &mut Vec<Protecting>| -> Result<(f64, f64)> {
        let t0 = now_ms() as f64;
        std::thread::sleep(Duration::from_secs(o.seconds));
        let t1 = now_ms() as f64;
        vm1.drain().map_err(logs)?;
        for p in others.iter_mut() {
            p.drain()?;
        }
        Ok((t0, t1))
    };
    let mut spans = vec![(1, 1, window(&mut vm1, &mut others)?)];
    for i in 1..VMS {
        create(i)?;
    }
    for i in 1..VMS {
        wait_booted(&name(i))?;
    }
    spans.push((VMS, 1, window(&mut vm1, &mut others)?));
    others.push(protect(1)?);
    spans.push((VMS, 2, window(&mut vm1, &mut others)?));
    for i in 2..VMS {
        others.push(protect(i)?);
    }
    spans.push((VMS, VMS, window(&mut vm1, &mut others)?));

    let others_cps: Vec<Value> = others.iter().flat_map(|p| p.cps.clone()).collect();
    let phases = spans
        .into_iter()
        .map(|(running, protected, span)| Phase {
            running,
            protected,
            span,
            vm1: Window::of(&vm1.cps, &[span]),
            others: Window::of(&others_cps, &[span]),
        })
        .collect();
    stop_all(&primary, vm1, others);
    Ok(Scale { accel, phases })
}

/// Stops every protection, then destroys every VM.
fn stop_all(primary: &Agent, vm1: Protecting, others: Vec<Protecting>) {
    for (i, p) in std::iter::once(vm1).chain(others).enumerate() {
        let err = p.stop(primary, &name(i));
        if !err.trim().is_empty() {
            eprintln!("remus-bench:   remus protect {}: {}", name(i), err.trim());
        }
    }
    for i in 0..VMS {
        destroy_or_warn(primary, &name(i));
    }
}

fn render(sc: &Scale) -> String {
    let mut s = format!(
        "### Many VMs: one protected VM's checkpoints as more protected VMs share its hosts\n\n\
         VM1 (256 MiB, the reference workload, -i {REF_INTERVAL_MS}) is protected throughout, from one \
         primary agent to one backup agent, and measured in four windows of time in one run: alone on \
         the hosts; with {} more VMs of the same size and workload running unprotected beside it (what \
         their guests alone cost); with one of them protected too (2 protected); with all {VMS} \
         protected. Ratios are against VM1 alone (first window) and against the window with the same VMs \
         running, only VM1 protected (second window), which separates the cost of the other sessions \
         from that of the other guests' CPU. Both hosts are agents on this machine: the {VMS} guests \
         ({}), the {VMS} standbys, both agents and the link share its two cores.\n\n\
         | window | VM1 n | pause p50 ms | p99 | ack p50 ms | p99 | pause p50 × alone | ack p50 × alone | pause p50 × same VMs unprotected | ack p50 × same VMs unprotected | other VMs' pause p50 ms | ack p50 ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        VMS - 1,
        sc.accel.to_uppercase()
    );
    let (alone, base) = (&sc.phases[0], &sc.phases[1]);
    let (ap, aa) = (stats(&alone.vm1.pause), stats(&alone.vm1.ack));
    let (bp, ba) = (stats(&base.vm1.pause), stats(&base.vm1.ack));
    for p in &sc.phases {
        let (pp, pa): (Stats, Stats) = (stats(&p.vm1.pause), stats(&p.vm1.ack));
        let others = if p.others.pause.is_empty() {
            "– | –".to_string()
        } else {
            format!(
                "{:.2} | {:.2}",
                stats(&p.others.pause).p50,
                stats(&p.others.ack).p50
            )
        };
        let vs_base = if p.running == VMS {
            format!(
                "{:.2} | {:.2}",
                ratio(pp.p50, bp.p50),
                ratio(pa.p50, ba.p50)
            )
        } else {
            "– | –".to_string()
        };
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {vs_base} | {others} |\n",
            p.label(),
            p.vm1.pause.len(),
            pp.p50,
            pp.p99,
            pa.p50,
            pa.p99,
            ratio(pp.p50, ap.p50),
            ratio(pa.p50, aa.p50),
        ));
    }
    s.push('\n');
    s
}
