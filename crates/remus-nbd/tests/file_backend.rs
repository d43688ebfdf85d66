//! `FileBackend` on a real file: open errors, positional I/O, and that trim
//! and write-zeroes really zero (and, where asked, deallocate) the range.

use std::os::unix::fs::MetadataExt;

use remus_nbd::{BlockBackend, FileBackend, NbdError};

const MIB: usize = 1024 * 1024;

fn image(dir: &tempfile::TempDir, size: usize, fill: u8) -> std::path::PathBuf {
    let p = dir.path().join("img.raw");
    std::fs::write(&p, vec![fill; size]).unwrap();
    p
}

fn allocated_bytes(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn open_errors_name_the_path_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.raw");
    let err = FileBackend::open(&missing, false).unwrap_err();
    assert!(matches!(err, NbdError::Open { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("missing.raw") && msg.contains("read-write"),
        "{msg}"
    );

    let err = FileBackend::open(dir.path(), true).unwrap_err();
    assert!(matches!(err, NbdError::NotExportable { .. }), "{err}");
}

#[test]
fn size_and_positional_io() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 3 * MIB + 5, 0x11);
    let b = FileBackend::open(&p, false).unwrap();
    assert_eq!(b.size(), (3 * MIB + 5) as u64);
    assert!(!b.read_only());
    b.write_at(b"hello", 1000, false).unwrap();
    b.write_at(b"world", 3 * MIB as u64, true).unwrap();
    b.flush().unwrap();
    let mut buf = [0u8; 7];
    b.read_at(&mut buf, 999).unwrap();
    assert_eq!(&buf, b"\x11hello\x11");
    let disk = std::fs::read(&p).unwrap();
    assert_eq!(&disk[3 * MIB..3 * MIB + 5], b"world");
    assert_eq!(disk.len(), 3 * MIB + 5);
    // Reading past the end is an error, not a short read.
    let mut big = vec![0u8; 10];
    assert!(b.read_at(&mut big, (3 * MIB) as u64).is_err());
}

#[test]
fn read_only_backend_refuses_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, MIB, 0x22);
    let b = FileBackend::open(&p, true).unwrap();
    assert!(b.read_only());
    assert!(b.write_at(b"x", 0, false).is_err());
    assert!(b.trim(0, 4096).is_err());
    assert!(b.write_zeroes(0, 4096, true, false).is_err());
    b.flush().unwrap();
    let mut buf = [0u8; 4];
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x22; 4]);
    assert!(std::fs::read(&p).unwrap().iter().all(|&x| x == 0x22));
}

#[test]
fn trim_punches_a_hole_and_keeps_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 4 * MIB, 0x33);
    let b = FileBackend::open(&p, false).unwrap();
    b.flush().unwrap();
    let before = allocated_bytes(&p);
    assert!(before >= 4 * MIB as u64, "image starts fully allocated");
    b.trim(MIB as u64, 2 * MIB as u64).unwrap();
    let after = allocated_bytes(&p);
    assert!(
        after <= before - 2 * MIB as u64,
        "2 MiB deallocated: {before} -> {after}"
    );
    let disk = std::fs::read(&p).unwrap();
    assert_eq!(disk.len(), 4 * MIB);
    assert!(disk[..MIB].iter().all(|&x| x == 0x33));
    assert!(disk[MIB..3 * MIB].iter().all(|&x| x == 0));
    assert!(disk[3 * MIB..].iter().all(|&x| x == 0x33));
    b.trim(0, 0).unwrap();
}

#[test]
fn write_zeroes_zeroes_exactly_the_range_with_and_without_trim() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 4 * MIB, 0x44);
    let b = FileBackend::open(&p, false).unwrap();
    // Unaligned ranges, both modes, plus FUA.
    b.write_zeroes(1000, 5000, false, false).unwrap();
    b.write_zeroes(MIB as u64 + 7, MIB as u64 + 3, true, true)
        .unwrap();
    b.write_zeroes(100, 0, true, false).unwrap();
    let disk = std::fs::read(&p).unwrap();
    assert_eq!(disk.len(), 4 * MIB);
    for (i, &x) in disk.iter().enumerate() {
        let zero = (1000..6000).contains(&i) || (MIB + 7..2 * MIB + 10).contains(&i);
        assert_eq!(x, if zero { 0 } else { 0x44 }, "byte {i}");
    }
}

#[test]
fn write_zeroes_with_trim_deallocates() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 4 * MIB, 0x55);
    let b = FileBackend::open(&p, false).unwrap();
    b.flush().unwrap();
    let before = allocated_bytes(&p);
    b.write_zeroes(0, 2 * MIB as u64, true, false).unwrap();
    assert!(allocated_bytes(&p) <= before - 2 * MIB as u64);
}
