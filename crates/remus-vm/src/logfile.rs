//! Log files that never grow without end.
//!
//! A guest decides how much it prints on its console, and a QEMU in
//! trouble can print a register dump per second: neither may fill the
//! host's disk. A [`CappedLog`] rotates as libvirt's virtlogd does, with
//! the same defaults: at [`MAX_SIZE`] the file becomes `NAME.1` (older
//! ones move up to `NAME.`[`BACKUPS`], the oldest is dropped) and a new
//! file starts. So a VM's console keeps at most 8 MiB of its latest output.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Size at which a log file is rotated (virtlogd's `max_size`).
pub const MAX_SIZE: u64 = 2 * 1024 * 1024;
/// Rotated files kept besides the current one (virtlogd's `max_backups`).
pub const BACKUPS: u32 = 3;

/// An append-only log file with a size cap and numbered backups.
pub struct CappedLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    backups: u32,
}

impl CappedLog {
    /// Opens `path` for appending (created 0600 if missing), with
    /// [`MAX_SIZE`] and [`BACKUPS`].
    pub fn open(path: &Path) -> std::io::Result<CappedLog> {
        Self::with_limits(path, MAX_SIZE, BACKUPS)
    }

    pub fn with_limits(path: &Path, max_size: u64, backups: u32) -> std::io::Result<CappedLog> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(CappedLog {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(1),
            backups,
        })
    }

    /// Appends `bytes`, rotating first when they would take the file past
    /// its cap. A single write larger than the cap is cut to the cap (its
    /// end is kept): a log holds the latest output, never more.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let bytes = if bytes.len() as u64 > self.max_size {
            &bytes[bytes.len() - self.max_size as usize..]
        } else {
            bytes
        };
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.backups == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..self.backups).rev() {
            let from = backup_path(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, backup_path(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, backup_path(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// The cap for a log another process writes to (QEMU's own output, which
/// goes straight to its file so that it outlives the agent): past
/// `max_size`, its content is copied into `NAME.1` (older backups move up,
/// the oldest is dropped) and the file is truncated in place, as
/// logrotate's `copytruncate` does; the writer's append-mode descriptor
/// goes on at the new end. Returns whether it rotated. Output the writer
/// adds between the copy and the truncation is lost.
pub fn cap_in_place(path: &Path, max_size: u64, backups: u32) -> std::io::Result<bool> {
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= max_size {
        return Ok(false);
    }
    if backups > 0 {
        for n in (1..backups).rev() {
            let from = backup_path(path, n);
            if from.exists() {
                std::fs::rename(&from, backup_path(path, n + 1))?;
            }
        }
        let mut from = File::open(path)?;
        let mut to = std::fs::File::create(backup_path(path, 1))?;
        // Only the last `max_size` bytes: a backup never exceeds the cap.
        use std::io::{Seek, SeekFrom};
        from.seek(SeekFrom::Start(size - max_size))?;
        std::io::copy(&mut std::io::Read::take(&mut from, max_size), &mut to)?;
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// Opens `path` for appending, created 0600 if missing.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// `NAME.N`, the Nth backup of `path`.
pub fn backup_path(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Everything a capped log still holds, oldest first (its backups, then
/// the current file); missing files are skipped.
pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for n in (1..=BACKUPS).rev() {
        match std::fs::read(backup_path(path, n)) {
            Ok(b) => out.extend(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::read(path) {
        Ok(b) => out.extend(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// A log file and its backups, for moving or removing them together.
pub fn with_backups(path: &Path) -> Vec<PathBuf> {
    std::iter::once(path.to_path_buf())
        .chain((1..=BACKUPS).map(|n| backup_path(path, n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_cap_and_keeps_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut log = CappedLog::with_limits(&p, 100, 2).unwrap();
        for i in 0..50u8 {
            log.write(&[b'a' + (i % 26); 10]).unwrap();
        }
        // 500 bytes written: the current file and two backups hold the
        // last 300, nothing more exists.
        let total: u64 = with_backups(&p)
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        assert_eq!(total, 300);
        assert!(!backup_path(&p, 3).exists());
        let all = read_all(&p).unwrap();
        assert_eq!(all.len(), 300);
        // The newest bytes are last.
        assert_eq!(all[all.len() - 10..], [b'a' + (49 % 26); 10]);
        assert_eq!(all[..10], [b'a' + 20; 10]); // write 20 of 50
    }

    #[test]
    fn one_huge_write_is_cut_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qemu.log");
        let mut log = CappedLog::with_limits(&p, 64, 1).unwrap();
        let big: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        log.write(&big).unwrap();
        let kept = std::fs::read(&p).unwrap();
        assert_eq!(kept, big[1000 - 64..]);
    }

    #[test]
    fn reopening_continues_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        CappedLog::with_limits(&p, 50, 1)
            .unwrap()
            .write(&[1; 40])
            .unwrap();
        let mut again = CappedLog::with_limits(&p, 50, 1).unwrap();
        again.write(&[2; 20]).unwrap();
        assert_eq!(std::fs::read(backup_path(&p, 1)).unwrap(), vec![1; 40]);
        assert_eq!(std::fs::read(&p).unwrap(), vec![2; 20]);
    }

    #[test]
    fn a_log_another_process_appends_to_is_capped_in_place() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qemu.log");
        // The writer's own append-mode descriptor, as QEMU holds it.
        let mut w = open_append(&p).unwrap();
        w.write_all(&[1; 40]).unwrap();
        assert!(!cap_in_place(&p, 100, 2).unwrap());
        w.write_all(&[2; 100]).unwrap();
        assert!(cap_in_place(&p, 100, 2).unwrap());
        // The backup holds the last 100 bytes; the file starts again.
        let b1 = std::fs::read(backup_path(&p, 1)).unwrap();
        assert_eq!(b1.len(), 100);
        assert_eq!(b1, vec![2; 100]);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        // The writer goes on at the new end, not at its old offset.
        w.write_all(b"after").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"after");
        w.write_all(&[3; 200]).unwrap();
        assert!(cap_in_place(&p, 100, 2).unwrap());
        assert_eq!(std::fs::read(backup_path(&p, 2)).unwrap(), b1);
        assert!(!cap_in_place(&dir.path().join("missing.log"), 100, 2).unwrap());
    }
}
