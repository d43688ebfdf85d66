//! Disk replication through the real CLI, agents and QEMU: the initial
//! sync copies only the chunks that differ (and creates a missing backup
//! image), and a backup whose disk fails or cannot be written stops
//! protection with a clear error instead of keeping a bad copy.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, DiskHosts, GuestImage, ProtectFollower, free_port, last_tick, write_key,
};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const BOOT: Duration = Duration::from_secs(90);
/// The initial sync's chunk size (remus_disk::sync::CHUNK_SIZE).
const CHUNK: usize = 64 * 1024;

/// Deterministic non-zero bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

fn disk_toml(path: &Path, target: &str) -> String {
    format!(
        "[[disk]]\npath = \"{}\"\ntarget = \"{target}\"\n",
        path.display()
    )
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Agent state has no change notification; poll the API.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn boot(agent: &Agent, name: &str, img: &GuestImage, disks: &str) {
    let cfg = agent.write_file(
        &format!("{name}.toml"),
        &img.config(name, "remus.workload=tick", disks),
    );
    let out = agent.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    agent
        .wait_console(name, BOOT, "tick 2", |c| last_tick(c) >= Some(2))
        .unwrap();
}

#[test]
fn initial_sync_sends_only_differing_chunks_and_creates_missing_images() {
    let img = GuestImage::find().expect("guest image");
    // The primary's images; the backup keeps its copies in its own image
    // directory, as a second host would.
    let hosts = DiskHosts::new().unwrap();
    let (pdir, listen) = (&hosts.pdir, &hosts.listen);
    let (b_vda, b_vdb) = (
        hosts.backup_image("sync", "vda"),
        hosts.backup_image("sync", "vdb"),
    );

    // vda: 16 MiB of data except chunks 10..20, which are zero.
    let mut a = pattern(1, 256 * CHUNK);
    a[10 * CHUNK..20 * CHUNK].fill(0);
    // The backup's copy differs in chunks 3, 100 and 255 (data), and in
    // chunk 15, which holds data there but zeroes here.
    let mut b = a.clone();
    for c in [3usize, 100, 255] {
        b[c * CHUNK + 77] ^= 0xFF;
    }
    b[15 * CHUNK..16 * CHUNK].copy_from_slice(&pattern(9, CHUNK));
    let vda = pdir.path().join("vda.img");
    std::fs::write(&vda, &a).unwrap();
    std::fs::create_dir_all(b_vda.parent().unwrap()).unwrap();
    std::fs::write(&b_vda, &b).unwrap();
    // vdb: 4 MiB, data in its first 4 chunks only; missing on the backup.
    let mut c = vec![0u8; 64 * CHUNK];
    c[..4 * CHUNK].copy_from_slice(&pattern(2, 4 * CHUNK));
    let vdb = pdir.path().join("vdb.img");
    std::fs::write(&vdb, &c).unwrap();

    let backup = hosts.backup(&bins()).expect("backup agent");
    let primary = hosts.primary(&bins()).unwrap();
    boot(
        &primary,
        "sync",
        &img,
        &(disk_toml(&vda, "vda") + &disk_toml(&vdb, "vdb")),
    );

    // Uncompressed (`-u`), as `xl remus -u`: pages and device state go raw.
    let mut follow = ProtectFollower::start(&primary, "sync", listen, &["-i", "100", "-u"])
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    let ev = follow
        .event("disk_synced")
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    assert_eq!(ev["chunks"], 256 + 64, "{ev}");
    assert_eq!(ev["chunk_size"], CHUNK, "{ev}");
    assert_eq!(ev["differing_chunks"], 4 + 4, "{ev}");
    assert_eq!(ev["zeroed_chunks"], 1, "{ev}");
    assert_eq!(
        ev["sent_bytes"],
        (3 + 4) * CHUNK,
        "only the differing chunks: {ev}"
    );
    let cp = follow.checkpoint_after(0).unwrap();
    assert_eq!(cp["xor_pages"], 0, "-u: {cp}");
    assert!(
        cp["bytes"].as_u64().unwrap() > cp["raw_bytes"].as_u64().unwrap(),
        "-u sends every raw byte plus frame headers: {cp}"
    );

    // Stop protection: the backup discards its standby; its images stay
    // and must now equal the primary's, byte for byte.
    let out = primary.cli(&["protect", "--stop", "sync"]);
    assert!(out.ok, "{}", out.stderr);
    let t = Instant::now();
    while backup.vm("sync").is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for the backup to drop its copy after protect --stop\nbackup: {:?}\nbackup log:\n{}\nprimary log:\n{}",
            backup.vm("sync"),
            backup.log_text(),
            primary.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(std::fs::read(&b_vda).unwrap() == a, "backup vda differs");
    let got = std::fs::read(&b_vdb).unwrap();
    assert!(got == c, "backup vdb differs");
    // The created image stayed sparse: only the 4 data chunks allocated.
    let blocks = std::fs::metadata(&b_vdb).unwrap().blocks();
    assert!(
        blocks * 512 <= 8 * CHUNK as u64,
        "created image allocates {} bytes for 4 chunks of data",
        blocks * 512
    );
    let log = backup.log_text();
    assert!(log.contains("created the copy's disk image"), "{log}");
    // An orderly stop is never taken for a lost primary.
    assert!(!log.contains("FAILOVER"), "{log}");
}

/// The backup's disk cannot hold what the guest writes: the commit fails
/// with ENOSPC, the backup says so, the primary runs on unprotected and
/// reports why, and the backup never resumes its copy.
#[test]
fn backup_disk_full_stops_protection_with_the_reason() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let pdir = tempfile::tempdir_in("/tmp").unwrap();
    let bimages = tempfile::tempdir_in("/tmp").unwrap();
    let vda = pdir.path().join("vda.img");
    // A 64 MiB sparse image; the backup's image directory is an 8 MiB
    // tmpfs (mounted in its own mount namespace, gone with it; 0700, as
    // the agent refuses an image directory others could write to).
    std::fs::File::create(&vda)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mount = |w: &'static str| OsStr::new(w);
    let backup = Agent::start_in_mount_ns(
        &bins(),
        &[&[
            mount("mount"),
            mount("-t"),
            mount("tmpfs"),
            mount("-o"),
            mount("size=8m,mode=0700"),
            mount("tmpfs"),
            bimages.path().as_os_str(),
        ]],
        &[
            "--listen",
            &listen,
            "--key",
            key.to_str().unwrap(),
            "--image-dir",
            bimages.path().to_str().unwrap(),
        ],
    )
    .expect("backup agent on a small tmpfs");
    let primary = Agent::start(&bins(), None, &["--key", key.to_str().unwrap()]).unwrap();
    let cfg = primary.write_file(
        "full.toml",
        &img.config(
            "full",
            "remus.workload=tick,diskload:/dev/vda:--region-mb:60",
            &disk_toml(&vda, "vda"),
        ),
    );
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    primary
        .wait_console("full", BOOT, "diskload", |c| c.contains("diskload: done"))
        .unwrap();
    let mut follow = ProtectFollower::start(&primary, "full", &listen, &["-i", "100"])
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    // The disk fills during the initial sync or in a later epoch, as fast
    // as the guest has written by then: either way the same end.
    let lost = follow
        .event("backup_lost")
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    let reason = lost["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("backup disk") && reason.contains("No space left on device"),
        "the primary says why: {lost}"
    );
    assert!(reason.contains("disk vda"), "{lost}");
    // The primary's VM runs on, unprotected; the backup dropped its copy.
    wait_for(
        "the backup to drop its copy",
        Duration::from_secs(30),
        || backup.vm("full").is_none(),
    );
    let v = primary.vm("full").unwrap();
    assert_eq!(v["role"], "unprotected", "{v}");
    let log = backup.log_text();
    assert!(!log.contains("FAILOVER"), "{log}");
}

/// A backup image that cannot be opened for writing refuses the session
/// before anything is copied, naming the disk and the reason.
#[test]
fn unwritable_backup_image_is_refused() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let pdir = tempfile::tempdir_in("/tmp").unwrap();
    let bdir = tempfile::tempdir_in("/tmp").unwrap();
    let vda = pdir.path().join("vda.img");
    std::fs::write(&vda, vec![0u8; 4 << 20]).unwrap();
    std::fs::create_dir(bdir.path().join("ro")).unwrap();
    std::fs::write(bdir.path().join("ro/vda.img"), vec![0u8; 4 << 20]).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let os = |w: &'static str| OsStr::new(w);
    // The backup sees its image directory read-only.
    let backup = Agent::start_in_mount_ns(
        &bins(),
        &[
            &[
                os("mount"),
                os("--bind"),
                bdir.path().as_os_str(),
                bdir.path().as_os_str(),
            ],
            &[
                os("mount"),
                os("-o"),
                os("remount,bind,ro"),
                bdir.path().as_os_str(),
            ],
        ],
        &[
            "--listen",
            &listen,
            "--key",
            key.to_str().unwrap(),
            "--image-dir",
            bdir.path().to_str().unwrap(),
        ],
    )
    .expect("backup agent with a read-only image");
    let primary = Agent::start(&bins(), None, &["--key", key.to_str().unwrap()]).unwrap();
    boot(&primary, "ro", &img, &disk_toml(&vda, "vda"));
    let out = primary.cli(&["protect", "-d", "ro", &listen]);
    assert!(!out.ok, "protect must fail");
    assert!(
        out.stderr.contains("vda") && out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    assert!(backup.vm("ro").is_none());
    assert_eq!(primary.vm("ro").unwrap()["role"], "unprotected");
}
