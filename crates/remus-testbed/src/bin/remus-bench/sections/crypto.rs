//! `crypto`: the encrypted link against the same sessions in the clear
//! (`--unencrypted`), in one run: pauses and acks on the reference
//! workload, and the initial copy of a guest holding [`CRYPTO_FILL_MIB`]
//! of data.

use anyhow::Result;

use crate::pause::{CaseResult, CaseSpec, Workload};
use crate::report::{Target, case_table, cases_json, ratio, stats};
use crate::suite::{Ctx, REF_INTERVAL_MS, Report, reference};

/// The crypto section's initial copy: a guest of this size holding this
/// much data (random, so neither zero pages nor compression shorten it).
const CRYPTO_FILL_MIB: u64 = 640;
const CRYPTO_FILL_GUEST_MIB: u64 = 1024;
/// Targets of the encrypted link against the clear one.
const TARGET_CRYPTO_PAUSE: f64 = 1.1;
const TARGET_CRYPTO_ACK: f64 = 1.1;
const TARGET_CRYPTO_SYNC: f64 = 0.8;

/// The `crypto` section of the suite.
pub(crate) fn run(cx: &Ctx, r: &mut Report) -> Result<()> {
    let Report {
        sections,
        runs,
        targets,
        cases,
        ..
    } = r;
    // The encrypted link against the same sessions in the clear
    // (`--unencrypted`), in one run: pauses and acks on the reference
    // workload, and the initial copy of a guest holding
    // CRYPTO_FILL_MIB of data.
    let clear = |mut s: CaseSpec| {
        s.protect_args.push("--unencrypted".into());
        s
    };
    let fill = || {
        let mut s = CaseSpec::new(REF_INTERVAL_MS, Workload::Fill(CRYPTO_FILL_MIB));
        s.memory_mib = CRYPTO_FILL_GUEST_MIB;
        s
    };
    // Each pair back to back, the encrypted case run here even when the
    // matrix ran the reference already: on a 2-core host the pause moves
    // by more than the cost of encryption between cases minutes apart.
    let specs = vec![
        clear(CaseSpec::new(REF_INTERVAL_MS, reference())),
        CaseSpec::new(REF_INTERVAL_MS, reference()),
        clear(fill()),
        fill(),
    ];
    let start = cases.len();
    cx.run_specs(specs, cases)?;
    let crypto = cases[start..].to_vec();
    sections.push(render_crypto(&crypto));
    runs.insert("crypto".into(), cases_json(&crypto));
    targets.extend(crypto_targets(&crypto));
    Ok(())
}

/// The initial copy's rate, MB/s (bytes over the time until acknowledged).
fn sync_mb_per_s(c: &CaseResult) -> f64 {
    let bytes = c.initial_sync["bytes"].as_f64().unwrap_or(0.0);
    let ms = c.initial_sync["ms"].as_f64().unwrap_or(f64::NAN);
    bytes / 1e6 / (ms / 1e3)
}

fn render_crypto(cases: &[CaseResult]) -> String {
    let mut s = String::from(
        "### The encrypted link against the clear one\n\n\
         The same sessions over the encrypted link (protocol 6: Noise_NNpsk0_25519_AESGCM_SHA256, \
         AES-256-GCM records of up to 64 KiB) and in the clear (`--unencrypted`, protocol 5). \
         Pause and ack on the reference workload; the initial copy's rate on a 1 GiB guest holding \
         640 MiB of random data (bytes copied over the time until the backup acknowledged them).\n\n",
    );
    s.push_str(&case_table(cases));
    s.push_str(
        "
| initial copy | MiB | ms | MB/s |
|---|---:|---:|---:|
",
    );
    for c in cases
        .iter()
        .filter(|c| matches!(c.workload, Workload::Fill(_)))
    {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} |
",
            if c.encrypted {
                "encrypted"
            } else {
                "in the clear"
            },
            c.initial_sync["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            c.initial_sync["ms"].as_f64().unwrap_or(f64::NAN),
            sync_mb_per_s(c)
        ));
    }
    s.push('\n');
    s
}

fn crypto_targets(cases: &[CaseResult]) -> Vec<Target> {
    let find = |fill: bool, enc: bool| {
        cases.iter().find(|c| {
            c.encrypted == enc
                && if fill {
                    matches!(c.workload, Workload::Fill(_))
                } else {
                    c.workload == reference() && c.memory_mib == 256 && c.compressed
                }
        })
    };
    let mut t = Vec::new();
    if let (Some(e), Some(p)) = (find(false, true), find(false, false)) {
        let (ep, pp) = (stats(&e.pause).p50, stats(&p.pause).p50);
        let r = ratio(ep, pp);
        t.push(Target::at_most(
            format!("encrypted checkpoint pause ≤ {TARGET_CRYPTO_PAUSE}× the clear one (p50, reference workload)"),
            format!("{r:.2}× ({ep:.2} / {pp:.2} ms)"),
            r,
            TARGET_CRYPTO_PAUSE,
            "×",
            2,
        ));
        let (ea, pa) = (stats(&e.ack).p50, stats(&p.ack).p50);
        let r = ratio(ea, pa);
        t.push(Target::at_most(
            format!(
                "encrypted ack time ≤ {TARGET_CRYPTO_ACK}× the clear one (p50, reference workload)"
            ),
            format!("{r:.2}× ({ea:.2} / {pa:.2} ms)"),
            r,
            TARGET_CRYPTO_ACK,
            "×",
            2,
        ));
    }
    if let (Some(e), Some(p)) = (find(true, true), find(true, false)) {
        let (es, ps) = (sync_mb_per_s(e), sync_mb_per_s(p));
        let r = ratio(es, ps);
        t.push(Target::at_least(
            format!("encrypted initial copy ≥ {TARGET_CRYPTO_SYNC}× the clear one's rate"),
            format!("{r:.2}× ({es:.0} / {ps:.0} MB/s)"),
            r,
            TARGET_CRYPTO_SYNC,
            "×",
            2,
        ));
    }
    t
}
