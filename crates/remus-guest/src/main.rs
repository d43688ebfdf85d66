//! `remus-guest`: the programs that run inside the remus guest, as one static
//! multi-call binary. The guest's `/init` (written by `remus-image`) runs
//! `remus-guest start-workloads`, which reads `remus.workload=` from the kernel
//! command line and starts each workload as a background child.
//!
//! Adding a workload = one module with `pub fn run(args: &[String]) -> Result<(), String>`
//! plus one entry in [`COMMANDS`].

mod cmdline;
mod cpumem;
mod dirty;
mod disk_probe;
mod diskbench;
mod diskload;
mod fsload;
mod options;
mod seqserver;
mod tick;

use std::process::ExitCode;

/// A subcommand: name, one-line usage, entry point.
pub struct Command {
    pub name: &'static str,
    pub usage: &'static str,
    pub run: fn(&[String]) -> Result<(), String>,
}

pub const COMMANDS: &[Command] = &[
    Command {
        name: "tick",
        usage: "tick [--interval-ms N]        print 'tick N' every N ms (default 100)",
        run: tick::run,
    },
    Command {
        name: "dirty",
        usage: "dirty [--mb-per-s 50] [--working-set-mb 64] [--write-bytes 1]\n                               dirty N MiB/s of distinct 4 KiB pages (N bytes changed in each), print 'dirty: N MB/s' each second",
        run: dirty::run,
    },
    Command {
        name: "cpumem",
        usage: "cpumem [--data-mb 64] [--table-mb 2]\n                               random reads, hashing and 8-byte writes to a hot table; print 'cpumem: N kops/s' each second",
        run: cpumem::run,
    },
    Command {
        name: "disk-probe",
        usage: "disk-probe DEVICE             read 4 KiB at 0, write+verify 4 KiB at 1 MiB",
        run: disk_probe::run,
    },
    Command {
        name: "diskload",
        usage: "diskload DEVICE [--region-mb 48] [--offset-mb 1]\n                               write checksummed 4 KiB records with O_DIRECT; touch /run/diskload.verify to verify",
        run: diskload::run,
    },
    Command {
        name: "diskbench",
        usage: "diskbench DEVICE [--block-kb 256] [--fsync-every 16] [--region-mb 256]\n                               sequential O_DIRECT writes, fdatasync every N blocks; print MB/s and fsync ms each second",
        run: diskbench::run,
    },
    Command {
        name: "fsload",
        usage: "fsload DEVICE [--dir /mnt]     mount ext4 DEVICE at DIR and churn files; touch /run/fsload.stop to unmount",
        run: fsload::run,
    },
    Command {
        name: "seqserver",
        usage: "seqserver [--port 7000] [--bulk-port 7001] [--interval-ms 5]\n                               TCP services: lines 1,2,3... both ways, checked (port); bulk send/recv (bulk port)",
        run: seqserver::run,
    },
    Command {
        name: "start-workloads",
        usage: "start-workloads [--cmdline FILE] [--dry-run]\n                               start each remus.workload= item in the background",
        run: cmdline::start_workloads,
    },
];

fn usage() -> String {
    let mut s = String::from("usage: remus-guest COMMAND [ARGS...]\ncommands:\n");
    for c in COMMANDS {
        s.push_str("  ");
        s.push_str(c.usage);
        s.push('\n');
    }
    s
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || matches!(args[0].as_str(), "-h" | "--help" | "help") {
        eprint!("{}", usage());
        return if args.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let name = args.remove(0);
    let Some(cmd) = COMMANDS.iter().find(|c| c.name == name) else {
        eprintln!("remus-guest: unknown command '{name}'");
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    match (cmd.run)(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remus-guest {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
