//! The primary's side: starting a protection session (`remus protect`),
//! carrying out how it ends (backup lost, stopped, switched over), and the
//! planned switch-over (`remus failback`).

use super::*;

/// Starts protecting `name` (blocking: connects, authenticates, waits for
/// the standby). Returns once the session runs.
pub fn start_protect(
    agent: &Arc<Agent>,
    name: &str,
    req: ProtectRequest,
) -> Result<(), AgentError> {
    start_protect_from(agent, name, req, None)
}

/// [`start_protect`], resuming the session a restart of the agent
/// suspended at `resume` (the guest stopped at that checkpoint since,
/// see [`super::suspend`]) if the backup still holds it; the guest runs
/// again either way once the session is set up.
pub(super) fn start_protect_from(
    agent: &Arc<Agent>,
    name: &str,
    req: ProtectRequest,
    resume: Option<remus_proto::Epoch>,
) -> Result<(), AgentError> {
    let slot = agent.slot(name)?;
    require_key(agent)?;
    // Claimed before connecting (which takes seconds): two sessions on one
    // VM would each clear the other's dirty bits and both miss pages.
    let stop = Arc::new(AtomicBool::new(false));
    slot.claim(Purpose::Protect, &req.peer, stop.clone())
        .map_err(|why| {
            AgentError::Conflict(format!(
                "VM '{name}' cannot be protected: {why}; protect needs an unprotected running VM"
            ))
        })?;
    let claimed = Claim(&slot);
    check_timing(req.interval_ms, req.timeout_ms)?;
    let max_rate = remus_api::rate::effective_rate(req.max_rate, agent.opts.max_rate)
        .map_err(AgentError::BadRequest)?;
    if let Some((_, why)) = slot.cluster_hold.held() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' waits for the cluster's decision ({why}); protect it again after `remus takeover {name}`"
        )));
    }
    if slot.vm.is_fenced() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is fenced (its arbiter lease lapsed); protect it again once the arbiter has answered and lifted the fence"
        )));
    }
    let cfg = &slot.vm.config;
    let replicate_disks = !req.no_disk && !slot.vm.replicated_disks().is_empty();
    let buffer_net = !req.no_net && !cfg.vifs.is_empty();
    // The default never exceeds a short -i; a value given must not.
    let min_interval = match req
        .min_interval_ms
        .unwrap_or(remus_api::DEFAULT_MIN_INTERVAL_MS.min(req.interval_ms))
    {
        0 => None,
        ms if ms > req.interval_ms => {
            return Err(AgentError::BadRequest(format!(
                "--min-interval {ms} ms is longer than the interval (-i {} ms): it is the shortest epoch, -i the longest",
                req.interval_ms
            )));
        }
        ms => Some(Duration::from_millis(ms)),
    };
    let max_latency = min_interval.map(|_| {
        Duration::from_millis(
            req.max_latency_ms
                .unwrap_or(remus_api::DEFAULT_MAX_LATENCY_MS),
        )
    });
    slot.vm
        .dirty_tracker()
        .map_err(|e| AgentError::Conflict(e.to_string()))?;
    // Split-brain protection: this host takes the VM's key before the
    // backup exists; the backup resumes only after taking it over.
    let guard = match agent.opts.arbiter.as_ref().filter(|_| cfg.arbiter) {
        Some(arb) => Some(arbitrate(arb, &slot)?),
        None => {
            let why = if agent.opts.arbiter.is_some() {
                "the VM's config says arbiter = false"
            } else {
                "this agent has no --arbiter"
            };
            let msg = format!(
                "no arbiter ({why}): if the link between the hosts fails while both are up, the backup resumes a second running copy (split brain); see docs/operations.md"
            );
            tracing::warn!(vm = %name, "{msg}");
            slot.publish(SessionEvent::Warning {
                message: msg.clone(),
            });
            None
        }
    };
    // Any early return from here keeps the VM running unprotected: its
    // key is pinned to this host.
    let mut pin_on_error = PinOnDrop(guard.clone());
    // The backup may take the key from this tenure at once (without
    // waiting for its lease) only when nothing the guest does reaches the
    // world before its checkpoint: every NIC buffered, every writable disk
    // replicated. Otherwise (--no-net, --no-disk, a disk with
    // `replicate = false`) a cut-off primary's live output is bounded
    // only by its lease, so the backup waits for it to lapse.
    let fast_takeover = !req.no_net
        && slot
            .vm
            .config
            .disks_in_order()
            .iter()
            .all(|d| d.readonly || (d.replicate && replicate_disks));
    let arbiter_setup = match (&guard, &agent.opts.arbiter) {
        (Some(g), Some(arb)) => {
            let held = g.info();
            Some(ArbiterSetup {
                cluster_id: arb
                    .arb
                    .cluster_id()
                    .map_err(|e| AgentError::Conflict(format!("the arbiter: {e}")))?,
                prefix: arb.arb.config().prefix.clone(),
                lease: held.lease.unwrap_or_default(),
                revision: held.revision,
                fast_takeover,
            })
        }
        _ => None,
    };
    // The copy record: generations for the backup's sync plan, and the
    // activity logs that mark extents before they are written.
    let copy_dir = crate::copies::dir(&agent.opts.state_dir, name);
    // This host's own config of the VM, for a resync back to it one day.
    crate::copies::save_config(&copy_dir, &slot.vm.config);
    let copy = if replicate_disks {
        let mut st = crate::copies::load(&copy_dir, name)
            .ok()
            .flatten()
            .unwrap_or_else(|| CopyState::new(cfg.memory, cfg.vcpus));
        st.running = true;
        st.discarded = false;
        crate::copies::save(&copy_dir, name, &st);
        crate::copies::attach_activity_logs(&slot.vm, &copy_dir, agent.opts.al_extents)
            .map_err(AgentError::Internal)?;
        Some(st)
    } else {
        None
    };
    let return_to = agent
        .opts
        .replication_listen
        .clone()
        .map(|address| ReturnTo {
            address,
            interval_ms: req.interval_ms,
            no_net: req.no_net,
            no_compress: req.no_compress,
            reprotect: !(req.no_reprotect || req.manual),
            heal: !req.manual,
            max_rate: req.max_rate,
        });
    // A session that can be suspended across a restart of this agent (not
    // an arbitrated one: its key would lapse with the agent).
    let ask = guard.is_none().then_some(super::SuspendAsk {
        resume: resume.map(|e| e.0),
    });
    let Opened {
        stream,
        version,
        plan,
        tunes,
        resumable,
        devices_only_state,
    } = open_session(
        agent,
        &slot,
        &req.peer,
        Purpose::Protect,
        req.timeout_ms,
        replicate_disks,
        arbiter_setup,
        copy.as_ref().map(|c| c.gens.clone()),
        return_to,
        req.unencrypted,
        ask,
    )?;
    let resumed = resume.filter(|e| resumable == Some(e.0));
    if resume.is_some() && resumed.is_none() && !slot.vm.is_held() {
        // The backup makes a new copy: the guest, stopped at the suspend,
        // runs again while it is made.
        tracing::info!(vm = %name, peer = %req.peer, "the backup no longer holds the suspended session's checkpoint: a new copy is made while the guest runs");
        if let Err(e) = slot.vm.qmp().execute("cont", None) {
            return Err(AgentError::Internal(format!(
                "VM '{name}': cannot resume the guest: {e}"
            )));
        }
    }
    let suspend = resumable.map(|_| Suspending {
        requested: Arc::new(AtomicBool::new(false)),
        grace: agent.opts.restart_grace,
        backup_restarting: Arc::new(AtomicBool::new(false)),
        backup_may_restart: slot.backup_may_restart(),
        end: Arc::new(AtomicBool::new(false)),
    });
    let backup_restarting = suspend.as_ref().map(|s| s.backup_restarting.clone());
    slot.set_suspend_flag(suspend.as_ref().map(|s| s.requested.clone()));
    if let Some(p) = &plan {
        tracing::info!(vm = %name, peer = %req.peer, mode = ?p.mode, reason = %remus_proto::printable(&p.reason), "disk sync plan");
        slot.publish(SessionEvent::SyncPlan {
            // The wire's plan, as the API shows it.
            mode: match p.mode {
                SyncMode::Full => remus_api::SyncMode::Full,
                SyncMode::Changed => remus_api::SyncMode::Changed,
            },
            reason: p.reason.clone(),
        });
    }
    let compress = compression(&req.peer, version, !req.no_compress);
    if req.no_disk && !cfg.disks.is_empty() {
        tracing::warn!(vm = %name, "--no-disk: disk writes are not replicated; after a failover the backup's disk may not match its memory");
    }
    if req.no_net && !cfg.vifs.is_empty() {
        tracing::warn!(vm = %name, "--no-net: network output is not held for its checkpoint");
    }
    let switch_over = Arc::new(AtomicBool::new(false));
    let tuning = Tuning::new(
        Duration::from_millis(req.interval_ms),
        Duration::from_millis(req.timeout_ms),
        tunes,
    );
    slot.life
        .protecting(switch_over.clone(), tuning.clone())
        .map_err(|why| AgentError::Internal(format!("VM '{name}': {why}")))?;
    claimed.keep();
    pin_on_error.0 = None;
    let copy = Arc::new(std::sync::Mutex::new(copy));
    let committed_any = Arc::new(AtomicBool::new(false));
    let on_commit = {
        let (slot, copy, dir, any) = (
            slot.clone(),
            copy.clone(),
            copy_dir.clone(),
            committed_any.clone(),
        );
        let peer = req.peer.clone();
        OnCommit(Arc::new(move |epoch| {
            if source_committed(&slot.vm, &copy, &dir, epoch.0, &any) {
                slot.notice(crate::observe::Notice::ResyncDone {
                    peer: Some(peer.clone()),
                    epoch: epoch.0,
                });
            }
        }))
    };
    let cfg = ProtectConfig {
        tuning,
        replicate_disks,
        buffer_net,
        compress,
        changed_sync: plan
            .filter(|p| p.mode == SyncMode::Changed)
            .map(|p| p.target_runs),
        switch_over,
        // An arbitrated VM's key moves with it at a switch-over.
        hand_over: guard.clone().map(|g| {
            let slot = slot.clone();
            HandOver(Arc::new(move || g.hand_over(&*slot)))
        }),
        on_commit: Some(on_commit),
        max_rate,
        min_interval,
        max_latency,
        suspend,
        resume_from: resumed,
        // Under a cluster manager, or with the arbiter (whose guard wants
        // the key pinned from the moment of the hold, and lifts the fence
        // only then): see hold_on_loss.
        hold_on_loss: match (&guard, agent.opts.cluster_decides()) {
            (_, true) => Some(OnHold {
                hook: Arc::new(|| {}),
                on_stop: false,
            }),
            (Some(g), false) => {
                let g = g.clone();
                Some(OnHold {
                    hook: Arc::new(move || g.pin()),
                    on_stop: fast_takeover,
                })
            }
            (None, false) => None,
        },
        devices_only_state,
    };
    let vm_name = name.to_string();
    let slot2 = slot.clone();
    let agent2 = agent.clone();
    let peer = req.peer.clone();
    let request = req.clone();
    std::thread::Builder::new()
        .name(format!("protect-{vm_name}"))
        .spawn(move || {
            tracing::info!(vm = %vm_name, %peer, interval_ms = cfg.tuning.interval().as_millis() as u64, min_interval_ms = cfg.min_interval.map(|d| d.as_millis() as u64), max_latency_ms = cfg.max_latency.map(|d| d.as_millis() as u64), "protection started");
            let emit = |ev: SessionEvent| {
                match &ev {
                    SessionEvent::Checkpoint(s) => {
                        tracing::debug!(vm = %vm_name, epoch = s.epoch, pause_ms = s.pause_ms, dirty = s.dirty_pages, "checkpoint committed");
                    }
                    // The session's last word: whoever reads it and then
                    // asks `list` must already see the VM unprotected (and
                    // find the reason in the log).
                    SessionEvent::BackupLost { reason } if slot2.vm.is_fenced() && agent2.opts.cluster_decides() => {
                        // Fenced by the session (see hold_on_loss): the
                        // cluster may be promoting the standby.
                        tracing::error!(vm = %vm_name, %peer, %reason, "BACKUP LOST: the VM is held paused, its output held, until the cluster decides: `remus takeover {vm_name}` here once {peer} is fenced (the resource agent does it), or the standby is promoted there");
                        slot2.cluster_hold.hold_primary(&format!("backup {peer} lost ({reason})"));
                        slot2.life.session_over();
                        slot2.notice(crate::observe::Notice::BackupLost {
                            peer: peer.clone(),
                            reason: reason.clone(),
                        });
                    }
                    SessionEvent::BackupLost { reason } => {
                        if guard.is_some() && slot2.vm.is_fenced() {
                            tracing::error!(vm = %vm_name, %peer, %reason, "BACKUP LOST: the VM is paused, its output held, until the arbiter's key is pinned to this host (then it runs on unprotected), or {peer} takes the key (then this copy is stale)");
                        } else if agent2.wish(&vm_name).is_some() {
                            tracing::error!(vm = %vm_name, %peer, %reason, "BACKUP LOST: the VM runs on UNPROTECTED; the agent protects it again as soon as the backup answers");
                        } else {
                            tracing::error!(vm = %vm_name, %peer, %reason, "BACKUP LOST: the VM runs on UNPROTECTED; run `remus protect` again");
                        }
                        slot2.life.session_over();
                        slot2.notice(crate::observe::Notice::BackupLost {
                            peer: peer.clone(),
                            reason: reason.clone(),
                        });
                    }
                    SessionEvent::Stopped { .. } => slot2.life.session_over(),
                    _ => {}
                }
                slot2.publish(ev);
            };
            let mut end = remus_replication::primary::protect(&slot2.vm, stream, &cfg, &stop, &emit);
            // An arbitrated VM whose key was handed over, and whose backup
            // did not confirm the switch-over (or refused it): the key
            // decides where it runs.
            if let (Some(g), Some(arb)) = (&guard, &agent2.opts.arbiter)
                && g.handed_over()
                && !matches!(end, Ok(ProtectEnd::SwitchedOver { .. }))
            {
                end = settle_hand_over(&slot2, arb, &peer, end);
            }
            if let Ok(ProtectEnd::SwitchedOver { epoch, downtime_ms }) = &end {
                // The backup runs the VM now and protects it back here:
                // this copy stops, its record says what its disks hold.
                tracing::warn!(vm = %vm_name, %peer, epoch, downtime_ms, "SWITCHED OVER: {peer} runs the VM from epoch {epoch} and protects it back to this host");
                switched_out(&agent2, &slot2, &copy, &copy_dir, *epoch);
                slot2.end_session();
                return;
            }
            if let Ok(ProtectEnd::Suspended { epoch, confirmed }) = &end {
                // The backup's agent restarts (it asked), or this one stops:
                // the session resumes from this checkpoint, the guest
                // paused until then.
                let backup_restarts = backup_restarting
                    .as_ref()
                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
                    && !agent2.stopping();
                let grace = if backup_restarts {
                    agent2
                        .opts
                        .restart_grace
                        .min(super::suspend::BACKUP_RESTART_WAIT)
                } else {
                    agent2.opts.restart_grace
                };
                let rec = super::suspend::save_record(&slot2, &request, (*epoch, grace), *confirmed);
                slot2.life.session_over();
                slot2.life.release();
                slot2.end_session();
                if backup_restarts {
                    slot2.backup_restarted();
                    tracing::warn!(vm = %vm_name, %peer, epoch, confirmed, "protection SUSPENDED for the backup's restart: the guest stays paused at epoch {epoch} until the session resumes (at most {}s)", grace.as_secs());
                    super::suspend::resume_after_backup_restart(&agent2, &vm_name, rec);
                } else {
                    tracing::warn!(vm = %vm_name, %peer, epoch, confirmed, "protection SUSPENDED for the agent's restart: the guest stays paused at epoch {epoch} until the next agent resumes the session from it");
                }
                return;
            }
            if let Ok(ProtectEnd::SwitchOverUnconfirmed { reason, .. }) = &end {
                // Neither resumed here nor known to run there: the guest
                // stays stopped and the operator decides.
                tracing::error!(vm = %vm_name, %peer, %reason, "switch-over UNCONFIRMED: {peer} may be running the VM; it stays paused here. Check {peer}: if it runs the VM there, destroy this copy; if not, `remus unpause` it here");
                slot2.vm.mark_operator_paused();
                slot2.life.release();
                slot2.publish(SessionEvent::Failed {
                    reason: format!("switch-over unconfirmed ({reason}): {peer} may be running the VM; it stays paused here until you check"),
                });
                slot2.end_session();
                return;
            }
            source_alone(&slot2.vm, &copy, &copy_dir, committed_any.load(std::sync::atomic::Ordering::SeqCst));
            slot2.life.session_over();
            // Runs on here unprotected: nobody may take over any more.
            if let Some(g) = &guard {
                g.pin();
            }
            slot2.life.release();
            // Output the session left held (it ended while fenced) goes
            // out once the fence is lifted: here if it already is, else
            // by the arbiter's keeper when it lifts it.
            slot2.release_held_output();
            match end {
                Ok(ProtectEnd::Stopped) => {
                    tracing::info!(vm = %vm_name, "protection stopped by the operator");
                }
                // Logged as the event went out (above).
                Ok(ProtectEnd::BackupLost(_)) => {}
                // A fenced guest whose backup refused the switch-over: it
                // runs again here once the arbiter lifts the fence.
                Ok(ProtectEnd::SwitchOverRefused { reason, .. }) => {
                    let msg = format!("the backup refused the switch-over ({reason}); the VM runs on here, unprotected, once the arbiter lifts its fence");
                    tracing::error!(vm = %vm_name, %peer, "{msg}");
                    slot2.publish(SessionEvent::Failed { reason: msg });
                }
                // Handled above.
                Ok(
                    ProtectEnd::SwitchedOver { .. }
                    | ProtectEnd::SwitchOverUnconfirmed { .. }
                    | ProtectEnd::Suspended { .. },
                ) => {}
                Err(e) if slot2.vm.is_fenced() && agent2.opts.cluster_decides() => {
                    slot2.publish(SessionEvent::Failed {
                        reason: e.to_string(),
                    });
                    tracing::error!(vm = %vm_name, error = %e, "protection failed: the VM is held paused, its output held, until the cluster decides (`remus takeover {vm_name}`)");
                    slot2.cluster_hold.hold_primary(&format!("backup {peer} lost (the session failed: {e})"));
                }
                Err(e) => {
                    slot2.publish(SessionEvent::Failed {
                        reason: e.to_string(),
                    });
                    tracing::error!(vm = %vm_name, error = %e, "protection failed: the VM runs on UNPROTECTED");
                }
            }
            slot2.end_session();
            // Protection still wanted: the healer sets it up again.
            agent2.wishes().poke();
        })
        .map_err(|e| AgentError::Internal(format!("spawn protect thread: {e}")))?;
    Ok(())
}

/// The interval and timeout a session may run with.
fn check_timing(interval_ms: u64, timeout_ms: u64) -> Result<(), AgentError> {
    if !(5..=60_000).contains(&interval_ms) {
        return Err(AgentError::BadRequest(format!(
            "interval {interval_ms} ms is out of range 5..=60000"
        )));
    }
    if timeout_ms < 2 * interval_ms.max(50) {
        return Err(AgentError::BadRequest(format!(
            "timeout {timeout_ms} ms must be at least twice the interval ({interval_ms} ms), and at least 100 ms"
        )));
    }
    if timeout_ms > remus_proto::MAX_TUNE_TIMEOUT_MS {
        return Err(AgentError::BadRequest(format!(
            "timeout {timeout_ms} ms is longer than an hour"
        )));
    }
    Ok(())
}

/// `remus protect --set`: changes the running session's interval (from
/// the next epoch) and timeout (the backup is told), without a new copy;
/// the recorded wish follows. Returns the settings now in force.
pub fn tune(
    agent: &Arc<Agent>,
    name: &str,
    req: &remus_api::TuneRequest,
) -> Result<(u64, u64), AgentError> {
    if req.interval_ms.is_none() && req.timeout_ms.is_none() {
        return Err(AgentError::BadRequest(
            "nothing to change: give -i MS and/or --timeout MS".into(),
        ));
    }
    let slot = agent.slot(name)?;
    let tuning = slot.life.tuning().ok_or_else(|| {
        AgentError::Conflict(format!(
            "VM '{name}' has no running protection session to change (see remus list)"
        ))
    })?;
    let interval_ms = req
        .interval_ms
        .unwrap_or(tuning.interval().as_millis() as u64);
    let timeout_ms = req
        .timeout_ms
        .unwrap_or(tuning.timeout().as_millis() as u64);
    check_timing(interval_ms, timeout_ms)?;
    tuning
        .set(
            req.interval_ms.map(Duration::from_millis),
            req.timeout_ms.map(Duration::from_millis),
        )
        .map_err(AgentError::Conflict)?;
    if let Some(mut wish) = agent.wish(name) {
        wish.request.interval_ms = interval_ms;
        wish.request.timeout_ms = timeout_ms;
        if let Err(e) = agent.wishes().set(name, wish) {
            tracing::error!(vm = %name, error = %e, "cannot record the new settings in the protection wish");
        }
    }
    tracing::info!(vm = %name, interval_ms, timeout_ms, "protection retuned: from the next epoch");
    Ok((interval_ms, timeout_ms))
}

/// A checkpoint of this primary's session committed on the backup (the
/// session's activity logs already dropped the extents it covers): the
/// first commit completes the resync (the backup holds this copy's
/// generation now): true then.
fn source_committed(
    vm: &remus_vm::Vm,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    epoch: u64,
    committed_any: &AtomicBool,
) -> bool {
    let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
    let Some(st) = copy.as_mut() else {
        return false;
    };
    if !committed_any.swap(true, std::sync::atomic::Ordering::SeqCst) {
        crate::copies::source_synced(vm);
        st.gens.synced();
        st.common_epoch = Some(epoch);
        crate::copies::save(dir, vm.name(), st);
        tracing::info!(vm = %vm.name(), epoch, generation = %st.gens.current, "resync complete: the backup holds this copy's data; change maps cleared");
        return true;
    }
    false
}

/// `remus failback VM`: a planned role swap of a protected VM. At the next
/// checkpoint the guest stops here for good, the backup resumes it from
/// that checkpoint and protects it back to this host. Progress goes to
/// the VM's event channel (subscribe first).
pub fn start_failback(agent: &Arc<Agent>, name: &str) -> Result<(), AgentError> {
    let slot = agent.slot(name)?;
    let stage = slot.life.stage();
    if !matches!(stage, Stage::Protecting { .. }) {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is {} here: failback swaps the roles of a protected VM, run it on the primary. After a failover, first protect the VM back to the old primary (`remus protect {name} OLD_PRIMARY:PORT`), which resyncs it, then fail back",
            crate::lifecycle::name(&stage)
        )));
    }
    if slot.vm.is_held() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' is paused; unpause it first"
        )));
    }
    if !slot.life.request_switch_over() {
        return Err(AgentError::Conflict(format!(
            "VM '{name}' has no protection session running"
        )));
    }
    tracing::info!(vm = %name, "failback requested: switching over at the next checkpoint");
    Ok(())
}

/// After a switch-over of an arbitrated VM that its backup did not
/// confirm, or refused: the etcd key, given up before the switch-over,
/// says which host runs the VM ([`crate::arbiter::reclaim`]). Taken back
/// here: the guest runs on here unprotected (`BackupLost`). Held by the
/// backup: it runs the VM, as after a confirmed switch-over
/// (`SwitchedOver`). The guest stays fenced until this is known, however
/// long etcd takes to answer (`protect --stop` does not cut that short:
/// only etcd may say that this copy can run); `remus destroy` ends it.
fn settle_hand_over(
    slot: &Arc<VmSlot>,
    arb: &Arc<crate::arbiter::AgentArbiter>,
    peer: &str,
    end: Result<ProtectEnd, remus_replication::ReplError>,
) -> Result<ProtectEnd, remus_replication::ReplError> {
    let (epoch, why) = match &end {
        Ok(
            ProtectEnd::SwitchOverUnconfirmed { epoch, reason }
            | ProtectEnd::SwitchOverRefused { epoch, reason },
        ) => (*epoch, reason.clone()),
        // The key is given up only right before the switch-over is sent.
        _ => return end,
    };
    let name = slot.vm.name().to_string();
    tracing::warn!(vm = %name, %peer, epoch, reason = %why, "switch-over not confirmed by {peer}; asking the arbiter which host runs the VM");
    let gone = || slot.vm.exit_status().is_some();
    match crate::arbiter::reclaim(arb, &name, &gone) {
        Some(crate::arbiter::Reclaimed::Here(_)) if gone() => {
            // Destroyed meanwhile: the key taken back goes too.
            let _ = arb.arb.clear(&name);
            end
        }
        Some(crate::arbiter::Reclaimed::Here(revision)) => {
            *slot.arbiter.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(crate::arbiter::Guard::pinned(arb, &**slot, revision));
            let reason = match slot.vm.unfence() {
                Ok(()) => format!(
                    "switch-over failed ({why}); the arbiter gave the VM back to this host (key pinned at revision {revision}): it runs on here UNPROTECTED"
                ),
                Err(e) => format!(
                    "switch-over failed ({why}); the arbiter gave the VM back to this host (key pinned at revision {revision}), but it cannot be resumed: {e}"
                ),
            };
            tracing::error!(vm = %name, %peer, revision, "{reason}");
            slot.publish(SessionEvent::Failed {
                reason: reason.clone(),
            });
            Ok(ProtectEnd::BackupLost(LostBackup::SwitchOverFailed(reason)))
        }
        Some(crate::arbiter::Reclaimed::There { holder, revision }) => {
            tracing::warn!(vm = %name, %holder, revision, epoch, "switch-over not confirmed ({why}), but the arbiter says {holder} holds the VM's key: it runs the VM");
            slot.publish(SessionEvent::SwitchedOver {
                epoch,
                downtime_ms: None,
                confirmed_by: Some("arbiter".into()),
            });
            Ok(ProtectEnd::SwitchedOver {
                epoch,
                downtime_ms: f64::NAN,
            })
        }
        // Stopped or gone meanwhile: as it was.
        None => end,
    }
}

/// The VM was handed over to the backup (planned switch-over): every
/// write of this copy is acknowledged, so its activity logs are cleared;
/// the record stays (not running) for the session that protects it back
/// here; the QEMU process goes.
fn switched_out(
    agent: &Arc<Agent>,
    slot: &Arc<VmSlot>,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    epoch: u64,
) {
    let name = slot.vm.name().to_string();
    if let Some(st) = copy.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        for p in slot.vm.replicated_disks() {
            if let Some(al) = p.activity_log() {
                let _ = al.acked_all(remus_proto::Epoch(epoch));
            }
        }
        st.running = false;
        st.common_epoch = Some(epoch);
        crate::copies::save(dir, &name, st);
    }
    slot.life.release();
    agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
}

/// This primary's session ended and the VM (if it still runs) goes on
/// alone: from a new generation once the backup had committed one of
/// ours (so that the two copies can tell what each did since), with its
/// changes recorded in change maps from now on.
fn source_alone(
    vm: &remus_vm::Vm,
    copy: &std::sync::Mutex<Option<CopyState>>,
    dir: &std::path::Path,
    committed_any: bool,
) {
    let mut copy = copy.lock().unwrap_or_else(|p| p.into_inner());
    let Some(st) = copy.as_mut() else {
        return;
    };
    // Destroyed meanwhile: its record was settled by the destroy.
    if vm.exit_status().is_some() || !dir.exists() {
        return;
    }
    if let Err(e) = crate::copies::track_changes(vm, dir) {
        tracing::error!(vm = %vm.name(), error = %e, "cannot record disk changes after the session; the next resync compares every chunk");
        crate::copies::forget(dir, vm.name());
        return;
    }
    if committed_any {
        st.gens.diverge();
    }
    crate::copies::save(dir, vm.name(), st);
    tracing::info!(vm = %vm.name(), generation = %st.gens.current, since = ?st.gens.bitmap.map(|g| g.to_string()), "the VM goes on alone; its disk changes are recorded for the next resync");
}

/// Takes the VM's arbiter key for a protection session (a key this host
/// already holds, pinned or leased, is taken over on a new lease).
fn arbitrate(
    arb: &Arc<crate::arbiter::AgentArbiter>,
    slot: &Arc<VmSlot>,
) -> Result<Arc<crate::arbiter::Guard>, AgentError> {
    if let Some(old) = slot.arbiter_guard() {
        if old.is_stale() {
            return Err(AgentError::Conflict(format!(
                "VM '{}' is a stale copy: {} holds its arbiter key and runs it; destroy this copy",
                slot.vm.name(),
                old.info().holder
            )));
        }
        // Its keeper may be pinning the key right now (a copy that has
        // just taken over): that write must not land after the new lease.
        old.stop_and_wait();
    }
    let guard = crate::arbiter::Guard::acquire(arb, slot).map_err(|e| match e {
        remus_arbiter::ArbiterError::HeldByOther { .. } => AgentError::Conflict(format!(
            "the arbiter refuses: {e}. If that host no longer runs the VM, delete the key: etcdctl del {}",
            arb.arb.config().runner_key(slot.vm.name())
        )),
        e => AgentError::Conflict(format!("the arbiter: {e}")),
    })?;
    *slot.arbiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard.clone());
    Ok(guard)
}

/// Pins the VM's key to this host when dropped (a protect that failed
/// before its session ran: the VM runs on unprotected).
struct PinOnDrop(Option<Arc<crate::arbiter::Guard>>);

impl Drop for PinOnDrop {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.pin();
        }
    }
}
