//! The backup's side: the `--listen` server, one standby per session, and
//! what becomes of the standby when its session ends ([`decide_failover`],
//! on the pure decision of [`crate::failover`]).

use super::resync::{create_images, plan_target, target_committed};
use super::*;
use remus_replication::backup::BackupEvent;

/// Accepts replication sessions on the `--listen` port (blocking; runs on
/// its own thread). A connection gets a thread only if the admission caps
/// for unauthenticated peers allow it (see [`crate::admission`]); others
/// are closed at once.
pub fn serve(agent: Arc<Agent>, listener: TcpListener) {
    let admission = crate::admission::Admission::new(
        crate::admission::MAX_UNAUTHENTICATED,
        crate::admission::MAX_PER_ADDRESS,
    );
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let Ok(peer_addr) = stream.peer_addr() else {
                    continue;
                };
                let Some(admitted) = admission.admit(peer_addr.ip()) else {
                    // Closed at once: no thread, nothing read.
                    drop(stream);
                    agent
                        .observer()
                        .metrics
                        .refused(crate::metrics::Refusal::Admission);
                    continue;
                };
                let a = agent.clone();
                let peer = peer_addr.to_string();
                let spawned = std::thread::Builder::new()
                    .name("repl-session".into())
                    .spawn(move || {
                        if let Err(e) = backup_session(&a, stream, admitted) {
                            // The reason may quote the peer (a VM name, a
                            // field of its setup): escaped, so it cannot
                            // forge log lines.
                            tracing::warn!(%peer, error = %remus_proto::printable(&e), "replication session refused");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a session thread");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "replication accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn backup_session(
    agent: &Arc<Agent>,
    mut tcp: TcpStream,
    admitted: Admitted,
) -> Result<(), String> {
    let Some(key) = agent.key() else {
        let _ = Message::Error {
            code: ErrorCode::Internal,
            message: "the backup agent has no replication key (--key)".into(),
        }
        .write_to(&mut tcp);
        return Err("no --key: replication refused".into());
    };
    let opts = remus_proto::ServerOptions {
        allow_unencrypted: agent.opts.allow_unencrypted,
        ..Default::default()
    };
    let mut reservation = None;
    let peer_ip = tcp.peer_addr().ok().map(|a| a.ip());
    let handshake = server_handshake(tcp, &key, &opts, |vm, _purpose| {
        // A name from the wire is checked as a name before it is used for
        // anything (it names directories of this host).
        remus_config::validate_name(vm)
            .map_err(|e| e.to_string())
            .and_then(|()| crate::storage::check_name("VM", vm))?;
        // A stopping agent takes no session: a standby it keeps for its
        // next agent is resumed by that one.
        if agent.stopping() {
            return Err(Refusal::new(
                ErrorCode::Busy,
                "this agent is stopping; try again in a moment",
            ));
        }
        if let Some(r) = agent.reserve(vm) {
            // Held until the standby exists: no other session sets up
            // the same copy meanwhile.
            reservation = Some(r);
            return Ok(None);
        }
        // A standby kept for a suspended session: the setup says whether
        // this session resumes it (see `suspend::unpark`).
        if agent.parked().holds(vm) {
            return Ok(None);
        }
        let busy = || {
            Refusal::new(
                ErrorCode::Busy,
                format!(
                    "a copy of '{vm}' is being set up or torn down on this host; try again in a moment"
                ),
            )
        };
        if agent.busy(vm) {
            return Err(busy());
        }
        let Ok(slot) = agent.slot(vm) else {
            return Err(busy());
        };
        // A standby held for the cluster's word whose primary opens a
        // session again: that primary is alive, so this copy will not be
        // promoted. It is discarded; the primary's next try gets a new
        // standby.
        if let Some(ip) = peer_ip
            && slot.cluster_hold.primary_is_back(ip)
        {
            tracing::warn!(vm = %vm, peer = %ip, "the primary this standby waited after is back: the held standby is discarded");
            return Err(busy());
        }
        if slot.life.role() == Role::Backup {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "this host still holds a standby copy of '{vm}' from another session (it is discarded when that session ends); try again in a moment"
                ),
            ));
        }
        Err(Refusal::new(
            ErrorCode::AlreadyRuns,
            format!(
                "a VM named '{vm}' already runs on this host. If both copies ran on their own after a failover (split brain), give one up: on its host run `remus destroy --discard-this-copy {vm}`, then protect from the copy you keep"
            ),
        ))
    });
    let (mut stream, session, hello) = match handshake {
        Ok(h) => h,
        Err(e) => {
            // Anyone can make a handshake fail: logged, rate-limited.
            admitted.handshake_failed(&e.peer, &e.to_string());
            agent
                .observer()
                .metrics
                .refused(crate::metrics::Refusal::Handshake);
            return Ok(());
        }
    };
    // Authenticated: the slot for unauthenticated peers is free again.
    drop(admitted);
    if !session.encrypted {
        tracing::warn!(peer = %session.peer, vm = %hello.vm_name, "replication session with a protocol-{} peer IN THE CLEAR (--allow-unencrypted-peers)", session.version);
    }
    let peer = session.peer.clone();
    let setup = match Message::read_from(&mut stream) {
        Ok(Message::VmConfig { json }) => serde_json::from_str::<SessionSetup>(&json)
            .map_err(|e| refuse(&mut stream, format!("bad VM config from {peer}: {e}")))?,
        Ok(other) => {
            return Err(format!(
                "{peer} sent {:?} instead of the VM config",
                other.msg_type()
            ));
        }
        Err(e) => return Err(format!("{peer}: {e}")),
    };
    let timeout = Duration::from_millis(setup.timeout_ms.clamp(100, 600_000));
    let arbiter = match &setup.arbiter {
        None => None,
        Some(theirs) => Some(check_arbiter(agent, theirs).map_err(|e| refuse(&mut stream, e))?),
    };
    // A resumable backup keeps its standby across a restart of the
    // primary's agent (not with an arbiter: its key would lapse).
    let suspendable =
        setup.suspend && session.purpose == Purpose::Protect && setup.arbiter.is_none();
    let kept = super::suspend::unpark(agent, &hello.vm_name, &setup, &peer);
    let Standby {
        slot,
        replica,
        disks,
        plan,
        copy,
        copy_dir,
        resumed,
    } = match kept {
        Some(k) => {
            let local = compat_of(&k.slot.vm.config).map_err(|e| refuse(&mut stream, e))?;
            if let Err(diffs) = hello.compat.check_sides(&local, "primary", "backup") {
                agent.destroy_slot(&k.slot, crate::agent::CopyRecord::Keep);
                return Err(refuse(&mut stream, diffs.join("; ")));
            }
            // Its QEMU loads only device-only state, which this primary
            // does not offer (an older agent): it could never resume.
            if k.slot.vm.devices_only_state() && !setup.devices_only_state {
                agent.destroy_slot(&k.slot, crate::agent::CopyRecord::Keep);
                return Err(refuse(
                    &mut stream,
                    "the standby kept here loads device-only state, which the primary's agent does not send: it is dropped, and the next protect makes a new copy".into(),
                ));
            }
            tracing::info!(vm = %hello.vm_name, %peer, epoch = k.epoch.0, "the primary's agent is back: the session resumes from the kept standby, nothing is copied");
            Standby {
                slot: k.slot,
                replica: k.replica,
                disks: k.disks,
                plan: None,
                copy: k.copy,
                copy_dir: k.copy_dir,
                resumed: Some(k.epoch),
            }
        }
        None => {
            // The kept standby (if any) is gone: this copy is set up anew.
            let reserved = match reservation.take() {
                Some(r) => r,
                None => agent.reserve(&hello.vm_name).ok_or_else(|| {
                    refuse_as(
                        &mut stream,
                        ErrorCode::Busy,
                        format!(
                            "a copy of '{}' is being torn down on this host; try again in a moment",
                            hello.vm_name
                        ),
                    )
                })?,
            };
            fresh_standby(
                agent,
                &mut stream,
                &hello,
                &setup,
                session.purpose,
                &peer,
                reserved,
            )?
        }
    };
    let name = slot.vm.name().to_string();
    // Set when this agent stops: the primary is asked to suspend.
    let restarting = Arc::new(AtomicBool::new(false));
    if suspendable {
        slot.set_suspend_flag(Some(restarting.clone()));
    }
    if suspendable {
        Message::Resumable {
            resumed_at: resumed.map_or(0, |e| e.0),
        }
        .write_to(&mut stream)
        .map_err(|e| format!("{peer}: {e}"))?;
    }
    if let Some(p) = &plan {
        tracing::info!(vm = %name, %peer, mode = ?p.mode, reason = %remus_proto::printable(&p.reason), "disk sync plan");
        let json = serde_json::to_string(p).map_err(|e| e.to_string())?;
        Message::SyncPlan { json }
            .write_to(&mut stream)
            .map_err(|e| format!("{peer}: {e}"))?;
    }
    // This backup takes a new failover timeout during the session.
    if setup.tune && session.purpose == Purpose::Protect {
        Message::Tune {
            timeout_ms: setup.timeout_ms.clamp(
                remus_proto::MIN_TUNE_TIMEOUT_MS,
                remus_proto::MAX_TUNE_TIMEOUT_MS,
            ),
        }
        .write_to(&mut stream)
        .map_err(|e| format!("{peer}: {e}"))?;
    }
    // The standby's QEMU was started for device-only state: the primary
    // sends that (a kept standby's from the session it was made for).
    if setup.devices_only_state && slot.vm.devices_only_state() {
        Message::DevicesOnlyState
            .write_to(&mut stream)
            .map_err(|e| format!("{peer}: {e}"))?;
    }
    Message::Ready
        .write_to(&mut stream)
        .map_err(|e| format!("{peer}: {e}"))?;
    tracing::info!(vm = %name, %peer, purpose = ?session.purpose, devices_only_state = slot.vm.devices_only_state(), "standby ready; receiving checkpoints");
    let mut replica = replica;
    // A migration's destination with a device-only standby (`-S`) loads
    // the last checkpoint's device state as it arrives (the source
    // streams its QEMU's save), its VM held stopped: the rest of the
    // save, the End, the ack, the switch-over order and the disks' flush
    // then overlap the load instead of preceding it. Only a migration: a
    // protected VM's standby keeps its incoming migration for a failover
    // from a later epoch.
    let early_load = session.purpose == Purpose::Migrate && slot.vm.devices_only_state();
    let cfg = BackupConfig {
        timeout,
        heartbeat: timeout / 4,
        changed_sync: plan.as_ref().is_some_and(|p| p.mode == SyncMode::Changed),
        suspendable,
        restarting: suspendable.then(|| restarting.clone()),
        stream_checkpoints: early_load,
    };
    let copy = std::sync::Mutex::new(copy);
    let protect_purpose = session.purpose == Purpose::Protect;
    let setup_replicates = setup.replicate_disks;
    let source_gens = setup.generations.clone();
    // A resumed session's copy completed long ago.
    let first_commit = AtomicBool::new(resumed.is_some());
    let targets: Vec<String> = slot
        .vm
        .replicated_disks()
        .iter()
        .map(|p| p.target().to_string())
        .collect();
    let mut disks = disks;
    let vm_name = name.clone();
    let slot2 = slot.clone();
    let slot3 = slot.clone();
    let early: std::sync::Mutex<Option<Result<remus_replication::failover::EarlyLoad, String>>> =
        std::sync::Mutex::new(None);
    // The last checkpoint's device state streams in as it arrives, before
    // its End: this feeds the load until the epoch commits.
    let feed: std::sync::Mutex<Option<remus_vm::devstate::Feed>> = std::sync::Mutex::new(None);
    let state_path = replica.device_state_path().to_path_buf();
    // Its QEMU sets the load up ahead, while the copy runs, and takes its
    // `cont` ahead: it runs the VM as the load ends, which only the
    // switch-over lets it do (the state's last byte is held back for it).
    let ahead = std::sync::Mutex::new(early_load.then(|| {
        remus_vm::devstate::connect_incoming(slot.vm.qmp(), &slot.vm.paths.incoming_socket())
            .inspect_err(|e| tracing::warn!(vm = %name, error = %e, "could not open the destination's incoming migration ahead; it is opened at the load"))
            .ok()
    }).flatten());
    let end = remus_replication::backup::receive(
        stream,
        &mut replica,
        disks.as_mut(),
        &cfg,
        &|ev| {
            tracing::debug!(vm = %vm_name, event = ?ev, "backup");
            let ev = match ev {
                BackupEvent::DeviceState { epoch, data } if early_load => {
                    let mut early = early.lock().unwrap_or_else(|p| p.into_inner());
                    let mut feed = feed.lock().unwrap_or_else(|p| p.into_inner());
                    if early.is_none() {
                        let to = ahead.lock().unwrap_or_else(|p| p.into_inner()).take();
                        let opened_ahead = to.is_some();
                        *early = Some(
                            remus_replication::failover::begin_fed_load(
                                &slot2.vm,
                                remus_proto::Epoch(epoch),
                                to,
                            )
                            .map(|(load, f)| {
                                tracing::info!(vm = %vm_name, epoch, opened_ahead, "migration: loading the last checkpoint's device state as it arrives, before the switch-over; the VM stays paused until it");
                                *feed = Some(f);
                                load
                            })
                            .map_err(|e| e.to_string()),
                        );
                    }
                    // Without a feed (the load could not begin) the
                    // switch-over refuses with the reason kept above.
                    if let Some(f) = feed.as_mut() {
                        f.push(&data.0);
                    }
                    return;
                }
                ev => ev,
            };
            if let BackupEvent::Committed { epoch, .. } = ev {
                // The state streamed in is whole: its feed ends (QEMU
                // gets its last byte and the stream's end at the
                // switch-over). (A state that did not stream, none
                // before this commit, loads from the committed file.)
                let fed = feed.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(f) = fed {
                    f.end();
                } else if early_load {
                    note_commit(
                        &mut early.lock().unwrap_or_else(|p| p.into_inner()),
                        epoch,
                        || {
                            let to = ahead.lock().unwrap_or_else(|p| p.into_inner()).take();
                            let opened_ahead = to.is_some();
                            let begun = remus_replication::failover::begin_load(
                                &slot2.vm,
                                &state_path,
                                remus_proto::Epoch(epoch),
                                to,
                            )
                            .map_err(|e| e.to_string());
                            if begun.is_ok() {
                                tracing::info!(vm = %vm_name, epoch, opened_ahead, "migration: loading the committed device state before the switch-over; the VM stays paused until it");
                            }
                            begun
                        },
                    );
                }
                agent.observer().backup_committed(&vm_name);
                if !first_commit.swap(true, std::sync::atomic::Ordering::SeqCst)
                    && target_committed(
                        &vm_name,
                        &copy,
                        &copy_dir,
                        source_gens.as_ref(),
                        &targets,
                        epoch,
                    )
                {
                    slot3.notice(crate::observe::Notice::ResyncDone {
                        peer: Some(peer.clone()),
                        epoch,
                    });
                }
            }
        },
        &|replica| {
            // Every epoch up to the switch-over committed: make it durable.
            for p in slot2.vm.replicated_disks() {
                p.local()
                    .flush()
                    .map_err(|e| format!("sync disk {}: {e}", p.target()))?;
            }
            // An arbitrated VM runs here only with its key, which the
            // primary gave up before sending the switch-over (or, if it
            // could not reach etcd, which lapses within its lease time).
            let lease = match arbiter.as_ref().filter(|_| protect_purpose) {
                Some(arb) => Some((
                    arb,
                    crate::arbiter::take_over(arb, &vm_name, None)
                        .map_err(|why| format!("NOT resuming at the switch-over: {why}"))?,
                )),
                None => None,
            };
            // A planned switch-over of a protected VM: this copy goes on
            // alone from here, its changes recorded from before it runs.
            let failback = protect_purpose && setup_replicates;
            let resumed = (|| {
                if failback {
                    crate::copies::track_changes(&slot2.vm, &copy_dir)?;
                }
                let early = early.lock().unwrap_or_else(|p| p.into_inner()).take();
                let loading = match early {
                    Some(Err(why)) => return Err(why),
                    Some(Ok(e)) => Some(e),
                    None => None,
                };
                remus_replication::failover::resume_loading(&slot2.vm, replica, loading)
                    .map_err(|e| e.to_string())
            })();
            let stats = match resumed {
                Ok(stats) => stats,
                Err(e) => {
                    // Not running here: the key goes back.
                    if let Some((arb, l)) = lease {
                        let _ = arb.arb.release(l);
                    }
                    return Err(e);
                }
            };
            if let Some((arb, l)) = lease {
                // Runs here, unprotected until protected back: pinned.
                let g = crate::arbiter::keep_taken(arb, &slot2, l);
                *slot2.arbiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
            }
            slot2.life.took_over();
            if failback && let Some(st) = copy.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                st.gens.diverge();
                st.running = true;
                st.common_epoch = Some(stats.epoch);
                crate::copies::save(&copy_dir, &vm_name, st);
            }
            tracing::info!(vm = %slot2.vm.name(), epoch = stats.epoch, load_ms = stats.load_ms, resumed_at_us = stats.resumed_at_us, started_by_load = stats.started_by_load, "switch-over: VM resumed here");
            Ok(())
        },
        &|| slot3.vm.exit_status().is_none(),
    );
    let copy = copy.into_inner().unwrap_or_else(|p| p.into_inner());
    let switched = matches!(end, Ok(BackupEnd::SwitchOver(_)));
    if let Decision::Park { epoch, grace } = crate::failover::decide(session.purpose, &end) {
        super::suspend::park(
            agent,
            super::suspend::Kept {
                slot,
                replica,
                disks,
                epoch,
                peer,
                setup,
                copy_dir,
                copy,
                own_restart: restarting.load(std::sync::atomic::Ordering::SeqCst),
            },
            grace,
        );
        return Ok(());
    }
    decide_failover(
        agent,
        &slot,
        (session.purpose, &peer, &setup),
        arbiter.as_ref(),
        &replica,
        disks.as_mut(),
        end,
        (&copy_dir, copy),
    );
    if switched && session.purpose == Purpose::Protect {
        protect_back(agent, &name, &setup);
    }
    Ok(())
}

/// A migration's destination at a commit whose device state did not
/// stream in: the first begins the early load; QEMU takes one incoming
/// stream, so a later one (an honest source sends one checkpoint) leaves
/// an error the switch-over refuses with. An error already there (a load
/// that could not begin) stays, as the reason.
fn note_commit<T>(
    slot: &mut Option<Result<T, String>>,
    epoch: u64,
    begin: impl FnOnce() -> Result<T, String>,
) {
    if matches!(slot, Some(Err(_))) {
        return;
    }
    *slot = Some(if slot.is_some() {
        Err(format!(
            "a second checkpoint ({epoch}) committed after the first one's device state was loaded: not resumed"
        ))
    } else {
        begin()
    });
}

/// The standby's replicated disks, written only when an epoch commits.
pub(super) fn standby_disks(agent: &Agent, slot: &VmSlot) -> remus_disk::EpochBuffer {
    remus_disk::EpochBuffer::with_spill_limit(
        slot.vm
            .replicated_disks()
            .iter()
            .map(|p| (p.target().to_string(), p.local().clone()))
            .collect(),
        DISK_BUFFER_MEMORY,
        &slot.vm.paths.dir().join("disk-epochs.spill"),
        agent.opts.max_spill_mib << 20,
    )
}

/// What a backup session receives into.
struct Standby {
    slot: Arc<VmSlot>,
    replica: Replica,
    disks: Option<remus_disk::EpochBuffer>,
    plan: Option<SyncPlan>,
    copy: Option<CopyState>,
    copy_dir: std::path::PathBuf,
    /// Resumed from the standby kept for a suspended session, at this
    /// epoch.
    resumed: Option<remus_proto::Epoch>,
}

/// Tells the peer why the session cannot go on (the text is returned for
/// the log).
fn refuse(stream: &mut Channel, msg: String) -> String {
    refuse_as(stream, ErrorCode::Incompatible, msg)
}

/// [`refuse`] with another error code.
fn refuse_as(stream: &mut Channel, code: ErrorCode, msg: String) -> String {
    let _ = Message::Error {
        code,
        message: msg.clone(),
    }
    .write_to(stream);
    msg
}

/// A new standby for a session: this host's config of the copy, its
/// images, the disk sync plan, the standby QEMU.
fn fresh_standby(
    agent: &Arc<Agent>,
    stream: &mut Channel,
    hello: &remus_proto::Hello,
    setup: &SessionSetup,
    purpose: Purpose,
    peer: &str,
    reserved: crate::agent::Reservation,
) -> Result<Standby, String> {
    // This host's own configuration of the copy: the peer's shape, this
    // host's paths (its record of the VM, the operator's placement file,
    // or its own image and boot directories); never a path from the wire.
    // Each host keeps its own image format: replication is of guest-
    // visible blocks, so a raw image here may back a qcow2 one there.
    let copy_dir = crate::copies::dir(&agent.opts.state_dir, &hello.vm_name);
    let record = crate::copies::load_config(&copy_dir);
    let sizes = hello
        .compat
        .disks
        .iter()
        .map(|d| (d.target.clone(), d.size_bytes))
        .collect();
    let (cfg, new_images) = agent
        .opts
        .storage
        .local_config(&setup.config, record.as_ref(), &sizes)
        .map_err(|e| {
            refuse(
                stream,
                format!("this host cannot keep '{}': {e}", hello.vm_name),
            )
        })?;
    if cfg.name != hello.vm_name {
        return Err(refuse(stream, "config name differs from the Hello".into()));
    }
    if let Err(e) = cfg.validate() {
        return Err(refuse(
            stream,
            format!("this host cannot run '{}': {e}", cfg.name),
        ));
    }
    // A replicated disk missing here is created (and filled by the
    // initial sync) before the host check, which wants every disk present.
    if setup.replicate_disks {
        create_images(agent, &cfg.name, &new_images).map_err(|e| refuse(stream, e))?;
    } else if let Some(missing) = new_images.first() {
        return Err(refuse(
            stream,
            format!(
                "disk {} is not replicated in this session and this host has no image at {}",
                missing.target,
                missing.path.display()
            ),
        ));
    }
    // Files only: the formats are this host's own (never sniffed).
    if let Err(e) = cfg.check_files() {
        return Err(refuse(
            stream,
            format!("this host cannot run '{}': {e}", cfg.name),
        ));
    }
    let local = compat_of(&cfg).map_err(|e| refuse(stream, e))?;
    if let Err(diffs) = hello.compat.check_sides(&local, "primary", "backup") {
        return Err(refuse(stream, diffs.join("; ")));
    }
    let name = cfg.name.clone();
    // This host's record of its copy decides how the disks are synced.
    let (plan, copy) =
        plan_target(setup, purpose, &copy_dir, &cfg, &local).map_err(|e| refuse(stream, e))?;
    if agent.take_stale(&name).is_some() {
        tracing::info!(vm = %name, %peer, "the stale copy here becomes the standby of the running copy");
    }
    let own_config = cfg.clone();
    // Device-only state when the primary offers it and this host's own
    // reading of the config allows it (never for a UEFI VM).
    let devices_only = setup.devices_only_state && remus_vm::devstate::devices_only_capable(&cfg);
    let (slot, replica) = agent
        .create_standby(cfg, purpose, devices_only, &reserved)
        .map_err(|e| refuse(stream, e.to_string()))?;
    drop(reserved);
    crate::copies::save_config(&copy_dir, &own_config);
    let disks = setup.replicate_disks.then(|| standby_disks(agent, &slot));
    Ok(Standby {
        slot,
        replica,
        disks,
        plan,
        copy,
        copy_dir,
        resumed: None,
    })
}

/// The protection of the VM back to the old primary, with the session's
/// settings, if the old primary gave an address.
fn request_back(setup: &SessionSetup) -> Option<ProtectRequest> {
    let back = setup.return_to.as_ref()?;
    Some(ProtectRequest {
        peer: back.address.clone(),
        interval_ms: back.interval_ms,
        timeout_ms: setup.timeout_ms,
        no_net: back.no_net,
        no_disk: !setup.replicate_disks,
        no_compress: back.no_compress,
        unencrypted: false,
        no_reprotect: !back.reprotect,
        manual: !back.heal,
        // The VM's own cap, or (0) this host's --max-rate.
        max_rate: back.max_rate,
        // This host's default.
        min_interval_ms: None,
        max_latency_ms: None,
    })
}

/// After a failover this host runs the VM: unless the old primary said
/// `--no-reprotect`, protection back to it is wanted from now on, and the
/// healer sets it up as soon as the old primary's agent answers.
fn wish_back(agent: &Arc<Agent>, name: &str, setup: &SessionSetup) {
    let Some(req) = request_back(setup) else {
        tracing::warn!(vm = %name, "the old primary gave no address to protect back to: the VM runs here UNPROTECTED; run `remus protect`");
        return;
    };
    if req.no_reprotect {
        tracing::warn!(vm = %name, peer = %req.peer, "the VM runs here UNPROTECTED: it was protected with --no-reprotect or --manual; run `remus protect` when the old primary is back");
        return;
    }
    let peer = req.peer.clone();
    let wish = crate::wishes::Wish {
        reprotect: true,
        request: req,
    };
    match agent.wishes().set(name, wish) {
        Ok(()) => {
            tracing::warn!(vm = %name, %peer, "the VM runs here UNPROTECTED until the old primary's agent answers; it is then protected back to it by itself (changed-only resync)")
        }
        Err(e) => {
            tracing::error!(vm = %name, %peer, error = %e, "the VM runs here UNPROTECTED; run `remus protect`")
        }
    }
}

/// After a planned switch-over this host runs the VM: it protects it back
/// to the old primary (which takes the session once its own copy is gone),
/// with the session's settings.
fn protect_back(agent: &Arc<Agent>, name: &str, setup: &SessionSetup) {
    let Some(req) = request_back(setup) else {
        tracing::warn!(vm = %name, "switched over, but the old primary gave no address to protect back to: the VM runs here UNPROTECTED; run `remus protect`");
        return;
    };
    let peer = req.peer.clone();
    // Wanted from now on (unless the protection is driven by hand).
    let want = || {
        if req.manual {
            return;
        }
        let wish = crate::wishes::Wish {
            reprotect: !req.no_reprotect,
            request: req.clone(),
        };
        if let Err(e) = agent.wishes().set(name, wish) {
            tracing::error!(vm = %name, %peer, error = %e, "cannot record the protection wish");
        }
    };
    // The old primary tears its copy down as soon as it has our Done; its
    // agent refuses the session while the VM is still listed there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match start_protect(agent, name, req.clone()) {
            Ok(()) => {
                tracing::info!(vm = %name, %peer, "switch-over: protecting the VM back to the old primary");
                want();
                return;
            }
            Err(AgentError::PeerRefused {
                code: ErrorCode::Busy | ErrorCode::AlreadyRuns,
                ..
            }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                tracing::error!(vm = %name, %peer, error = %e, "switch-over: cannot protect the VM back; it runs here UNPROTECTED until a retry succeeds");
                want();
                return;
            }
        }
    }
}

/// The backup's side of an arbitrated session: this agent must have an
/// arbiter on the same etcd cluster, under the same prefix.
fn check_arbiter(
    agent: &Agent,
    theirs: &ArbiterSetup,
) -> Result<Arc<crate::arbiter::AgentArbiter>, String> {
    let Some(arb) = agent.opts.arbiter.clone() else {
        return Err(
            "the primary protects this VM with an arbiter but this agent has none: start remusd with the same --arbiter".into(),
        );
    };
    let prefix = &arb.arb.config().prefix;
    if *prefix != theirs.prefix {
        return Err(format!(
            "arbiter prefixes differ: the primary uses '{}', this host '{prefix}'",
            theirs.prefix
        ));
    }
    let id = arb
        .arb
        .cluster_id()
        .map_err(|e| format!("this host cannot reach the arbiter: {e}"))?;
    if id != theirs.cluster_id {
        return Err(format!(
            "the primary's arbiter is etcd cluster {:x}, this host's is {id:x}: they must be the same cluster",
            theirs.cluster_id
        ));
    }
    Ok(arb)
}

/// The failover policy: the one place that decides whether the standby
/// runs. It resumes only when a protected VM's primary went silent or its
/// connection closed after at least one committed checkpoint. A migration
/// resumes only at its switch-over (done in the session already). In every
/// other case (orderly end, an aborted session whose primary was told and
/// runs on, a local failure) the copy is discarded: never two running
/// copies. With an arbiter, a failover also needs the VM's etcd key,
/// which the primary's lease holds until it lapses.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide_failover(
    agent: &Arc<Agent>,
    slot: &Arc<VmSlot>,
    (purpose, peer, setup): (Purpose, &str, &SessionSetup),
    arbiter: Option<&Arc<crate::arbiter::AgentArbiter>>,
    replica: &Replica,
    disks: Option<&mut remus_disk::EpochBuffer>,
    end: Result<BackupEnd, remus_replication::ReplError>,
    (copy_dir, copy): (&std::path::Path, Option<CopyState>),
) {
    let name = slot.vm.name().to_string();
    // The old primary by the address its agent takes sessions at, when
    // it gave one (else as it connected).
    let peer = setup
        .return_to
        .as_ref()
        .map_or(peer, |b| b.address.as_str());
    // A discarded standby keeps its record: it says what its disks hold
    // (a committed checkpoint of the primary's generation, or an
    // interrupted resync), for the next session to this host.
    let discard = |why: &str| {
        tracing::warn!(vm = %name, "{why}; the copy here is discarded");
        agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
    };
    let (reason, silent) = match crate::failover::decide(purpose, &end) {
        Decision::RunsHere { epoch, what } => {
            tracing::info!(vm = %name, epoch, "{what}: the VM runs on this host");
            return;
        }
        Decision::Discard(why) => return discard(&why),
        // Parked by the session before it gets here.
        Decision::Park { epoch, .. } => {
            return discard(&format!("a suspended session at {epoch} was not kept"));
        }
        Decision::Resume { reason, silent } => (reason, silent),
    };
    // Under a cluster manager, the cluster decides (after fencing the
    // primary's host): wait for its word.
    let cluster = agent.opts.cluster_decides();
    if cluster {
        let epoch = replica.committed().map_or(0, |e| e.0);
        tracing::error!(vm = %name, %peer, %reason, epoch, "PRIMARY LOST: the standby waits for the cluster's decision: `remus takeover {name}` (the resource agent's promote, once {peer} is fenced) resumes it from epoch {epoch}; `remus destroy {name}` discards it");
        let gone = || agent.stopping() || slot.vm.exit_status().is_some();
        let primary_ip = peer.parse::<std::net::SocketAddr>().map(|a| a.ip()).ok();
        if !slot
            .cluster_hold
            .wait(&format!("primary {peer} lost ({reason})"), primary_ip, gone)
        {
            if !agent.stopping() {
                discard(
                    "no takeover came before the standby ended (destroyed, its QEMU gone, or its primary is back)",
                );
            }
            return;
        }
    }
    let resumed = |outcome: Result<(), String>| {
        if cluster {
            slot.cluster_hold.resumed(outcome);
        }
    };
    // The arbiter first: resume only holding the VM's key, taken from the
    // primary's tenure (when the session allowed it) or once the
    // primary's lease has lapsed.
    let lease = match arbiter {
        Some(arb) => {
            let from = setup.arbiter.as_ref().filter(|a| a.fast_takeover).map(|a| {
                crate::arbiter::FromTenure {
                    revision: a.revision,
                    grace: crate::arbiter::grace(Duration::from_millis(setup.timeout_ms), silent),
                }
            });
            tracing::warn!(vm = %name, %reason, fast = from.is_some(), window_ms = arb.takeover_window().as_millis() as u64, "primary lost; asking the arbiter before resuming");
            let answer = crate::arbiter::take_over(arb, &name, from);
            if let Decision::Discard(why) =
                crate::failover::after_arbiter(&reason, silent, answer.as_ref().map(|_| ()))
            {
                slot.notice(crate::observe::Notice::SplitBrainRefused {
                    peer: Some(peer.to_string()),
                    reason: why.clone(),
                });
                return discard(&why);
            }
            answer.ok().map(|l| (arb, l))
        }
        None => None,
    };
    // Gives the key back if this copy does not run after all.
    let give_back = |lease: Option<(&Arc<crate::arbiter::AgentArbiter>, remus_arbiter::Lease)>| {
        if let Some((arb, l)) = lease {
            let _ = arb.arb.release(l);
        }
    };
    // The disks first: drop what never committed, make the rest
    // durable, and record what changes from now on.
    if let Some(d) = disks {
        match remus_replication::failover::take_over_disks(&slot.vm, d, copy_dir) {
            Ok(t) => {
                tracing::info!(vm = %name, discarded_records = t.discarded_records, discarded_bytes = t.discarded_bytes, change_maps = ?t.change_maps, "failover: uncommitted disk writes discarded; changes from now on are recorded");
            }
            Err(e) => {
                tracing::error!(vm = %name, error = %e, "failover FAILED: the disks cannot take over");
                agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
                give_back(lease);
                resumed(Err(format!("the disks cannot take over: {e}")));
                return;
            }
        }
        // This copy goes on alone from here: a new generation,
        // recorded before the VM runs.
        let mut rec =
            copy.unwrap_or_else(|| CopyState::new(slot.vm.config.memory, slot.vm.config.vcpus));
        rec.gens.diverge();
        rec.running = true;
        rec.resync_from = None;
        rec.common_epoch = replica.committed().map(|e| e.0);
        crate::copies::save(copy_dir, &name, &rec);
        tracing::info!(vm = %name, generation = %rec.gens.current, since = ?rec.gens.bitmap.map(|g| g.to_string()), "failover: this copy goes on alone from a new generation");
    } else {
        // Its disks were not replicated: what they hold is not
        // what any record says.
        crate::copies::forget(copy_dir, &name);
    }
    match remus_replication::failover::resume(&slot.vm, replica) {
        Ok(stats) => {
            slot.life.took_over();
            tracing::warn!(vm = %name, epoch = stats.epoch, load_ms = stats.load_ms, cont_ms = stats.cont_ms, "FAILOVER: primary lost ({reason}); resumed from the last committed checkpoint, epoch {}", stats.epoch);
            slot.notice(crate::observe::Notice::Failover {
                peer: Some(peer.to_string()),
                epoch: stats.epoch,
                reason: reason.clone(),
            });
            resumed(Ok(()));
            if purpose == Purpose::Protect {
                wish_back(agent, &name, setup);
            }
            // Runs here unprotected now: the key is pinned to this
            // host (the lease is kept, and fenced, until it is).
            if let Some((arb, l)) = lease {
                let g = crate::arbiter::keep_taken(arb, slot, l);
                *slot.arbiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
            }
        }
        Err(e) => {
            tracing::error!(vm = %name, error = %e, "failover FAILED");
            agent.destroy_slot(slot, crate::agent::CopyRecord::Keep);
            give_back(lease);
            resumed(Err(format!("the VM cannot be resumed: {e}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::note_commit;

    #[test]
    fn only_the_first_commit_of_a_migration_is_loaded_early() {
        let mut slot: Option<Result<u64, String>> = None;
        let mut begun = 0;
        note_commit(&mut slot, 4, || {
            begun += 1;
            Ok(4)
        });
        assert_eq!(slot, Some(Ok(4)));
        note_commit(&mut slot, 5, || {
            begun += 1;
            Ok(5)
        });
        assert_eq!(begun, 1, "a second load was begun");
        let why = slot.unwrap().unwrap_err();
        assert!(why.contains("second checkpoint (5)"), "{why}");
        // A load that could not begin is kept as its error.
        let mut slot: Option<Result<u64, String>> = None;
        note_commit(&mut slot, 1, || Err("no thread".into()));
        assert_eq!(slot, Some(Err("no thread".into())));
        note_commit(&mut slot, 1, || Ok(1));
        assert_eq!(
            slot,
            Some(Err("no thread".into())),
            "the first reason stays"
        );
    }
}
