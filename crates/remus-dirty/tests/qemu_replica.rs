//! Dirty tracking against a real QEMU 10 (TCG) booting the remus guest.
//!
//! The story: QEMU started with the preload is verified as tracked; a
//! replica built from one full copy of the RAM file plus only the pages each
//! 100 ms scan reports is byte-identical to the RAM file once the guest is
//! stopped. QEMU started without the preload is refused with a clear error.
//!
//! Needs `qemu-system-x86_64` and the guest image in
//! `<workspace>/target/guest-image` (built by `remus-image`). One guest at a
//! time: both cases run in one test, in sequence.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remus_dirty::{DirtyError, DirtyTracker, RamFile, preload_env, preload_path};

const RAM_MIB: u64 = 128;
const EPOCHS: usize = 20;
const EPOCH: Duration = Duration::from_millis(100);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the preload (a cdylib cannot be a dependency, so cargo does not
/// build it for this test) and returns its path.
fn built_preload() -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "-p", "remus-dirty-preload"])
        .current_dir(workspace_root());
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build
        .status()
        .expect("run cargo build -p remus-dirty-preload");
    assert!(
        status.success(),
        "`cargo build -p remus-dirty-preload` failed; the QEMU test needs the preload library"
    );
    preload_path().expect("libremus_dirty_preload.so not found after building it")
}

/// A QEMU child with its own RAM file; killed (by PID) and cleaned up on drop.
struct Qemu {
    child: Child,
    ram_file: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    fn start(name: &str, preload: Option<&Path>) -> Qemu {
        let image = workspace_root().join("target/guest-image");
        assert!(
            image.join("vmlinuz").is_file() && image.join("initrd.img").is_file(),
            "guest image missing in {}: build it with remus-image",
            image.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let ram_file = PathBuf::from(format!(
            "/dev/shm/remus-dirty-test-{}-{name}.ram",
            std::process::id()
        ));
        let _ = fs::remove_file(&ram_file);
        let log = dir.path().join("qemu.log");
        let stdout = fs::File::create(&log).expect("create qemu.log");
        let stderr = stdout.try_clone().expect("clone qemu.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", &format!("{RAM_MIB}")])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=ram0,size={RAM_MIB}M,mem-path={},share=on",
                ram_file.display()
            ))
            .args(["-machine", "q35,memory-backend=ram0"])
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            .args(["-append", "console=ttyS0 quiet remus.workload=tick"])
            .arg("-serial")
            .arg(format!("file:{}", dir.path().join("console.log").display()))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some(preload) = preload {
            cmd.envs(preload_env(preload, &ram_file));
        }
        let child = cmd.spawn().expect("spawn qemu-system-x86_64");
        Qemu {
            child,
            ram_file,
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until QEMU has mapped its RAM file, then attaches.
    fn attach(&mut self) -> DirtyTracker {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("QEMU exited early ({status}); log:\n{}", self.log());
            }
            match DirtyTracker::attach(self.pid(), &self.ram_file) {
                Ok(tracker) => return tracker,
                Err(DirtyError::NotMapped { .. } | DirtyError::RamFile { .. })
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("attach: {e}; log:\n{}", self.log()),
            }
        }
    }

    /// SIGSTOPs QEMU and waits until every thread is stopped, so that no
    /// vCPU writes guest RAM any more.
    fn freeze(&self) {
        let pid = self.pid();
        // SAFETY: signalling our own child by PID.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            assert!(Instant::now() < deadline, "QEMU did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(state == 'T' || state == 't')
            })
            .unwrap_or(false)
    })
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.ram_file);
    }
}

fn copy_range(ram: &RamFile, range: remus_dirty::PageRange, replica: &mut [u8]) {
    let offset = range.file_offset(ram.page_size()) as usize;
    let len = ram.range_len(range);
    ram.read_pages(range, &mut replica[offset..offset + len])
        .expect("read RAM file");
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[test]
fn replica_from_scanned_pages_matches_qemu_ram_and_untracked_qemu_is_refused() {
    let preload = built_preload();

    // Without the preload: refused, with the reason spelled out.
    {
        let mut qemu = Qemu::start("untracked", None);
        let mut tracker = qemu.attach();
        let err = tracker
            .verify_tracking()
            .expect_err("untracked QEMU must be refused");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "dirty tracking is not active in QEMU pid {}",
                qemu.pid()
            )),
            "{text}"
        );
        eprintln!("untracked QEMU refused: {text}");
    }

    // With the preload: scanned pages rebuild RAM exactly.
    let mut qemu = Qemu::start("tracked", Some(&preload));
    let mut tracker = qemu.attach();
    tracker
        .verify_tracking()
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", qemu.log()));
    assert!(
        qemu.log()
            .contains("remus-dirty-preload: tracking writes to"),
        "{}",
        qemu.log()
    );

    let ram = RamFile::open(&qemu.ram_file).expect("open RAM file");
    assert_eq!(ram.len(), RAM_MIB << 20);
    let mut replica = vec![0u8; ram.len() as usize];

    // Let the guest boot for a while so the full copy has data to copy.
    std::thread::sleep(Duration::from_secs(1));
    // Reset the written bits first so the first epoch's delta is small; the
    // full copy below covers everything written before.
    let started = Instant::now();
    let startup = tracker.scan().expect("first scan");
    let startup_time = started.elapsed();
    let mut full_copy_pages = 0;
    for range in ram.data_ranges() {
        let range = range.expect("SEEK_DATA");
        full_copy_pages += range.count;
        copy_range(&ram, range, &mut replica);
    }

    let mut scan_times = Vec::new();
    let mut epoch_pages = Vec::new();
    for _ in 0..EPOCHS {
        std::thread::sleep(EPOCH);
        let started = Instant::now();
        let dirty = tracker.scan().expect("scan");
        scan_times.push(started.elapsed());
        epoch_pages.push(dirty.page_count());
        for range in &dirty {
            copy_range(&ram, *range, &mut replica);
        }
    }

    qemu.freeze();
    let last = tracker.scan().expect("final scan");
    for range in &last {
        copy_range(&ram, *range, &mut replica);
    }
    let started = Instant::now();
    let idle = tracker.scan().expect("idle scan");
    let idle_time = started.elapsed();
    assert!(
        idle.is_empty(),
        "stopped QEMU wrote {} pages",
        idle.page_count()
    );

    eprintln!(
        "startup scan {startup_time:?} ({} pages); full copy {full_copy_pages} pages; \
         epoch scans median {:?} max {:?}; pages per epoch {epoch_pages:?}; final delta {} pages; \
         idle scan {idle_time:?}",
        startup.page_count(),
        median(scan_times.clone()),
        scan_times.iter().max().expect("epochs"),
        last.page_count(),
    );
    assert!(
        epoch_pages.iter().sum::<u64>() > 0,
        "the guest wrote nothing in {EPOCHS} epochs; is it running? log:\n{}",
        qemu.log()
    );

    let actual = fs::read(&qemu.ram_file).expect("read RAM file");
    let page = ram.page_size() as usize;
    let differing: Vec<usize> = actual
        .chunks(page)
        .zip(replica.chunks(page))
        .enumerate()
        .filter(|(_, (a, r))| a != r)
        .map(|(index, _)| index)
        .collect();
    assert!(
        differing.is_empty(),
        "{} pages differ between replica and RAM file, first {:?}",
        differing.len(),
        &differing[..differing.len().min(10)]
    );
}
