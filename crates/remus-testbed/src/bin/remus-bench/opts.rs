//! The command line. `scripts/bench.sh` passes its arguments on, runs
//! `--suite` when it has none, and drops a leading `--pause` (the default
//! run, the pause cases).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use remus_testbed::workspace_root;

use crate::suite;

/// What a run measures, and how.
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

/// The arguments as given; [`Cli::into_opts`] checks them and fills in
/// what depends on others.
#[derive(Debug, Parser)]
#[command(
    name = "remus-bench",
    about = "The remus benchmark: checkpoint pause by interval and workload (the default\n\
             run), the disk cases (--disk), the network cases (--net) or the whole suite\n\
             (--suite). Each run appends one dated report to results.md and one run to\n\
             results.json.",
    override_usage = "remus-bench [--seconds 15] [--warmup 5] [--intervals 100,200] [--mb-per-s 50]\n                   \
                      [--timeout MS] [--out DIR] [--no-write]\n                   \
                      [--suite [--only SECTIONS] [--failover-rounds 12] | --disk | --net]",
    after_help = "Run it with scripts/bench.sh: it builds the tools and the guest images first,\n\
                  runs --suite when given no arguments, and drops a leading --pause (the\n\
                  default run). remus-bench uses the remus and remusd binaries next to its own\n\
                  executable. The disk, network, failover and resync cases need root.",
    args_override_self = true
)]
struct Cli {
    /// Measured checkpoints per case = N s / interval (default 15;
    /// 8 with --suite); disk cases: N of the guest's once-a-second
    /// lines per case; net cases: N s of pings (50/s), then N s of
    /// TCP each way
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        verbatim_doc_comment
    )]
    seconds: Option<u64>,

    /// Checkpoints dropped at the start of each case (disk cases
    /// drop their first 2 lines instead; net cases let N
    /// checkpoints pass before measuring)
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 5,
        verbatim_doc_comment
    )]
    warmup: usize,

    /// Checkpoint intervals in ms, comma-separated
    #[arg(long, value_name = "LIST", default_value = "100,200")]
    intervals: String,

    /// The dirtying guest's rate (MB/s)
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 50
    )]
    mb_per_s: u64,

    /// remus protect --timeout
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "MS",
        default_value_t = 2000
    )]
    timeout: u64,

    /// Where results.md and results.json go
    #[arg(long, value_name = "DIR", default_value_os_t = workspace_root().join("bench"))]
    out: PathBuf,

    /// Print the results, do not append them
    #[arg(long)]
    no_write: bool,

    /// The whole benchmark (what scripts/bench.sh runs): pause by
    /// interval x dirty rate, wire vs raw bytes, pause vs RAM size,
    /// a Debian VM booted from disk, guest slowdown (cpumem),
    /// failover times, remus migrate vs QEMU's live migration, the
    /// disk and network cases, the encrypted link vs the clear
    /// one, resync after a failover (changed chunks only) against
    /// a full compare and a full copy for 1/4/16 GiB disks with
    /// 1%/10% rewritten, a VM's checkpoints during another's
    /// initial copy with and without --max-rate, one VM's
    /// checkpoints as 1, 2 and 4 protected VMs share the hosts,
    /// agent restarts under a running VM; one report with
    /// every target met or missed (--seconds defaults to 8)
    #[arg(long, help_heading = "Runs", verbatim_doc_comment)]
    suite: bool,

    /// With --suite (implies it): only these sections,
    /// comma-separated, of matrix, wire, ram, boot, slowdown,
    /// failover, migrate, disk, net, resync, crypto, ratecap,
    /// scale, restart
    #[arg(
        long,
        value_name = "SECTIONS",
        help_heading = "Runs",
        verbatim_doc_comment
    )]
    only: Option<String>,

    /// Failover rounds of --suite (every third one freezes the
    /// primary)
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 12,
        help_heading = "Runs",
        verbatim_doc_comment
    )]
    failover_rounds: u64,

    /// Run only the disk cases: one guest writing sequentially to
    /// a replicated disk (diskbench), unprotected, then protected
    /// at each interval; write MB/s, fsync latency, ratio
    /// (target >= 0.7x unprotected at -i 200), pauses, disk
    /// bytes/checkpoint
    #[arg(long, help_heading = "Runs", verbatim_doc_comment)]
    disk: bool,

    /// Run only the network cases: one guest on a LAN of network
    /// namespaces (client c pings it and runs TCP bulk transfers),
    /// unprotected, protected --no-net at the first interval, then
    /// protected with output buffering at each interval; RTT
    /// p50/p90/max and loss, RTT increase (target for buffered:
    /// p50 +interval/2 + 2 ms at most), TCP MB/s both ways and
    /// ratio to unprotected, pause p50, ack p50; needs root
    #[arg(long, help_heading = "Runs", verbatim_doc_comment)]
    net: bool,
}

impl Opts {
    /// The options of this process's command line; on an error, or after
    /// `--help`, exits with clap's message (status 2 on an error).
    pub(crate) fn parse() -> Opts {
        Opts::try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// The options of `args` (the first is the program's name).
    pub(crate) fn try_parse_from<I, T>(args: I) -> Result<Opts, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Cli::try_parse_from(args)?.into_opts()
    }
}

impl Cli {
    fn into_opts(self) -> Result<Opts, clap::Error> {
        let error = |kind: ErrorKind, msg: String| Cli::command().error(kind, msg);
        let only: Vec<String> = match &self.only {
            Some(v) => v.split(',').map(|s| s.trim().to_string()).collect(),
            None => Vec::new(),
        };
        if let Some(bad) = only.iter().find(|s| !suite::SECTIONS.contains(&s.as_str())) {
            return Err(error(
                ErrorKind::InvalidValue,
                format!(
                    "unknown section '{bad}' (sections: {})",
                    suite::SECTIONS.join(", ")
                ),
            ));
        }
        let intervals = self
            .intervals
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|e| error(ErrorKind::InvalidValue, format!("bad interval '{s}': {e}")))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        if self.seconds == Some(0) || intervals.is_empty() || intervals.contains(&0) {
            return Err(error(
                ErrorKind::InvalidValue,
                "--seconds and every interval must be > 0".into(),
            ));
        }
        // --only implies --suite.
        let suite = self.suite || self.only.is_some();
        if [self.disk, self.net, suite].iter().filter(|x| **x).count() > 1 {
            return Err(error(
                ErrorKind::ArgumentConflict,
                "--suite, --disk and --net are separate runs: give one of them".into(),
            ));
        }
        Ok(Opts {
            // Some 30 cases in the suite: 8 s each keeps it near 25 minutes.
            seconds: self.seconds.unwrap_or(if suite { 8 } else { 15 }),
            warmup: self.warmup,
            intervals,
            mb_per_s: self.mb_per_s,
            timeout_ms: self.timeout,
            out: self.out,
            write: !self.no_write,
            disk: self.disk,
            net: self.net,
            suite,
            only,
            failover_rounds: self.failover_rounds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, clap::Error> {
        Opts::try_parse_from(std::iter::once("remus-bench").chain(args.iter().copied()))
    }

    fn error(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(o) => panic!("{args:?} parsed: {o:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults() {
        let o = parse(&[]).unwrap();
        assert_eq!(o.seconds, 15);
        assert_eq!(o.warmup, 5);
        assert_eq!(o.intervals, vec![100, 200]);
        assert_eq!(o.mb_per_s, 50);
        assert_eq!(o.timeout_ms, 2000);
        assert_eq!(o.out, workspace_root().join("bench"));
        assert!(o.write);
        assert!(!o.disk && !o.net && !o.suite);
        assert!(o.only.is_empty());
        assert_eq!(o.failover_rounds, 12);
    }

    #[test]
    fn every_flag() {
        let o = parse(&[
            "--seconds",
            "3",
            "--warmup",
            "2",
            "--intervals",
            "25, 50,400",
            "--mb-per-s",
            "10",
            "--timeout",
            "900",
            "--out",
            "/tmp/x",
            "--no-write",
            "--suite",
            "--failover-rounds",
            "4",
        ])
        .unwrap();
        assert_eq!(
            (
                o.seconds,
                o.warmup,
                o.mb_per_s,
                o.timeout_ms,
                o.failover_rounds
            ),
            (3, 2, 10, 900, 4)
        );
        assert_eq!(o.intervals, vec![25, 50, 400]);
        assert_eq!(o.out, PathBuf::from("/tmp/x"));
        assert!(!o.write && o.suite);
        assert!(parse(&["--disk"]).unwrap().disk);
        assert!(parse(&["--net"]).unwrap().net);
        // As before, a flag given twice: the last one counts.
        assert_eq!(
            parse(&["--seconds", "3", "--seconds", "4"])
                .unwrap()
                .seconds,
            4
        );
        assert!(parse(&["--suite", "--suite"]).unwrap().suite);
        assert_eq!(parse(&["--seconds=6"]).unwrap().seconds, 6);
    }

    #[test]
    fn the_suite_defaults_to_8_seconds() {
        assert_eq!(parse(&["--suite"]).unwrap().seconds, 8);
        assert_eq!(parse(&["--only", "ram"]).unwrap().seconds, 8);
        assert_eq!(parse(&["--suite", "--seconds", "15"]).unwrap().seconds, 15);
        assert_eq!(parse(&["--seconds", "3", "--suite"]).unwrap().seconds, 3);
        assert_eq!(parse(&["--disk"]).unwrap().seconds, 15);
        assert_eq!(parse(&["--net"]).unwrap().seconds, 15);
    }

    #[test]
    fn only_implies_the_suite_and_knows_the_sections() {
        let o = parse(&["--only", "matrix, wire"]).unwrap();
        assert!(o.suite);
        assert_eq!(o.only, vec!["matrix", "wire"]);
        let all = suite::SECTIONS.join(",");
        assert_eq!(parse(&["--only", &all]).unwrap().only, suite::SECTIONS);
        let e = error(&["--only", "matrix,bogus"]);
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        assert!(
            e.to_string().contains(
                "unknown section 'bogus' (sections: matrix, wire, ram, boot, slowdown, failover, \
                 migrate, disk, net, resync, crypto, ratecap, scale, restart)"
            ),
            "{e}"
        );
        assert!(
            error(&["--only", ""])
                .to_string()
                .contains("unknown section ''")
        );
    }

    #[test]
    fn suite_disk_and_net_are_separate_runs() {
        for args in [
            &["--suite", "--disk"][..],
            &["--disk", "--net"],
            &["--net", "--suite"],
            &["--only", "net", "--net"],
            &["--disk", "--only", "disk"],
        ] {
            let e = error(args);
            assert_eq!(e.kind(), ErrorKind::ArgumentConflict, "{args:?}");
            assert!(
                e.to_string()
                    .contains("--suite, --disk and --net are separate runs: give one of them"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_numbers() {
        for args in [
            &["--seconds", "x"][..],
            &["--seconds", "-1"],
            &["--warmup", "1.5"],
            &["--mb-per-s", ""],
            &["--timeout", "2s"],
            &["--failover-rounds", "many"],
        ] {
            assert_eq!(error(args).kind(), ErrorKind::ValueValidation, "{args:?}");
        }
        let e = error(&["--intervals", "100,x"]);
        assert!(e.to_string().contains("bad interval 'x'"), "{e}");
        assert!(
            error(&["--intervals", ""])
                .to_string()
                .contains("bad interval ''")
        );
        for args in [
            &["--seconds", "0"][..],
            &["--intervals", "100,0"],
            &["--suite", "--seconds", "0"],
        ] {
            assert!(
                error(args)
                    .to_string()
                    .contains("--seconds and every interval must be > 0"),
                "{args:?}"
            );
        }
    }

    #[test]
    fn values_and_unknown_arguments() {
        assert_eq!(error(&["--seconds"]).kind(), ErrorKind::InvalidValue);
        assert_eq!(error(&["--bogus"]).kind(), ErrorKind::UnknownArgument);
        assert_eq!(error(&["matrix"]).kind(), ErrorKind::UnknownArgument);
        // scripts/bench.sh drops a leading --pause; the binary does not know it.
        assert_eq!(error(&["--pause"]).kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn help_explains_every_flag_and_section() {
        for flag in ["-h", "--help"] {
            assert_eq!(error(&[flag]).kind(), ErrorKind::DisplayHelp);
        }
        let help = Cli::command().render_help().to_string();
        for flag in [
            "--seconds",
            "--warmup",
            "--intervals",
            "--mb-per-s",
            "--timeout",
            "--out",
            "--no-write",
            "--suite",
            "--only",
            "--failover-rounds",
            "--disk",
            "--net",
            "[default: 100,200]",
            "(default 15;",
            "8 with --suite",
            "[default: 5]",
            "[default: 50]",
            "[default: 2000]",
            "[default: 12]",
        ] {
            assert!(help.contains(flag), "{flag} in\n{help}");
        }
        for s in suite::SECTIONS {
            assert!(help.contains(s), "{s} in\n{help}");
        }
    }
}
