//! The preload's hooks in a small child process instead of QEMU: this test
//! binary re-runs itself with `LD_PRELOAD` as the child, which maps a tmpfs
//! file through the hooked `mmap` and punches holes through the hooked
//! `fallocate`, while the parent scans it like the agent scans QEMU.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use remus_dirty::{DirtySet, DirtyTracker, PageRange, page_size, preload_env, preload_path};

/// Set in the child's environment: the RAM file to map.
const CHILD_FILE_ENV: &str = "REMUS_DIRTY_TEST_CHILD_FILE";
const PAGES: u64 = 64;

fn built_preload() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "remus-dirty-preload"])
        .args((!cfg!(debug_assertions)).then_some("--release"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .status()
        .expect("run cargo build -p remus-dirty-preload");
    assert!(
        status.success(),
        "`cargo build -p remus-dirty-preload` failed"
    );
    preload_path().expect("libremus_dirty_preload.so not found after building it")
}

/// The child's side: runs only when re-executed by the parent test.
#[test]
fn preload_child_process() {
    let Some(path) = std::env::var_os(CHILD_FILE_ENV) else {
        return;
    };
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let page = page_size() as usize;
    let len = PAGES as usize * page;
    // SAFETY: a fresh shared mapping of our file; goes through the preload.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    } as *mut u8;
    assert_ne!(addr.cast(), libc::MAP_FAILED);
    let punch = |first: u64, count: u64, hooked: bool| {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (offset, len) = ((first * page as u64) as i64, (count * page as u64) as i64);
        // SAFETY: plain file operations on our own fd.
        let rc = unsafe {
            if hooked {
                libc::fallocate(file.as_raw_fd(), mode, offset, len)
            } else {
                libc::syscall(libc::SYS_fallocate, file.as_raw_fd(), mode, offset, len) as i32
            }
        };
        assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    };

    let advise = |advice: &str, first: u64, count: u64, hooked: bool| {
        let advice = match advice {
            "dontneed" => libc::MADV_DONTNEED,
            "remove" => libc::MADV_REMOVE,
            other => panic!("child: unknown advice {other}"),
        };
        // SAFETY: inside our mapping.
        let start = unsafe { addr.add(first as usize * page) }.cast();
        let len = count as usize * page;
        // SAFETY: advice on our own mapping.
        let rc = unsafe {
            if hooked {
                libc::madvise(start, len, advice)
            } else {
                libc::syscall(libc::SYS_madvise, start, len, advice) as i32
            }
        };
        assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
    };

    for line in std::io::stdin().lines() {
        let line = line.expect("stdin");
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["write", first, count] => {
                let (first, count): (usize, usize) =
                    (first.parse().unwrap(), count.parse().unwrap());
                for index in first..first + count {
                    // SAFETY: inside the mapping.
                    unsafe { addr.add(index * page + 1).write_volatile(0x5a) };
                }
            }
            ["punch", first, count] => punch(first.parse().unwrap(), count.parse().unwrap(), true),
            ["punch-unhooked", first, count] => {
                punch(first.parse().unwrap(), count.parse().unwrap(), false)
            }
            ["madvise", advice, first, count] => {
                advise(advice, first.parse().unwrap(), count.parse().unwrap(), true)
            }
            ["madvise-unhooked", advice, first, count] => advise(
                advice,
                first.parse().unwrap(),
                count.parse().unwrap(),
                false,
            ),
            ["exit"] => return,
            _ => panic!("child: bad command {line:?}"),
        }
        println!("CHILD done");
    }
}

struct ChildProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildProcess {
    fn spawn(preload: &Path, file: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .args([
                "--exact",
                "preload_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(preload_env(preload, file))
            .env(CHILD_FILE_ENV, file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        ChildProcess {
            child,
            stdin,
            stdout,
        }
    }

    fn run(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("to child");
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).expect("from child");
            assert!(n > 0, "child exited during {command:?}");
            // libtest may have printed "test <name> ... " on the same line.
            if line.trim_end().ends_with("CHILD done") {
                return;
            }
        }
    }

    /// Tells the child to exit and checks that it did so cleanly.
    fn finish(mut self) {
        writeln!(self.stdin, "exit").expect("to child");
        let status = self.child.wait().expect("wait for child");
        assert!(status.success(), "child failed: {status}");
    }

    /// Runs `write 0 0` to make sure the child has mapped the file.
    fn wait_mapped(&mut self) {
        self.run("write 0 0");
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ranges(set: &DirtySet) -> Vec<PageRange> {
    set.ranges().to_vec()
}

#[test]
fn preload_tracks_a_shared_mapping_and_hole_punches() {
    let preload = built_preload();
    let file = tempfile::Builder::new()
        .prefix("remus-dirty-preload-")
        .tempfile_in("/dev/shm")
        .expect("tmpfs file");
    file.as_file()
        .set_len(PAGES * page_size())
        .expect("set_len");

    let mut child = ChildProcess::spawn(&preload, file.path());
    child.wait_mapped();
    let mut tracker = DirtyTracker::attach(child.child.id(), file.path()).expect("attach");
    tracker
        .verify_tracking()
        .expect("the preload turned tracking on");
    assert!(tracker.scan().expect("scan").is_empty());

    child.run("write 0 8");
    assert_eq!(
        ranges(&tracker.scan().expect("scan")),
        [PageRange::new(0, 8)]
    );

    // A page whose contents the file loses while it is write-protected
    // keeps its write-protect marker and is not reported by the kernel:
    // the reason for the hooks.
    child.run("punch-unhooked 5 1");
    child.run("madvise-unhooked remove 6 1");
    assert!(
        tracker.scan().expect("scan").is_empty(),
        "the kernel reports pages removed from the file after all; the hooks may be unneeded"
    );
    // Through the hooked libc calls, the same operations are reported.
    child.run("punch 2 2");
    assert_eq!(
        ranges(&tracker.scan().expect("scan")),
        [PageRange::new(2, 2)]
    );
    child.run("madvise remove 7 1");
    assert_eq!(
        ranges(&tracker.scan().expect("scan")),
        [PageRange::new(7, 1)]
    );

    // A written page that is unmapped before the scan (MADV_DONTNEED, or
    // reclaim to swap) is still reported: the scan reports every PTE that
    // is not write-protected, empty ones included, then protects it.
    child.run("write 10 2");
    child.run("madvise-unhooked dontneed 10 1");
    assert_eq!(
        ranges(&tracker.scan().expect("scan")),
        [PageRange::new(10, 2)]
    );
    assert!(tracker.scan().expect("scan").is_empty());
    child.run("write 10 1");
    assert_eq!(
        ranges(&tracker.scan().expect("scan")),
        [PageRange::new(10, 1)]
    );
    child.finish();
}
