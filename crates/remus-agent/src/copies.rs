//! This host's records of its copies of protected VMs, kept apart from
//! the VMs themselves (`STATE_DIR/copies/NAME/`) so that they outlive the
//! QEMU process, the VM's directory and the agent:
//!
//! - `copy.json`: the copy's generations ([`CopyState`]);
//! - `disk-TARGET.al`: the activity log of each replicated disk, kept
//!   while this host is (or was) the primary;
//! - `disk-TARGET.changed`: the change map of each replicated disk, kept
//!   while the copy goes on alone (after a failover, or after its session
//!   ended) until a resync makes both copies equal.
//!
//! An agent that starts and finds a record saying the VM ran here lists it
//! as a *stale* copy: it never runs again on its own; `remus destroy`
//! forgets it, a resync from the copy that took over reuses it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use remus_disk::{ActivityLog, ChangeMap};
use remus_replication::copy::CopyState;
use remus_vm::Vm;

/// The directory of VM `name`'s copy record.
pub fn dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("copies").join(name)
}

fn al_path(dir: &Path, target: &str) -> PathBuf {
    dir.join(format!("disk-{target}.al"))
}

fn changed_path(dir: &Path, target: &str) -> PathBuf {
    dir.join(format!("disk-{target}.changed"))
}

/// Loads the record, logging (and treating as absent) one that cannot be
/// read: the resync then compares every chunk, and says why.
pub fn load(
    dir: &Path,
    vm: &str,
) -> Result<Option<CopyState>, remus_replication::copy::RecordError> {
    CopyState::load(dir).inspect_err(|e| {
        tracing::error!(%vm, error = %e, "the copy's record is unreadable; the next resync compares every chunk");
    })
}

/// Saves the record; a failure is logged (the record then says less than
/// it could, and the next resync may compare more).
pub fn save(dir: &Path, vm: &str, state: &CopyState) {
    if let Err(e) = state.save(dir) {
        tracing::error!(%vm, error = %e, "cannot save the copy's record");
    }
}

/// Attaches an activity log to each replicated disk of `vm` that has none
/// yet (the primary marks extents before writing them from now on).
pub fn attach_activity_logs(vm: &Vm, dir: &Path, limit: usize) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for p in vm.replicated_disks() {
        if p.activity_log().is_some() {
            continue;
        }
        let path = al_path(dir, p.target());
        let al = ActivityLog::open(&path, p.local().size(), limit)
            .map_err(|e| format!("activity log {}: {e}", path.display()))?;
        p.set_activity_log(Some(Arc::new(al)));
    }
    Ok(())
}

/// Records changes of each replicated disk from now on in its change map
/// (kept if it exists), then detaches the activity log (whose marks stay
/// in its file): used when the VM goes on alone.
pub fn track_changes(vm: &Vm, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for p in vm.replicated_disks() {
        if p.change_map().is_none() {
            let path = changed_path(dir, p.target());
            let map = ChangeMap::open(&path, p.local().size(), remus_disk::sync::CHUNK_SIZE)
                .map_err(|e| format!("change map {}: {e}", path.display()))?;
            p.track_changes(Arc::new(map));
        }
        p.set_activity_log(None);
        paths.push(changed_path(dir, p.target()));
    }
    Ok(paths)
}

/// A resync from this host committed on the peer: the change maps are
/// spent (tracking stops, the files go) and what the activity logs held
/// from before the session is on the peer now.
pub fn source_synced(vm: &Vm) {
    for p in vm.replicated_disks() {
        if let Some(m) = p.stop_tracking() {
            let _ = std::fs::remove_file(m.path());
        }
        if let Some(al) = p.activity_log()
            && let Err(e) = al.forget_before_session()
        {
            tracing::warn!(vm = %vm.name(), disk = %p.target(), error = %e, "activity log");
        }
    }
}

/// A resync to this host committed: its own change records are spent.
pub fn target_synced(dir: &Path, targets: &[String]) {
    for t in targets {
        let _ = std::fs::remove_file(al_path(dir, t));
        let _ = std::fs::remove_file(changed_path(dir, t));
    }
}

/// The chunks this host's own change records mark for each disk (in
/// order; `disks` is (target, size)), as runs: its activity logs, and its
/// change maps.
pub fn own_runs(dir: &Path, disks: &[(String, u64)]) -> Result<Vec<Vec<(u64, u64)>>, String> {
    use remus_disk::sync::CHUNK_SIZE;
    disks
        .iter()
        .map(|(target, size)| {
            let al = al_path(dir, target);
            let log = al
                .exists()
                .then(|| ActivityLog::open(&al, *size, remus_disk::activity::DEFAULT_LIMIT))
                .transpose()
                .map_err(|e| format!("activity log {}: {e}", al.display()))?;
            let ch = changed_path(dir, target);
            let map = ch
                .exists()
                .then(|| ChangeMap::open(&ch, *size, CHUNK_SIZE))
                .transpose()
                .map_err(|e| format!("change map {}: {e}", ch.display()))?;
            // At most MAX_RUNS per disk (comparing a few more chunks,
            // never fewer), so the plan fits its frame and the peer's
            // bounds.
            Ok(remus_replication::copy::coalesce(
                remus_replication::disks::record_runs(log.as_ref(), map.as_ref(), &[], *size),
                remus_replication::copy::MAX_RUNS,
            ))
        })
        .collect()
}

/// The records found at start-up: (name, record) of each copy that was
/// running here when the agent stopped.
pub fn stale_at_start(state_dir: &Path) -> Vec<(String, CopyState)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(state_dir.join("copies")) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        match load(&e.path(), &name) {
            Ok(Some(s)) if s.running => out.push((name, s)),
            _ => {}
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// This host's own configuration of its copy of a VM (`config.json` in
/// the record): the paths it used, so that a later session reuses its
/// disks where they are (see [`crate::storage`]).
pub fn save_config(dir: &Path, cfg: &remus_config::VmConfig) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join("config.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(cfg)?)?;
        std::fs::rename(&tmp, dir.join("config.json"))
    };
    if let Err(e) = write() {
        tracing::error!(vm = %cfg.name, error = %e, "cannot save this host's config of the copy");
    }
}

/// [`save_config`]'s record, if there is a readable one.
pub fn load_config(dir: &Path) -> Option<remus_config::VmConfig> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(dir.join("config.json"))
        .ok()?
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    match serde_json::from_str::<remus_config::VmConfig>(&text) {
        Ok(c) if c.validate().is_ok() => Some(c),
        _ => {
            tracing::warn!(dir = %dir.display(), "this host's config of the copy is unreadable; using the placement file or the defaults");
            None
        }
    }
}

/// Forgets a copy's record entirely (`d`: its directory).
pub fn forget(d: &Path, name: &str) {
    if d.exists()
        && let Err(e) = std::fs::remove_dir_all(d)
    {
        tracing::warn!(vm = %name, error = %e, "cannot remove the copy's record");
    }
}
