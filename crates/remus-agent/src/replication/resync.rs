//! The backup's record of its copy: the sync plan it answers a primary
//! with, what a commit changes in it, and the disk images it creates.

use super::*;

/// The backup's side of the sync plan: from the primary's generations and
/// this host's record of its copy. Returns the plan to send (None for
/// peers before version 5, and for sessions without disk replication)
/// and the record to keep up to date (None: nothing known of the disks).
/// A refusal (split brain, a newer copy here) is an error naming the
/// resolution. The record is marked as being resynced before anything is
/// written.
pub(super) fn plan_target(
    setup: &SessionSetup,
    purpose: Purpose,
    dir: &std::path::Path,
    cfg: &VmConfig,
    local: &VmCompat,
) -> Result<(Option<SyncPlan>, Option<CopyState>), String> {
    let name = &cfg.name;
    if purpose != Purpose::Protect || !setup.replicate_disks {
        // The disks are not written by this session: the record (if any)
        // still describes them.
        let rec = crate::copies::load(dir, name).ok().flatten();
        if purpose == Purpose::Migrate {
            // A migration overwrites the disks with a full compare.
            crate::copies::forget(dir, name);
            return Ok((None, None));
        }
        return Ok((None, rec));
    }
    let Some(source) = &setup.generations else {
        // A version-4 primary: a full compare overwrites the disks and
        // nothing is known of its generation.
        crate::copies::forget(dir, name);
        return Ok((None, None));
    };
    let loaded = crate::copies::load(dir, name);
    let (mut mode, mut reason, common) = match &loaded {
        Ok(rec) => remus_replication::copy::plan(source, rec.as_ref(), name)?,
        Err(e) => (
            SyncMode::Full,
            format!(
                "this host's record of the VM is unreadable ({e}): digest compare of every chunk"
            ),
            None,
        ),
    };
    let mut target_runs = Vec::new();
    if mode == SyncMode::Changed {
        let disks: Vec<(String, u64)> = local
            .disks
            .iter()
            .filter(|d| {
                cfg.disks
                    .iter()
                    .any(|c| c.target == d.target && c.replicate && !c.readonly)
            })
            .map(|d| (d.target.clone(), d.size_bytes))
            .collect();
        match crate::copies::own_runs(dir, &disks) {
            Ok(r) => target_runs = r,
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "this copy's change records are unusable");
                mode = SyncMode::Full;
                reason = format!(
                    "this copy's change records are unusable ({e}): digest compare of every chunk"
                );
            }
        }
    }
    let mut rec = loaded
        .ok()
        .flatten()
        .unwrap_or_else(|| CopyState::new(cfg.memory, cfg.vcpus));
    rec.resync_from = Some(source.current);
    rec.running = false;
    rec.memory_mib = cfg.memory;
    rec.vcpus = cfg.vcpus;
    crate::copies::save(dir, name, &rec);
    Ok((
        Some(SyncPlan {
            mode,
            reason,
            common: common.filter(|_| mode == SyncMode::Changed),
            target_runs,
        }),
        Some(rec),
    ))
}

/// The first checkpoint of a resync committed here: this copy holds the
/// source's generation now, and its own change records are spent. True
/// when this commit completed a resync.
pub(super) fn target_committed(
    vm: &str,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    source: Option<&Generations>,
    targets: &[String],
    epoch: u64,
) -> bool {
    let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(st), Some(src)) = (copy.as_mut(), source) else {
        return false;
    };
    if st.resync_from.is_none() {
        return false;
    }
    st.gens.adopt(src);
    st.resync_from = None;
    st.discarded = false;
    st.common_epoch = Some(epoch);
    crate::copies::save(dir, vm, st);
    crate::copies::target_synced(dir, targets);
    tracing::info!(%vm, epoch, generation = %st.gens.current, "resync complete: this copy holds the primary's data");
    true
}

/// Creates the images this host keeps a copy in (missing ones, sparse, at
/// the peer's size), each recorded with its format before it exists.
pub(super) fn create_images(
    agent: &Agent,
    vm: &str,
    images: &[crate::storage::NewImage],
) -> Result<(), String> {
    for img in images {
        agent
            .opts
            .storage
            .record_created(vm, &img.target, img.format)
            .map_err(|e| format!("disk {}: {e}", img.target))?;
        if img.format == remus_config::DiskFormat::Qcow2 {
            let out =
                std::process::Command::new(remus_vm::qemu_tool(&agent.opts.qemu.path, "qemu-img"))
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&img.path)
                    .arg(img.size.to_string())
                    .output()
                    .map_err(|e| format!("disk {}: run qemu-img: {e}", img.target))?;
            if !out.status.success() {
                return Err(format!(
                    "disk {}: cannot create the qcow2 image {}: {}",
                    img.target,
                    img.path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&img.path)
                .map_err(|e| {
                    format!(
                        "disk {}: cannot create {}: {e}",
                        img.target,
                        img.path.display()
                    )
                })?;
            f.set_len(img.size)
                .map_err(|e| format!("disk {}: size {}: {e}", img.target, img.path.display()))?;
        }
        tracing::info!(%vm, disk = %img.target, path = %img.path.display(), size = img.size, format = img.format.as_str(), "created the copy's disk image (sparse); the initial sync fills it");
    }
    Ok(())
}
