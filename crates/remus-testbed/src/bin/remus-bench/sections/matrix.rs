//! `matrix`: checkpoint pause p50/p99/max for every interval (25, 50,
//! 100, 200 ms) × guest dirty rate (idle, 10, 50, 200 MB/s), with wire
//! and raw bytes per checkpoint.

use anyhow::Result;

use crate::pause::{CaseResult, CaseSpec, TARGET_DIRTY_PAGES, TARGET_P50_MS, Workload};
use crate::report::{Target, case_label, case_table, cases_json, stats};
use crate::suite::{Ctx, REF_WRITE_BYTES, Report};

const MATRIX_INTERVALS: [u64; 4] = [25, 50, 100, 200];
const MATRIX_RATES: [u64; 3] = [10, 50, 200];

/// The `matrix` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Report {
        sections,
        runs,
        targets,
        cases,
        ..
    } = r;
    let mut specs = Vec::new();
    for &i in &MATRIX_INTERVALS {
        specs.push(CaseSpec::new(i, Workload::Idle));
        for &mb in &MATRIX_RATES {
            specs.push(CaseSpec::new(i, Workload::Dirty(mb, REF_WRITE_BYTES)));
        }
    }
    let start = cases.len();
    cx.run_specs(specs, cases)?;
    let matrix = &cases[start..];
    sections.push(render_matrix(matrix));
    runs.insert("matrix".into(), cases_json(matrix));
    if let Some(c) = matrix
        .iter()
        .filter(|c| c.workload != Workload::Idle)
        .min_by_key(|c| (stats(&c.dirty).p50 - TARGET_DIRTY_PAGES as f64).abs() as u64)
    {
        let p = stats(&c.pause);
        targets.push(Target::at_most(
            format!(
                "pause p50 ≤ {TARGET_P50_MS} ms at about {TARGET_DIRTY_PAGES} dirty pages per epoch"
            ),
            format!(
                "{:.2} ms at {:.0} pages ({})",
                p.p50,
                stats(&c.dirty).p50,
                case_label(c)
            ),
            p.p50,
            TARGET_P50_MS,
            " ms",
            1,
        ));
        // The performance issue's lower floor, at the same case.
        for (what, got, limit) in [("p50", p.p50, FLOOR_P50_MS), ("p99", p.p99, FLOOR_P99_MS)] {
            targets.push(Target::at_most(
                format!(
                    "pause {what} ≤ {limit} ms at about {TARGET_DIRTY_PAGES} dirty pages per epoch (the lower floor)"
                ),
                format!("{got:.2} ms ({})", case_label(c)),
                got,
                limit,
                " ms",
                2,
            ));
        }
    }
    Ok(())
}

/// The network-performance issue's pause floor at about
/// [`TARGET_DIRTY_PAGES`] dirty pages.
const FLOOR_P50_MS: f64 = 3.0;
const FLOOR_P99_MS: f64 = 8.0;

fn render_matrix(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### Checkpoint pause: interval × dirty rate\n\n\
         256 MiB guest; `dirty` changes 256 bytes of each page it visits. Percentiles are nearest-rank.\n\n",
    );
    s.push_str(&case_table(cases));
    s.push_str(
        "\nPause phases (p50 ms): QMP stop / dirty scan / page copy / device state (from the stop, beside scan and copy) / QMP cont\n\n",
    );
    for c in cases {
        s.push_str(&format!(
            "- {}: {:.2} / {:.2} / {:.2} / {:.2} / {:.2}\n",
            case_label(c),
            stats(&c.ph_stop).p50,
            stats(&c.ph_scan).p50,
            stats(&c.ph_copy).p50,
            stats(&c.ph_devstate).p50,
            stats(&c.ph_cont).p50
        ));
    }
    s.push('\n');
    s
}
