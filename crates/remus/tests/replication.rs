//! Migration, rejections on the replication port, loss of the backup and
//! `destroy` on the primary, through the real CLI and agents.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, ProtectFollower, free_port, last_diskload_done, last_tick, now_ms,
    ticks, write_key,
};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const BOOT: Duration = Duration::from_secs(90);

/// An agent with a replication port and key.
fn agent_with_port(key: &Path) -> (Agent, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let a = Agent::start(
        &bins(),
        None,
        &["--listen", &listen, "--key", key.to_str().unwrap()],
    )
    .expect("agent");
    (a, listen)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Agent state has no change notification; poll the API.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn boot(agent: &Agent, vm: &str, img: &GuestImage) {
    let cfg = agent.write_file(
        &format!("{vm}.toml"),
        &img.config(vm, "remus.workload=tick", ""),
    );
    let out = agent.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    agent
        .wait_console(vm, BOOT, "tick 3", |c| last_tick(c) >= Some(3))
        .unwrap();
}

#[test]
fn migration_there_and_back() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    // The VM's disk is local to each host: A has the image; B keeps its
    // copy in its own image directory (and starts without one), and so
    // does A when the VM comes back (its record of the VM is gone with
    // the migration).
    let adir = tempfile::tempdir_in("/tmp").unwrap();
    let disk = adir.path().join("mig.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (a, a_listen) = agent_with_port(&key);
    let b_port = free_port();
    let b_listen = format!("127.0.0.1:{b_port}");
    let b = Agent::start(
        &bins(),
        None,
        &["--listen", &b_listen, "--key", key.to_str().unwrap()],
    )
    .expect("agent B");
    let cfg = a.write_file(
        "mig.toml",
        &img.config(
            "mig",
            "remus.workload=tick,diskload:/dev/vda:--region-mb:60",
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n",
                disk.display()
            ),
        ),
    );
    let out = a.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    a.wait_console("mig", BOOT, "tick 3 and diskload", |c| {
        last_tick(c) >= Some(3) && c.contains("diskload: done")
    })
    .unwrap();

    for (from, to, to_listen) in [(&a, &b, &b_listen), (&b, &a, &a_listen)] {
        let before = last_tick(&from.console("mig")).unwrap();
        let out = from.cli(&["migrate", "--json", "mig", to_listen]);
        assert!(out.ok, "migrate: {}\n{}", out.stderr, from.log_text());
        let done: serde_json::Value = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "done")
            .unwrap_or_else(|| panic!("no done event: {}", out.stdout));
        for k in ["total_ms", "downtime_ms", "bytes"] {
            assert!(done[k].as_f64().unwrap() > 0.0, "{k}: {done}");
        }
        // Gone from the source, running at the destination.
        assert!(from.vm("mig").is_none(), "source still lists the VM");
        let v = to.vm("mig").expect("destination lists the VM");
        assert_eq!(v["role"], "unprotected");
        assert!(v["state"] == "r" || v["state"] == "b", "{v}");
        // And it goes on counting from where it was.
        let text = to
            .wait_console("mig", BOOT, "ticks after migration", |c| {
                ticks(c).len() >= 3
            })
            .unwrap();
        remus_testbed::assert_ticks_go_on(&text, before);
        // The switch-over resumed it once; once the destination's failover
        // decision has run, nothing has tried to resume it again.
        wait_for(
            "the destination's decision",
            Duration::from_secs(30),
            || to.log_text().matches("migration complete").count() >= 1,
        );
        let log = to.log_text();
        assert!(!log.contains("FAILED"), "{log}");
        // The source streamed its QEMU's save of the device state, and
        // the destination loaded it as it arrived (through the incoming
        // migration opened ahead), and ran the VM only at the switch-over:
        // QEMU's RESUME there comes after its STOP at the source.
        let taken = from.last_log_line("migration: guest stopped for the last checkpoint");
        assert!(taken.contains("streamed=true"), "{taken}");
        let loaded = to.last_log_line("device state as it arrives");
        assert!(loaded.contains("opened_ahead=true"), "{loaded}");
        // QEMU there started the VM itself as its load ended (its RESUME
        // before its `completed`): it took the `cont` with the incoming
        // migration opened ahead, and the load waited for the state's
        // last byte and the stream's end, held back until then.
        let switched = to.last_log_line("switch-over: VM resumed here");
        assert!(switched.contains("started_by_load=true"), "{switched}");
        let stopped = done["stopped_at_us"].as_u64().expect("stopped_at_us");
        let resumed = remus_testbed::resumed_at_us(&log)
            .unwrap_or_else(|| panic!("no resumed_at_us:\n{log}"));
        assert!(
            resumed > stopped,
            "resumed at {resumed} µs, stopped at {stopped} µs"
        );
        assert!(
            to.vm("mig").is_some(),
            "still there after the session ended"
        );
        // The disk came along: the chunks that differed (all of them the
        // first time, where B had no image; only what B wrote since, on
        // the way back) and every write made during the migration. The
        // guest checks its records against the disk it now runs on.
        let synced: serde_json::Value = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "disk_synced")
            .unwrap_or_else(|| panic!("no disk_synced event: {}", out.stdout));
        assert!(synced["differing_chunks"].as_u64().unwrap() > 0, "{synced}");
        // A migration compares every chunk, and says so.
        assert_eq!(synced["mode"], "full", "{synced}");
        let out = to.cli_stdin(&["console", "mig"], Some(b"\ntouch /run/diskload.verify\n"));
        assert!(out.ok, "{}", out.stderr);
        let text = to
            .wait_console("mig", BOOT, "diskload verify", |c| {
                c.contains("diskload verify ok") || c.contains("diskload verify FAILED")
            })
            .unwrap();
        assert!(text.contains("diskload verify ok"), "{text}");
    }
}

#[test]
fn bad_peers_are_rejected_and_the_agent_carries_on() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let (backup, listen) = agent_with_port(&key);

    // Garbage bytes on the replication port: refused, agent unharmed.
    {
        let mut s = std::net::TcpStream::connect(&listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage")
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // A peer offering only a protocol version from the future.
    {
        let s = std::net::TcpStream::connect(&listen).unwrap();
        let k = remus_proto::Key::load(&key).unwrap();
        let mut params = remus_proto::HelloParams::new(
            remus_proto::Purpose::Protect,
            "x",
            remus_proto::VmCompat::default(),
        );
        params.versions = 90..=99;
        let e = remus_proto::client_handshake(s, &k, &params)
            .expect_err("a version from the future must be refused");
        assert!(e.to_string().contains("version"), "{e}");
    }

    // A primary with another key.
    let kd2 = tempfile::tempdir().unwrap();
    let other_key = write_key(kd2.path());
    let stranger = Agent::start(&bins(), None, &["--key", other_key.to_str().unwrap()]).unwrap();
    boot(&stranger, "vm1", &img);
    let out = stranger.cli(&["protect", "-d", "vm1", &listen]);
    assert!(!out.ok, "a wrong key must be refused");
    assert!(
        out.stderr.contains("could not prove") || out.stderr.contains("authenticat"),
        "{}",
        out.stderr
    );
    assert_eq!(stranger.vm("vm1").unwrap()["role"], "unprotected");

    // No key at all on the primary: a clear error before any connection.
    let keyless = Agent::start(&bins(), None, &[]).unwrap();
    let cfg = keyless.write_file("k.toml", &img.config("vm2", "remus.workload=tick", ""));
    assert!(keyless.cli(&["create", cfg.to_str().unwrap()]).ok);
    let out = keyless.cli(&["protect", "-d", "vm2", &listen]);
    assert!(!out.ok && out.stderr.contains("--key"), "{}", out.stderr);

    // A name the backup already runs.
    let cfg = backup.write_file("b.toml", &img.config("vm1", "remus.workload=tick", ""));
    assert!(backup.cli(&["create", cfg.to_str().unwrap()]).ok);
    let friend = Agent::start(&bins(), None, &["--key", key.to_str().unwrap()]).unwrap();
    let cfg = friend.write_file("f.toml", &img.config("vm1", "remus.workload=tick", ""));
    assert!(friend.cli(&["create", cfg.to_str().unwrap()]).ok);
    let out = friend.cli(&["protect", "-d", "vm1", &listen]);
    assert!(
        !out.ok
            && out.stderr.contains("already runs on this host")
            && out.stderr.contains("--discard-this-copy"),
        "{}",
        out.stderr
    );

    // Through all of it the backup agent kept serving, with only its own VM.
    let list = backup.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["role"], "unprotected");
    assert!(backup.cli(&["info"]).ok);
}

#[test]
fn backup_loss_then_reprotect_then_destroy_fails_over() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let primary = Agent::start(&bins(), None, &["--key", key.to_str().unwrap()]).unwrap();
    let (mut b1, l1) = agent_with_port(&key);
    boot(&primary, "vm", &img);

    let out = primary.cli(&[
        "protect",
        "-d",
        "--manual",
        "-i",
        "100",
        "--timeout",
        "1000",
        "vm",
        &l1,
    ]);
    assert!(out.ok, "{}", out.stderr);
    wait_for("standby on b1", Duration::from_secs(30), || {
        b1.vm("vm").is_some_and(|v| v["role"] == "backup")
    });
    assert_eq!(primary.vm("vm").unwrap()["role"], "primary");

    // The backup hangs (frozen: its socket stays open and silent): the
    // primary notices by the missing heartbeats within about the timeout
    // (1 s), runs on, unprotected, and says so.
    b1.freeze();
    let frozen = Instant::now();
    wait_for("primary to notice", Duration::from_secs(30), || {
        primary.vm("vm").is_some_and(|v| v["role"] == "unprotected")
    });
    assert!(
        frozen.elapsed() < Duration::from_secs(5),
        "a silent backup must be noticed by its missing heartbeats, took {:?}",
        frozen.elapsed()
    );
    b1.kill_hard();
    let log = primary.log_text();
    assert!(log.contains("BACKUP LOST"), "{log}");
    let t = last_tick(&primary.console("vm")).unwrap();
    primary
        .wait_console("vm", BOOT, "ticks after backup loss", |c| {
            last_tick(c) >= Some(t + 3)
        })
        .unwrap();

    // Protect again, to a new backup, following the checkpoints.
    let (b2, l2) = agent_with_port(&key);
    let mut follow =
        ProtectFollower::start(&primary, "vm", &l2, &["-i", "100", "--timeout", "1000"]).unwrap();
    // This agent has no arbiter: protect says first, in one line, what
    // that risks; then the initial sync.
    let first = follow.next_event().unwrap();
    assert_eq!(first["event"], "warning", "{first}");
    let msg = first["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("no arbiter") && msg.contains("split brain"),
        "{first}"
    );
    let second = follow.next_event().unwrap();
    assert_eq!(second["event"], "initial_sync", "{second}");
    let v = b2.vm("vm").expect("standby on b2");
    assert_eq!(
        (v["role"].as_str(), v["state"].as_str()),
        (Some("backup"), Some("p"))
    );
    // A checkpoint taken after we saw tick `seen` is acknowledged: the
    // backup holds at least that state.
    follow.checkpoint_after(now_ms()).unwrap();
    // Checkpoints travel compressed by default (protocol version 3): pages
    // the backup already has a version of go as XOR deltas, and far fewer
    // bytes than the raw pages and device state cross the wire. The
    // backup decodes each against its committed copy; the checkpoint
    // digest verified the result, or nothing would have been acked.
    let (mut wire, mut raw, mut xor, mut dev_max) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..5 {
        let ev = follow.event("checkpoint").unwrap();
        wire += ev["bytes"].as_u64().unwrap();
        raw += ev["raw_bytes"].as_u64().unwrap();
        xor += ev["xor_pages"].as_u64().unwrap();
        let dev = ev["raw_bytes"].as_u64().unwrap() - 4096 * ev["dirty_pages"].as_u64().unwrap();
        dev_max = dev_max.max(dev);
    }
    // Between two agents of this version the device state of a VM
    // without UEFI travels without QEMU's RAM blocks (device-only state,
    // about 80 KB; QEMU's full stream is 300-400 KB, mostly firmware).
    assert!(
        dev_max > 0 && dev_max < 200_000,
        "device state of up to {dev_max} bytes per checkpoint"
    );
    assert!(
        raw > 0 && wire * 2 < raw,
        "compressed {wire} of {raw} raw bytes"
    );
    assert!(xor > 0, "no page went as a delta in 5 checkpoints");

    // An operator's pause holds across checkpoints (which stop and resume
    // the guest themselves): ticks stop while checkpoints go on.
    assert!(primary.cli(&["pause", "vm"]).ok);
    let at_pause = last_tick(&primary.console("vm")).unwrap();
    // The checkpoint that captures the paused guest says so. (It may
    // begin before this test reads the clock after `pause` returns, and
    // none follows it while the guest is paused: a time cannot find it.)
    let captured = loop {
        let ev = follow.event("checkpoint").unwrap();
        if ev["guest_held"] == true {
            break ev;
        }
    };
    // The paused state is captured once; the session stays alive (the
    // backup does not fail over) and the guest stays paused.
    assert_eq!(primary.vm("vm").unwrap()["state"], "p", "after {captured}");
    assert_eq!(b2.vm("vm").unwrap()["role"], "backup");
    assert_eq!(last_tick(&primary.console("vm")).unwrap(), at_pause);
    assert!(primary.cli(&["unpause", "vm"]).ok);
    primary
        .wait_console("vm", BOOT, "ticks after unpause", |c| {
            last_tick(c) > Some(at_pause)
        })
        .unwrap();
    let seen_at = now_ms();
    let seen = last_tick(&primary.console("vm")).unwrap();
    follow.checkpoint_after(seen_at).unwrap();

    // `destroy` on the primary is a primary failure to the backup.
    let out = primary.cli(&["destroy", "vm"]);
    assert!(out.ok, "{}", out.stderr);
    let t = Instant::now();
    while !b2.vm("vm").is_some_and(|v| v["role"] == "unprotected") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for failover on b2: {:?}\nb2's log:\n{}",
            b2.vm("vm"),
            b2.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = b2
        .wait_console("vm", BOOT, "ticks on b2", |c| ticks(c).len() >= 2)
        .unwrap();
    let got = ticks(&text);
    assert!(
        got[0] >= seen,
        "resumed at {} but {seen} was acknowledged: {got:?}",
        got[0]
    );
    assert!(b2.log_text().contains("FAILOVER"));
}

/// The backup cannot run the primary's VM as configured (its disk has
/// another size there): protect is refused, listing the mismatch, and
/// nothing is left on the backup.
#[test]
fn incompatible_backup_is_refused_with_the_mismatch() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let files = tempfile::tempdir_in("/tmp").unwrap();
    let disk = files.path().join("disk.img");
    let other = files.path().join("other.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&other, vec![0u8; 2 << 20]).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let backup = Agent::start(
        &bins(),
        None,
        &["--listen", &listen, "--key", key.to_str().unwrap()],
    )
    .expect("backup agent");
    // The backup's operator placed a 2 MiB image for the VM's shared disk.
    let placement = backup.dir.path().join("vms");
    std::fs::create_dir_all(&placement).unwrap();
    std::fs::write(
        placement.join("inc.toml"),
        format!(
            "[[disk]]\ntarget = \"vda\"\npath = \"{}\"\n",
            other.display()
        ),
    )
    .unwrap();
    let primary = Agent::start(&bins(), None, &["--key", key.to_str().unwrap()]).unwrap();
    let cfg = primary.write_file(
        "vm.toml",
        &img.config(
            "inc",
            "remus.workload=tick",
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\nreplicate = false\n",
                disk.display()
            ),
        ),
    );
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "{}", out.stderr);
    let out = primary.cli(&["protect", "-d", "inc", &listen]);
    assert!(!out.ok, "an incompatible backup must refuse");
    assert!(
        out.stderr.contains("vda")
            && out.stderr.contains("1048576")
            && out.stderr.contains("2097152"),
        "the error names the disk and both sizes: {}",
        out.stderr
    );
    assert!(backup.list().is_empty(), "nothing left on the backup");
    assert_eq!(primary.vm("inc").unwrap()["role"], "unprotected");
}

/// The initial copy of a guest's memory streams: neither agent holds it
/// whole. A 1 GiB guest fills 640 MiB with data, is protected, and once
/// the initial copy is acknowledged each agent's peak memory (VmHWM) is
/// far below what it copied.
#[test]
fn the_initial_copy_streams_on_both_sides() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let primary = Agent::start(&bins(), None, &["--key", key.to_str().unwrap()]).unwrap();
    let (backup, listen) = agent_with_port(&key);
    let cfg = img
        .config("big", "remus.workload=cpumem:--data-mb:640", "")
        .replace("memory = 256", "memory = 1024");
    let cfg = primary.write_file("big.toml", &cfg);
    assert!(primary.cli(&["create", cfg.to_str().unwrap()]).ok);
    primary
        .wait_console("big", Duration::from_secs(180), "the data filled", |c| {
            c.contains("cpumem:")
        })
        .unwrap();
    let mut follow = ProtectFollower::start(&primary, "big", &listen, &["-i", "200"]).unwrap();
    let initial = follow.event("initial_sync").unwrap();
    let copied = initial["bytes"].as_u64().unwrap();
    assert!(copied > 640 << 20, "{initial}");
    follow.checkpoint_after(0).unwrap();
    let peak = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        kb << 10
    };
    let (p, b) = (peak(primary.pid().unwrap()), peak(backup.pid().unwrap()));
    eprintln!(
        "initial copy {} MiB; peak memory: primary agent {} MiB, backup agent {} MiB",
        copied >> 20,
        p >> 20,
        b >> 20
    );
    for (who, m) in [("primary", p), ("backup", b)] {
        assert!(
            m < 256 << 20,
            "the {who} agent peaked at {} MiB for a {} MiB copy",
            m >> 20,
            copied >> 20
        );
    }
}

/// `remus protect --unencrypted` (for a link encrypted already) works only
/// with a backup that allows it, and both sides say so in their logs.
#[test]
fn unencrypted_replication_only_where_the_backup_allows_it() {
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let primary = Agent::start(&bins(), None, &["--key", key.to_str().unwrap()]).unwrap();
    boot(&primary, "clear", &img);
    let (strict, strict_listen) = agent_with_port(&key);
    let out = primary.cli(&["protect", "-d", "--unencrypted", "clear", &strict_listen]);
    assert!(!out.ok, "a backup that does not allow it refuses");
    assert!(
        out.stderr.contains("--allow-unencrypted-peers"),
        "{}",
        out.stderr
    );
    assert!(strict.vm("clear").is_none());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let lax = Agent::start(
        &bins(),
        None,
        &[
            "--listen",
            &listen,
            "--key",
            key.to_str().unwrap(),
            "--allow-unencrypted-peers",
        ],
    )
    .unwrap();
    let mut follow =
        ProtectFollower::start(&primary, "clear", &listen, &["-i", "100", "--unencrypted"])
            .unwrap();
    follow.checkpoint_after(0).unwrap();
    assert!(primary.log_text().contains("IN THE CLEAR"));
    assert!(lax.log_text().contains("IN THE CLEAR"));
    assert_eq!(lax.vm("clear").unwrap()["role"], "backup");
}

/// `--max-rate` on the real path: a protection's initial copy (the disk
/// sync's data and the copy of RAM) and a migration's pre-copy go at most
/// at the cap (plus the bucket's 100 ms burst and 5 %), a stop during a
/// capped copy is not held up by it, and without a cap the same copies go
/// faster.
#[test]
fn max_rate_caps_the_initial_copy_and_the_pre_copy() {
    const CAP: u64 = 20 << 20;
    // A migration compresses its pages (this guest's RAM to about a
    // tenth), so its pre-copy is smaller: a lower cap keeps it long
    // enough to measure.
    const MIGRATE_CAP: u64 = 8 << 20;
    let img = GuestImage::find().expect("guest image");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let (a, a_listen) = agent_with_port(&key);
    let (b, b_listen) = agent_with_port(&key);
    // The guest writes up to 16 MiB of its disk, differing from B's new copy.
    let adir = tempfile::tempdir_in("/tmp").unwrap();
    let disk = adir.path().join("cap.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let cfg = a.write_file(
        "cap.toml",
        &img.config(
            "cap",
            "remus.workload=tick,diskload:/dev/vda:--region-mb:16",
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n",
                disk.display()
            ),
        ),
    );
    assert!(a.cli(&["create", cfg.to_str().unwrap()]).ok);
    // At least 9 MiB written (records of 4 KiB), so that the capped sync
    // below has more than its 8 MiB to send.
    a.wait_console("cap", BOOT, "tick 3 and 9 MiB of diskload", |c| {
        last_tick(c) >= Some(3) && last_diskload_done(c) >= Some(9 * 256)
    })
    .unwrap();
    // Bytes sent in `ms` under the cap: at most the rate for that time,
    // the bucket's burst (100 ms) and a piece in flight, with 5 % for the
    // clocks.
    let under_cap =
        |cap: u64, bytes: u64, ms: f64| bytes as f64 <= cap as f64 * (ms / 1e3 * 1.05 + 0.1) + 1e6;
    let mib_s = |bytes: u64, ms: f64| bytes as f64 / (1 << 20) as f64 / (ms / 1e3);

    // Protection, capped. Uncompressed (-u), so that the bytes the events
    // report are the bytes on the link (the cap counts the latter).
    let mut follow = ProtectFollower::start(
        &a,
        "cap",
        &b_listen,
        &["-u", "-i", "200", "--max-rate", "20M"],
    )
    .unwrap();
    let synced = follow.event("disk_synced").unwrap();
    let (sent, sync_ms) = (
        synced["sent_bytes"].as_u64().unwrap(),
        synced["ms"].as_f64().unwrap(),
    );
    let initial = follow.event("initial_sync").unwrap();
    let (copied, copy_ms) = (
        initial["bytes"].as_u64().unwrap(),
        initial["ms"].as_f64().unwrap(),
    );
    follow.checkpoint_after(0).unwrap();
    eprintln!(
        "capped at 20 MiB/s: disk sync {} MiB in {sync_ms:.0} ms ({:.1} MiB/s), RAM {} MiB in {copy_ms:.0} ms ({:.1} MiB/s)",
        sent >> 20,
        mib_s(sent, sync_ms),
        copied >> 20,
        mib_s(copied, copy_ms)
    );
    // Enough to take the cap a while (four bursts and more): it is
    // measured, not its burst. (The guest wrote most of its 16 MiB.)
    assert!(sent >= 8 << 20, "{synced}");
    assert!(copied >= 2 * CAP, "{initial}");
    assert!(
        under_cap(CAP, sent, sync_ms),
        "disk sync over the cap: {synced}"
    );
    assert!(
        under_cap(CAP, copied, copy_ms),
        "RAM copy over the cap: {initial}"
    );
    drop(follow);
    assert!(a.cli(&["protect", "--stop", "cap"]).ok);
    wait_for("protection to end", Duration::from_secs(30), || {
        a.vm("cap").is_some_and(|v| v["role"] == "unprotected") && b.vm("cap").is_none()
    });

    // A capped copy ends at once on `--stop`, as an orderly end: the
    // backup hears the goodbye inside the open copy and discards its copy
    // (at 1 MiB/s this copy of RAM would take over a minute).
    let on_purpose = || b.log_text().matches("ended the session on purpose").count();
    let before = on_purpose();
    let mut follow = unless_busy(|| {
        let mut f = ProtectFollower::start(
            &a,
            "cap",
            &b_listen,
            &["-u", "-i", "200", "--max-rate", "1M"],
        )
        .map_err(|e| format!("{e:#}"))?;
        f.event("disk_synced").map_err(|e| format!("{e:#}"))?;
        Ok(f)
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    assert!(a.cli(&["protect", "--stop", "cap"]).ok);
    let stopped = follow.event("stopped").unwrap();
    assert_eq!(stopped["checkpoints"], 0, "{stopped}");
    wait_for("protection to end", Duration::from_secs(30), || {
        a.vm("cap").is_some_and(|v| v["role"] == "unprotected") && b.vm("cap").is_none()
    });
    eprintln!(
        "stopped during a copy at 1 MiB/s: over in {:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the stop waited {:?} for the capped copy",
        t.elapsed()
    );
    assert_eq!(on_purpose(), before + 1, "{}", b.log_text());
    drop(follow);

    // The same copy of RAM without a cap goes faster. Asked for as soon
    // as b no longer lists its copy, while it may still be tearing it
    // down: a's agent asks again while b says it is busy (no retry here).
    let mut follow = ProtectFollower::start(&a, "cap", &b_listen, &["-u", "-i", "200"])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", a.log_text()));
    let initial = follow.event("initial_sync").unwrap();
    eprintln!(
        "protect right after a stop: a asked b again while it was busy: {}",
        a.log_text()
            .contains("the peer is busy with a copy of the VM")
    );
    let (free, free_ms) = (
        initial["bytes"].as_u64().unwrap(),
        initial["ms"].as_f64().unwrap(),
    );
    follow.checkpoint_after(0).unwrap();
    eprintln!(
        "uncapped: RAM {} MiB in {free_ms:.0} ms ({:.1} MiB/s)",
        free >> 20,
        mib_s(free, free_ms)
    );
    assert!(
        mib_s(free, free_ms) > 1.5 * mib_s(copied, copy_ms),
        "uncapped {initial} against capped {copied} bytes in {copy_ms} ms"
    );
    drop(follow);
    assert!(a.cli(&["protect", "--stop", "cap"]).ok);
    wait_for("protection to end", Duration::from_secs(30), || {
        a.vm("cap").is_some_and(|v| v["role"] == "unprotected") && b.vm("cap").is_none()
    });

    // Migration: capped there, uncapped back. The pre-copy (disk sync,
    // initial copy, rounds) is what the last round's byte count says was
    // sent before the guest stopped, in the time before the downtime.
    let migrate = |from: &Agent, to: &str, args: &[&str]| -> (u64, f64) {
        let mut argv = vec!["migrate", "--json"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["cap", to]);
        let out = unless_busy(|| {
            let out = from.cli(&argv);
            if !out.ok {
                return Err(format!("migrate: {}\n{}", out.stderr, from.log_text()));
            }
            Ok(out)
        });
        let events: Vec<serde_json::Value> = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let pre = events
            .iter()
            .rev()
            .find(|v| v["event"] == "round")
            .and_then(|v| v["bytes"].as_u64())
            .unwrap_or_else(|| panic!("no round event: {}", out.stdout));
        let done = events
            .iter()
            .find(|v| v["event"] == "done")
            .unwrap_or_else(|| panic!("no done event: {}", out.stdout));
        let ms = done["total_ms"].as_f64().unwrap() - done["downtime_ms"].as_f64().unwrap();
        (pre, ms)
    };
    let (pre, pre_ms) = migrate(&a, &b_listen, &["--max-rate", "8M"]);
    assert!(b.vm("cap").is_some() && a.vm("cap").is_none());
    let (back, back_ms) = migrate(&b, &a_listen, &[]);
    eprintln!(
        "migration: capped at 8 MiB/s {} MiB in {pre_ms:.0} ms ({:.1} MiB/s), uncapped {} MiB in {back_ms:.0} ms ({:.1} MiB/s)",
        pre >> 20,
        mib_s(pre, pre_ms),
        back >> 20,
        mib_s(back, back_ms)
    );
    assert!(pre >= 2 * MIGRATE_CAP, "{pre}");
    assert!(
        under_cap(MIGRATE_CAP, pre, pre_ms),
        "pre-copy over the cap: {pre} bytes in {pre_ms} ms"
    );
    assert!(
        mib_s(back, back_ms) > 1.5 * mib_s(pre, pre_ms),
        "uncapped {back} bytes in {back_ms} ms"
    );
    // The guest ran through it all.
    a.wait_console("cap", BOOT, "ticks after coming back", |c| {
        ticks(c).len() >= 3
    })
    .unwrap();
}

/// `f`, again while it fails because the peer is still tearing down the
/// last session's copy (it says "try again in a moment"), for up to 30 s.
fn unless_busy<T>(mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if e.contains("try again") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
}
