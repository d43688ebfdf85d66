//! `boot`: a real distribution booted from its disk (the Debian image
//! of `scripts/build-debian-image.sh`, on qcow2, idle) against the
//! kernel+initramfs guest idle, both with 512 MiB at -i 100: pause and
//! device state per checkpoint.

use anyhow::{Result, bail};
use remus_testbed::workspace_root;

use crate::pause::{CaseResult, CaseSpec, Workload};
use crate::report::{case_table, cases_json, stats};
use crate::suite::{Ctx, REF_INTERVAL_MS, Report};

/// The `boot` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Report {
        sections,
        runs,
        cases,
        ..
    } = r;
    eprintln!("remus-bench: a distribution booted from disk against the initramfs guest ...");
    let debian = workspace_root().join("target/debian-image/debian.qcow2");
    if !debian.exists() {
        bail!(
            "{} is missing: run scripts/build-debian-image.sh (scripts/bench.sh does)",
            debian.display()
        );
    }
    let mut specs = Vec::new();
    for disk in [None, Some(debian)] {
        let mut s = CaseSpec::new(REF_INTERVAL_MS, Workload::Idle);
        s.memory_mib = 512;
        s.disk_boot = disk;
        specs.push(s);
    }
    let start = cases.len();
    cx.run_specs(specs, cases)?;
    let boot = cases[start..].to_vec();
    sections.push(render_boot(&boot));
    runs.insert("boot".into(), cases_json(&boot));
    Ok(())
}

/// Device state per checkpoint: raw bytes less the dirty pages.
fn devstate_bytes(c: &CaseResult) -> Vec<f64> {
    c.raw_bytes
        .iter()
        .zip(&c.dirty)
        .map(|(raw, dirty)| raw - dirty * 4096.0)
        .collect()
}

fn render_boot(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### A distribution booted from disk\n\n\
         The Debian 12 image of `scripts/build-debian-image.sh` (systemd, Debian's cloud kernel, ext4 root; SeaBIOS and syslinux; \
         a qcow2 overlay served by qemu-storage-daemon) against the kernel+initramfs test guest, both idle with 512 MiB, -i 100.\n\n",
    );
    s.push_str(&case_table(cases));
    let dev: Vec<String> = cases
        .iter()
        .map(|c| {
            format!(
                "{}: {:.0} KiB",
                if c.disk_boot {
                    "Debian"
                } else {
                    "initramfs guest"
                },
                stats(&devstate_bytes(c)).p50 / 1024.0
            )
        })
        .collect();
    s.push_str(&format!(
        "
Device state per checkpoint, p50 (raw bytes less dirty pages): {}

",
        dev.join(", ")
    ));
    s
}
