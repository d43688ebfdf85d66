//! Resynchronisation and failback through the real CLI, agents, QEMU and
//! network: hosts a and b (each with its own storage, a mount namespace
//! over one image directory) and a client c on one LAN. The guest writes
//! checkable records to its disk and holds a TCP session with the client
//! throughout.
//!
//! 1. Five round trips: protect, kill the primary at a random moment, the
//!    backup fails over; the dead host's agent comes back on its old state
//!    dir and lists the VM as stale (it never runs); protect back from
//!    the new primary, which compares only the chunks either side's change
//!    records mark; and again the other way. After every failover the
//!    guest verifies its records against the disk, and the session goes
//!    on whole.
//! 2. `remus failback` under load: a planned role swap.
//! 3. The backup's agent crashes in the middle of a resync; the resync
//!    runs again, converges, and the copy it made runs the guest.
//! 4. A forced split brain (the hosts cut apart, both copies run): the
//!    resync refuses and names `--discard-this-copy`; after it, the resync
//!    overwrites the copy given up.

use std::path::Path;
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, Lan, ProtectFollower, SeqClient, jitter, last_diskload_done,
    now_ms, write_key,
};

const VM: &str = "rs";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7100;
/// Activity-log extents the agents keep (a small bound, so the test sees
/// it hold): 8 × 4 MiB.
const AL_EXTENTS: u64 = 8;
const CHUNK: u64 = 64 * 1024;
const EXTENT_CHUNKS: u64 = 64;
const DISK_BYTES: u64 = 512 << 20;

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

/// An agent on host `h` that keeps the copies it receives in `store`
/// (its own image directory; the VM's creator keeps its own disk where
/// the VM was created).
fn agent(lan: &Lan, h: &str, store: &Path, key: &Path) -> Agent {
    let listen = format!("{}:{REPL_PORT}", lan.addr(h));
    let al = AL_EXTENTS.to_string();
    let extra = [
        "--key",
        key.to_str().unwrap(),
        "--listen",
        &listen,
        "--al-extents",
        &al,
        "--image-dir",
        store.to_str().unwrap(),
    ];
    Agent::start(&bins(), Some(lan.host(h)), &extra).unwrap_or_else(|e| panic!("agent on {h}: {e}"))
}

/// Set bits of a remus bitmap file (change map or activity log), 0 if
/// there is none.
fn marked(path: &Path) -> u64 {
    let Ok(raw) = std::fs::read(path) else {
        return 0;
    };
    assert!(
        raw.len() >= 4096 && &raw[..8] == b"RMSCHG01",
        "{}",
        path.display()
    );
    raw[4096..].iter().map(|b| u64::from(b.count_ones())).sum()
}

/// The verify results on a console, in order (Ok(records) or the line).
fn verifies(console: &str) -> Vec<Result<u64, String>> {
    console
        .lines()
        .filter_map(|l| {
            if let Some((_, rest)) = l.split_once("diskload verify ok: ") {
                return rest.split_whitespace().next()?.parse().ok().map(Ok);
            }
            l.contains("diskload verify FAILED")
                .then(|| Err(l.to_string()))
        })
        .collect()
}

/// Has the guest on `host` check its records against its disk; returns how
/// many it verified.
fn verify(host: &Agent, what: &str) -> u64 {
    let before = verifies(&host.console(VM)).len();
    let out = host.cli_stdin(&["console", VM], Some(b"\ntouch /run/diskload.verify\n"));
    assert!(out.ok, "{what}: {}", out.stderr);
    let text = host
        .wait_console(VM, Duration::from_secs(60), "diskload verify", |c| {
            verifies(c).len() > before
        })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    match verifies(&text).pop() {
        Some(Ok(n)) => n,
        other => panic!("{what}: the guest's records do not match its disk: {other:?}\n{text}"),
    }
}

/// The session with the client goes on: more numbers arrive, none missing,
/// repeated or reset.
fn session_flows(client: &SeqClient, host: &Agent, what: &str) {
    let at = client.received();
    client
        .wait_received(at + 100, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{what}: the session stalled: {e}\n{}", host.console(VM)));
    assert_eq!(client.error(), None, "{what}");
    let console = host.console(VM);
    assert!(
        !console.contains("seqserver: gap") && !console.contains("seqserver: duplicate"),
        "{what}: {console}"
    );
}

/// The dead host's agent is back on its old state dir: the VM is listed
/// stale (shut down, role stale), has no QEMU and cannot be started.
fn check_stale(host: &mut Agent, what: &str) {
    host.restart()
        .unwrap_or_else(|e| panic!("{what}: restart: {e}"));
    let v = host
        .vm(VM)
        .unwrap_or_else(|| panic!("{what}: the stale copy is not listed"));
    assert_eq!(
        (v["state"].as_str(), v["role"].as_str()),
        (Some("s"), Some("stale")),
        "{what}: {v}"
    );
    assert!(host.qemu_pids().is_empty(), "{what}: a stale copy runs");
    let out = host.cli(&["unpause", VM]);
    assert!(
        !out.ok && out.stderr.contains("stale"),
        "{what}: {}",
        out.stderr
    );
    let log = host.log_text();
    assert!(log.contains("STALE COPY"), "{what}: {log}");
}

/// Protects the VM from `from` to `to`; returns the follower (past its
/// first committed checkpoint) and the disk sync's numbers, checked
/// against the change records of both sides: only what they mark is
/// compared (`full` only when `to` knows nothing of the VM), and what is
/// sent is at most those chunks.
fn protect(
    from: &Agent,
    to: &Agent,
    lan: &Lan,
    to_name: &str,
    expect_full: bool,
    what: &str,
) -> (ProtectFollower, serde_json::Value) {
    let theirs = to.state_dir.join("copies").join(VM);
    let target_marks = marked(&theirs.join("disk-vda.al")) * EXTENT_CHUNKS
        + marked(&theirs.join("disk-vda.changed"));
    let peer = format!("{}:{REPL_PORT}", lan.addr(to_name));
    let mut follow = ProtectFollower::start(from, VM, &peer, &["-i", "100", "--timeout", "1000"])
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let plan = follow
        .event("sync_plan")
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", to.log_text()));
    let synced = follow
        .event("disk_synced")
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", to.log_text()));
    // The source's own records, read after its snapshot (they only grow
    // until the first commit clears them).
    let ours = from.state_dir.join("copies").join(VM);
    let source_marks =
        marked(&ours.join("disk-vda.changed")) + marked(&ours.join("disk-vda.al")) * EXTENT_CHUNKS;
    follow
        .checkpoint_after(0)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", to.log_text()));
    let u = |k: &str| synced[k].as_u64().unwrap_or(u64::MAX);
    let mode = if expect_full { "full" } else { "changed" };
    assert_eq!(plan["mode"], mode, "{what}: {plan}");
    assert_eq!(synced["mode"], mode, "{what}: {synced}");
    assert_eq!(u("disk_chunks"), DISK_BYTES / CHUNK, "{what}: {synced}");
    if !expect_full {
        assert!(
            u("chunks") <= source_marks + target_marks,
            "{what}: compared {} chunks, but the change records of both sides mark only {source_marks} + {target_marks}: {synced}",
            u("chunks")
        );
        assert!(
            u("differing_chunks") <= u("chunks")
                && u("sent_bytes") <= u("differing_chunks") * CHUNK,
            "{what}: {synced}"
        );
        assert!(
            u("sent_bytes") < DISK_BYTES / 8,
            "{what}: the resync sent {} bytes of a {DISK_BYTES}-byte disk: {synced}",
            u("sent_bytes")
        );
    }
    eprintln!(
        "{what}: {} sync, {} of {} chunks compared (records: source {source_marks}, target {target_marks}), {} differed, {} KiB sent",
        mode,
        u("chunks"),
        u("disk_chunks"),
        u("differing_chunks"),
        u("sent_bytes") / 1024
    );
    (follow, synced)
}

/// Kills `primary` at a random moment of its protection (after a
/// checkpoint that covers what the guest had written when we looked), and
/// waits for `backup` to take over; checks the records and the session.
fn kill_and_fail_over(
    primary: &mut Agent,
    backup: &Agent,
    follow: &mut ProtectFollower,
    client: &SeqClient,
    seed: u64,
    what: &str,
) -> u64 {
    session_flows(client, primary, what);
    std::thread::sleep(Duration::from_millis(200 + jitter(seed, 1500)));
    let seen_at = now_ms();
    let seen_done = last_diskload_done(&primary.console(VM)).unwrap_or(0);
    follow
        .checkpoint_after(seen_at)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    std::thread::sleep(Duration::from_millis(jitter(seed + 7, 100)));
    let killed = Instant::now();
    primary.kill_hard();
    let ms = backup
        .wait_failover(VM, killed, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    session_flows(client, backup, what);
    let verified = verify(backup, what);
    assert!(
        verified >= seen_done,
        "{what}: record {seen_done} was complete before an acknowledged checkpoint, but the copy that took over knows only {verified}"
    );
    eprintln!("{what}: failover {ms} ms, the guest verified {verified} records");
    ms
}

#[test]
fn resync_round_trips_failback_crash_and_split_brain() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::standard("rsy").expect("LAN of namespace hosts");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let top = tempfile::tempdir_in("/tmp").unwrap();
    let images = top.path().join("images");
    let store = [images.clone(), top.path().join("b")];
    for d in [&images, &store[1]] {
        std::fs::create_dir_all(d).unwrap();
    }
    let disk = images.join("records.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let names = ["a", "b"];
    let mut hosts = [
        agent(&lan, "a", &store[0], &key),
        agent(&lan, "b", &store[1], &key),
    ];
    let cfg = hosts[0].write_file(
        "vm.toml",
        &img.config(
            VM,
            &format!(
                "remus.workload=tick,diskload:/dev/vda:--region-mb:500,seqserver remus.ip={VM_IP}/24"
            ),
            &format!(
                "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n[[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:c6:12:0e\"\n",
                disk.display()
            ),
        ),
    );
    let out = hosts[0].cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    hosts[0]
        .wait_console(VM, Duration::from_secs(90), "seqserver and diskload", |c| {
            c.contains("seqserver: listening") && last_diskload_done(c).is_some()
        })
        .unwrap();
    let client = SeqClient::start(
        lan.host("c"),
        format!("{VM_IP}:7000").parse().unwrap(),
        Duration::from_millis(5),
    )
    .unwrap_or_else(|e| panic!("connect: {e}\n{}", hosts[0].console(VM)));
    client.wait_received(50, Duration::from_secs(30)).unwrap();

    // 1. Five round trips: ten kills, each host in turn.
    let rounds: u64 = std::env::var("REMUS_RESYNC_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut failovers = Vec::new();
    for n in 0..rounds {
        let (p, q) = ((n % 2) as usize, 1 - (n % 2) as usize);
        let what = format!("round {n} ({} → {})", names[p], names[q]);
        let (mut follow, _) = protect(&hosts[p], &hosts[q], &lan, names[q], n == 0, &what);
        let [h0, h1] = &mut hosts;
        let (primary, backup) = if p == 0 { (h0, &*h1) } else { (h1, &*h0) };
        failovers.push(kill_and_fail_over(
            primary,
            backup,
            &mut follow,
            &client,
            n,
            &what,
        ));
        drop(follow);
        check_stale(&mut hosts[p], &what);
    }
    // The VM runs on `r`; `s` holds its stale copy.
    let r = (rounds % 2) as usize;
    let s = 1 - r;

    // 2. Planned switch-over under load: r → s, then s protects back.
    let (follow, _) = protect(
        &hosts[r],
        &hosts[s],
        &lan,
        names[s],
        false,
        "failback setup",
    );
    drop(follow);
    session_flows(&client, &hosts[r], "before failback");
    let t = Instant::now();
    let out = hosts[r].cli(&["failback", VM]);
    assert!(out.ok, "failback: {}\n{}", out.stderr, hosts[s].log_text());
    let downtime: f64 = out
        .stderr
        .split("paused ")
        .nth(1)
        .and_then(|x| x.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("failback did not report its downtime: {}", out.stderr));
    let wait_role = |h: &Agent, role: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if h.vm(VM).is_some_and(|v| v["role"] == role) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no role {role}: {:?}\n{}",
                h.vm(VM),
                h.log_text()
            );
            // Agent state has no change notification; poll the API.
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_role(&hosts[s], "primary");
    wait_role(&hosts[r], "backup");
    session_flows(&client, &hosts[s], "after failback");
    let back = hosts[s].log_text();
    assert!(back.contains("protecting the VM back"), "{back}");
    eprintln!(
        "failback {} → {}: guest paused {downtime:.1} ms, protected back within {:.1} s, longest client wait so far {} ms",
        names[r],
        names[s],
        t.elapsed().as_secs_f64(),
        client.longest_gap().as_millis()
    );
    verify(&hosts[s], "after failback");

    // 3. The backup (r) crashes in the middle of a resync; it comes back,
    //    the resync runs again and converges.
    let out = hosts[s].cli(&["protect", "--stop", VM]);
    assert!(out.ok, "{}", out.stderr);
    wait_role(&hosts[s], "unprotected");
    // The backup discards its standby (and keeps its record).
    let deadline = Instant::now() + Duration::from_secs(60);
    while hosts[r].vm(VM).is_some() {
        assert!(Instant::now() < deadline, "the standby is never discarded");
        // Agent state has no change notification; poll the API.
        std::thread::sleep(Duration::from_millis(50));
    }
    let peer = format!("{}:{REPL_PORT}", lan.addr(names[r]));
    let mut follow =
        ProtectFollower::start(&hosts[s], VM, &peer, &["-i", "100", "--timeout", "1000"]).unwrap();
    follow.event("disk_synced").unwrap();
    hosts[r].kill_hard();
    // Killed before the session's first commit (the RAM copy was still
    // under way): no checkpoint, then the backup is lost.
    loop {
        let ev = follow.next_event().unwrap();
        assert_ne!(
            ev["event"], "checkpoint",
            "the kill came after the first commit: {ev}"
        );
        if ev["event"] == "backup_lost" {
            break;
        }
    }
    drop(follow);
    // Its record says it was being resynced from the running copy.
    let record =
        std::fs::read_to_string(hosts[r].state_dir.join("copies").join(VM).join("copy.json"))
            .unwrap();
    assert!(record.contains("resync_from"), "{record}");
    hosts[r].restart().unwrap();
    assert!(
        hosts[r].vm(VM).is_none(),
        "a copy left inconsistent by an interrupted resync is not listed (it never ran here)"
    );
    let (mut follow, _) = protect(
        &hosts[s],
        &hosts[r],
        &lan,
        names[r],
        false,
        "resync after a crash mid-resync",
    );
    let [h0, h1] = &mut hosts;
    let (primary, backup) = if s == 0 { (h0, &*h1) } else { (h1, &*h0) };
    kill_and_fail_over(
        primary,
        backup,
        &mut follow,
        &client,
        99,
        "after the interrupted resync",
    );
    drop(follow);
    check_stale(&mut hosts[s], "after the interrupted resync");

    // 4. Split brain: protect r → s, cut r off so that both run it.
    let (follow, _) = protect(
        &hosts[r],
        &hosts[s],
        &lan,
        names[s],
        false,
        "split brain setup",
    );
    drop(follow);
    lan.cut(names[r]).unwrap();
    hosts[s]
        .wait_failover(VM, Instant::now(), Duration::from_secs(60))
        .unwrap();
    wait_role(&hosts[r], "unprotected");
    lan.restore(names[r]).unwrap();
    // r's agent goes down and comes back: its copy, which ran on alone, is
    // stale now.
    hosts[r].kill_hard();
    hosts[r].restart().unwrap();
    let peer = format!("{}:{REPL_PORT}", lan.addr(names[r]));
    let out = hosts[s].cli(&["protect", "-d", "--manual", VM, &peer]);
    assert!(
        !out.ok && out.stderr.contains("split brain") && out.stderr.contains("--discard-this-copy"),
        "protecting onto a copy that ran on its own must be refused: {}",
        out.stderr
    );
    assert!(hosts[r].vm(VM).is_some_and(|v| v["role"] == "stale"));
    let out = hosts[r].cli(&["destroy", "--discard-this-copy", VM]);
    assert!(out.ok, "{}", out.stderr);
    assert!(hosts[r].vm(VM).is_none());
    let (mut follow, _) = protect(
        &hosts[s],
        &hosts[r],
        &lan,
        names[r],
        false,
        "after --discard-this-copy",
    );
    // The copy given up now holds the kept one's data: it takes over and
    // the guest's records check out there.
    let seen_done = last_diskload_done(&hosts[s].console(VM)).unwrap_or(0);
    follow.checkpoint_after(now_ms()).unwrap();
    hosts[s].kill_hard();
    hosts[r]
        .wait_failover(VM, Instant::now(), Duration::from_secs(60))
        .unwrap();
    let verified = verify(&hosts[r], "split brain resolved");
    assert!(verified >= seen_done, "{verified} < {seen_done}");
    eprintln!(
        "{} failovers: {:?} ms; client's longest wait {} ms",
        failovers.len(),
        failovers,
        client.longest_gap().as_millis()
    );
}
