//! The backup's epoch buffer against a model: records apply only at their
//! checkpoint's commit, in order, from memory or the spill file alike;
//! refused records leave the disk untouched.

use std::sync::Arc;

use proptest::prelude::*;
use remus_disk::EpochBuffer;
use remus_nbd::{BlockBackend, FileBackend};
use remus_proto::{DiskLogDigest, DiskOp, DiskRecord, DiskSeal, Epoch};

const SIZE: usize = 256 * 1024;

struct Setup {
    _dir: tempfile::TempDir,
    img: std::path::PathBuf,
    spill: std::path::PathBuf,
    buf: EpochBuffer,
}

fn setup(mem_limit: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0xEEu8; SIZE]).unwrap();
    let spill = dir.path().join("spill");
    let disk: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img, false).unwrap());
    let buf = EpochBuffer::new(vec![("vda".into(), disk)], mem_limit, &spill);
    Setup {
        _dir: dir,
        img,
        spill,
        buf,
    }
}

fn write(epoch: u64, offset: u64, byte: u8, len: usize) -> DiskRecord {
    DiskRecord {
        epoch: Epoch(epoch),
        disk: 0,
        op: DiskOp::Write {
            offset,
            fua: false,
            data: vec![byte; len],
        },
    }
}

fn seal_of(recs: &[DiskRecord], epoch: u64) -> DiskSeal {
    let mut d = DiskLogDigest::default();
    for r in recs.iter().filter(|r| r.epoch.0 == epoch) {
        d.add(r);
    }
    d.seal(Epoch(epoch))
}

#[test]
fn writes_wait_for_their_commit_and_uncommitted_ones_are_discarded() {
    let mut s = setup(1 << 20);
    let e1 = vec![write(1, 0, 1, 4096), write(1, 4096, 2, 100)];
    for r in &e1 {
        s.buf.accept(r.clone(), None).unwrap();
    }
    let e2 = write(2, 8192, 3, 10);
    s.buf.accept(e2.clone(), None).unwrap();
    assert_eq!(
        std::fs::read(&s.img).unwrap()[0],
        0xEE,
        "nothing applied before commit"
    );
    // A commit without its seal is refused.
    assert!(s.buf.commit(Epoch(1)).is_err());
    s.buf.seal(&seal_of(&e1, 1), None).unwrap();
    let st = s.buf.commit(Epoch(1)).unwrap();
    assert_eq!((st.records, st.bytes), (2, 4196));
    let img = std::fs::read(&s.img).unwrap();
    assert_eq!(img[0], 1);
    assert_eq!(img[4096], 2);
    assert_eq!(img[8192], 0xEE, "epoch 2 is not committed");
    // Failover: epoch 2 never commits.
    assert_eq!(s.buf.discard(), (1, 10));
    assert_eq!(std::fs::read(&s.img).unwrap()[8192], 0xEE);
}

#[test]
fn refused_records_apply_nothing() {
    let mut s = setup(1 << 20);
    let e1 = vec![write(1, 0, 1, 10)];
    s.buf.accept(e1[0].clone(), None).unwrap();
    s.buf.seal(&seal_of(&e1, 1), None).unwrap();
    s.buf.commit(Epoch(1)).unwrap();
    let before = std::fs::read(&s.img).unwrap();

    let e = s
        .buf
        .accept(write(1, 100, 9, 10), Some(Epoch(1)))
        .unwrap_err();
    assert!(e.to_string().contains("already committed"), "{e}");
    let e = s
        .buf
        .accept(write(0, 100, 9, 10), Some(Epoch(1)))
        .unwrap_err();
    assert!(e.to_string().contains("initial-sync data after"), "{e}");
    let e = s
        .buf
        .accept(write(2, SIZE as u64 - 5, 9, 10), Some(Epoch(1)))
        .unwrap_err();
    assert!(e.to_string().contains("beyond disk vda"), "{e}");
    let mut other = write(2, 0, 9, 10);
    other.disk = 4;
    let e = s.buf.accept(other, Some(Epoch(1))).unwrap_err();
    assert!(e.to_string().contains("replicated disk 4"), "{e}");
    // A seal that does not match what arrived.
    let e2 = vec![write(2, 0, 7, 10)];
    s.buf.accept(e2[0].clone(), Some(Epoch(1))).unwrap();
    let mut bad = seal_of(&e2, 2);
    bad.digest[0] ^= 1;
    let e = s.buf.seal(&bad, Some(Epoch(1))).unwrap_err();
    assert!(
        e.to_string().contains("same counts, different contents"),
        "{e}"
    );
    // After its seal, no more records for the epoch.
    s.buf.seal(&seal_of(&e2, 2), Some(Epoch(1))).unwrap();
    let e = s
        .buf
        .accept(write(2, 0, 7, 10), Some(Epoch(1)))
        .unwrap_err();
    assert!(e.to_string().contains("after its seal"), "{e}");
    s.buf.discard();
    assert_eq!(std::fs::read(&s.img).unwrap(), before);
}

#[test]
fn spilled_epochs_apply_like_buffered_ones_and_the_spill_file_is_emptied() {
    let mut s = setup(8192);
    let recs: Vec<DiskRecord> = (0..10)
        .map(|i| write(1, i * 4096, i as u8 + 1, 4096))
        .collect();
    for r in &recs {
        s.buf.accept(r.clone(), None).unwrap();
    }
    assert!(s.buf.spilled_total() >= 8 * 4096);
    assert!(std::fs::metadata(&s.spill).unwrap().len() >= 8 * 4096);
    s.buf.seal(&seal_of(&recs, 1), None).unwrap();
    s.buf.commit(Epoch(1)).unwrap();
    let img = std::fs::read(&s.img).unwrap();
    for i in 0..10 {
        assert_eq!(img[i * 4096], i as u8 + 1);
    }
    assert_eq!(std::fs::metadata(&s.spill).unwrap().len(), 0);
}

#[test]
fn flush_or_fua_makes_the_commit_sync() {
    let mut s = setup(1 << 20);
    let recs = vec![write(1, 0, 1, 10)];
    s.buf.accept(recs[0].clone(), None).unwrap();
    s.buf.seal(&seal_of(&recs, 1), None).unwrap();
    assert!(!s.buf.commit(Epoch(1)).unwrap().synced);
    let recs = vec![
        write(2, 0, 1, 10),
        DiskRecord {
            epoch: Epoch(2),
            disk: 0,
            op: DiskOp::Flush,
        },
    ];
    for r in &recs {
        s.buf.accept(r.clone(), Some(Epoch(1))).unwrap();
    }
    s.buf.seal(&seal_of(&recs, 2), Some(Epoch(1))).unwrap();
    assert!(s.buf.commit(Epoch(2)).unwrap().synced);
}

/// A disk that is full: every write fails with ENOSPC.
struct Full;
impl BlockBackend for Full {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], _: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc_enospc()))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn a_full_disk_fails_the_commit_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = EpochBuffer::new(
        vec![("vdb".into(), Arc::new(Full))],
        1 << 20,
        &dir.path().join("s"),
    );
    let recs = vec![write(1, 4096, 1, 10)];
    b.accept(recs[0].clone(), None).unwrap();
    b.seal(&seal_of(&recs, 1), None).unwrap();
    let e = b.commit(Epoch(1)).unwrap_err().to_string();
    assert!(
        e.contains("apply epoch 1 (10 bytes at 4096) to disk vdb") && e.contains("No space left"),
        "{e}"
    );
}

/// What a primary can make the backup hold for uncommitted epochs is
/// bounded: the spill file's size, the number of records and of open
/// epochs. Past a bound the record is refused with a clear error, and
/// what committed before is untouched.
#[test]
fn uncommitted_data_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0xEEu8; SIZE]).unwrap();
    let disk: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img, false).unwrap());
    // No memory, a 64 KiB spill file.
    let mut b = EpochBuffer::with_spill_limit(
        vec![("vda".into(), disk)],
        0,
        &dir.path().join("spill"),
        64 << 10,
    );
    let committed = vec![write(1, 0, 7, 4096)];
    b.accept(committed[0].clone(), None).unwrap();
    b.seal(&seal_of(&committed, 1), None).unwrap();
    b.commit(Epoch(1)).unwrap();
    // 16 writes of 4 KiB fill it; the 17th is refused.
    for i in 0..16 {
        b.accept(write(2, i * 4096, 9, 4096), Some(Epoch(1)))
            .unwrap();
    }
    let e = b
        .accept(write(2, 0, 9, 4096), Some(Epoch(1)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fill this backup's spill file to its limit"),
        "{e}"
    );
    assert!(e.contains("backup buffer limit"), "{e}");
    b.discard();
    assert_eq!(
        &std::fs::read(&img).unwrap()[..4096],
        &[7u8; 4096][..],
        "the commit stays"
    );

    // Epochs far ahead: at most MAX_OPEN_EPOCHS at once.
    let limit = remus_disk::epochs::MAX_OPEN_EPOCHS as u64;
    for e in 0..limit {
        let z = DiskRecord {
            epoch: Epoch(2 + e),
            disk: 0,
            op: DiskOp::Flush,
        };
        b.accept(z, Some(Epoch(1))).unwrap();
    }
    let z = DiskRecord {
        epoch: Epoch(2 + limit),
        disk: 0,
        op: DiskOp::Flush,
    };
    let e = b.accept(z, Some(Epoch(1))).unwrap_err().to_string();
    assert!(
        e.contains("uncommitted epochs are held here already"),
        "{e}"
    );
    let seal = DiskLogDigest::default().seal(Epoch(3 + limit));
    assert!(b.seal(&seal, Some(Epoch(1))).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the mix of writes and zeroings, the memory bound and the
    /// commit point, the disk ends exactly as the model: committed epochs
    /// applied in order, the rest not at all.
    #[test]
    fn matches_the_model(
        ops in prop::collection::vec((1u64..5, 0u64..(SIZE as u64 - 5000), 1usize..5000, any::<u8>(), any::<bool>()), 1..40),
        mem_limit in prop_oneof![Just(0u64), Just(6000u64), Just(1u64 << 30)],
        commit_through in 0u64..5,
    ) {
        let mut s = setup(mem_limit);
        let mut sorted = ops.clone();
        sorted.sort_by_key(|o| o.0); // records arrive in epoch order
        let recs: Vec<DiskRecord> = sorted.iter().map(|&(e, off, len, byte, zero)| {
            if zero {
                DiskRecord { epoch: Epoch(e), disk: 0, op: DiskOp::Zero { offset: off, len: len as u64, trim: byte % 2 == 0, fua: false } }
            } else {
                write(e, off, byte, len)
            }
        }).collect();
        let mut model = vec![0xEEu8; SIZE];
        let mut committed = None;
        let mut next = 0;
        for e in 1..5u64 {
            while next < recs.len() && recs[next].epoch.0 == e {
                s.buf.accept(recs[next].clone(), committed).unwrap();
                next += 1;
            }
            s.buf.seal(&seal_of(&recs, e), committed).unwrap();
            if e <= commit_through {
                s.buf.commit(Epoch(e)).unwrap();
                committed = Some(Epoch(e));
                for r in recs.iter().filter(|r| r.epoch.0 == e) {
                    match &r.op {
                        DiskOp::Write { offset, data, .. } => model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data),
                        DiskOp::Zero { offset, len, .. } => model[*offset as usize..(*offset + *len) as usize].fill(0),
                        DiskOp::Flush => {}
                    }
                }
            }
        }
        s.buf.discard();
        prop_assert!(std::fs::read(&s.img).unwrap() == model);
    }
}

/// The primary sends an epoch's records while the one before it is still
/// committing, so something is always pending: the spill file's space is
/// still given back as epochs commit. Fifty epochs of 32 KiB each, all
/// spilled, through a 64 KiB spill limit (two epochs live at a time): no
/// limit error, every write lands, and the file's blocks stay near the
/// live data.
#[test]
fn spill_space_is_reused_while_later_epochs_are_pending() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; SIZE]).unwrap();
    let disk: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img, false).unwrap());
    let spill = dir.path().join("spill");
    let mut b = EpochBuffer::with_spill_limit(vec![("vda".into(), disk)], 0, &spill, 64 << 10);
    let epoch =
        |e: u64| -> Vec<DiskRecord> { (0..8).map(|i| write(e, i * 4096, e as u8, 4096)).collect() };
    let mut committed = None;
    let mut held = epoch(1);
    for r in &held {
        b.accept(r.clone(), committed).unwrap();
    }
    let mut most_blocks = 0;
    for e in 2..=50u64 {
        let next = epoch(e);
        for r in &next {
            b.accept(r.clone(), committed)
                .unwrap_or_else(|err| panic!("epoch {e}: {err}"));
        }
        b.seal(&seal_of(&held, e - 1), committed).unwrap();
        b.commit(Epoch(e - 1)).unwrap();
        committed = Some(Epoch(e - 1));
        assert_eq!(std::fs::read(&img).unwrap()[0], (e - 1) as u8);
        let blocks = std::fs::metadata(&spill).unwrap().blocks() * 512;
        most_blocks = most_blocks.max(blocks);
        held = next;
    }
    assert!(b.spilled_total() >= 50 * 32 * 1024);
    assert!(
        most_blocks <= 128 << 10,
        "the spill file held {most_blocks} bytes of blocks for 64 KiB of live data"
    );
}
