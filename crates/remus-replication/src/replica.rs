//! The backup's copy of guest RAM and device state.
//!
//! Pages are written into the replica file only when their checkpoint is
//! complete and verified (or, before the first commit, as initial sync:
//! there is no resumable state yet to spoil). Device state is written to a
//! temporary file and renamed over `dev.committed`, so the committed state
//! is always whole: the pages of epoch N plus the device state of epoch N.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use remus_proto::{Epoch, PAGE_SIZE, PageRun};

use crate::ReplError;

/// The RAM replica and the committed device state of one standby VM.
pub struct Replica {
    file: File,
    path: PathBuf,
    pages: u64,
    dev_committed: PathBuf,
    /// The committed device state: the base of compressed device state.
    dev_state: Vec<u8>,
    committed: Option<Epoch>,
}

impl Replica {
    /// Creates (or resizes) the replica file for `size` bytes of guest RAM.
    pub fn create(path: &Path, size: u64, dev_dir: &Path) -> Result<Replica, ReplError> {
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
        Ok(Replica {
            file,
            path: path.to_path_buf(),
            pages: size / PAGE_SIZE as u64,
            dev_committed: dev_dir.join("dev.committed"),
            dev_state: Vec::new(),
            committed: None,
        })
    }

    /// Opens the replica a standby kept across a restart of its agent:
    /// the RAM file of `size` bytes and the committed device state in
    /// `dev_dir`, which hold `epoch`.
    pub fn reopen(
        path: &Path,
        size: u64,
        dev_dir: &Path,
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
        let dev_committed = dev_dir.join("dev.committed");
        let dev_len = std::fs::metadata(&dev_committed)
            .map_err(io("stat", &dev_committed))?
            .len();
        if dev_len > remus_proto::MAX_DEVICE_STATE {
            return Err(ReplError::Setup(format!(
                "{} holds {dev_len} bytes, more than a device state may",
                dev_committed.display()
            )));
        }
        let dev_state = std::fs::read(&dev_committed).map_err(io("read", &dev_committed))?;
        Ok(Replica {
            file,
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
    pub fn read_page(&self, page: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if page >= self.pages || buf.len() != PAGE_SIZE {
            return Err(std::io::Error::other(format!(
                "page {page} is outside guest RAM ({} pages)",
                self.pages
            )));
        }
        self.file.read_exact_at(buf, page * PAGE_SIZE as u64)
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
        let tmp = self.dev_committed.with_extension("tmp");
        std::fs::write(&tmp, device_state)
            .map_err(|e| ReplError::Io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &self.dev_committed)
            .map_err(|e| ReplError::Io(format!("commit {}", self.dev_committed.display()), e))?;
        self.dev_state.clear();
        self.dev_state.extend_from_slice(device_state);
        self.committed = Some(epoch);
        Ok(())
    }
}
