//! The events of a VM's replication session: what the agent streams (one
//! JSON object per line, `"event"` naming the kind) to `remus protect`,
//! `remus failback` and `remus migrate`, and what they decode. The agent
//! emits only these; a reader meets [`SessionEvent::Unknown`] for a kind a
//! newer agent added.

use serde::{Deserialize, Serialize};

/// One event of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    /// The backup's plan for the disk sync (protection).
    SyncPlan { mode: SyncMode, reason: String },
    /// Initial disk sync: one more batch of chunks compared.
    DiskSync(DiskSyncProgress),
    /// Initial disk sync finished (queued for sending).
    DiskSynced(DiskSyncStats),
    /// Protection: the backup holds the initial copy of RAM.
    InitialSync { pages: u64, bytes: u64, ms: f64 },
    /// Protection: one checkpoint acknowledged by the backup.
    Checkpoint(CheckpointStats),
    /// Protection ended: the backup or the link failed; the VM runs on
    /// unprotected.
    BackupLost { reason: String },
    /// Protection ended by the operator.
    Stopped { checkpoints: u64 },
    /// Planned switch-over: the backup runs the VM from `epoch`.
    /// `downtime_ms` is None when the backup's answer was lost and the
    /// arbiter (`confirmed_by`) says it runs the VM.
    SwitchedOver {
        epoch: u64,
        downtime_ms: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirmed_by: Option<String>,
    },
    /// Migration: before the initial copy, how much there is to send.
    Start { pages: u64, bytes: u64 },
    /// Migration: a pre-copy round was sent (round 0 is the initial copy).
    Round {
        round: u64,
        pages: u64,
        bytes: u64,
        ms: f64,
    },
    /// Migration: the destination runs the VM.
    Done(MigrateStats),
    /// Something the operator should know at the start of a session.
    Warning { message: String },
    /// The session failed; `reason` says how and what state the VM is in.
    Failed { reason: String },
    /// The arbiter changed what this host may do with the VM.
    Arbiter { state: String, message: String },
    /// A kind this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

impl SessionEvent {
    /// Progress events are frequent and superseded by the next one; the
    /// others are the session's milestones.
    pub fn is_progress(&self) -> bool {
        matches!(
            self,
            SessionEvent::Checkpoint(_) | SessionEvent::DiskSync(_)
        )
    }
}

/// How the disks of a session are synchronised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Digests of every chunk are compared.
    #[default]
    Full,
    /// Only the chunks either side's change records mark are compared.
    Changed,
}

/// One committed checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointStats {
    pub epoch: u64,
    /// When the guest was paused for this checkpoint (Unix ms).
    pub taken_at_ms: u64,
    /// Guest paused for this long (stop → cont acknowledged).
    pub pause_ms: f64,
    pub dirty_pages: u64,
    /// Bytes of page data and device state put on the wire (compressed
    /// when compression is on; frame headers included).
    pub bytes: u64,
    /// The same before compression: dirty pages × 4096 plus the device
    /// state.
    pub raw_bytes: u64,
    /// Pages sent as XOR against the backup's copy (the rest went plain).
    pub xor_pages: u64,
    /// End frame sent → ack received.
    pub ack_ms: f64,
    /// Disk records of this epoch and the bytes they wrote or zeroed.
    pub disk_records: u64,
    pub disk_bytes: u64,
    /// Time guest disk writes spent waiting for room in the journal since
    /// the previous checkpoint (the link or the backup fell behind).
    pub disk_wait_ms: f64,
    /// The guest is held paused (`remus pause`, or the fence): this
    /// checkpoint left it stopped, and the next one waits until it runs
    /// again.
    #[serde(default)]
    pub guest_held: bool,
    /// Where the pause went.
    pub phases: PausePhases,
}

/// The parts of one checkpoint pause: QMP stop, dirty scan, page copy,
/// device state save, QMP cont (ms); and, before the pause, the wait for
/// the guest to take the frames already handed to QEMU. The save is
/// sent right behind the `stop` (QEMU runs it as soon as the guest has
/// stopped) and QEMU writes the device state while the agent scans and
/// copies guest RAM: `devstate` runs from the `stop`'s start to the
/// save's end as seen after the copy (so it includes `stop`), and the
/// pause is about the longer of `devstate` and `stop` + `scan` + `copy`,
/// plus `cont`. (Before 2026-12-05 the save began after the `stop`'s
/// answer: `stop` + the longer of the rest.) `cont` runs from the save's
/// end as seen here to the `cont`'s answer; behind a device-only save
/// the `cont` is sent as soon as the copy is done, and QEMU runs it the
/// moment the save ends (since 2026-12-05, later the same day).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PausePhases {
    /// Before the pause, with the guest running: inbound frames held at
    /// the relay while QEMU hands its queue to the guest (ms).
    #[serde(default)]
    pub inbound: f64,
    /// That wait ran out of its budget (a frame QEMU still held may have
    /// been dropped by the stop; TCP resends it).
    #[serde(default)]
    pub inbound_timed_out: bool,
    pub stop: f64,
    pub scan: f64,
    pub copy: f64,
    /// Beside `scan` and `copy`, not after them.
    pub devstate: f64,
    pub cont: f64,
}

/// Progress of the initial disk sync, per digest frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskSyncProgress {
    pub disk: String,
    /// Bytes of this disk compared so far, and how many will be (its size
    /// for a full sync).
    pub compared_bytes: u64,
    pub disk_bytes: u64,
    /// Over all disks so far: chunks that differed, bytes sent for them.
    pub differing_chunks: u64,
    pub sent_bytes: u64,
}

/// What the initial disk sync did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskSyncStats {
    pub disks: u64,
    /// `full` (every chunk compared) or `changed` (only the chunks either
    /// side's change records mark).
    pub mode: SyncMode,
    /// Chunks compared, and chunks the disks have.
    pub chunks: u64,
    pub disk_chunks: u64,
    pub chunk_size: u32,
    pub differing_chunks: u64,
    /// Data bytes sent (zeroed chunks send none).
    pub sent_bytes: u64,
    /// Differing chunks that were all zero here, sent as a zeroing.
    pub zeroed_chunks: u64,
    pub ms: f64,
}

/// What a migration cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateStats {
    pub total_ms: f64,
    /// Guest stopped at the source → the destination's confirmation that
    /// it runs the VM (sent once it has resumed the VM), as the source
    /// sees it. The wait before the stop, while the guest takes the
    /// frames QEMU holds for it, is not counted: the guest runs then.
    pub downtime_ms: f64,
    pub bytes: u64,
    pub rounds: u64,
    pub final_pages: u64,
    /// QEMU's timestamp of the guest's stop at the source (its STOP
    /// event, µs since the Unix epoch, by the source host's clock). The
    /// destination's agent logs the VM's RESUME the same way
    /// (`resumed_at_us`): with the two hosts' clocks in step, the guest's
    /// downtime by QEMU's own events is the difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at_us: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_the_agents_lines_and_back() {
        let lines = [
            r#"{"event":"checkpoint","epoch":7,"taken_at_ms":1,"pause_ms":4.5,"dirty_pages":12,"bytes":900,"raw_bytes":49152,"xor_pages":3,"ack_ms":2.0,"disk_records":0,"disk_bytes":0,"disk_wait_ms":0.0,"guest_held":false,"phases":{"inbound":0.3,"inbound_timed_out":false,"stop":0.5,"scan":0.3,"copy":0.7,"devstate":2.4,"cont":0.6}}"#,
            r#"{"event":"switched_over","epoch":9,"downtime_ms":null,"confirmed_by":"arbiter"}"#,
            r#"{"event":"switched_over","epoch":9,"downtime_ms":31.5}"#,
            r#"{"event":"sync_plan","mode":"changed","reason":"the copies share generation 3"}"#,
            r#"{"event":"backup_lost","reason":"no word from the backup within the timeout"}"#,
            r#"{"event":"done","total_ms":900.0,"downtime_ms":9.0,"bytes":1024,"rounds":3,"final_pages":20}"#,
        ];
        for line in lines {
            let ev: SessionEvent = serde_json::from_str(line).expect(line);
            assert!(!matches!(ev, SessionEvent::Unknown), "{line}");
            let back: serde_json::Value = serde_json::to_value(&ev).unwrap();
            let want: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(back, want, "re-encodes to the same object");
        }
        let ev: SessionEvent = serde_json::from_str(r#"{"event":"checkpoint","epoch":7,"taken_at_ms":1,"pause_ms":4.5,"dirty_pages":12,"bytes":900,"raw_bytes":49152,"xor_pages":3,"ack_ms":2.0,"disk_records":0,"disk_bytes":0,"disk_wait_ms":0.0,"phases":{"stop":0.5,"scan":0.3,"copy":0.7,"devstate":2.4,"cont":0.6}}"#).unwrap();
        assert!(ev.is_progress());
        // An older agent's line (no inbound gate, no guest_held) reads
        // with none.
        let SessionEvent::Checkpoint(cp) = ev else {
            panic!("not a checkpoint: {ev:?}");
        };
        assert_eq!(
            (
                cp.phases.inbound,
                cp.phases.inbound_timed_out,
                cp.guest_held
            ),
            (0.0, false, false)
        );
    }

    #[test]
    fn a_kind_from_a_newer_agent_is_unknown_not_an_error() {
        let ev: SessionEvent =
            serde_json::from_str(r#"{"event":"rekeyed","generation":2}"#).unwrap();
        assert_eq!(ev, SessionEvent::Unknown);
    }
}
