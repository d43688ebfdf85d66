//! `ram`: pause against guest RAM size (256 MiB to 4 GiB) at the same
//! dirty rate.

use anyhow::Result;

use crate::pause::{CaseResult, CaseSpec};
use crate::report::{Target, case_table, cases_json, ratio, stats};
use crate::suite::{Ctx, REF_INTERVAL_MS, Report, is_reference, reference, with_reference};

const RAM_SIZES_MIB: [u64; 4] = [256, 1024, 2048, 4096];
const TARGET_RAM_RATIO: f64 = 1.2;

/// The `ram` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Report {
        sections,
        runs,
        targets,
        cases,
        ..
    } = r;
    let specs: Vec<CaseSpec> = RAM_SIZES_MIB
        .iter()
        .filter(|&&mib| mib != 256 || !cases.iter().any(is_reference))
        .map(|&mib| {
            let mut s = CaseSpec::new(REF_INTERVAL_MS, reference());
            s.memory_mib = mib;
            s
        })
        .collect();
    let start = cases.len();
    cx.run_specs(specs, cases)?;
    let mut ram = with_reference(cases, start);
    ram.sort_by_key(|c| c.memory_mib);
    sections.push(render_ram(&ram));
    runs.insert("ram".into(), cases_json(&ram));
    if let (Some(small), Some(big)) = (ram.first(), ram.last())
        && big.memory_mib > small.memory_mib
    {
        let (b, sm) = (stats(&big.pause).p50, stats(&small.pause).p50);
        let r = ratio(b, sm);
        targets.push(Target::at_most(
            format!(
                "pause at {} MiB ≤ {TARGET_RAM_RATIO}× the pause at {} MiB (p50, same dirty rate)",
                big.memory_mib, small.memory_mib
            ),
            format!("{r:.2}× ({b:.2} / {sm:.2} ms)"),
            r,
            TARGET_RAM_RATIO,
            "×",
            2,
        ));
    }
    Ok(())
}

fn render_ram(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### Pause against guest RAM size\n\n-i 100, reference workload (the same dirty rate at every size).\n\n",
    );
    s.push_str(&case_table(cases));
    s.push_str("\nDirty scan p50 (ms) by size: ");
    let scans: Vec<String> = cases
        .iter()
        .map(|c| format!("{} MiB {:.2}", c.memory_mib, stats(&c.ph_scan).p50))
        .collect();
    s.push_str(&scans.join(", "));
    s.push_str("\n\n");
    s
}
