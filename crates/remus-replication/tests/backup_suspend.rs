//! A session suspended for a restart of the primary's agent, through the
//! backup's real receive loop on a real encrypted connection: the backup
//! answers a Suspend at its committed epoch with Done and ends
//! `Suspended` (it keeps the standby, no failover); a second session on
//! the same replica resumes from that epoch with no copy, its compressed
//! checkpoints decoding against the kept copy although the new primary's
//! compression cache starts empty. A Suspend at another epoch, or to a
//! backup that never said it takes one, is refused and ends nothing
//! quietly.

mod common;

use common::next;

use std::io::Write;
use std::time::Duration;

use remus_proto::delta::DeltaEncoder;
use remus_proto::{
    Channel, CheckpointKind, CheckpointWriter, Epoch, ErrorCode, Message, PAGE_SIZE,
};
use remus_replication::ReplError;
use remus_replication::backup::BackupEnd;
use remus_replication::replica::Replica;

const RAM: u64 = 1 << 20;

fn pages(seed: u8, n: usize) -> Vec<u8> {
    (0..n * PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed)
        .collect()
}

/// Sends checkpoint `epoch`; the error if the backup hung up meanwhile.
fn try_checkpoint(
    w: &mut Channel,
    enc: &mut DeltaEncoder,
    epoch: u64,
    kind: CheckpointKind,
    data: &[u8],
) -> Result<(), Box<dyn std::error::Error>> {
    enc.begin_checkpoint();
    let mut cp = CheckpointWriter::begin(w, Epoch(epoch), kind)?;
    cp.pages(w, 0, data, Some(enc))?;
    if kind == CheckpointKind::Checkpoint {
        cp.device_state(w, b"devstate", Some(enc))?;
    }
    cp.end(w)?;
    w.flush()?;
    Ok(())
}

fn checkpoint(
    w: &mut Channel,
    enc: &mut DeltaEncoder,
    epoch: u64,
    kind: CheckpointKind,
    data: &[u8],
) {
    try_checkpoint(w, enc, epoch, kind, data).unwrap();
}

fn acked(r: &mut Channel, epoch: u64) {
    assert_eq!(
        next(r),
        Message::Ack {
            epoch: Epoch(epoch)
        }
    );
}

fn read_ram(replica: &Replica, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * PAGE_SIZE];
    for (i, p) in out.chunks_mut(PAGE_SIZE).enumerate() {
        replica.read_page(i as u64, p).unwrap();
    }
    out
}

/// The initial copy and checkpoint 1, each acknowledged.
fn first_two(s: &mut Channel) {
    let mut enc = DeltaEncoder::new(1 << 20);
    checkpoint(s, &mut enc, 0, CheckpointKind::InitialSync, &pages(1, 4));
    acked(s, 0);
    checkpoint(s, &mut enc, 1, CheckpointKind::Checkpoint, &pages(2, 4));
    acked(s, 1);
}

/// The first session: the initial copy and checkpoint 1, then `last`.
fn first_session(
    replica: &mut Replica,
    suspendable: bool,
    last: Message,
) -> (Result<BackupEnd, ReplError>, Message) {
    let (tx, rx) = std::sync::mpsc::channel();
    let end = common::session_with(replica, None, suspendable, None, move |mut s| {
        first_two(&mut s);
        last.write_to(&mut s).unwrap();
        s.flush().unwrap();
        tx.send(next(&mut s)).unwrap();
    });
    (end, rx.recv_timeout(Duration::from_secs(10)).unwrap())
}

fn suspend(epoch: u64) -> Message {
    Message::Suspend {
        epoch: Epoch(epoch),
        grace_ms: 5_000,
    }
}

#[test]
fn a_suspended_session_resumes_from_the_kept_copy_without_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::create(&dir.path().join("ram"), RAM).unwrap();
    let (end, answer) = first_session(&mut replica, true, suspend(1));
    assert_eq!(answer, Message::Done, "the backup confirms the suspend");
    assert_eq!(
        end.unwrap(),
        BackupEnd::Suspended {
            epoch: Epoch(1),
            grace: Duration::from_secs(5)
        }
    );
    assert_eq!(replica.committed(), Some(Epoch(1)));

    // The next agent's session: checkpoints from epoch 2, compressed with
    // an empty cache, no initial copy.
    let mut v2 = pages(2, 4);
    v2[5] ^= 0xff;
    v2[3 * PAGE_SIZE + 7] ^= 0x0f;
    let sent = v2.clone();
    let end = common::session(&mut replica, None, move |mut s| {
        let mut enc = DeltaEncoder::new(1 << 20);
        checkpoint(&mut s, &mut enc, 2, CheckpointKind::Checkpoint, &sent);
        acked(&mut s, 2);
        Message::Done.write_to(&mut s).unwrap();
        s.flush().unwrap();
    });
    assert_eq!(end, BackupEnd::Done);
    assert_eq!(replica.committed(), Some(Epoch(2)));
    assert_eq!(read_ram(&replica, 4), v2);
}

#[test]
fn a_resumed_session_cannot_go_back_to_a_committed_epoch_or_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::create(&dir.path().join("ram"), RAM).unwrap();
    let (end, _) = first_session(&mut replica, true, suspend(1));
    assert!(matches!(end, Ok(BackupEnd::Suspended { .. })));
    for (epoch, kind) in [
        (1, CheckpointKind::Checkpoint),
        (0, CheckpointKind::InitialSync),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let end = common::session_with(&mut replica, None, true, None, move |mut s| {
            let mut enc = DeltaEncoder::new(1 << 20);
            // The backup may refuse at the first frame and hang up.
            let _ = try_checkpoint(&mut s, &mut enc, epoch, kind, &pages(9, 4));
            tx.send(next(&mut s)).unwrap();
        });
        let answer = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            matches!(answer, Message::Error { .. }),
            "epoch {epoch} after 1: {answer:?}"
        );
        assert!(
            !matches!(
                end,
                Ok(BackupEnd::Suspended { .. } | BackupEnd::PrimaryLost { .. })
            ),
            "{end:?}"
        );
        assert_eq!(replica.committed(), Some(Epoch(1)));
        assert_eq!(read_ram(&replica, 4), pages(2, 4), "nothing applied");
    }
}

#[test]
fn a_suspend_at_another_epoch_or_to_a_backup_that_never_offered_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::create(&dir.path().join("ram"), RAM).unwrap();
    let (end, answer) = first_session(&mut replica, true, suspend(2));
    assert!(
        matches!(&answer, Message::Error { code: ErrorCode::Protocol, message } if message.contains("suspend at")),
        "{answer:?}"
    );
    assert!(matches!(end, Err(ReplError::Protocol(_))), "{end:?}");

    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::create(&dir.path().join("ram"), RAM).unwrap();
    let (end, answer) = first_session(&mut replica, false, suspend(1));
    assert!(
        matches!(&answer, Message::Error { code: ErrorCode::Protocol, message } if message.contains("Suspend")),
        "{answer:?}"
    );
    assert!(matches!(end, Err(ReplError::Protocol(_))), "{end:?}");
}

#[test]
fn a_backup_whose_agent_restarts_asks_the_primary_to_suspend() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::create(&dir.path().join("ram"), RAM).unwrap();
    let restarting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = restarting.clone();
    let end = common::session_with(&mut replica, None, true, Some(restarting), move |mut s| {
        first_two(&mut s);
        // The agent stops: the primary hears it (within a heartbeat's
        // look), then suspends at its last checkpoint.
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(next(&mut s), Message::Restarting);
        suspend(1).write_to(&mut s).unwrap();
        s.flush().unwrap();
        assert_eq!(next(&mut s), Message::Done);
    });
    assert!(
        matches!(
            end,
            Ok(BackupEnd::Suspended {
                epoch: Epoch(1),
                ..
            })
        ),
        "{end:?}"
    );
}
