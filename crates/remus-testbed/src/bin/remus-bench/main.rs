//! `remus-bench`: the benchmark (not a test; nothing here passes or fails
//! on the numbers). Run it with `scripts/bench.sh`; results are appended
//! to `bench/results.md` and `bench/results.json`.
//!
//! One module per run or section, and what their reports share:
//! - [`opts`]: the command line.
//! - [`pause`]: the checkpoint pause cases; a run without `--suite`,
//!   `--disk` or `--net` measures those of `--intervals`.
//! - [`sections::disk`] (`--disk`) and [`sections::net`] (`--net`): the
//!   disk and network cases.
//! - [`suite`] (`--suite`): every section of [`sections`] in one run, one
//!   report with a table of the targets.
//! - [`report`]: statistics, the machine, the case table, the targets,
//!   appending a run to the results files.
//! - [`harness`]: agents, VMs, `remus protect` and QEMU for the cases.
//!
//! It uses the `remus` and `remusd` binaries next to its own executable
//! (target/release or target/debug) and the guest image from
//! `scripts/build-guest.sh`.

mod harness;
mod opts;
mod pause;
mod report;
mod sections;
mod suite;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use remus_testbed::{Binaries, GuestImage};

use crate::opts::Opts;
use crate::report::{machine, utc_now};

/// `remus` and `remusd` next to this executable, or a clear error.
fn find_bins() -> Result<(Binaries, String)> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("executable has no directory")?;
    let profile = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "?".into());
    // Next to this executable, in the same profile (scripts/bench.sh
    // builds them).
    let bins = Binaries::next_to_exe()?;
    if !dir.join("libremus_dirty_preload.so").exists() {
        eprintln!(
            "remus-bench: warning: no libremus_dirty_preload.so in {}; remusd looks elsewhere in target/, and protect fails if it finds none",
            dir.display()
        );
    }
    Ok((bins, profile))
}

fn real_main() -> Result<()> {
    let o = Opts::parse();
    let (bins, profile) = find_bins()?;
    let img = GuestImage::find()?;
    let m = machine(qemu_version().unwrap_or_else(|| "?".into()));
    let date = utc_now();
    if o.disk {
        return sections::disk::disk_main(&o, &bins, &profile, &img, &m, &date);
    }
    if o.net {
        return sections::net::net_main(&o, &bins, &profile, &img, &m, &date);
    }
    if o.suite {
        return suite::suite_main(&o, &bins, &profile, &img, &m, &date);
    }
    pause::pause_main(&o, &bins, &profile, &img, &m, &date)
}

/// `qemu-system-x86_64 --version`'s first line (the agents' default QEMU).
fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remus-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
