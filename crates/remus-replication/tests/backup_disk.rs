//! The backup's receive loop with disk replication, driven over a real TCP
//! connection by a scripted primary: epochs apply to the disk only at
//! their commit, in order; a record for an epoch that already committed
//! ends the session with a clear error and nothing of it is applied; the
//! initial sync's digests and data do what the protocol says.

mod common;

use common::{next, session};

use remus_proto::Channel;
use std::io::Write;
use std::sync::Arc;

use remus_disk::EpochBuffer;
use remus_nbd::{BlockBackend, FileBackend};
use remus_proto::{
    CheckpointKind, CheckpointWriter, DiskLogDigest, DiskOp, DiskRecord, Epoch, ErrorCode, Message,
};
use remus_replication::ReplError;
use remus_replication::backup::BackupEnd;
use remus_replication::replica::Replica;

const DISK: usize = 1 << 20;

fn record(epoch: u64, offset: u64, byte: u8) -> DiskRecord {
    DiskRecord {
        epoch: Epoch(epoch),
        disk: 0,
        op: DiskOp::Write {
            offset,
            fua: false,
            data: vec![byte; 512],
        },
    }
}

/// Sends records, their seal and a checkpoint of `epoch`.
fn send_epoch(w: &mut Channel, epoch: u64, kind: CheckpointKind, recs: &[DiskRecord]) {
    let mut d = DiskLogDigest::default();
    for r in recs {
        r.write_to(w).unwrap();
        d.add(r);
    }
    Message::DiskSeal(d.seal(Epoch(epoch))).write_to(w).unwrap();
    let mut cp = CheckpointWriter::begin(w, Epoch(epoch), kind).unwrap();
    if kind == CheckpointKind::Checkpoint {
        cp.device_state(w, b"device state", None).unwrap();
    }
    cp.end(w).unwrap();
    w.flush().unwrap();
}

#[test]
fn epochs_commit_in_order_and_a_record_for_a_committed_epoch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    // The backup's copy differs from the primary's (all 0x11) in chunk 3.
    let mut theirs = vec![0x11u8; DISK];
    theirs[3 * 65536] = 0x99;
    std::fs::write(&img, &theirs).unwrap();
    let disk: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img, false).unwrap());
    let mut buf = EpochBuffer::new(
        vec![("vda".into(), disk)],
        1 << 20,
        &dir.path().join("spill"),
    );
    let mut replica = Replica::create(&dir.path().join("ram"), 1 << 20).unwrap();

    let end = session(&mut replica, Some(&mut buf), |mut s| {
        let mut r = s.try_clone().unwrap();
        // 1. The backup opens with the digests of its copy: 16 chunks.
        let Message::DiskDigests(d) = next(&mut r) else {
            panic!("digests first")
        };
        assert_eq!((d.disk, d.first_chunk, d.digests.len()), (0, 0, 16));
        let ours = remus_disk::sync::digest(&[0x11u8; 65536]);
        let differing: Vec<usize> = (0..16).filter(|&i| d.digests[i] != ours).collect();
        assert_eq!(differing, vec![3], "only the chunk that differs");
        // 2. Initial sync: that chunk, applied on arrival.
        let sync = vec![DiskRecord {
            epoch: Epoch(0),
            disk: 0,
            op: DiskOp::Write {
                offset: 3 * 65536,
                fua: false,
                data: vec![0x11; 65536],
            },
        }];
        send_epoch(&mut s, 0, CheckpointKind::InitialSync, &sync);
        assert_eq!(next(&mut r), Message::Ack { epoch: Epoch(0) });
        // 3. Epoch 1 writes 0xAA at 0; epoch 2's record (0xBB at 4096)
        //    travels before epoch 1 commits, as the sender streams it.
        record(2, 4096, 0xBB).write_to(&mut s).unwrap();
        send_epoch(&mut s, 1, CheckpointKind::Checkpoint, &[record(1, 0, 0xAA)]);
        assert_eq!(next(&mut r), Message::Ack { epoch: Epoch(1) });
        // 4. A record for epoch 1, which has committed: refused.
        record(1, 8192, 0xCC).write_to(&mut s).unwrap();
        s.flush().unwrap();
        match next(&mut r) {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::Protocol);
                assert!(message.contains("already committed"), "{message}");
            }
            other => panic!("expected an Error, got {other:?}"),
        }
    });
    match end {
        BackupEnd::Aborted { reason } => assert!(reason.contains("already committed"), "{reason}"),
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert_eq!(replica.committed(), Some(Epoch(1)));
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(disk[3 * 65536], 0x11, "initial sync applied");
    assert_eq!(disk[0], 0xAA, "epoch 1 committed");
    assert_eq!(disk[4096], 0x11, "epoch 2 never committed: not applied");
    assert_eq!(disk[8192], 0x11, "the refused record is not applied");
    // What never committed is dropped at the end of the session.
    assert_eq!(buf.discard(), (1, 512));
}

/// A session with one replicated disk that commits epoch 1 (0xAA at 0),
/// then sends `after` (records of epoch 2) and a Suspend at 1; how it
/// ended, the backup's answer, the image, and what the disk buffer still
/// held for later epochs.
fn suspend_after(
    after: Vec<DiskRecord>,
) -> (Result<BackupEnd, ReplError>, Message, Vec<u8>, (u64, u64)) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0x11u8; DISK]).unwrap();
    let disk: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img, false).unwrap());
    let mut buf = EpochBuffer::new(
        vec![("vda".into(), disk)],
        1 << 20,
        &dir.path().join("spill"),
    );
    let mut replica = Replica::create(&dir.path().join("ram"), 1 << 20).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let end = common::session_with(&mut replica, Some(&mut buf), true, None, move |mut s| {
        let mut r = s.try_clone().unwrap();
        while matches!(next(&mut r), Message::DiskDigests(d) if d.first_chunk + (d.digests.len() as u64) < 16)
        {
        }
        send_epoch(&mut s, 0, CheckpointKind::InitialSync, &[]);
        assert_eq!(next(&mut r), Message::Ack { epoch: Epoch(0) });
        send_epoch(&mut s, 1, CheckpointKind::Checkpoint, &[record(1, 0, 0xAA)]);
        assert_eq!(next(&mut r), Message::Ack { epoch: Epoch(1) });
        for rec in &after {
            rec.write_to(&mut s).unwrap();
        }
        Message::Suspend {
            epoch: Epoch(1),
            grace_ms: 5_000,
        }
        .write_to(&mut s)
        .unwrap();
        s.flush().unwrap();
        tx.send(next(&mut r)).unwrap();
    });
    let answer = rx.recv().unwrap();
    let left = buf.discard();
    (end, answer, std::fs::read(&img).unwrap(), left)
}

#[test]
fn a_suspend_drops_the_flushes_after_its_epoch_and_refuses_writes_there() {
    // QEMU flushes while it saves its state: dropped, the suspend taken.
    let flush = DiskRecord {
        epoch: Epoch(2),
        disk: 0,
        op: DiskOp::Flush,
    };
    let (end, answer, disk, left) = suspend_after(vec![flush]);
    assert_eq!(answer, Message::Done);
    assert_eq!(left, (0, 0), "the next session's epoch 2 starts empty");
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
    assert_eq!(disk[0], 0xAA, "epoch 1 committed");

    // A write after the suspended epoch would never reach the backup:
    // the suspend is refused (no standby kept for a resume).
    let (end, answer, disk, _) = suspend_after(vec![record(2, 4096, 0xBB)]);
    assert!(
        matches!(&answer, Message::Error { code: ErrorCode::Protocol, message } if message.contains("disk writes after it")),
        "{answer:?}"
    );
    assert!(matches!(end, Ok(BackupEnd::Aborted { .. })), "{end:?}");
    assert_eq!(disk[4096], 0x11, "the write after the epoch is not applied");
}
