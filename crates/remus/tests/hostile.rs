//! The attacker's side, through the real agents: a peer that holds the key
//! and sends what no honest primary or backup would, a flood of peers
//! without it, someone who alters bytes on the wire, and a guest that
//! writes an image header to its own raw disk. Each test asserts what the
//! attacker cannot do, and that the agent carries on.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use remus_proto::{
    Channel, DiskCompat, HelloParams, Key, Message, Purpose, ServerOptions, VmCompat,
    client_handshake, server_handshake,
};
use remus_testbed::{
    Agent, Binaries, GuestImage, ProtectFollower, free_port, last_tick, write_key,
};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const BOOT: Duration = Duration::from_secs(90);

fn listening_agent(key: &Path) -> (Agent, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let a = Agent::start(
        &bins(),
        None,
        &["--listen", &listen, "--key", key.to_str().unwrap()],
    )
    .expect("agent");
    (a, listen)
}

fn compat(disk_bytes: u64) -> VmCompat {
    VmCompat {
        memory_mib: 256,
        vcpus: 1,
        machine: "q35".into(),
        cpu_model: String::new(),
        disks: vec![DiskCompat {
            target: "vda".into(),
            size_bytes: disk_bytes,
        }],
        macs: vec![],
    }
}

/// A primary of our own making: the real handshake with the key, then
/// whatever setup the test wants; returns the channel and the backup's
/// first answer.
fn push_setup(listen: &str, key: &Key, vm: &str, setup: serde_json::Value) -> (Channel, Message) {
    let (mut ch, _) = client_handshake(
        TcpStream::connect(listen).unwrap(),
        key,
        &HelloParams::new(Purpose::Protect, vm, compat(1 << 20)),
    )
    .expect("handshake with the key");
    Message::VmConfig {
        json: setup.to_string(),
    }
    .write_to(&mut ch)
    .unwrap();
    ch.flush().unwrap();
    ch.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let answer = Message::read_from(&mut ch).expect("an answer");
    (ch, answer)
}

/// Every path a process has open, and its command line.
fn open_files(pid: u32) -> (Vec<PathBuf>, String) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    (fds, cmd)
}

/// Whether any of the processes in `pids` has `path` open or names it on
/// its command line.
fn touches(pids: &[u32], path: &Path) -> Option<String> {
    let needle = path.to_string_lossy().to_string();
    for &pid in pids {
        let (fds, cmd) = open_files(pid);
        if fds.iter().any(|f| f == path) || cmd.contains(&needle) {
            return Some(format!("pid {pid}: {cmd}"));
        }
    }
    None
}

/// A peer holding the key offers a VM whose config names host files: a
/// disk at a file it wants overwritten, a kernel at a path outside the
/// backup's boot directory, a bridge the backup does not offer to peers,
/// and VM names that are paths. The backup uses none of them: the disk
/// goes to its own image directory, a name is refused as a name, and the
/// victim file is untouched.
#[test]
fn a_key_holding_peer_cannot_choose_host_paths() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key_path = write_key(kd.path());
    let key = Key::load(&key_path).unwrap();
    let (backup, listen) = listening_agent(&key_path);
    let victims = tempfile::tempdir().unwrap();
    let victim = victims.path().join("authorized_keys");
    std::fs::write(&victim, b"ssh-ed25519 AAAA... operator\n").unwrap();
    let before = std::fs::metadata(&victim).unwrap().modified().unwrap();

    let setup = |disk: &Path, kernel: &Path, extra: serde_json::Value| {
        let mut config = serde_json::json!({
            "name": "evil",
            "memory": 256,
            "vcpus": 1,
            "kernel": kernel,
            "initrd": img.initrd,
            "cmdline": "console=ttyS0",
            "disk": [{"path": disk, "target": "vda"}],
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        serde_json::json!({"config": config, "timeout_ms": 2000, "replicate_disks": true})
    };

    // 1. The disk at the victim's path, the kernel by the guest's real
    //    path: the backup keeps the disk in its own image directory and
    //    finds the kernel by its file name in its boot directory.
    let (ch, answer) = push_setup(
        &listen,
        &key,
        "evil",
        setup(&victim, &img.kernel, serde_json::json!({})),
    );
    assert!(
        matches!(answer, Message::Ready | Message::SyncPlan { .. }),
        "{answer:?}\n{}",
        backup.log_text()
    );
    let standby = backup.vm("evil").expect("a standby");
    let qemu = standby["pid"].as_u64().unwrap() as u32;
    let agent_pid = backup.pid().unwrap();
    assert_eq!(
        touches(&[qemu, agent_pid], &victim),
        None,
        "the victim file is used"
    );
    let own_image = backup.state_dir.join("images/evil/vda.img");
    assert!(own_image.is_file(), "the copy's disk is the backup's own");
    assert!(
        touches(&[agent_pid], &own_image).is_some(),
        "the agent serves its own image"
    );
    let (_, qemu_cmd) = open_files(qemu);
    let boot_kernel = remus_testbed::GuestImage::dir().join(img.kernel.file_name().unwrap());
    assert!(
        qemu_cmd.contains(&format!("-kernel {}", boot_kernel.display())),
        "the kernel from the boot directory: {qemu_cmd}"
    );
    drop(ch);
    let t = Instant::now();
    while backup.vm("evil").is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "standby never dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // 2. A kernel the boot directory does not have (its file name is all
    //    that counts): refused, saying what to set.
    // (Another VM: the backup's own record of "evil" now decides its
    // kernel, whatever the peer says.)
    let (_ch, answer) = push_setup(
        &listen,
        &key,
        "evil2",
        setup(
            &victim,
            Path::new("/etc/shadow"),
            serde_json::json!({"name": "evil2"}),
        ),
    );
    match answer {
        Message::Error { message, .. } => {
            assert!(
                message.contains("boots its kernel directly") && message.contains("shadow"),
                "{message}"
            )
        }
        other => panic!("accepted a kernel outside the boot directory: {other:?}"),
    }

    // 3. A bridge this host does not offer to peers.
    let (_ch, answer) = push_setup(
        &listen,
        &key,
        "evil3",
        setup(
            &victim,
            &img.kernel,
            serde_json::json!({"name": "evil3", "vif": [{"bridge": "br-mgmt"}]}),
        ),
    );
    match answer {
        Message::Error { message, .. } => {
            assert!(
                message.contains("br-mgmt") && message.contains("peer-bridges"),
                "{message}"
            )
        }
        other => panic!("plugged a peer's VM into br-mgmt: {other:?}"),
    }

    // 4. Names that are paths: refused before they name anything.
    for name in ["../../etc", ".hidden", "a/b"] {
        let e = client_handshake(
            TcpStream::connect(&listen).unwrap(),
            &key,
            &HelloParams::new(Purpose::Protect, name, compat(1 << 20)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("name"), "{name}: {e}");
    }

    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"ssh-ed25519 AAAA... operator\n"
    );
    assert_eq!(
        std::fs::metadata(&victim).unwrap().modified().unwrap(),
        before
    );
    assert!(backup.cli(&["list"]).ok, "the agent carries on");
}

/// A backup holding the key answers with a sync plan naming more chunks
/// than exist (one run of 2^50): the primary refuses it before it makes
/// anything of it, says why, and its VM runs on unprotected.
#[test]
fn a_key_holding_backup_cannot_make_the_primary_expand_a_plan() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key_path = write_key(kd.path());
    let key = Key::load(&key_path).unwrap();
    let primary = Agent::start(&bins(), None, &["--key", key_path.to_str().unwrap()]).unwrap();
    let disk = primary.dir.path().join("vda.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cfg = primary.write_file(
        "p.toml",
        &img.config(
            "plan",
            "remus.workload=tick",
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n",
                disk.display()
            ),
        ),
    );
    assert!(primary.cli(&["create", cfg.to_str().unwrap()]).ok);
    primary
        .wait_console("plan", BOOT, "tick 1", |c| last_tick(c) >= Some(1))
        .unwrap();
    // A fake backup: the real handshake, then a hostile plan.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        let (mut ch, _, _) =
            server_handshake(tcp, &key, &ServerOptions::default(), |_, _| Ok(None)).unwrap();
        let Message::VmConfig { .. } = Message::read_from(&mut ch).unwrap() else {
            panic!("no setup")
        };
        let plan = serde_json::json!({
            "mode": "changed",
            "reason": "trust me",
            "target_runs": [[[0u64, 1u64 << 50]]],
        });
        Message::SyncPlan {
            json: plan.to_string(),
        }
        .write_to(&mut ch)
        .unwrap();
        ch.flush().unwrap();
        let mut rest = Vec::new();
        let _ = ch.read_to_end(&mut rest);
    });
    let rss_before = rss(primary.pid().unwrap());
    let out = primary.cli(&["protect", "-d", "plan", &addr]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("sync plan this host refuses")
            && out.stderr.contains("beyond the disk"),
        "{}",
        out.stderr
    );
    fake.join().unwrap();
    assert!(rss(primary.pid().unwrap()) < rss_before + (64 << 20));
    assert_eq!(primary.vm("plan").unwrap()["role"], "unprotected");
}

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss(pid: u32) -> u64 {
    status_field(pid, "VmRSS:") << 10
}

/// Without the key, no number of connections takes the agent down: 600
/// connections, each announcing a 64 MiB first frame or sitting idle,
/// cost a few dozen threads and a few MiB at most, the excess is closed
/// at once and counted in the log, and `remus list` answers throughout.
#[test]
fn an_unauthenticated_flood_costs_little() {
    let kd = tempfile::tempdir().unwrap();
    let key_path = write_key(kd.path());
    let (agent, listen) = listening_agent(&key_path);
    let pid = agent.pid().unwrap();
    let (threads0, rss0) = (status_field(pid, "Threads:"), rss(pid));
    let mut header = Vec::new();
    header.extend_from_slice(b"RMS1");
    header.extend_from_slice(&10u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(64u32 << 20).to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    let mut conns = Vec::new();
    let mut peak_threads = 0;
    let mut slowest_list = Duration::ZERO;
    for i in 0..600 {
        if let Ok(mut s) = TcpStream::connect(&listen) {
            if i % 2 == 0 {
                let _ = s.write_all(&header);
                let _ = s.write_all(&[0u8; 4096]);
            }
            conns.push(s);
        }
        if i % 100 == 99 {
            peak_threads = peak_threads.max(status_field(pid, "Threads:"));
            let t = Instant::now();
            assert!(agent.cli(&["list"]).ok, "the API answers during the flood");
            slowest_list = slowest_list.max(t.elapsed());
        }
    }
    peak_threads = peak_threads.max(status_field(pid, "Threads:"));
    let grew = rss(pid).saturating_sub(rss0);
    eprintln!(
        "flood of {} connections: threads {threads0} -> peak {peak_threads}, RSS +{} KiB, slowest `remus list` {} ms",
        conns.len(),
        grew >> 10,
        slowest_list.as_millis()
    );
    assert!(
        peak_threads <= threads0 + 40,
        "{threads0} -> {peak_threads} threads"
    );
    assert!(grew < 32 << 20, "RSS grew by {} MiB", grew >> 20);
    assert!(slowest_list < Duration::from_secs(2), "{slowest_list:?}");
    drop(conns);
    let log = agent.log_text();
    assert!(
        log.contains("closed") && log.contains("connection(s) at once"),
        "{log}"
    );
}

/// Bytes altered on the wire after the handshake end the session with an
/// authentication error: the backup never applies the altered data and
/// never resumes a copy because of it (the primary is alive), and the
/// primary runs on, unprotected, saying why.
#[test]
fn bytes_altered_in_flight_end_the_session_without_a_failover() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key_path = write_key(kd.path());
    let (backup, listen) = listening_agent(&key_path);
    let primary = Agent::start(&bins(), None, &["--key", key_path.to_str().unwrap()]).unwrap();
    let cfg = primary.write_file("t.toml", &img.config("tamper", "remus.workload=tick", ""));
    assert!(primary.cli(&["create", cfg.to_str().unwrap()]).ok);
    primary
        .wait_console("tamper", BOOT, "tick 1", |c| last_tick(c) >= Some(1))
        .unwrap();
    // A man in the middle that passes the first 2 MiB the primary sends
    // (the handshake and part of the initial copy), then flips one bit.
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let via = proxy.local_addr().unwrap().to_string();
    let target = listen.clone();
    std::thread::spawn(move || {
        let (c, _) = proxy.accept().unwrap();
        let s = TcpStream::connect(&target).unwrap();
        let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let (mut c, mut s) = (c, s);
        let mut seen = 0usize;
        let mut buf = vec![0u8; 65536];
        const FLIP: usize = 2 << 20;
        loop {
            let n = match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n).contains(&FLIP) {
                buf[FLIP - seen] ^= 0x01;
            }
            seen += n;
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut follow = ProtectFollower::start(&primary, "tamper", &via, &["-i", "100"]).unwrap();
    let lost = follow.event("backup_lost").unwrap();
    let reason = lost["reason"].as_str().unwrap_or_default().to_string();
    let t = Instant::now();
    while backup.vm("tamper").is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the backup kept its copy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = backup.log_text();
    assert!(log.contains("failed authentication"), "{log}");
    assert!(
        !log.contains("FAILOVER"),
        "altered bytes made the backup resume:\n{log}"
    );
    assert!(
        reason.contains("altered") || reason.contains("authentication"),
        "{lost}"
    );
    assert_eq!(primary.vm("tamper").unwrap()["role"], "unprotected");
    let before = last_tick(&primary.console("tamper")).unwrap();
    primary
        .wait_console("tamper", BOOT, "ticks after", |c| {
            last_tick(c) > Some(before)
        })
        .unwrap();
}

/// A guest writes a qcow2 header naming a host file as its backing file
/// to the start of its own raw disk. That never makes anything open the
/// host file: not the primary, not the backup's copy (created raw and
/// recorded so), not after a failover and the resync back to the old
/// primary.
#[test]
fn a_guest_written_image_header_opens_no_host_file() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key_path = write_key(kd.path());
    let key = key_path.to_str().unwrap();
    let la = format!("127.0.0.1:{}", free_port());
    let lb = format!("127.0.0.1:{}", free_port());
    let mut a = Agent::start(&bins(), None, &["--listen", &la, "--key", key]).unwrap();
    let b = Agent::start(&bins(), None, &["--listen", &lb, "--key", key]).unwrap();
    let lures = tempfile::tempdir().unwrap();
    let lure = lures.path().join("host-secret");
    std::fs::write(&lure, vec![b'S'; 1 << 20]).unwrap();
    // The header the guest will write: a real qcow2 header whose backing
    // file is the lure.
    let hdr_file = lures.path().join("hdr.qcow2");
    remus_testbed::run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            lure.to_str().unwrap(),
            hdr_file.to_str().unwrap(),
            "32M",
        ],
    );
    let mut header = std::fs::read(&hdr_file).unwrap();
    header.truncate(4096);
    let b64 = {
        use std::fmt::Write as _;
        // A small base64 encoder: the header goes through the guest's
        // console as text.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in header.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        let mut wrapped = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && i % 76 == 0 {
                wrapped.push('\n');
            }
            let _ = wrapped.write_char(ch);
        }
        wrapped
    };
    let disk = a.dir.path().join("raw.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let cfg = a.write_file(
        "g.toml",
        &img.config(
            "lured",
            "remus.workload=tick",
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n",
                disk.display()
            ),
        ),
    );
    assert!(a.cli(&["create", cfg.to_str().unwrap()]).ok);
    a.wait_console("lured", BOOT, "tick 1", |c| last_tick(c) >= Some(1))
        .unwrap();
    // The guest writes the header to its raw disk.
    let script = format!(
        "\ncat > /tmp/h.b64 <<'EOF'\n{b64}\nEOF\nbase64 -d /tmp/h.b64 > /tmp/h && dd if=/tmp/h of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null && echo header-written-$((6*7))\n"
    );
    assert!(
        a.cli_stdin(&["console", "lured"], Some(script.as_bytes()))
            .ok
    );
    a.wait_console("lured", BOOT, "the guest wrote the header", |c| {
        // What the shell prints, not the echo of the command typed (which
        // says `$((6*7))`): the write is done.
        c.contains("header-written-42")
    })
    .unwrap();
    assert_eq!(
        &std::fs::read(&disk).unwrap()[..4],
        b"QFI\xfb",
        "the guest's header"
    );

    let all_pids = |agents: &[&Agent]| -> Vec<u32> {
        let mut pids = Vec::new();
        for ag in agents {
            pids.extend(ag.pid());
            pids.extend(ag.qemu_pids());
        }
        pids
    };
    // Protected to b: its copy is raw (the primary's declared format),
    // recorded so.
    let mut follow = ProtectFollower::start(&a, "lured", &lb, &["-i", "100"]).unwrap();
    follow.checkpoint_after(0).unwrap();
    assert_eq!(touches(&all_pids(&[&a, &b]), &lure), None);
    // Failover to b, then a comes back and b resyncs the VM to it.
    a.kill_hard();
    drop(follow);
    b.wait_failover("lured", Instant::now(), Duration::from_secs(30))
        .unwrap();
    assert_eq!(touches(&all_pids(&[&b]), &lure), None);
    a.restart().unwrap();
    let mut back = ProtectFollower::start(&b, "lured", &la, &["-i", "100"]).unwrap();
    back.checkpoint_after(0).unwrap();
    assert_eq!(touches(&all_pids(&[&a, &b]), &lure), None);
    // The header is still the guest's data on both copies.
    let b_disk = b.state_dir.join("images/lured/vda.img");
    assert_eq!(&std::fs::read(&b_disk).unwrap()[..4], b"QFI\xfb");
    // And an operator who boots that disk by hand is stopped, not misled.
    let cfg2 = b.write_file(
        "again.toml",
        &img.config(
            "again",
            "",
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n",
                disk.display()
            ),
        ),
    );
    let out = b.cli(&["create", "--dry-run", cfg2.to_str().unwrap()]);
    assert!(
        !out.ok && out.stderr.contains("qcow2 header"),
        "{}",
        out.stderr
    );
}
