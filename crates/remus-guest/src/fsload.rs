//! `fsload DEVICE [--dir /mnt]`: filesystem metadata and data churn on an
//! ext4 filesystem, for failover tests (afterwards the host runs `e2fsck`).
//!
//! Mounts DEVICE (ext4, made by the host) at DIR (created if missing) and
//! works in `DIR/fsload/` (emptied at start). Each step i writes a file
//! `t<i>` of 4–64 KiB whose content derives from i (every 4th one is
//! fsynced), renames it to `f<i>`, and once more than [`KEEP_FILES`] files
//! exist reads back the oldest one (it must still hold its content) and
//! deletes it. Every 16th step makes a directory `d<i>` with a small file in
//! it, removing the oldest such directory beyond [`KEEP_DIRS`]; every 64th
//! step fsyncs the working directory.
//!
//! Console lines (stdout):
//! * `fsload: mounted DEVICE` (or `fsload: mount failed: ...`, then exit 1);
//! * `fsload: ops K` about once a second, K = filesystem operations so far;
//! * `fsload: error: ...` if an operation fails or a file read back differs
//!   (the churn stops; the stop trigger still works).
//!
//! Stop: when [`STOP_TRIGGER`] exists, it is removed, the churn stops, the
//! program runs `sync`, unmounts DIR and prints `fsload: unmounted` (exit 0,
//! or 1 after an error) or `fsload: umount failed: ...` (exit 1).

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file whose existence makes fsload sync, unmount and exit.
pub const STOP_TRIGGER: &str = "/run/fsload.stop";
/// Files kept; older ones are deleted.
pub const KEEP_FILES: usize = 300;
/// Directories kept; older ones are removed.
pub const KEEP_DIRS: usize = 4;

pub fn run(args: &[String]) -> Result<(), String> {
    let mut dir = "/mnt".to_string();
    let pos = crate::options::parse(args, &mut [], &mut [("--dir", &mut dir)])?;
    let [device] = pos.as_slice() else {
        return Err("usage: fsload DEVICE [--dir /mnt]".into());
    };
    let mnt = Path::new(&dir);
    if let Err(e) = fs::create_dir_all(mnt).and_then(|()| mount(device, mnt, "ext4")) {
        say(&format!("fsload: mount failed: {device} on {dir}: {e}"));
        return Err(format!("mount {device} on {dir}: {e}"));
    }
    say(&format!("fsload: mounted {device}"));

    let stop = Path::new(STOP_TRIGGER);
    let mut churn = Churn::new(mnt.join("fsload"), KEEP_FILES);
    let mut failed = false;
    if let Err(e) = churn.prepare() {
        say(&format!("fsload: error: {e}"));
        failed = true;
    }
    let mut report_at = Instant::now() + Duration::from_secs(1);
    loop {
        if stop.exists() {
            break;
        }
        if failed {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if let Err(e) = churn.step() {
            say(&format!("fsload: error: {e}"));
            failed = true;
            continue;
        }
        let now = Instant::now();
        if now >= report_at {
            say(&format!("fsload: ops {}", churn.ops));
            report_at = now + Duration::from_secs(1);
        }
    }
    let _ = fs::remove_file(stop);
    drop(churn);
    // SAFETY: plain syscall without arguments.
    unsafe { libc::sync() };
    if let Err(e) = umount(mnt) {
        say(&format!("fsload: umount failed: {dir}: {e}"));
        std::process::exit(1);
    }
    say("fsload: unmounted");
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn cstr(s: &str) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

fn mount(device: &str, dir: &Path, fstype: &str) -> std::io::Result<()> {
    let (src, target, ty) = (cstr(device)?, cstr(&dir.to_string_lossy())?, cstr(fstype)?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            ty.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn umount(dir: &Path) -> std::io::Result<()> {
    let target = cstr(&dir.to_string_lossy())?;
    // SAFETY: valid NUL-terminated string.
    if unsafe { libc::umount(target.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The content of file `f<i>`: 4 KiB to 64 KiB (whole KiB) derived from i.
pub fn content(i: u64) -> Vec<u8> {
    let len = 4096 + (mix(i) % 61) as usize * 1024;
    let mut out = Vec::with_capacity(len);
    let mut state = i;
    while out.len() < len {
        state = mix(state);
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The churn in one working directory.
struct Churn {
    dir: PathBuf,
    keep: usize,
    next: u64,
    files: VecDeque<u64>,
    dirs: VecDeque<u64>,
    /// Filesystem operations done (write, fsync, rename, read, unlink,
    /// mkdir, rmdir).
    ops: u64,
}

fn err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> String {
    let p = path.display().to_string();
    let w = what.to_string();
    move |e| format!("{w} {p}: {e}")
}

impl Churn {
    fn new(dir: PathBuf, keep: usize) -> Churn {
        Churn {
            dir,
            keep,
            next: 1,
            files: VecDeque::new(),
            dirs: VecDeque::new(),
            ops: 0,
        }
    }

    /// Empties (or creates) the working directory.
    fn prepare(&mut self) -> Result<(), String> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("remove", &self.dir)(e)),
        }
        fs::create_dir(&self.dir).map_err(err("mkdir", &self.dir))
    }

    fn step(&mut self) -> Result<(), String> {
        let i = self.next;
        self.next += 1;
        let tmp = self.dir.join(format!("t{i}"));
        let fin = self.dir.join(format!("f{i}"));
        let mut f = File::create(&tmp).map_err(err("create", &tmp))?;
        f.write_all(&content(i)).map_err(err("write", &tmp))?;
        self.ops += 1;
        if i.is_multiple_of(4) {
            f.sync_all().map_err(err("fsync", &tmp))?;
            self.ops += 1;
        }
        drop(f);
        fs::rename(&tmp, &fin).map_err(err("rename", &tmp))?;
        self.ops += 1;
        self.files.push_back(i);
        while self.files.len() > self.keep {
            let j = self.files.pop_front().expect("non-empty");
            let old = self.dir.join(format!("f{j}"));
            let got = fs::read(&old).map_err(err("read", &old))?;
            self.ops += 1;
            if got != content(j) {
                return Err(format!(
                    "{} does not hold what was written ({} bytes read)",
                    old.display(),
                    got.len()
                ));
            }
            fs::remove_file(&old).map_err(err("unlink", &old))?;
            self.ops += 1;
        }
        if i.is_multiple_of(16) {
            let d = self.dir.join(format!("d{i}"));
            fs::create_dir(&d).map_err(err("mkdir", &d))?;
            let x = d.join("x");
            fs::write(&x, i.to_le_bytes()).map_err(err("write", &x))?;
            self.ops += 2;
            self.dirs.push_back(i);
            while self.dirs.len() > KEEP_DIRS {
                let j = self.dirs.pop_front().expect("non-empty");
                let d = self.dir.join(format!("d{j}"));
                let x = d.join("x");
                fs::remove_file(&x).map_err(err("unlink", &x))?;
                fs::remove_dir(&d).map_err(err("rmdir", &d))?;
                self.ops += 2;
            }
        }
        if i.is_multiple_of(64) {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(err("fsync", &self.dir))?;
            self.ops += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_sized() {
        assert_eq!(content(7), content(7));
        assert_ne!(content(7), content(8));
        for i in 0..500 {
            let n = content(i).len();
            assert!(
                (4096..=65536).contains(&n) && n.is_multiple_of(1024),
                "{i}: {n}"
            );
        }
    }

    #[test]
    fn churn_keeps_a_bounded_set() {
        let dir = std::env::temp_dir().join(format!("remus-fsload-{}", std::process::id()));
        let mut c = Churn::new(dir.join("w"), 20);
        fs::create_dir_all(dir.join("w")).unwrap();
        fs::write(dir.join("w/stale"), b"x").unwrap();
        c.prepare().unwrap();
        for _ in 0..100 {
            c.step().unwrap();
        }
        let mut names: Vec<String> = fs::read_dir(dir.join("w"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let files = names.iter().filter(|n| n.starts_with('f')).count();
        let dirs: Vec<&String> = names.iter().filter(|n| n.starts_with('d')).collect();
        assert_eq!(files, 20);
        assert_eq!(dirs, ["d48", "d64", "d80", "d96"]);
        assert!(!names.iter().any(|n| n.starts_with('t') || n == "stale"));
        assert_eq!(fs::read(dir.join("w/f100")).unwrap(), content(100));
        assert!(c.ops > 100 * 2);
        // A file changed behind its back is noticed when it is retired.
        fs::write(dir.join("w/f81"), b"changed").unwrap();
        let e = c.step().unwrap_err();
        fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("f81 does not hold what was written"), "{e}");
    }
}
