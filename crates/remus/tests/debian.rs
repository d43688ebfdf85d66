//! A real distribution protected end to end: the Debian 12 image of
//! `scripts/build-debian-image.sh` (SeaBIOS, syslinux, systemd, Debian's
//! kernel, root on ext4), booted once from a qcow2 overlay on host a, with
//! a client on host c holding a TCP session with its seqserver service.
//! Each round protects the VM from the host it runs on to the other one
//! (disks and network; after the first round only the chunks that changed
//! travel), kills the primary at a random moment and checks, on the host
//! that took over: the session carries on with no gap, duplicate or
//! reset, and the root filesystem of the disk there (copied while the VM
//! is paused) replays its journal as after a crash and then passes a
//! forced fsck clean. Hosts are network namespaces, each seeing its own
//! image directory.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, Lan, ProtectFollower, SeqClient, now_ms, run_ok, workspace_root, write_key,
};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const VM: &str = "deb";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7100;
/// Where the root partition starts in the image (sector 133120).
const ROOT_OFFSET: u64 = 133_120 * 512;

fn image() -> PathBuf {
    let p = std::env::var_os("REMUS_DEBIAN_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debian-image"))
        .join("debian.qcow2");
    assert!(
        p.exists(),
        "{} is missing: build it with scripts/build-debian-image.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// An agent in host `h` of the LAN that keeps the copies it receives in
/// `store`, its own image directory (an agent started again there finds
/// them).
fn agent(lan: &Lan, h: &str, store: &Path, key: &Path, listen: bool) -> Agent {
    let l = format!("{}:{REPL_PORT}", lan.addr(h));
    let mut extra = vec![
        "--key",
        key.to_str().unwrap(),
        "--image-dir",
        store.to_str().unwrap(),
    ];
    if listen {
        extra.extend(["--listen", &l]);
    }
    Agent::start(&bins(), Some(lan.host(h)), &extra).unwrap_or_else(|e| panic!("agent on {h}: {e}"))
}

/// The disk the agent uses for its copy of VM `vm`: the path in its own
/// record of the copy (the disk it was created on, or the one its own
/// image directory holds).
fn disk_of(agent: &Agent, vm: &str) -> PathBuf {
    let cfg = std::fs::read_to_string(agent.state_dir.join("copies").join(vm).join("config.json"))
        .unwrap_or_else(|e| panic!("{vm}'s copy record: {e}"));
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    PathBuf::from(cfg["disk"][0]["path"].as_str().expect("a disk path"))
}

/// The root filesystem of `disk` (a qcow2 another process has open),
/// checked as a boot after a crash would: journal replayed, then a forced
/// check that must find nothing.
fn fsck_root(disk: &Path, scratch: &Path) -> String {
    let flat = scratch.join("flat.raw");
    let root = scratch.join("root.ext4");
    run_ok::<&OsStr>(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-U".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            disk.as_os_str(),
            flat.as_os_str(),
        ],
    );
    let skip = format!("skip={}", ROOT_OFFSET / 512);
    let (i, o) = (
        format!("if={}", flat.display()),
        format!("of={}", root.display()),
    );
    run_ok::<&OsStr>(
        "dd",
        &[
            i.as_ref(),
            o.as_ref(),
            "bs=512".as_ref(),
            skip.as_ref(),
            "conv=sparse".as_ref(),
            "status=none".as_ref(),
        ],
    );
    std::fs::remove_file(&flat).unwrap();
    // Replays the journal (exit 0 or 1: "modified"), then must be clean.
    let out = Command::new("e2fsck")
        .args(["-fy".as_ref(), root.as_os_str()])
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "e2fsck -fy: exit {code}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = run_ok::<&OsStr>("e2fsck", &["-fn".as_ref(), root.as_os_str()]);
    std::fs::remove_file(&root).unwrap();
    text
}

#[test]
fn debian_survives_primary_kills_with_its_session_and_filesystem() {
    let base = image();
    let lan = Lan::standard("deb").expect("LAN of namespace hosts");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let top = tempfile::tempdir_in("/tmp").unwrap();
    let images = top.path().join("images");
    let scratch = top.path().join("scratch");
    let store = [images.clone(), top.path().join("b")];
    for d in [&images, &scratch, &store[0], &store[1]] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Host a: an overlay on the built image; host b has none (created and
    // filled by the first initial sync).
    let overlay = store[0].join("deb.qcow2");
    run_ok::<&OsStr>(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            overlay.as_os_str(),
        ],
    );
    let disk = images.join("deb.qcow2");
    let mut agents = [
        agent(&lan, "a", &store[0], &key, true),
        agent(&lan, "b", &store[1], &key, true),
    ];
    let cfg = agents[0].write_file(
        "deb.toml",
        &format!(
            "name = \"{VM}\"\nmemory = 512\nvcpus = 1\naccel = \"auto\"\n\
             [[disk]]\npath = \"{}\"\ntarget = \"vda\"\nformat = \"qcow2\"\n\
             [[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:c6:12:0d\"\n",
            disk.display()
        ),
    );
    let out = agents[0].cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    let t = Instant::now();
    agents[0]
        .wait_console(VM, Duration::from_secs(300), "seqserver up", |c| {
            c.contains("seqserver: listening")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agents[0].log_text()));
    eprintln!("Debian booted in {:.1} s", t.elapsed().as_secs_f64());
    let client = SeqClient::start(
        lan.host("c"),
        format!("{VM_IP}:7000").parse().unwrap(),
        Duration::from_millis(5),
    )
    .unwrap_or_else(|e| panic!("connect: {e}\n{}", agents[0].console(VM)));
    client.wait_received(50, Duration::from_secs(60)).unwrap();

    let rounds: usize = std::env::var("REMUS_DEBIAN_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let hosts = ["a", "b"];
    for n in 0..rounds {
        let (p, q) = (n % 2, 1 - n % 2);
        let peer = format!("{}:{REPL_PORT}", lan.addr(hosts[q]));
        let mut follow =
            ProtectFollower::start(&agents[p], VM, &peer, &["-i", "100", "--timeout", "1000"])
                .unwrap_or_else(|e| panic!("round {n}: {e}\n{}", agents[q].log_text()));
        let synced = follow
            .event("disk_synced")
            .unwrap_or_else(|e| panic!("round {n}: {e}\n{}", agents[q].log_text()));
        follow.checkpoint_after(0).unwrap();
        let before = client.received();
        client
            .wait_received(before + 50, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {n}: no output while protected: {e}"));
        // A random moment, then the plug.
        let wait = (now_ms().wrapping_mul(6364136223846793005) >> 33) % 1500;
        std::thread::sleep(Duration::from_millis(300 + wait));
        let killed = Instant::now();
        agents[p].kill_hard();
        let ms = agents[q]
            .wait_failover(VM, killed, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {n}: {e}"));
        drop(follow);
        let at = client.received();
        client
            .wait_received(at + 200, Duration::from_secs(90))
            .unwrap_or_else(|e| {
                panic!(
                    "round {n}: the session did not survive: {e}\n{}",
                    agents[q].console(VM)
                )
            });
        assert_eq!(client.error(), None, "round {n}");
        let console = agents[q].console(VM);
        assert!(
            !console.contains("gap") && !console.contains("duplicate"),
            "round {n}: {console}"
        );
        // The filesystem on the disk of the host that took over, copied
        // while the VM is paused.
        assert!(agents[q].cli(&["pause", VM]).ok);
        let fsck = fsck_root(&disk_of(&agents[q], VM), &scratch);
        assert!(agents[q].cli(&["unpause", VM]).ok);
        eprintln!(
            "round {n}: {} → {}: {} of {} chunks synced ({} MiB), failover {ms} ms, client's longest wait so far {} ms (the pauses for the fsck copies included), fsck clean ({})",
            hosts[p],
            hosts[q],
            synced["differing_chunks"],
            synced["chunks"],
            synced["sent_bytes"].as_u64().unwrap_or(0) >> 20,
            client.longest_gap().as_millis(),
            fsck.lines()
                .find(|l| l.contains("files,"))
                .unwrap_or("")
                .trim()
        );
        // The dead host comes back with a fresh agent (same disk) and is
        // the next round's backup.
        agents[p] = agent(&lan, hosts[p], &store[p], &key, true);
    }
}
