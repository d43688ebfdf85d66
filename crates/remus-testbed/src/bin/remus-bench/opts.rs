//! The command line. `scripts/bench.sh` passes its arguments on, runs
//! `--suite` when it has none, and drops a leading `--pause` (the default
//! run, the pause cases).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use remus_testbed::workspace_root;

use crate::suite;

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
pub(crate) struct Opts {
    pub(crate) seconds: u64,
    pub(crate) warmup: usize,
    pub(crate) intervals: Vec<u64>,
    pub(crate) mb_per_s: u64,
    pub(crate) timeout_ms: u64,
    pub(crate) out: PathBuf,
    pub(crate) write: bool,
    /// Run the disk cases (only).
    pub(crate) disk: bool,
    /// Run the network cases (only).
    pub(crate) net: bool,
    /// Run the whole suite (`suite.rs`).
    pub(crate) suite: bool,
    /// With `suite`: only these sections.
    pub(crate) only: Vec<String>,
    /// With `suite`: failover rounds.
    pub(crate) failover_rounds: u64,
}

pub(crate) fn parse_opts(args: &[String]) -> Result<Opts> {
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
