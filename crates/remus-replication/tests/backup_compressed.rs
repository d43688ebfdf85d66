//! The backup's receive loop with compressed checkpoints (protocol version
//! 3), driven over a real TCP connection by a scripted primary: deltas
//! decode against the committed copy and commit exactly the primary's
//! pages and device state; a delta built against a base the backup does
//! not hold fails the checkpoint digest and is never applied; a garbled
//! LZ4 block is rejected by name.

mod common;

use common::next;

use remus_proto::Channel;
use std::io::Write;

use remus_proto::delta::DeltaEncoder;
use remus_proto::{CheckpointKind, CheckpointWriter, Epoch, ErrorCode, Message, PAGE_SIZE};
use remus_replication::backup::BackupEnd;
use remus_replication::replica::Replica;

const RAM: u64 = 1 << 20;

fn pages(seed: u8, n: usize) -> Vec<u8> {
    (0..n * PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn send(
    w: &mut Channel,
    enc: &mut DeltaEncoder,
    epoch: u64,
    kind: CheckpointKind,
    first: u64,
    data: &[u8],
    dev: &[u8],
) {
    enc.begin_checkpoint();
    let mut cp = CheckpointWriter::begin(w, Epoch(epoch), kind).unwrap();
    cp.pages(w, first, data, Some(enc)).unwrap();
    if kind == CheckpointKind::Checkpoint {
        cp.device_state(w, dev, Some(enc)).unwrap();
    }
    cp.end(w).unwrap();
    w.flush().unwrap();
}

/// A fresh replica of `RAM` bytes in `dir` and the backup's session into
/// it while `primary` scripts the other end.
fn session(
    dir: &std::path::Path,
    primary: impl FnOnce(Channel) + Send + 'static,
) -> (BackupEnd, Replica) {
    let mut replica = Replica::create(&dir.join("ram"), RAM).unwrap();
    let end = common::session(&mut replica, None, primary);
    (end, replica)
}

fn read_ram(replica: &Replica, first: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * PAGE_SIZE];
    for (i, p) in out.chunks_mut(PAGE_SIZE).enumerate() {
        replica.read_page(first + i as u64, p).unwrap();
    }
    out
}

#[test]
fn deltas_commit_exactly_and_a_delta_against_the_wrong_base_is_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let v0 = pages(1, 4);
    let mut v1 = v0.clone();
    v1[10] ^= 0xff;
    v1[3 * PAGE_SIZE + 77] ^= 0x0f;
    let (v0c, v1c) = (v0.clone(), v1.clone());
    let (end, replica) = session(dir.path(), move |mut s| {
        let mut r = s.try_clone().unwrap();
        let mut enc = DeltaEncoder::new(1 << 20);
        // Initial sync: plain pages (nothing cached yet), LZ4 only.
        send(
            &mut s,
            &mut enc,
            0,
            CheckpointKind::InitialSync,
            8,
            &v0c,
            b"",
        );
        assert_eq!(next(&mut r), Message::Ack { epoch: Epoch(0) });
        // Checkpoint 1: all four pages as XOR deltas, and a device state.
        let dev = vec![0x42u8; 3000];
        send(
            &mut s,
            &mut enc,
            1,
            CheckpointKind::Checkpoint,
            8,
            &v1c,
            &dev,
        );
        assert_eq!(enc.take_stats().xor_pages, 4);
        assert_eq!(next(&mut r), Message::Ack { epoch: Epoch(1) });
        // Checkpoint 2 from an encoder that believes the backup holds
        // other contents: the decoded pages are wrong, the digest says so.
        let mut wrong = DeltaEncoder::new(1 << 20);
        wrong.begin_checkpoint();
        wrong.encode_pages(8, &pages(9, 4));
        send(
            &mut s,
            &mut wrong,
            2,
            CheckpointKind::Checkpoint,
            8,
            &v0c,
            &dev,
        );
        match next(&mut r) {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::CheckpointRejected);
                assert!(message.contains("digest mismatch"), "{message}");
            }
            other => panic!("expected an Error, got {other:?}"),
        }
    });
    match end {
        BackupEnd::Aborted { reason } => assert!(reason.contains("digest"), "{reason}"),
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert_eq!(replica.committed(), Some(Epoch(1)));
    assert!(read_ram(&replica, 8, 4) == v1, "epoch 1's pages, exactly");
    assert_eq!(replica.device_state(), &[0x42u8; 3000][..]);
    assert_eq!(
        std::fs::read(replica.device_state_path()).unwrap(),
        vec![0x42u8; 3000]
    );
}

#[test]
fn a_garbled_compressed_block_is_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (end, replica) = session(dir.path(), move |mut s| {
        let mut r = s.try_clone().unwrap();
        Message::CheckpointBegin {
            epoch: Epoch(0),
            kind: CheckpointKind::InitialSync,
        }
        .write_to(&mut s)
        .unwrap();
        // A frame with a valid CRC whose LZ4 block is nonsense.
        Message::PageDelta(remus_proto::PageDelta {
            first_page: 0,
            page_count: 2,
            xor: vec![0],
            compressed: vec![0xf0; 16],
        })
        .write_to(&mut s)
        .unwrap();
        s.flush().unwrap();
        match next(&mut r) {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::CheckpointRejected);
                assert!(message.contains("corrupt"), "{message}");
            }
            other => panic!("expected an Error, got {other:?}"),
        }
    });
    assert!(matches!(end, BackupEnd::Aborted { .. }), "{end:?}");
    assert_eq!(replica.committed(), None);
}
