//! The agent restarts without stopping its VMs, through the real agents,
//! QEMU and network: hosts a and b run agents with `--on-stop keep` (the
//! default outside tests); the guest on a serves a TCP session to c and
//! writes checked records to its disk.
//!
//! 1. Unprotected: a's agent is stopped (SIGTERM) and started again, then
//!    killed (SIGKILL) and started again. Each time the same QEMU runs on
//!    (same PID), the new agent adopts it with the same ID, and the
//!    session and the disk records carry on.
//! 2. Protected to b (wanted): a's agent is restarted (SIGTERM). It
//!    suspends the session at a last checkpoint (the guest stays stopped
//!    there, b keeps its standby and does not fail over), and the new
//!    agent resumes the session from that checkpoint: the same standby
//!    QEMU on b, no new copy, no disk sync.
//!    While a's agent is away once more, a peer on host c that holds the
//!    key asks b for the kept standby, naming the suspended epoch: b hands
//!    it to no other host (it discards it), and a's next agent gets a new
//!    copy instead (changed-only), with nothing running twice.
//! 3. b's agent is restarted (SIGTERM): it asks a to suspend the session,
//!    and keeps its standby running for its next agent, which adopts it;
//!    a resumes the session once b is back: the same standby QEMU, no
//!    new copy, no disk sync. b's agent restarted again at once: a does
//!    not pause its guest for that twice in ten minutes, it ends the
//!    session in order (b drops its standby, no failover) and protects
//!    again with a new copy.
//! 4. a's agent is killed (SIGKILL) while the VM is protected: b takes
//!    over (the session's connection closed with no goodbye). The new
//!    agent on a must not run the QEMU it finds (b runs the VM now): it
//!    stops it, and b protects the VM back to a.
//! 5. b's agent (now the primary's) stays away longer than the restart
//!    grace (`--restart-grace 10`): a takes the silence for a dead host
//!    and fails over. b's next agent finds a running the VM when it tries
//!    to resume: it stops its own QEMU (never runs it) and lists the copy
//!    stale, and a protects the VM back to b.
//!
//! The TCP session survives all of it, and every record the guest wrote
//! is on its disk at the end.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use remus_proto::{HelloParams, Key, Message, Purpose, VmCompat, client_handshake};

use remus_testbed::{
    Agent, Binaries, GuestImage, Lan, PairFiles, ProtectFollower, SeqClient, lan_agent,
    process_alive, records_intact, start_records_vm, wait_for,
};

const VM: &str = "rst";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7200;
const DISK_BYTES: u64 = 256 << 20;
/// `--restart-grace`: long enough for a restart on a loaded host, short
/// enough to wait out in step 5.
const GRACE_S: u64 = 10;

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

/// `n` more lines reach the client within 90 s, and nothing went wrong
/// on either side of the session so far.
fn session_goes_on(client: &SeqClient, n: u64, host: &Agent, what: &str) {
    let at = client.received();
    client
        .wait_received(at + n, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{what}: the session stalled: {e}\n{}", host.console(VM)));
    assert_eq!(client.error(), None, "{what}");
    let console = host.console(VM);
    assert!(
        !console.contains("gap") && !console.contains("duplicate"),
        "{what}: {console}"
    );
}

fn info(h: &Agent) -> serde_json::Value {
    h.vm(VM)
        .unwrap_or_else(|| panic!("{VM} not listed:\n{}", h.log_text()))
}

/// The VM's role on `h` becomes `role`.
fn wait_role(h: &Agent, role: &str, timeout: Duration) {
    wait_for(&format!("{VM} as {role}"), timeout, || {
        h.vm(VM).filter(|v| v["role"] == role).map(|_| ())
    });
}

/// The backup's last disk sync plan compared only changed chunks (no
/// full compare, no full copy).
fn last_sync_changed_only(backup: &Agent, what: &str) {
    let plan = backup.last_sync_plan();
    assert!(plan.contains("mode=Changed"), "{what}: {plan}");
}

/// The VM on `h` is the primary of a session whose first checkpoint has
/// committed (before that, a lost primary leaves the backup nothing to
/// resume).
fn wait_protected(h: &Agent, timeout: Duration) {
    wait_for(
        &format!("{VM} protected, a checkpoint committed"),
        timeout,
        || {
            h.vm(VM)
                .filter(|v| v["role"] == "primary" && !v["protection"]["last_checkpoint"].is_null())
                .map(|_| ())
        },
    );
}

/// The backup still runs the standby QEMU `pid`, and its log has no disk
/// sync plan beyond the `plans` it had: the session was resumed, not set
/// up anew.
fn same_standby(backup: &Agent, pid: Option<u64>, plans: usize) {
    let log = backup.log_text();
    assert_eq!(info(backup)["pid"].as_u64(), pid, "a new standby:\n{log}");
    assert_eq!(
        log.matches("disk sync plan").count(),
        plans,
        "a new disk sync:\n{log}"
    );
}

/// The epoch the last suspend on `h` stopped the guest at (from its log).
fn suspended_epoch(h: &Agent) -> u64 {
    let log = h.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("protection SUSPENDED"))
        .unwrap_or_else(|| panic!("no suspend in the log:\n{log}"));
    let at = line.find(" epoch=").expect("epoch field") + " epoch=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("epoch in: {line}"))
}

/// A peer with the key on host c asks `backup` to resume the session of
/// the VM (config as a recorded it) at `epoch`; the backup's first answer.
fn steal_standby(
    lan: &Lan,
    backup: &str,
    key: &Key,
    config: serde_json::Value,
    epoch: u64,
) -> Message {
    lan.host("c")
        .run_in(|| {
            let (mut ch, _) = client_handshake(
                TcpStream::connect(backup).expect("connect to b"),
                key,
                &HelloParams::new(Purpose::Protect, VM, VmCompat::default()),
            )
            .expect("handshake with the key");
            let setup = serde_json::json!({
                "config": config,
                "timeout_ms": 1000,
                "replicate_disks": true,
                "tune": true,
                "suspend": true,
                "resume": epoch,
            });
            Message::VmConfig {
                json: setup.to_string(),
            }
            .write_to(&mut ch)
            .unwrap();
            ch.flush().unwrap();
            ch.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            Message::read_from(&mut ch).expect("an answer")
        })
        .expect("run on host c")
}

/// An agent on host `h` that leaves its VMs running when it stops.
fn agent(lan: &Lan, h: &str, store: &std::path::Path, key: &std::path::Path) -> Agent {
    let grace = GRACE_S.to_string();
    let extra = [
        "--host-name",
        h,
        "--on-stop",
        "keep",
        "--restart-grace",
        &grace,
    ];
    lan_agent(&bins(), lan, (h, REPL_PORT), store, key, &extra)
}

#[test]
fn restarting_the_agent_stops_no_vm() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::standard("rst").expect("LAN of namespace hosts");
    let files = PairFiles::new(DISK_BYTES);
    let mut a = agent(&lan, "a", &files.images, &files.key);
    let mut b = agent(&lan, "b", &files.store_b, &files.key);
    let b_listen = format!("{}:{REPL_PORT}", lan.addr("b"));

    let client = start_records_vm(
        &a,
        &img,
        VM,
        (VM_IP, "52:54:00:c6:12:3f"),
        &files.disk,
        lan.host("c"),
    );
    let first = info(&a);
    let (id, pid) = (first["id"].clone(), first["pid"].as_u64().unwrap() as u32);

    // 1. Unprotected: a graceful restart, then a crash of the agent.
    for (how, crash) in [("SIGTERM", false), ("SIGKILL", true)] {
        let t = Instant::now();
        if crash {
            a.kill_agent_only();
        } else {
            a.stop_agent_only().unwrap();
        }
        assert!(process_alive(pid), "{how}: QEMU went with the agent");
        a.restart().unwrap();
        let v = info(&a);
        assert_eq!(
            (&v["id"], v["pid"].as_u64()),
            (&id, Some(u64::from(pid))),
            "{how}: {v}"
        );
        assert!(v["state"] == "r" || v["state"] == "b", "{how}: runs: {v}");
        session_goes_on(&client, 100, &a, how);
        eprintln!(
            "1. agent {how}: adopted, the session flowed again {:?} after the stop",
            t.elapsed()
        );
    }
    assert!(a.log_text().contains("adopted the VM"), "{}", a.log_text());
    let n1 = records_intact(&a, VM, "after two agent restarts");
    eprintln!("1. {n1} records intact");

    // 2. Protected (wanted), a's agent restarted in order: the session is
    //    suspended and resumed.
    let mut follow =
        ProtectFollower::start_healing(&a, VM, &b_listen, &["-i", "100", "--timeout", "1000"])
            .unwrap();
    follow.checkpoint_after(0).unwrap();
    drop(follow);
    wait_role(&b, "backup", Duration::from_secs(30));
    let standby_pid = info(&b)["pid"].as_u64();
    let plans = b.log_text().matches("disk sync plan").count();
    let t = Instant::now();
    a.stop_agent_only().unwrap();
    assert!(process_alive(pid), "the protected VM went with the agent");
    assert!(
        a.log_text().contains("protection SUSPENDED"),
        "{}",
        a.log_text()
    );
    // b keeps its standby: no failover, nothing dropped.
    wait_for("b to keep its standby", Duration::from_secs(10), || {
        b.log_text()
            .contains("the primary's agent is restarting")
            .then_some(())
    });
    assert_eq!(info(&b)["role"], "backup");
    a.restart().unwrap();
    assert_eq!(info(&a)["pid"].as_u64(), Some(u64::from(pid)));
    wait_protected(&a, Duration::from_secs(60));
    let resumed_in = t.elapsed();
    assert!(
        a.log_text()
            .contains("session resumed from the checkpoint the guest stopped at"),
        "{}",
        a.log_text()
    );
    assert!(
        b.log_text()
            .contains("the session resumes from the kept standby"),
        "{}",
        b.log_text()
    );
    // The same standby QEMU, and no new copy or disk sync.
    same_standby(&b, standby_pid, plans);
    session_goes_on(&client, 100, &a, "after a's restart");
    assert!(!b.log_text().contains("FAILOVER"), "{}", b.log_text());
    eprintln!(
        "2. a's agent restarted: session suspended and resumed in {resumed_in:?}, same standby"
    );

    // 2b. A key-holding peer on host c asks for the kept standby.
    a.stop_agent_only().unwrap();
    let epoch = suspended_epoch(&a);
    wait_for(
        "b to keep its standby again",
        Duration::from_secs(10),
        || {
            (b.log_text()
                .matches("the primary's agent is restarting")
                .count()
                == 2)
                .then_some(())
        },
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.state_dir.join("vms").join(VM).join("config.json")).unwrap(),
    )
    .unwrap();
    let key = Key::load(&files.key).unwrap();
    let answer = steal_standby(&lan, &b_listen, &key, config, epoch);
    assert_ne!(
        answer,
        Message::Resumable { resumed_at: epoch },
        "b handed the standby to another host:\n{}",
        b.log_text()
    );
    wait_for(
        "b to discard the kept standby",
        Duration::from_secs(10),
        || {
            b.log_text()
                .contains("is discarded: the session comes from")
                .then_some(())
        },
    );
    a.restart().unwrap();
    wait_protected(&a, Duration::from_secs(120));
    assert!(
        a.log_text()
            .contains("the backup no longer holds the suspended session's checkpoint"),
        "{}",
        a.log_text()
    );
    last_sync_changed_only(&b, "a new copy after the standby was discarded");
    session_goes_on(&client, 100, &a, "after the attempt on the kept standby");
    assert!(!b.log_text().contains("FAILOVER"), "{}", b.log_text());
    eprintln!(
        "2b. a peer on c asked for the kept standby of epoch {epoch}: refused ({answer:?}); a got a new copy"
    );

    // 3. b's agent restarted: the session is suspended for it and resumed
    //    with the same standby.
    let standby_pid = info(&b)["pid"].as_u64().unwrap() as u32;
    let plans = b.log_text().matches("disk sync plan").count();
    let t = Instant::now();
    b.stop_agent_only().unwrap();
    assert!(
        process_alive(standby_pid),
        "the standby went with b's agent:\n{}",
        b.log_text()
    );
    wait_for(
        "a to suspend for b's restart",
        Duration::from_secs(10),
        || {
            a.log_text()
                .contains("protection SUSPENDED for the backup's restart")
                .then_some(())
        },
    );
    b.restart().unwrap();
    assert!(
        b.log_text().contains("a standby kept across the restart"),
        "{}",
        b.log_text()
    );
    wait_protected(&a, Duration::from_secs(60));
    let resumed_in = t.elapsed();
    same_standby(&b, Some(u64::from(standby_pid)), plans);
    session_goes_on(&client, 100, &a, "after b's restart");
    assert!(!b.log_text().contains("FAILOVER"), "{}", b.log_text());
    eprintln!(
        "3. b's agent restarted: session suspended and resumed in {resumed_in:?}, same standby"
    );
    b.stop_agent_only().unwrap();
    wait_for(
        "a to end the session in order",
        Duration::from_secs(10),
        || {
            a.log_text()
                .contains("restarts again soon after its last restart")
                .then_some(())
        },
    );
    assert!(
        !process_alive(standby_pid),
        "b kept a standby the primary gave up:\n{}",
        b.log_text()
    );
    b.restart().unwrap();
    wait_protected(&a, Duration::from_secs(120));
    wait_role(&b, "backup", Duration::from_secs(30));
    last_sync_changed_only(&b, "protected again after b's second restart");
    session_goes_on(&client, 100, &a, "after b's second restart");
    assert!(!b.log_text().contains("FAILOVER"), "{}", b.log_text());
    eprintln!("3. b's agent restarted again at once: session ended in order, protected again");

    // 4. a's agent killed while the VM is protected: b takes over, and
    //    the new agent on a must not run its old QEMU.
    let t = Instant::now();
    a.kill_agent_only();
    let ms = b
        .wait_failover(VM, t, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    session_goes_on(&client, 100, &b, "after the failover to b");
    a.restart().unwrap();
    assert!(
        !process_alive(pid),
        "a's new agent left the old primary's QEMU running:\n{}",
        a.log_text()
    );
    assert!(
        a.log_text().contains("NOT ADOPTED"),
        "a's log must say why: {}",
        a.log_text()
    );
    // b protects the VM back to a (changed-only resync of a's copy).
    wait_protected(&b, Duration::from_secs(120));
    wait_role(&a, "backup", Duration::from_secs(30));
    session_goes_on(&client, 100, &b, "protected back to a");
    last_sync_changed_only(&a, "protected back to a");
    let n4 = records_intact(&b, VM, "after the failover");
    assert!(n4 >= n1, "records went missing: {n4} < {n1}");
    eprintln!(
        "4. a's agent killed: b took over in {ms} ms, a's old QEMU stopped; {n4} records intact"
    );

    // 5. b's agent stays away past the grace: a fails over, and b's next
    //    agent must not run its copy.
    let b_pid = info(&b)["pid"].as_u64().unwrap() as u32;
    let t = Instant::now();
    b.stop_agent_only().unwrap();
    assert!(
        b.log_text().contains("protection SUSPENDED"),
        "{}",
        b.log_text()
    );
    let ms = a
        .wait_failover(VM, t, Duration::from_secs(GRACE_S + 60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        ms >= GRACE_S * 1000,
        "a failed over after {ms} ms, within the grace"
    );
    session_goes_on(&client, 50, &a, "after the failover to a");
    b.restart().unwrap();
    wait_for("b to stop its copy", Duration::from_secs(60), || {
        (!process_alive(b_pid)).then_some(())
    });
    assert!(
        b.log_text().contains("the backup RUNS THE VM"),
        "{}",
        b.log_text()
    );
    // a protects the VM back to b (which first lists its copy stale).
    wait_protected(&a, Duration::from_secs(120));
    wait_role(&b, "backup", Duration::from_secs(30));
    session_goes_on(&client, 100, &a, "protected back to b");
    let n5 = records_intact(&a, VM, "after the failover past the grace");
    assert!(n5 >= n4, "records went missing: {n5} < {n4}");
    eprintln!(
        "5. b's agent away past the grace: a took over in {ms} ms, b's copy stopped; {n5} records intact"
    );

    let out = a.cli(&["protect", "--stop", VM]);
    assert!(out.ok, "{}", out.stderr);
    drop(client);
}
