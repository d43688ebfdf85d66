//! What a host knows of its copy of a protected VM: DRBD-style generation
//! identifiers, kept in `copy.json` in the copy's directory, and the rule
//! that turns two copies' generations into a resync plan.
//!
//! A generation names a line of data. Both copies of a protected VM carry
//! the primary's `current` once the backup has committed a checkpoint. A
//! copy that goes on alone (the backup that fails over, the primary whose
//! session ends) starts a new `current` and remembers the old one as
//! `bitmap`: from then on its change records (the change maps, and the
//! activity log of a primary) cover every block it wrote since. When two
//! copies meet, the target's data plus its change records and the
//! source's data plus its change records differ only inside the union of
//! those records, if both descend from one generation:
//!
//! | target              | source               | plan                          |
//! |---------------------|----------------------|-------------------------------|
//! | no record           | any                  | full digest compare           |
//! | current = S.current | —                    | changed chunks (both sides)   |
//! | current = S.bitmap  | —                    | changed chunks (both sides)   |
//! | bitmap = S.bitmap   | —                    | split brain: refused          |
//! | bitmap = S.current  | —                    | target is newer: refused      |
//! | bitmap set, else    | —                    | split brain: refused          |
//! | anything else       | —                    | full digest compare           |
//!
//! A target the operator gave up (`discarded`) is never refused: its own
//! change records join the union when there is a common generation, else
//! the full compare runs. A target left inconsistent by an interrupted
//! resync keeps its old generations (and records) until one commits, so
//! the same source resumes the same plan; another source gets a full
//! compare.

pub use remus_proto::setup::{Gen, Generations, MAX_PLAN_DISKS, MAX_RUNS, SyncMode, SyncPlan};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the copy's record in its directory.
pub const COPY_FILE: &str = "copy.json";

/// The record of one copy (`copy.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyState {
    pub gens: Generations,
    /// A resync from this generation is overwriting the copy: it is
    /// inconsistent until a checkpoint of that session commits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_from: Option<Gen>,
    /// The operator gave this copy up (`remus destroy --discard-this-copy`).
    #[serde(default)]
    pub discarded: bool,
    /// The VM ran here (as primary or on its own) when this was written.
    #[serde(default)]
    pub running: bool,
    /// The last epoch committed in common with the peer, for the logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common_epoch: Option<u64>,
    /// Shape, for listing a stale copy.
    #[serde(default)]
    pub memory_mib: u64,
    #[serde(default)]
    pub vcpus: u32,
}

impl CopyState {
    pub fn new(memory_mib: u64, vcpus: u32) -> CopyState {
        CopyState {
            gens: Generations::fresh(),
            resync_from: None,
            discarded: false,
            running: false,
            common_epoch: None,
            memory_mib,
            vcpus,
        }
    }

    /// Reads `dir/copy.json`: None if there is none, an error if it cannot
    /// be used.
    pub fn load(dir: &Path) -> Result<Option<CopyState>, RecordError> {
        let path = dir.join(COPY_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| RecordError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Io { path, source }),
        }
    }

    /// Writes `dir/copy.json` atomically and durably (a crash leaves the
    /// old record or the new one).
    pub fn save(&self, dir: &Path) -> Result<(), RecordError> {
        let path = dir.join(COPY_FILE);
        let tmp: PathBuf = dir.join(format!("{COPY_FILE}.tmp"));
        let body = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Corrupt {
            path: path.clone(),
            source,
        })?;
        (|| -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })()
        .map_err(|source| RecordError::Io { path, source })
    }
}

/// Why a copy's record cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Decides how a target (`target`: its record, if any) is synchronised
/// from a source with generations `source`; an error is a refusal naming
/// the resolution. `vm` and `source_host` are for the messages.
pub fn plan(
    source: &Generations,
    target: Option<&CopyState>,
    vm: &str,
) -> Result<(SyncMode, String, Option<Gen>), String> {
    let Some(t) = target else {
        return Ok((
            SyncMode::Full,
            "this host has no record of the VM's data: digest compare of every chunk".into(),
            None,
        ));
    };
    if let Some(from) = t.resync_from
        && from != source.current
    {
        return Ok((
            SyncMode::Full,
            format!(
                "an interrupted resync from generation {from} left this copy inconsistent: digest compare of every chunk"
            ),
            None,
        ));
    }
    let tg = &t.gens;
    let changed = |why: String, common: Gen| Ok((SyncMode::Changed, why, Some(common)));
    if tg.current == source.current {
        return changed(
            format!(
                "both copies hold generation {}: only changed chunks",
                tg.current
            ),
            tg.current,
        );
    }
    if Some(tg.current) == source.bitmap {
        return changed(
            format!(
                "this copy is generation {}, which the source went on from: only the chunks either side changed since",
                tg.current
            ),
            tg.current,
        );
    }
    let resolution = format!(
        "choose the copy to give up: on its host run `remus destroy --discard-this-copy {vm}`, then protect from the copy you keep"
    );
    if let Some(b) = tg.bitmap {
        if t.discarded {
            if source.bitmap == Some(b) || source.current == b {
                return changed(
                    format!(
                        "this copy was given up (--discard-this-copy); both copies changed since generation {b}: only the chunks either side changed"
                    ),
                    b,
                );
            }
        } else if source.bitmap == Some(b) {
            return Err(format!(
                "split brain: both copies of {vm} ran on their own after their last common generation {b} (this copy as {}, the source as {}); nothing was copied; {resolution}",
                tg.current, source.current
            ));
        } else if source.current == b {
            return Err(format!(
                "the copy of {vm} here is newer than the source: it ran on its own after the source's generation {b}; protect from this host instead, or {resolution}"
            ));
        } else {
            return Err(format!(
                "split brain: the copy of {vm} here ran on its own since generation {b}, which the source's data does not descend from; nothing was copied; {resolution}"
            ));
        }
    }
    let why = if source.history.contains(&tg.current) {
        format!(
            "this copy is an older generation ({}) than the source's change records reach: digest compare of every chunk",
            tg.current
        )
    } else {
        format!(
            "no common generation with change records (this copy {}, the source {}): digest compare of every chunk",
            tg.current, source.current
        )
    };
    Ok((SyncMode::Full, why, None))
}

/// Ascending chunk numbers (duplicates allowed) as (first, count) runs.
pub fn to_runs(chunks: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<u64> = chunks.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in v {
        match out.last_mut() {
            Some((f, n)) if *f + *n == c => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

/// `runs` with at most `max` entries: the smallest gaps are filled first
/// (comparing a few more chunks, never fewer).
pub fn coalesce(mut runs: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let mut gap = 1u64;
    while runs.len() > max.max(1) {
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (f, n) in runs {
            match out.last_mut() {
                Some((lf, ln)) if f - (*lf + *ln) <= gap => *ln = f + n - *lf,
                _ => out.push((f, n)),
            }
        }
        runs = out;
        gap = gap.saturating_mul(2);
    }
    runs
}

/// The union of `runs` (in any order, overlapping or not) as ascending,
/// disjoint runs: merged as intervals, never expanded into chunks.
pub fn union_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.retain(|r| r.1 > 0);
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (f, n) in runs {
        let end = f.saturating_add(n);
        match out.last_mut() {
            Some((lf, ln)) if f <= *lf + *ln => *ln = (*ln).max(end - *lf),
            _ => out.push((f, end - f)),
        }
    }
    out
}

/// Checks runs a peer sent for a disk of `total` chunks before anything
/// is made of them: at most [`MAX_RUNS`], each non-empty and within the
/// disk.
pub fn check_peer_runs(runs: &[(u64, u64)], total: u64, what: &str) -> Result<(), String> {
    if runs.len() > MAX_RUNS {
        return Err(format!("{what}: {} runs, at most {MAX_RUNS}", runs.len()));
    }
    for &(f, n) in runs {
        if n == 0 || f.checked_add(n).is_none_or(|end| end > total) {
            return Err(format!(
                "{what}: run of {n} chunks at {f} is empty or beyond the disk's {total} chunks"
            ));
        }
    }
    Ok(())
}

/// The chunks of some runs.
pub fn from_runs(runs: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    runs.iter().flat_map(|&(f, n)| f..f + n)
}

/// Chunks in runs.
pub fn run_chunks(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|r| r.1).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(g: &Generations) -> CopyState {
        CopyState {
            gens: g.clone(),
            ..CopyState::new(256, 1)
        }
    }

    /// Runs are merged as intervals (one naming billions of chunks costs
    /// nothing), and a peer's runs are checked against the disk first.
    #[test]
    fn runs_merge_as_intervals_and_peer_runs_are_bounded() {
        assert_eq!(
            union_runs(vec![(10, 5), (0, 3), (12, 10), (3, 2), (30, 0), (25, 1)]),
            vec![(0, 5), (10, 12), (25, 1)]
        );
        assert_eq!(union_runs(vec![(0, 1 << 50), (5, 3)]), vec![(0, 1 << 50)]);
        assert!(check_peer_runs(&[(0, 10)], 10, "vda").is_ok());
        let e = check_peer_runs(&[(5, 1 << 50)], 1000, "vda").unwrap_err();
        assert!(e.contains("beyond the disk's 1000 chunks"), "{e}");
        assert!(check_peer_runs(&[(u64::MAX, 2)], 1000, "vda").is_err());
        assert!(check_peer_runs(&[(3, 0)], 1000, "vda").is_err());
        let many = vec![(0, 1); MAX_RUNS + 1];
        assert!(check_peer_runs(&many, 1 << 40, "vda").is_err());
    }

    #[test]
    fn failover_then_resync_back_is_a_changed_sync_and_then_both_agree() {
        // A protects to B: B adopts A's generation at the first commit.
        let mut a = Generations::fresh();
        let mut b = Generations::fresh();
        b.adopt(&a);
        assert_eq!(a.current, b.current);
        // A dies; B fails over and goes on alone.
        b.diverge();
        assert_eq!(b.bitmap, Some(a.current));
        // Protect back from B to the stale A: only changed chunks.
        let (mode, _, common) = plan(&b, Some(&state(&a)), "web").unwrap();
        assert_eq!((mode, common), (SyncMode::Changed, Some(a.current)));
        // It commits: A adopts B's generation, B's records are spent.
        a.adopt(&b);
        b.synced();
        assert_eq!(a.current, b.current);
        assert_eq!((a.bitmap, b.bitmap), (None, None));
        let (mode, _, _) = plan(&b, Some(&state(&a)), "web").unwrap();
        assert_eq!(mode, SyncMode::Changed);
    }

    #[test]
    fn both_copies_gone_on_alone_is_split_brain_until_one_is_discarded() {
        let mut a = Generations::fresh();
        let mut b = Generations::fresh();
        b.adopt(&a);
        // The link breaks: A runs on (its session ended), B fails over.
        a.diverge();
        b.diverge();
        let e = plan(&b, Some(&state(&a)), "web").unwrap_err();
        assert!(
            e.contains("split brain") && e.contains("--discard-this-copy web"),
            "{e}"
        );
        // The other way round too.
        assert!(
            plan(&a, Some(&state(&b)), "web")
                .unwrap_err()
                .contains("split brain")
        );
        let mut given_up = state(&a);
        given_up.discarded = true;
        let (mode, _, common) = plan(&b, Some(&given_up), "web").unwrap();
        assert_eq!((mode, common), (SyncMode::Changed, b.bitmap));
    }

    #[test]
    fn a_newer_target_is_refused_and_unknown_or_old_targets_get_a_full_compare() {
        let a = Generations::fresh();
        let mut b = Generations::fresh();
        b.adopt(&a);
        b.diverge();
        // Protecting from the old copy onto the one that went on: refused.
        let e = plan(&a, Some(&state(&b)), "web").unwrap_err();
        assert!(e.contains("newer"), "{e}");
        // No record here: full.
        assert_eq!(plan(&a, None, "web").unwrap().0, SyncMode::Full);
        // An unrelated copy: full.
        let other = Generations::fresh();
        assert_eq!(
            plan(&a, Some(&state(&other)), "web").unwrap().0,
            SyncMode::Full
        );
        // A copy whose generation the source left behind long ago: full.
        let mut c = b.clone();
        c.synced();
        c.diverge();
        c.synced();
        let old = state(&a);
        let (mode, why, _) = plan(&c, Some(&old), "web").unwrap();
        assert_eq!(mode, SyncMode::Full);
        assert!(why.contains("older generation"), "{why}");
    }

    #[test]
    fn an_interrupted_resync_resumes_only_from_the_same_source() {
        let a = Generations::fresh();
        let mut b = Generations::fresh();
        b.adopt(&a);
        b.diverge();
        let mut t = state(&a);
        t.resync_from = Some(b.current);
        assert_eq!(plan(&b, Some(&t), "web").unwrap().0, SyncMode::Changed);
        let other = Generations::fresh();
        assert_eq!(plan(&other, Some(&t), "web").unwrap().0, SyncMode::Full);
    }

    #[test]
    fn the_record_survives_a_save_and_load_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(CopyState::load(dir.path()).unwrap(), None);
        let mut s = CopyState::new(512, 2);
        s.gens.diverge();
        s.running = true;
        s.save(dir.path()).unwrap();
        assert_eq!(CopyState::load(dir.path()).unwrap(), Some(s));
        std::fs::write(dir.path().join(COPY_FILE), b"{not json").unwrap();
        let e = CopyState::load(dir.path()).unwrap_err();
        assert!(matches!(e, RecordError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains("copy.json"), "{e}");
    }

    #[test]
    fn runs_round_trip() {
        let runs = to_runs([9, 1, 2, 3, 7, 3, 8]);
        assert_eq!(runs, vec![(1, 3), (7, 3)]);
        assert_eq!(from_runs(&runs).collect::<Vec<_>>(), vec![1, 2, 3, 7, 8, 9]);
        assert_eq!(run_chunks(&runs), 6);
        assert!(to_runs([]).is_empty());
        let many: Vec<(u64, u64)> = (0..100).map(|i| (i * 10, 1 + i % 3)).collect();
        let few = coalesce(many.clone(), 7);
        assert!(few.len() <= 7);
        let covered: std::collections::HashSet<u64> = from_runs(&few).collect();
        assert!(from_runs(&many).all(|c| covered.contains(&c)), "a superset");
        assert_eq!(coalesce(many.clone(), 100), many);
    }

    /// A peer's plan is bounded while it is parsed: lists for more disks
    /// than a VM can have, or more runs than a disk can need, are refused
    /// before they are built.
    #[test]
    fn a_sync_plan_is_bounded_as_it_is_read() {
        let parse = |runs: &str| {
            serde_json::from_str::<SyncPlan>(&format!(
                r#"{{"mode":"changed","reason":"r","target_runs":{runs}}}"#
            ))
        };
        let ok = parse("[[[0,4],[10,1]],[]]").unwrap();
        assert_eq!(ok.target_runs, vec![vec![(0, 4), (10, 1)], vec![]]);
        let many_disks = format!("[{}[]]", "[],".repeat(MAX_PLAN_DISKS));
        let e = parse(&many_disks).unwrap_err().to_string();
        assert!(e.contains("more than 26 disks"), "{e}");
        let many_runs = format!("[[{}[0,1]]]", "[0,1],".repeat(MAX_RUNS));
        let e = parse(&many_runs).unwrap_err().to_string();
        assert!(e.contains(&format!("more than {MAX_RUNS} items")), "{e}");
    }
}
