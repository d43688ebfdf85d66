//! The backup's copy of guest RAM and device state.
//!
//! Pages are written into the replica file only when their checkpoint is
//! complete and verified (or, before the first commit, as initial sync:
//! there is no resumable state yet to spoil). Device state is written to a
//! temporary file and renamed over `NAME.dev.committed` beside the RAM
//! file (remus-vm's `devstate::save_file`), so the committed state is
//! always whole: the pages of epoch N plus the device state of epoch N.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use remus_proto::{Epoch, PAGE_SIZE, PageRun};
use remus_vm::devstate;

use crate::ReplError;

/// The RAM replica and the committed device state of one standby VM.
pub struct Replica {
    file: File,
    /// The file mapped read-only: the base of each compressed page is read
    /// through it, not with a `pread` per page (which cost a system call
    /// and a copy per page on the path to every ack).
    map: memmap2::Mmap,
    path: PathBuf,
    pages: u64,
    dev_committed: PathBuf,
    /// The committed device state: the base of compressed device state.
    dev_state: Vec<u8>,
    committed: Option<Epoch>,
}

impl Replica {
    /// Creates the replica file for `size` bytes of guest RAM (and
    /// forgets device state an earlier standby of the name committed).
    pub fn create(path: &Path, size: u64) -> Result<Replica, ReplError> {
        let io = |op: &str| {
            let what = format!("{op} {}", path.display());
            move |e: std::io::Error| ReplError::Io(what, e)
        };
        // A new file, readable by this user only: never one someone else
        // created (the caller removes a leftover of its own first), and no
        // page of an earlier guest can survive where the primary sends
        // nothing (its holes are zero).
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io("create RAM replica"))?;
        file.set_len(size).map_err(io("size RAM replica"))?;
        let map = map_replica(&file, path)?;
        let dev_committed = devstate::save_file(path, devstate::COMMITTED);
        for f in [
            &dev_committed,
            &devstate::save_file(path, devstate::COMMITTED_NEXT),
        ] {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(ReplError::Io(format!("remove {}", f.display()), e));
                }
                _ => {}
            }
        }
        Ok(Replica {
            file,
            map,
            path: path.to_path_buf(),
            pages: size / PAGE_SIZE as u64,
            dev_committed,
            dev_state: Vec::new(),
            committed: None,
        })
    }

    /// Opens the replica a standby kept across a restart of its agent:
    /// the RAM file of `size` bytes and the committed device state beside
    /// it, which hold `epoch`. Earlier agents kept that state in the VM's
    /// directory `vm_dir` (`dev.committed`): read from there, it is moved
    /// beside the RAM file.
    pub fn reopen(
        path: &Path,
        size: u64,
        vm_dir: &Path,
        epoch: Epoch,
    ) -> Result<Replica, ReplError> {
        let io = |op: &str, p: &Path| {
            let what = format!("{op} {}", p.display());
            move |e: std::io::Error| ReplError::Io(what, e)
        };
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io("open RAM replica", path))?;
        let len = file.metadata().map_err(io("stat RAM replica", path))?.len();
        if len != size {
            return Err(ReplError::Setup(format!(
                "RAM replica {} holds {len} bytes, the VM has {size}",
                path.display()
            )));
        }
        let map = map_replica(&file, path)?;
        let dev_committed = devstate::save_file(path, devstate::COMMITTED);
        let legacy = vm_dir.join("dev.committed");
        let from = if dev_committed.exists() {
            &dev_committed
        } else {
            &legacy
        };
        let dev_state = read_device_state(from)?;
        if from == &legacy {
            write_then_rename(path, &dev_state)?;
            std::fs::remove_file(&legacy).map_err(io("remove", &legacy))?;
            tracing::info!(from = %legacy.display(), to = %dev_committed.display(), "moved a kept standby's committed device state beside its RAM file");
        }
        Ok(Replica {
            file,
            map,
            path: path.to_path_buf(),
            pages: size / PAGE_SIZE as u64,
            dev_committed,
            dev_state,
            committed: Some(epoch),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Guest pages in the replica.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// The last committed epoch, if any.
    pub fn committed(&self) -> Option<Epoch> {
        self.committed
    }

    /// The committed device state file (valid once an epoch committed).
    pub fn device_state_path(&self) -> &Path {
        &self.dev_committed
    }

    /// The committed device state (empty before the first commit).
    pub fn device_state(&self) -> &[u8] {
        &self.dev_state
    }

    /// Reads the replica's copy of `page` (the base of a compressed page).
    /// A primary sends a page as a delta only after it sent it whole, so
    /// only written pages are read. A peer that marks a never-sent page
    /// makes this read fault a hole of the file in (tmpfs allocates it):
    /// at most the guest RAM the standby holds anyway.
    pub fn read_page(&self, page: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(page)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .filter(|_| page < self.pages && buf.len() == PAGE_SIZE);
        match start.and_then(|s| self.map.get(s..s + PAGE_SIZE)) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(std::io::Error::other(format!(
                "page {page} is outside guest RAM ({} pages)",
                self.pages
            ))),
        }
    }

    /// Writes one run of pages. Bounds were checked by the assembler; they
    /// are checked again here because a wrong write corrupts the standby.
    pub fn write_run(&self, run: &PageRun) -> Result<(), ReplError> {
        let count = run.data.len() as u64 / PAGE_SIZE as u64;
        if run
            .first_page
            .checked_add(count)
            .is_none_or(|end| end > self.pages)
        {
            return Err(ReplError::Protocol(format!(
                "page run {}+{count} is outside guest RAM ({} pages)",
                run.first_page, self.pages
            )));
        }
        self.file
            .write_all_at(&run.data, run.first_page * PAGE_SIZE as u64)
            .map_err(|e| ReplError::Io(format!("write RAM replica {}", self.path.display()), e))
    }

    /// Commits a complete checkpoint: its pages, then its device state
    /// (atomically replacing the previous one).
    pub fn commit(
        &mut self,
        epoch: Epoch,
        runs: &[PageRun],
        device_state: &[u8],
    ) -> Result<(), ReplError> {
        for r in runs {
            self.write_run(r)?;
        }
        write_then_rename(&self.path, device_state)?;
        self.dev_state.clear();
        self.dev_state.extend_from_slice(device_state);
        self.committed = Some(epoch);
        Ok(())
    }
}

/// Maps the replica file read-only.
fn map_replica(file: &File, path: &Path) -> Result<memmap2::Mmap, ReplError> {
    // SAFETY: a read-only mapping of a 0600 file in the agent's private
    // (0700) RAM directory, created or opened by this agent at its full
    // size; this agent writes it (with `pwrite`, which the mapping sees)
    // and the standby QEMU maps it, and neither truncates it while the
    // replica lives.
    unsafe { memmap2::Mmap::map(file) }
        .map_err(|e| ReplError::Io(format!("map RAM replica {}", path.display()), e))
}

/// Reads committed device state, no more than a device state may hold.
fn read_device_state(path: &Path) -> Result<Vec<u8>, ReplError> {
    let io = |op: &str| {
        let what = format!("{op} {}", path.display());
        move |e: std::io::Error| ReplError::Io(what, e)
    };
    let len = std::fs::metadata(path).map_err(io("stat"))?.len();
    if len > remus_proto::MAX_DEVICE_STATE {
        return Err(ReplError::Setup(format!(
            "{} holds {len} bytes, more than a device state may",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io("read"))
}

/// Replaces the committed device state beside the RAM file `ram` with
/// `state` whole: written to [`devstate::COMMITTED_NEXT`] first, then
/// renamed over [`devstate::COMMITTED`], so a crash leaves the old state
/// or the new one, never part of either.
fn write_then_rename(ram: &Path, state: &[u8]) -> Result<(), ReplError> {
    let committed = devstate::save_file(ram, devstate::COMMITTED);
    let next = devstate::save_file(ram, devstate::COMMITTED_NEXT);
    std::fs::write(&next, state)
        .map_err(|e| ReplError::Io(format!("write {}", next.display()), e))?;
    std::fs::rename(&next, &committed)
        .map_err(|e| ReplError::Io(format!("commit {}", committed.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 16 * PAGE_SIZE as u64;

    fn page_run(first_page: u64, byte: u8) -> PageRun {
        PageRun {
            first_page,
            data: vec![byte; PAGE_SIZE],
        }
    }

    #[test]
    fn commits_keep_the_device_state_whole_beside_the_ram_file() {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("web.ram");
        // A committed state of an earlier standby of the name is forgotten.
        std::fs::write(dir.path().join("web.dev.committed"), b"old").unwrap();
        let mut r = Replica::create(&ram, RAM).unwrap();
        assert!(!dir.path().join("web.dev.committed").exists());
        assert_eq!(r.committed(), None);
        r.commit(Epoch(1), &[page_run(3, 7)], b"state one").unwrap();
        r.commit(Epoch(2), &[], b"state two").unwrap();
        assert_eq!(r.device_state_path(), dir.path().join("web.dev.committed"));
        assert_eq!(std::fs::read(r.device_state_path()).unwrap(), b"state two");
        assert_eq!(r.device_state(), b"state two");
        assert!(!dir.path().join("web.dev.committed.next").exists());
        let mut page = vec![0; PAGE_SIZE];
        r.read_page(3, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 7));
        // A run outside guest RAM is refused, not written.
        assert!(r.commit(Epoch(3), &[page_run(16, 1)], b"x").is_err());
        assert_eq!(r.committed(), Some(Epoch(2)));
    }

    #[test]
    fn a_kept_standby_reopens_from_beside_its_ram_file_or_moves_an_earlier_agents_state() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let ram = dir.path().join("web.ram");
        let mut r = Replica::create(&ram, RAM).unwrap();
        r.commit(Epoch(5), &[], b"current").unwrap();
        drop(r);
        // Beside the RAM file wins over a leftover in the VM directory.
        std::fs::write(vm_dir.join("dev.committed"), b"legacy").unwrap();
        let r = Replica::reopen(&ram, RAM, &vm_dir, Epoch(5)).unwrap();
        assert_eq!(r.device_state(), b"current");
        assert_eq!(r.committed(), Some(Epoch(5)));
        drop(r);
        // Only in the VM directory (an earlier agent's): read and moved.
        std::fs::remove_file(dir.path().join("web.dev.committed")).unwrap();
        let r = Replica::reopen(&ram, RAM, &vm_dir, Epoch(5)).unwrap();
        assert_eq!(r.device_state(), b"legacy");
        assert!(!vm_dir.join("dev.committed").exists());
        assert_eq!(
            std::fs::read(dir.path().join("web.dev.committed")).unwrap(),
            b"legacy"
        );
        drop(r);
        // Neither: a clear error naming the file looked for.
        std::fs::remove_file(dir.path().join("web.dev.committed")).unwrap();
        let e = Replica::reopen(&ram, RAM, &vm_dir, Epoch(5)).err().unwrap();
        assert!(e.to_string().contains("dev.committed"), "{e}");
        // Too large to be a device state: refused before it is read.
        let big = std::fs::File::create(dir.path().join("web.dev.committed")).unwrap();
        big.set_len(remus_proto::MAX_DEVICE_STATE + 1).unwrap();
        let e = Replica::reopen(&ram, RAM, &vm_dir, Epoch(5)).err().unwrap();
        assert!(e.to_string().contains("more than a device state"), "{e}");
        // A RAM file of another size is not this VM's.
        let e = Replica::reopen(&ram, RAM * 2, &vm_dir, Epoch(5))
            .err()
            .unwrap();
        assert!(e.to_string().contains("holds"), "{e}");
    }
}
