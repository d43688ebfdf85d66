//! Human output in xl's layout.

use remus_api::{SessionEvent, SyncMode, VcpuInfo, VmInfo};

/// `xl list`'s table: Name, ID, Mem, VCPUs, State, Time(s); then remus's
/// own: the role here and the protection wanted (the backup's address).
pub fn list_table(vms: &[VmInfo]) -> String {
    let mut out = format!(
        "{:<40} {:>5} {:>6} {:>5}     {:<6} {:>9}  {:<11} {}\n",
        "Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Role", "Wanted"
    );
    for v in vms {
        let letter = v.state.chars().next().unwrap_or('-');
        let pos = "rbpscd".find(letter).unwrap_or(usize::MAX);
        let flags: String = (0..6)
            .map(|i| if i == pos { letter } else { '-' })
            .collect();
        let wanted = match (&v.wanted, v.role.as_str()) {
            (None, _) => "-".to_string(),
            // Protected as wanted: the address says it all.
            (Some(w), "primary") => w.clone(),
            // Wanted here, but the VM is a copy: it applies if it runs here.
            (Some(w), "backup" | "stale") => format!("{w} (when it runs here)"),
            (Some(w), _) => format!("{w} (not yet: retrying)"),
        };
        out.push_str(&format!(
            "{:<40} {:>5} {:>6} {:>5}     {:<6} {:>9.1}  {:<11} {}\n",
            v.name, v.id, v.mem_mib, v.vcpus, flags, v.time_s, v.role, wanted
        ));
    }
    for v in vms {
        if let Some(why) = &v.crash {
            out.push_str(&format!("{}: crashed: {why}\n", v.name));
        }
    }
    out
}

/// One replication event as a line, in the spirit of `xl remus`.
pub fn protect_event(ev: &SessionEvent) -> String {
    const MIB: f64 = 1048576.0;
    match ev {
        SessionEvent::InitialSync { pages, bytes, ms } => format!(
            "initial sync: {pages} pages ({:.1} MiB) in {ms:.0} ms",
            *bytes as f64 / MIB
        ),
        SessionEvent::Checkpoint(c) => {
            let mut sent = format!("{:>8} B", c.bytes);
            if c.raw_bytes > c.bytes {
                // Compressed: how much of the raw checkpoint went out.
                sent.push_str(&format!(
                    " ({:.0}% of {} B)",
                    c.bytes as f64 * 100.0 / c.raw_bytes as f64,
                    c.raw_bytes
                ));
            }
            let mut line = format!(
                "epoch {:>6}  pause {:>6.2} ms  dirty {:>6} pages  sent {sent}  ack {:>6.2} ms",
                c.epoch, c.pause_ms, c.dirty_pages, c.ack_ms
            );
            if c.disk_records > 0 {
                line.push_str(&format!(
                    "  disk {:>4} ops {:>8} B",
                    c.disk_records, c.disk_bytes
                ));
            }
            if c.disk_wait_ms > 0.0 {
                // Guest writes waited for the link: replication is behind.
                line.push_str(&format!("  disk wait {:.1} ms", c.disk_wait_ms));
            }
            if c.guest_held {
                // The last one until the guest runs again.
                line.push_str("  (guest paused: next checkpoint after unpause)");
            }
            line
        }
        SessionEvent::DiskSync(p) => format!(
            "disk sync {}: {:.1}/{:.1} MiB compared, {} chunks differ, {:.1} MiB to send",
            p.disk,
            p.compared_bytes as f64 / MIB,
            p.disk_bytes as f64 / MIB,
            p.differing_chunks,
            p.sent_bytes as f64 / MIB
        ),
        SessionEvent::DiskSynced(d) => format!(
            "disk sync ({}): {} of {} chunks compared ({} KiB each, of {} on the disks) differed from the backup's copy; {:.1} MiB of data sent, {} chunks zeroed, in {:.0} ms",
            sync_mode(d.mode),
            d.differing_chunks,
            d.chunks,
            d.chunk_size / 1024,
            d.disk_chunks,
            d.sent_bytes as f64 / MIB,
            d.zeroed_chunks,
            d.ms
        ),
        SessionEvent::SyncPlan { mode, reason } => {
            format!("disk sync plan: {} ({reason})", sync_mode(*mode))
        }
        SessionEvent::SwitchedOver {
            epoch,
            downtime_ms: Some(ms),
            ..
        } => format!(
            "SWITCHED OVER at epoch {epoch}: the backup runs the VM now (guest paused {ms:.1} ms)"
        ),
        SessionEvent::SwitchedOver { epoch, .. } => format!(
            "SWITCHED OVER at epoch {epoch}: the backup's answer was lost, but the arbiter says it runs the VM now"
        ),
        SessionEvent::BackupLost { reason } => {
            format!("BACKUP LOST: {reason} — the VM runs on UNPROTECTED; run remus protect again")
        }
        SessionEvent::Stopped { checkpoints } => {
            format!("protection stopped after {checkpoints} checkpoints")
        }
        SessionEvent::Failed { reason } => {
            format!("PROTECTION FAILED: {reason} — the VM runs on UNPROTECTED")
        }
        SessionEvent::Warning { message } => format!("warning: {message}"),
        SessionEvent::Arbiter { message, .. } => format!("arbiter: {message}"),
        SessionEvent::Start { pages, bytes } => {
            format!(
                "migration: {pages} pages ({:.1} MiB) to copy",
                *bytes as f64 / MIB
            )
        }
        SessionEvent::Round {
            round,
            pages,
            bytes,
            ms,
        } => format!(
            "round {round}: {pages} pages in {ms:.0} ms ({:.1} MiB sent so far)",
            *bytes as f64 / MIB
        ),
        SessionEvent::Done(m) => format!(
            "migrated in {:.0} ms, downtime {:.1} ms, {} rounds",
            m.total_ms, m.downtime_ms, m.rounds
        ),
        SessionEvent::Unknown => "(an event this remus does not know; see --json)".into(),
    }
}

fn sync_mode(m: SyncMode) -> &'static str {
    match m {
        SyncMode::Full => "full",
        SyncMode::Changed => "changed",
    }
}

/// `xl vcpu-list`'s table.
pub fn vcpu_table(vm: &str, vcpus: &[VcpuInfo]) -> String {
    let mut out = format!(
        "{:<32} {:>5} {:>8}  {}\n",
        "Name", "VCPU", "Thread", "CPU Affinity"
    );
    for v in vcpus {
        out.push_str(&format!(
            "{:<32} {:>5} {:>8}  {}\n",
            vm,
            v.vcpu,
            v.thread_id,
            cpu_list(&v.affinity)
        ));
    }
    out
}

/// `[0,1,2,5]` → `0-2,5`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_xl_columns_and_flags() {
        let t = list_table(&[VmInfo {
            name: "demo".into(),
            id: 3,
            mem_mib: 256,
            vcpus: 1,
            state: "p".into(),
            state_name: "paused".into(),
            role: "unprotected".into(),
            time_s: 12.34,
            accel: "tcg".into(),
            pid: 1,
            crash: None,
            protection: None,
            changed_chunks: Default::default(),
            arbiter: None,
            wanted: None,
            awaiting_takeover: None,
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("Name"));
        for col in ["ID", "Mem", "VCPUs", "State", "Time(s)"] {
            assert!(lines[0].contains(col), "{col}");
        }
        assert!(lines[1].starts_with("demo"));
        assert!(lines[1].contains("--p---"), "{}", lines[1]);
        assert!(lines[1].contains("12.3  unprotected"), "{}", lines[1]);
        assert!(lines[1].trim_end().ends_with('-'), "{}", lines[1]);
    }

    #[test]
    fn checkpoint_lines_show_disk_work_only_when_there_is_some() {
        let mut c = remus_api::CheckpointStats {
            epoch: 7,
            pause_ms: 4.5,
            dirty_pages: 12,
            bytes: 1000,
            ack_ms: 1.25,
            ..Default::default()
        };
        let line = protect_event(&SessionEvent::Checkpoint(c.clone()));
        assert!(line.starts_with("epoch      7  pause   4.50 ms"), "{line}");
        assert!(!line.contains("disk"), "{line}");
        assert!(!line.contains('%'), "uncompressed: no ratio: {line}");
        c.raw_bytes = 53248;
        let line = protect_event(&SessionEvent::Checkpoint(c.clone()));
        assert!(line.contains("sent     1000 B (2% of 53248 B)"), "{line}");
        c.disk_records = 3;
        c.disk_bytes = 8192;
        c.disk_wait_ms = 2.5;
        let line = protect_event(&SessionEvent::Checkpoint(c.clone()));
        assert!(line.contains("disk    3 ops     8192 B"), "{line}");
        assert!(line.contains("disk wait 2.5 ms"), "{line}");
        assert!(!line.contains("paused"), "{line}");
        c.guest_held = true;
        let line = protect_event(&SessionEvent::Checkpoint(c));
        assert!(
            line.ends_with("(guest paused: next checkpoint after unpause)"),
            "{line}"
        );
        let sync = SessionEvent::DiskSynced(remus_api::DiskSyncStats {
            disks: 1,
            mode: SyncMode::Changed,
            chunks: 320,
            disk_chunks: 16384,
            chunk_size: 65536,
            differing_chunks: 8,
            sent_bytes: 458752,
            zeroed_chunks: 1,
            ms: 35.0,
        });
        let line = protect_event(&sync);
        assert!(
            line.starts_with(
                "disk sync (changed): 8 of 320 chunks compared (64 KiB each, of 16384 on the disks)"
            ),
            "{line}"
        );
    }

    #[test]
    fn cpu_lists_compress() {
        assert_eq!(cpu_list(&[0, 1, 2, 5]), "0-2,5");
        assert_eq!(cpu_list(&[1]), "1");
        assert_eq!(cpu_list(&[]), "");
    }
}
