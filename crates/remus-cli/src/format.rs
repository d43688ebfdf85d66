//! Human output in xl's layout.

use remus_api::{VcpuInfo, VmInfo};

/// `xl list`'s table: Name, ID, Mem, VCPUs, State, Time(s).
pub fn list_table(vms: &[VmInfo]) -> String {
    let mut out = format!(
        "{:<40} {:>5} {:>6} {:>5}     {:<6} {:>9}\n",
        "Name", "ID", "Mem", "VCPUs", "State", "Time(s)"
    );
    for v in vms {
        let letter = v.state.chars().next().unwrap_or('-');
        let pos = "rbpscd".find(letter).unwrap_or(usize::MAX);
        let flags: String = (0..6)
            .map(|i| if i == pos { letter } else { '-' })
            .collect();
        out.push_str(&format!(
            "{:<40} {:>5} {:>6} {:>5}     {:<6} {:>9.1}\n",
            v.name, v.id, v.mem_mib, v.vcpus, flags, v.time_s
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
pub fn protect_event(ev: &serde_json::Value) -> String {
    let f = |k: &str| ev[k].as_f64().unwrap_or(0.0);
    let u = |k: &str| ev[k].as_u64().unwrap_or(0);
    match ev["event"].as_str().unwrap_or("") {
        "initial_sync" => format!(
            "initial sync: {} pages ({:.1} MiB) in {:.0} ms",
            u("pages"),
            f("bytes") / 1048576.0,
            f("ms")
        ),
        "checkpoint" => {
            let mut sent = format!("{:>8} B", u("bytes"));
            if u("raw_bytes") > u("bytes") {
                // Compressed: how much of the raw checkpoint went out.
                sent.push_str(&format!(
                    " ({:.0}% of {} B)",
                    f("bytes") * 100.0 / f("raw_bytes"),
                    u("raw_bytes")
                ));
            }
            let mut line = format!(
                "epoch {:>6}  pause {:>6.2} ms  dirty {:>6} pages  sent {sent}  ack {:>6.2} ms",
                u("epoch"),
                f("pause_ms"),
                u("dirty_pages"),
                f("ack_ms")
            );
            if u("disk_records") > 0 {
                line.push_str(&format!(
                    "  disk {:>4} ops {:>8} B",
                    u("disk_records"),
                    u("disk_bytes")
                ));
            }
            if f("disk_wait_ms") > 0.0 {
                // Guest writes waited for the link: replication is behind.
                line.push_str(&format!("  disk wait {:.1} ms", f("disk_wait_ms")));
            }
            line
        }
        "disk_sync" => format!(
            "disk sync {}: {:.1}/{:.1} MiB compared, {} chunks differ, {:.1} MiB to send",
            ev["disk"].as_str().unwrap_or("?"),
            f("compared_bytes") / 1048576.0,
            f("disk_bytes") / 1048576.0,
            u("differing_chunks"),
            f("sent_bytes") / 1048576.0
        ),
        "disk_synced" => format!(
            "disk sync ({}): {} of {} chunks compared ({} KiB each, of {} on the disks) differed from the backup's copy; {:.1} MiB of data sent, {} chunks zeroed, in {:.0} ms",
            ev["mode"].as_str().unwrap_or("full"),
            u("differing_chunks"),
            u("chunks"),
            u("chunk_size") / 1024,
            u("disk_chunks"),
            f("sent_bytes") / 1048576.0,
            u("zeroed_chunks"),
            f("ms")
        ),
        "sync_plan" => format!(
            "disk sync plan: {} ({})",
            ev["mode"].as_str().unwrap_or("?"),
            ev["reason"].as_str().unwrap_or("")
        ),
        "switched_over" => match ev["downtime_ms"].as_f64() {
            Some(ms) => format!(
                "SWITCHED OVER at epoch {}: the backup runs the VM now (guest paused {ms:.1} ms)",
                u("epoch")
            ),
            None => format!(
                "SWITCHED OVER at epoch {}: the backup's answer was lost, but the arbiter says it runs the VM now",
                u("epoch")
            ),
        },
        "backup_lost" => format!(
            "BACKUP LOST: {} — the VM runs on UNPROTECTED; run remus protect again",
            ev["reason"].as_str().unwrap_or("?")
        ),
        "stopped" => format!("protection stopped after {} checkpoints", u("checkpoints")),
        "failed" => format!(
            "PROTECTION FAILED: {} — the VM runs on UNPROTECTED",
            ev["reason"].as_str().unwrap_or("?")
        ),
        "warning" => format!("warning: {}", ev["message"].as_str().unwrap_or("?")),
        "arbiter" => format!("arbiter: {}", ev["message"].as_str().unwrap_or("?")),
        _ => ev.to_string(),
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
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("Name"));
        for col in ["ID", "Mem", "VCPUs", "State", "Time(s)"] {
            assert!(lines[0].contains(col), "{col}");
        }
        assert!(lines[1].starts_with("demo"));
        assert!(lines[1].contains("--p---"), "{}", lines[1]);
        assert!(lines[1].trim_end().ends_with("12.3"), "{}", lines[1]);
    }

    #[test]
    fn checkpoint_lines_show_disk_work_only_when_there_is_some() {
        let mut ev = serde_json::json!({"event": "checkpoint", "epoch": 7, "pause_ms": 4.5,
            "dirty_pages": 12, "bytes": 1000, "ack_ms": 1.25, "disk_records": 0, "disk_bytes": 0,
            "disk_wait_ms": 0.0});
        let line = protect_event(&ev);
        assert!(line.starts_with("epoch      7  pause   4.50 ms"), "{line}");
        assert!(!line.contains("disk"), "{line}");
        assert!(!line.contains('%'), "uncompressed: no ratio: {line}");
        ev["raw_bytes"] = 53248.into();
        let line = protect_event(&ev);
        assert!(line.contains("sent     1000 B (2% of 53248 B)"), "{line}");
        ev["disk_records"] = 3.into();
        ev["disk_bytes"] = 8192.into();
        ev["disk_wait_ms"] = 2.5.into();
        let line = protect_event(&ev);
        assert!(line.contains("disk    3 ops     8192 B"), "{line}");
        assert!(line.contains("disk wait 2.5 ms"), "{line}");
        let sync = serde_json::json!({"event": "disk_synced", "mode": "changed", "differing_chunks": 8, "chunks": 320,
            "disk_chunks": 16384, "chunk_size": 65536, "sent_bytes": 458752, "zeroed_chunks": 1, "ms": 35.0});
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
