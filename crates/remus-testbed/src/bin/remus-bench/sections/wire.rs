//! `wire`: bytes on the wire against raw dirty bytes as the share of
//! each page the guest changes varies (1, 64, 256, 4096 bytes per page
//! visit), and the reference case with compression off (`-u`).

use anyhow::Result;

use crate::pause::{CaseResult, CaseSpec, Workload};
use crate::report::{Target, case_label, case_table, cases_json, wire_ratio};
use crate::suite::{
    Ctx, REF_INTERVAL_MS, REF_MB_PER_S, Report, is_reference, reference, with_reference,
};

const WIRE_WRITE_BYTES: [u64; 3] = [1, 64, 4096];
const TARGET_WIRE_RATIO: f64 = 0.5;

/// The `wire` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Report {
        sections,
        runs,
        targets,
        cases,
        ..
    } = r;
    let mut specs: Vec<CaseSpec> = WIRE_WRITE_BYTES
        .iter()
        .map(|&b| CaseSpec::new(REF_INTERVAL_MS, Workload::Dirty(REF_MB_PER_S, b)))
        .collect();
    let mut off = CaseSpec::new(REF_INTERVAL_MS, reference());
    off.protect_args = vec!["-u".into()];
    specs.push(off);
    if !cases.iter().any(is_reference) {
        specs.push(CaseSpec::new(REF_INTERVAL_MS, reference()));
    }
    let start = cases.len();
    cx.run_specs(specs, cases)?;
    let mut wire = with_reference(cases, start);
    wire.sort_by_key(|c| {
        (
            !c.compressed,
            match c.workload {
                Workload::Dirty(_, b) => b,
                _ => 0,
            },
        )
    });
    sections.push(render_wire(&wire));
    runs.insert("wire".into(), cases_json(&wire));
    if let Some(r) = wire.iter().find(|c| is_reference(c)) {
        let w = wire_ratio(r);
        targets.push(Target::at_most(
            format!("wire bytes ≤ {TARGET_WIRE_RATIO}× raw dirty bytes on the reference workload"),
            format!("{w:.3}× ({})", case_label(r)),
            w,
            TARGET_WIRE_RATIO,
            "×",
            3,
        ));
    }
    Ok(())
}

fn render_wire(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### Bytes on the wire against raw dirty bytes\n\n\
         -i 100, `dirty` at 50 MB/s; the bytes of each page changed per visit vary. \
         raw = dirty pages × 4096 + device state; wire = page and device-state frames as sent (headers included). \
         Compression XORs each page against the copy the backup holds (64 MiB page cache on the primary), then LZ4.\n\n",
    );
    s.push_str(&case_table(cases));
    s.push('\n');
    s
}
