//! The bench suite (`remus-bench --suite`, what `scripts/bench.sh` runs
//! with no arguments): every measurement of the benchmark issue in one
//! run, one report section and one JSON run in `bench/`, and a summary of
//! the targets, each met or missed by how much.
//!
//! Sections (`--only` picks some; they run in this order, each a module of
//! [`crate::sections`]):
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
//!   unprotected against protected at the defaults (the rate the adaptive
//!   policy picks) and at 25 and 40 checkpoints per second (and at 40
//!   with `-u`), in one run on one VM; then the same guest in a QEMU
//!   driven over QMP alone, to locate QEMU's share.
//! - `failover`: repeated primary failures (SIGKILL; every third round
//!   frozen instead) on a LAN of network namespaces: time to the backup's
//!   running VM and to the first line a TCP client gets from it.
//! - `migrate`: `remus migrate` against QEMU's own live migration of the
//!   same guest over the same loopback link: total time, downtime, bytes.
//! - `disk`, `net`: the disk and network cases (`--disk`, `--net`).
//! - `crypto`: the encrypted link against the clear one: pause and ack on
//!   the reference workload, and the initial copy's rate.
//! - `resync`: after a failover, protecting back to the old primary
//!   (restarted on its state dir, its copy stale) compares only the chunks
//!   either side's change records mark; against a full digest compare of
//!   every chunk and a full copy (derived), in the same run, for 1, 4 and
//!   16 GiB sparse disks with 1% and 10% of the disk rewritten: chunks
//!   compared, differing, bytes sent, sync time and time to the first
//!   checkpoint, and their ratios.
//! - `ratecap`: a protected VM's checkpoint pause and ack while another
//!   VM's initial copy runs over the same link, uncapped and at
//!   `--max-rate`, against the first VM alone.
//! - `scale`: a protected VM's checkpoint pause and ack as 1, 2 and 4
//!   protected VMs share the same two hosts, against it alone and against
//!   the same VMs running with only it protected.
//! - `restart`: an agent stopped or killed and started again under a
//!   running VM (unprotected, protected, the backup's agent): the TCP
//!   client's wait and the time until protection is restored.
//!
//! The reference workload (for the wire target) is `dirty` at 50 MB/s
//! changing 256 random bytes of each page it visits, checkpointed every
//! 100 ms (about 1,280 dirty pages per epoch).

use anyhow::Result;
use remus_testbed::{Binaries, GuestImage};
use serde_json::{Value, json};

use crate::opts::Opts;
use crate::pause::{CaseResult, CaseSpec, Workload, run_case};
use crate::report::{Machine, Target, emit, stats, wire_ratio};
use crate::sections;

pub(crate) const SECTIONS: &[&str] = &[
    "matrix", "wire", "ram", "boot", "slowdown", "failover", "migrate", "disk", "net", "resync",
    "crypto", "ratecap", "scale", "restart",
];

/// Bytes of each page the reference workload changes per visit.
pub(crate) const REF_WRITE_BYTES: u64 = 256;
pub(crate) const REF_INTERVAL_MS: u64 = 100;
pub(crate) const REF_MB_PER_S: u64 = 50;

pub(crate) fn reference() -> Workload {
    Workload::Dirty(REF_MB_PER_S, REF_WRITE_BYTES)
}

pub(crate) fn is_reference(c: &CaseResult) -> bool {
    c.interval_ms == REF_INTERVAL_MS
        && c.workload == reference()
        && c.memory_mib == 256
        && c.compressed
        && c.encrypted
}

/// The cases run since `start`, plus the reference case if it was run
/// before (by an earlier section), which this section would repeat.
pub(crate) fn with_reference(cases: &[CaseResult], start: usize) -> Vec<CaseResult> {
    let mut v = cases[start..].to_vec();
    if let Some(r) = cases[..start].iter().find(|c| is_reference(c)) {
        v.push(r.clone());
    }
    v
}

/// What every section runs with.
pub(crate) struct Ctx<'a> {
    pub(crate) o: &'a Opts,
    pub(crate) bins: &'a Binaries,
    pub(crate) profile: &'a str,
    pub(crate) img: &'a GuestImage,
    pub(crate) m: &'a Machine,
    pub(crate) date: &'a str,
}

impl Ctx<'_> {
    /// Runs pause cases one after the other, appending their results to
    /// `cases`.
    pub(crate) fn run_specs(
        &self,
        specs: Vec<CaseSpec>,
        cases: &mut Vec<CaseResult>,
    ) -> Result<()> {
        let Ctx { o, bins, img, .. } = *self;
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
    }
}

/// What the sections add to the suite's report, in the order they run.
#[derive(Default)]
pub(crate) struct Report {
    /// Markdown, one per section.
    pub(crate) sections: Vec<String>,
    /// JSON, by section name.
    pub(crate) runs: serde_json::Map<String, Value>,
    pub(crate) targets: Vec<Target>,
    /// Every pause case run so far (later sections reuse the reference
    /// case of an earlier one, see [`with_reference`]).
    pub(crate) cases: Vec<CaseResult>,
    /// The accelerators of sections that keep no pause cases.
    pub(crate) other_accel: Vec<String>,
}

/// A section: measures, then adds to the report.
type Section = fn(&Ctx, &mut Report) -> Result<()>;

/// The sections in the order they run (not that of [`SECTIONS`]).
const ORDER: [(&str, Section); 14] = [
    ("matrix", sections::matrix::run),
    ("wire", sections::wire::run),
    ("ram", sections::ram::run),
    ("boot", sections::boot::run),
    ("slowdown", sections::slowdown::run),
    ("failover", sections::failover::run),
    ("migrate", sections::migrate::run),
    ("disk", sections::disk::run),
    ("net", sections::net::run),
    ("crypto", sections::crypto::run),
    ("resync", sections::resync::run),
    ("ratecap", sections::ratecap::run),
    ("scale", sections::scale::run),
    ("restart", sections::restart::run),
];

pub(crate) fn suite_main(
    o: &Opts,
    bins: &Binaries,
    profile: &str,
    img: &GuestImage,
    m: &Machine,
    date: &str,
) -> Result<()> {
    let only = |s: &str| o.only.is_empty() || o.only.iter().any(|x| x == s);
    let cx = Ctx {
        o,
        bins,
        profile,
        img,
        m,
        date,
    };
    let mut r = Report::default();
    for (name, run) in ORDER {
        if only(name) {
            run(&cx, &mut r)?;
        }
    }
    let Report {
        sections,
        runs,
        targets,
        cases,
        other_accel,
    } = r;
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
         {}\
         - command: `scripts/bench.sh` (`remus-bench --suite{}`); {} s measured per pause case after {} warm-up checkpoints\n\
         - reference workload: `dirty` at {REF_MB_PER_S} MB/s changing {REF_WRITE_BYTES} random bytes of each page it visits, -i {REF_INTERVAL_MS}; \
         checkpoints compressed (the default) unless a row says `-u`\n\n\
         ### Targets\n\n| target | measured | verdict |\n|---|---|---|\n",
        m.md(
            &if accel.is_empty() {
                "?".to_string()
            } else {
                accel.join(", ")
            },
            profile
        ),
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
        "machine": m.json(),
        "accel": accel,
        "profile": profile,
        "settings": {"seconds": o.seconds, "warmup": o.warmup, "timeout_ms": o.timeout_ms, "only": o.only,
            "reference": {"interval_ms": REF_INTERVAL_MS, "mb_per_s": REF_MB_PER_S, "write_bytes_per_page": REF_WRITE_BYTES}},
        "targets": targets.iter().map(Target::json).collect::<Vec<_>>(),
        "sections": Value::Object(runs),
    });
    (md, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_runs_once() {
        let mut run: Vec<&str> = ORDER.iter().map(|(name, _)| *name).collect();
        let mut listed = SECTIONS.to_vec();
        run.sort_unstable();
        listed.sort_unstable();
        assert_eq!(run, listed);
    }
}
