//! The source's side of a live migration (`remus migrate`).

use super::*;

/// Starts migrating `name` to the agent at `peer`; progress goes to the
/// VM's event channel (subscribe first). On success the VM is destroyed
/// here. `max_rate` caps the pre-copy (bytes/s; 0: this host's
/// `--max-rate`).
pub fn start_migrate(
    agent: &Arc<Agent>,
    name: &str,
    peer: &str,
    max_rate: u64,
) -> Result<(), AgentError> {
    let slot = agent.slot(name)?;
    require_key(agent)?;
    let max_rate = remus_api::rate::effective_rate(max_rate, agent.opts.max_rate)
        .map_err(AgentError::BadRequest)?;
    if slot.vm.is_held() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is paused; unpause it before migrating"
        )));
    }
    if slot.arbiter_guard().is_some_and(|g| g.is_leased()) {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' still holds its arbiter lease from the last protection (the arbiter has not answered since); migrate once `remus list --json` shows it pinned"
        )));
    }
    slot.claim(Purpose::Migrate, peer, Arc::new(AtomicBool::new(false)))
        .map_err(|why| {
            AgentError::Conflict(format!(
                "VM '{name}' cannot be migrated: {why}; migrate needs an unprotected running VM (stop protection first)"
            ))
        })?;
    let claimed = Claim(&slot);
    slot.vm
        .dirty_tracker()
        .map_err(|e| AgentError::Conflict(e.to_string()))?;
    // Replicated disks travel with the VM; disks marked `replicate =
    // false` are taken to be shared storage both hosts see.
    let replicate_disks = !slot.vm.replicated_disks().is_empty();
    let Opened {
        stream,
        version,
        devices_only_state,
        ..
    } = open_session(
        agent,
        &slot,
        peer,
        Purpose::Migrate,
        30_000,
        replicate_disks,
        None,
        None,
        None,
        false,
        None,
    )?;
    let mcfg = remus_replication::migrate::MigrateConfig {
        compress: compression(peer, version, true),
        max_rate,
        devices_only_state,
        ..Default::default()
    };
    claimed.keep();
    let agent = agent.clone();
    let vm_name = name.to_string();
    let peer = peer.to_string();
    std::thread::Builder::new()
        .name(format!("migrate-{vm_name}"))
        .spawn(move || {
            tracing::info!(vm = %vm_name, %peer, "migration started");
            // `done` is published once this host no longer lists the VM:
            // whoever acts on it finds the VM on the destination only.
            let done = std::sync::Mutex::new(None);
            let emit = |ev: SessionEvent| match ev {
                SessionEvent::Done(_) => *done.lock().unwrap_or_else(|p| p.into_inner()) = Some(ev),
                ev => slot.publish(ev),
            };
            let r = remus_replication::migrate::migrate(
                &slot.vm,
                stream,
                &mcfg,
                &emit,
            );
            slot.life.release();
            match r {
                Ok(stats) => {
                    tracing::info!(vm = %vm_name, %peer, total_ms = stats.total_ms, downtime_ms = stats.downtime_ms, bytes = stats.bytes, "migrated; destroying the source copy");
                    agent.destroy_slot_then(&slot, crate::agent::CopyRecord::Forget, || {
                        let done = done.lock().unwrap_or_else(|p| p.into_inner()).take();
                        if let Some(ev) = done {
                            slot.publish(ev);
                        }
                        slot.end_session();
                    });
                }
                Err(e) => {
                    tracing::error!(vm = %vm_name, %peer, error = %e, "migration failed");
                    slot.publish(SessionEvent::Failed {
                        reason: e.to_string(),
                    });
                    slot.end_session();
                }
            }
        })
        .map_err(|e| AgentError::Internal(format!("spawn migrate thread: {e}")))?;
    Ok(())
}
