//! Remus core and disk replication through the real CLI and agents:
//! protect a running guest that writes to two disks (raw records on one,
//! an ext4 filesystem on the other) to a backup agent, pull the primary's
//! plug (SIGKILL of its agent and QEMU, or a freeze) at random moments,
//! and check that the backup resumes the guest from at least the last
//! acknowledged state, never from boot, with a disk that matches its
//! memory exactly: the guest verifies its records 1..N (N from its own
//! memory) and that nothing beyond N reached the disk, and the
//! filesystem passes a forced fsck. Every fifth round (from the second)
//! the disks are qcow2 images, the records one on a raw backing file,
//! served through qemu-storage-daemon; the backup creates its own qcow2
//! copies.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, ProtectFollower, free_port, jitter, last_diskload_done, last_tick,
    now_ms, run_ok, ticks, write_key,
};

/// Where diskload starts on its disk, and its record size.
const DISKLOAD_OFFSET: u64 = 1 << 20;
const RECORD: u64 = 4096;
/// The change map's chunk size (remus_disk::sync::CHUNK_SIZE).
const CHUNK: u64 = 64 * 1024;

/// `diskload verify ok: N records` → N; a FAILED line → the line.
fn verify_result(console: &str) -> Option<Result<u64, String>> {
    console.lines().find_map(|l| {
        if let Some((_, rest)) = l.split_once("diskload verify ok: ") {
            return rest.split_whitespace().next()?.parse().ok().map(Ok);
        }
        l.contains("diskload verify FAILED")
            .then(|| Err(l.to_string()))
    })
}

/// Marked chunks of a change map file (layout in remus_disk::changes).
fn marked_chunks(map: &Path) -> Vec<u64> {
    let raw = std::fs::read(map).unwrap_or_default();
    assert!(
        raw.len() > 4096 && &raw[..8] == b"RMSCHG01",
        "{}",
        map.display()
    );
    let mut out = Vec::new();
    for (i, b) in raw[4096..].iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                out.push(i as u64 * 8 + bit);
            }
        }
    }
    out
}

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

/// The two hosts' disk directories: the primary's images are in
/// `primary`; the backup keeps its copies of VM V's disk T in its own
/// image directory, as `backup/V/T.img`.
struct DiskDirs {
    primary: PathBuf,
    backup: PathBuf,
}

/// One round: boot on a fresh primary, protect, kill at a random moment,
/// check the backup. Returns the failover time in ms.
fn round(img: &GuestImage, backup: &Agent, dirs: &DiskDirs, port: u16, key: &Path, n: u64) -> u64 {
    let key_s = key.to_str().unwrap();
    let mut primary = Agent::start(&bins(), None, &["--key", key_s]).expect("primary agent");
    let vm = format!("ha{n}");
    // Fresh images each round, missing on the backup (created there and
    // filled by the initial sync): raw records and an ext4 filesystem.
    let qcow2 = n % 5 == 1;
    let ext = if qcow2 { "qcow2" } else { "img" };
    let raw = dirs.primary.join(format!("r{n}-records.{ext}"));
    let fs = dirs.primary.join(format!("r{n}-ext4.{ext}"));
    let fs_raw = dirs.primary.join(format!("r{n}-ext4.raw"));
    let base = dirs.primary.join(format!("r{n}-base.raw"));
    let (raw_file, fs_file) = if qcow2 { (&base, &fs_raw) } else { (&raw, &fs) };
    std::fs::File::create(raw_file)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    std::fs::File::create(fs_file)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", fs_file.to_str().unwrap()]);
    if qcow2 {
        // The records disk: an overlay on a raw base; the filesystem: a
        // standalone qcow2 image.
        let (b, r) = (base.to_str().unwrap(), raw.to_str().unwrap());
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", b, r],
        );
        let (fr, f) = (fs_raw.to_str().unwrap(), fs.to_str().unwrap());
        run_ok("qemu-img", &["convert", "-O", "qcow2", fr, f]);
    }
    let format = if qcow2 { "format = \"qcow2\"\n" } else { "" };
    let disks = format!(
        "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n{format}[[disk]]\npath = \"{}\"\ntarget = \"vdb\"\n{format}",
        raw.display(),
        fs.display()
    );
    let cfg = primary.write_file(
        "vm.toml",
        &img.config(
            &vm,
            "remus.workload=tick,diskload:/dev/vda:--region-mb:90,fsload:/dev/vdb",
            &disks,
        ),
    );
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    primary
        .wait_console(
            &vm,
            Duration::from_secs(90),
            "tick 2, diskload and fsload",
            |c| {
                last_tick(c) >= Some(2)
                    && last_diskload_done(c).is_some()
                    && c.contains("fsload: mounted")
            },
        )
        .unwrap();

    // Protect, following the events as JSON lines; the first checkpoints
    // commit.
    let peer = format!("127.0.0.1:{port}");
    let mut follow =
        ProtectFollower::start(&primary, &vm, &peer, &["-i", "100", "--timeout", "1000"])
            .unwrap_or_else(|e| panic!("{e}\nbackup log:\n{}", backup.log_text()));
    follow.checkpoint_after(0).unwrap_or_else(|e| {
        panic!(
            "{e}\nbackup log:\n{}\nprimary log:\n{}",
            backup.log_text(),
            primary.log_text()
        )
    });
    let b = backup.vm(&vm).expect("standby listed on the backup");
    assert_eq!(b["state"], "p", "standby is shown paused: {b}");
    assert_eq!(b["role"], "backup");
    let p = primary.vm(&vm).unwrap();
    assert_eq!(p["role"], "primary");
    // `list --json` says where it is protected to and how far it got.
    assert_eq!(p["protection"]["peer"], peer.as_str(), "{p}");
    assert!(
        p["protection"]["last_checkpoint"]["epoch"].as_u64() >= Some(1),
        "{p}"
    );

    // Let the guest run a random while (0–1.5 s), note its last tick and
    // when, then wait for a checkpoint taken after that moment to be
    // acknowledged: the backup then holds at least that tick.
    std::thread::sleep(Duration::from_millis(jitter(n, 1500)));
    let seen_at = now_ms();
    let console = primary.console(&vm);
    let seen = last_tick(&console).unwrap();
    // The guest said it had completed this many records: once a later
    // checkpoint is acknowledged, the backup must have all of them.
    let seen_done = last_diskload_done(&console).unwrap();
    follow.checkpoint_after(seen_at).unwrap();
    // Pull the plug at a random point of the following epoch
    // (mid-checkpoint or mid-transmission as it falls). Every fourth round
    // freezes the primary instead (SIGSTOP): its sockets stay open and
    // silent, so the backup must notice by its timeout, not by a reset.
    std::thread::sleep(Duration::from_millis(jitter(n + 7, 100)));
    let killed = Instant::now();
    let frozen = n % 4 == 3;
    if frozen {
        primary.freeze();
    } else {
        primary.kill_hard();
    }
    drop(follow);

    // The backup resumes the guest.
    let failover_ms = backup
        .wait_failover(&vm, killed, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("round {n}: {e}"));
    if frozen {
        // The backup's clock runs from the last frame it received, which
        // can precede the freeze by up to an interval (100 ms) plus a
        // transmission: it must wait at least timeout - interval - margin
        // and must not take much longer than the timeout.
        assert!(
            (850..=2000).contains(&failover_ms),
            "round {n}: a silent primary must be given the timeout (1000 ms), failover came after {failover_ms} ms"
        );
        primary.kill_hard();
    }
    let text = backup
        .wait_console(&vm, Duration::from_secs(30), "ticks after failover", |c| {
            ticks(c).len() >= 3
        })
        .unwrap();
    let got = ticks(&text);
    assert!(
        got[0] >= seen,
        "round {n}: the backup resumed at tick {} but tick {seen} had been acknowledged: {got:?}",
        got[0]
    );
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    let log = backup.log_text();
    assert!(log.contains("FAILOVER"), "{log}");

    // The guest checks its own records against the backup's disk.
    let out = backup.cli_stdin(&["console", &vm], Some(b"\ntouch /run/diskload.verify\n"));
    assert!(out.ok, "{}", out.stderr);
    let text = backup
        .wait_console(&vm, Duration::from_secs(60), "diskload verify", |c| {
            verify_result(c).is_some()
        })
        .unwrap();
    let verified = match verify_result(&text) {
        Some(Ok(v)) => v,
        other => panic!("round {n}: the guest's records do not match its disk: {other:?}\n{text}"),
    };
    assert!(
        verified >= seen_done,
        "round {n}: record {seen_done} was complete before an acknowledged checkpoint, but the backup's guest knows only {verified}"
    );
    // After failover the backup records which chunks change: the records
    // diskload writes next are marked.
    let maps = backup.state_dir.join("copies").join(&vm);
    let next_chunk = (DISKLOAD_OFFSET + verified * RECORD) / CHUNK;
    backup
        .wait_console(&vm, Duration::from_secs(30), "diskload after verify", |c| {
            last_diskload_done(c).is_some_and(|d| d > verified + 1)
        })
        .unwrap();
    let marked = marked_chunks(&maps.join("disk-vda.changed"));
    let listed = &backup.vm(&vm).unwrap()["changed_chunks"];
    assert!(
        listed["vda"].as_u64().unwrap_or(0) >= marked.len() as u64 && listed["vdb"].is_u64(),
        "list --json reports the changed chunks: {listed}"
    );
    assert!(
        marked.contains(&next_chunk),
        "round {n}: chunk {next_chunk} (record {}) written after failover is not in the change map {marked:?}",
        verified + 1
    );

    // The filesystem: unmounted cleanly by the guest, then checked from
    // the backup host's copy.
    let out = backup.cli_stdin(&["console", &vm], Some(b"\ntouch /run/fsload.stop\n"));
    assert!(out.ok, "{}", out.stderr);
    let text = backup
        .wait_console(&vm, Duration::from_secs(60), "fsload unmount", |c| {
            c.contains("fsload: unmounted")
                || c.contains("fsload: umount failed")
                || c.contains("fsload: error")
        })
        .unwrap();
    assert!(
        text.contains("fsload: unmounted") && !text.contains("fsload: error"),
        "round {n}: {text}"
    );
    assert!(!marked_chunks(&maps.join("disk-vdb.changed")).is_empty());
    let out = backup.cli(&["destroy", &vm]);
    assert!(out.ok, "{}", out.stderr);
    let mut backup_fs = dirs.backup.join(&vm).join("vdb.img");
    if qcow2 {
        // The backup made its own qcow2 copy (no backing file): check it,
        // then the filesystem in it.
        let b = backup_fs.to_str().unwrap().to_string();
        let info = run_ok("qemu-img", &["info", "--output=json", &b]);
        assert!(info.contains("\"format\": \"qcow2\""), "{info}");
        run_ok("qemu-img", &["check", &b]);
        let flat = dirs.backup.join(format!("{vm}-vdb.flat"));
        run_ok(
            "qemu-img",
            &["convert", "-O", "raw", &b, flat.to_str().unwrap()],
        );
        backup_fs = flat;
    }
    run_ok("e2fsck", &["-fn", backup_fs.to_str().unwrap()]);
    eprintln!(
        "round {n}: failover {failover_ms} ms{}{}, guest verified {verified} records ({seen_done} seen before the acknowledged checkpoint), fsck clean",
        if frozen { " (frozen primary)" } else { "" },
        if qcow2 { " (qcow2 disks)" } else { "" }
    );
    for f in [&raw, &fs, &fs_raw, &base, &backup_fs] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(dirs.backup.join(&vm));
    failover_ms
}

#[test]
fn failover_at_random_moments() {
    let img = GuestImage::find().expect("guest image");
    let keydir = tempfile::tempdir().unwrap();
    let key = write_key(keydir.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let pdir = tempfile::tempdir_in("/tmp").unwrap();
    let bdir = tempfile::tempdir_in("/tmp").unwrap();
    let dirs = DiskDirs {
        primary: pdir.path().to_path_buf(),
        backup: bdir.path().to_path_buf(),
    };
    let backup = Agent::start(
        &bins(),
        None,
        &[
            "--listen",
            &listen,
            "--key",
            key.to_str().unwrap(),
            "--image-dir",
            dirs.backup.to_str().unwrap(),
        ],
    )
    .expect("backup agent");
    let rounds: u64 = std::env::var("REMUS_FAILOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (mut killed, mut frozen) = (Vec::new(), Vec::new());
    for n in 0..rounds {
        let t = round(&img, &backup, &dirs, port, &key, n);
        if n % 4 == 3 {
            frozen.push(t)
        } else {
            killed.push(t)
        }
    }
    for (what, times) in [
        ("killed (connection reset)", &mut killed),
        ("frozen (silence, timeout 1000 ms)", &mut frozen),
    ] {
        times.sort_unstable();
        if let (Some(min), Some(max)) = (times.first(), times.last()) {
            eprintln!(
                "failover, primary {what}: {} rounds, min {min} ms, median {} ms, max {max} ms",
                times.len(),
                times[times.len() / 2]
            );
        }
    }
}
