//! Failover decided by a cluster manager (`remusd --failover-by cluster`),
//! through the real agents, QEMU and network: hosts a and b run agents
//! that never decide a failover by themselves; the guest on a serves a
//! TCP session to c and writes checked records to its disk. The test
//! plays the cluster manager, which would have fenced the lost host
//! before it says `remus takeover`.
//!
//! 1. a's host dies (SIGKILL of its agent and QEMU) while the VM is
//!    protected to b: b's standby does not resume by itself; it waits,
//!    listed `awaiting_takeover`, and no line reaches the client. At
//!    `remus takeover` (Pacemaker's promote) it resumes from the last
//!    committed checkpoint, and the TCP session goes on with no gap.
//! 2. a's agent is back: b protects the VM back to a (changed-only
//!    resync). Then a's host dies again, now as the backup: b's guest is
//!    held paused with its output held (a may have been promoted), until
//!    `remus takeover` on b (the resource agent's notify once a is
//!    fenced) lets it run on unprotected, releasing what it held.
//!
//! 3. Only the link between them fails (both hosts live): b's guest is
//!    held, a's standby waits. After the takeover on b (the operator's
//!    call: the cluster sees no failure to fence), b protects the VM
//!    again: a discards its held standby when b's session arrives (its
//!    primary is alive, so it will never be promoted) and takes it.
//!
//! A takeover of a VM that waits for none is refused, and the records on
//! the disk are intact at the end.

use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, Lan, PairFiles, ProtectFollower, SeqClient, lan_agent,
    records_intact, start_records_vm, wait_for,
};

const VM: &str = "clu";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7300;
const DISK_BYTES: u64 = 256 << 20;

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

fn agent(lan: &Lan, h: &str, store: &std::path::Path, key: &std::path::Path) -> Agent {
    let extra = ["--host-name", h, "--failover-by", "cluster"];
    lan_agent(&bins(), lan, (h, REPL_PORT), store, key, &extra)
}

fn info(h: &Agent) -> serde_json::Value {
    h.vm(VM)
        .unwrap_or_else(|| panic!("{VM} not listed:\n{}", h.log_text()))
}

/// `n` more lines reach the client within 90 s, with no gap, duplicate
/// or reset.
fn session_goes_on(client: &SeqClient, n: u64, host: &Agent, what: &str) {
    let at = client.received();
    client
        .wait_received(at + n, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{what}: the session stalled: {e}\n{}", host.log_text()));
    assert_eq!(client.error(), None, "{what}");
    let console = host.console(VM);
    assert!(
        !console.contains("gap") && !console.contains("duplicate"),
        "{what}: {console}"
    );
}

/// The VM on `h` comes to wait for a takeover as `role`, paused (a
/// standby, or a held primary), because its `lost` peer is lost.
fn wait_held(h: &Agent, role: &str, lost: &str) {
    let held = wait_for(
        &format!("{VM} awaiting a takeover as {role}"),
        Duration::from_secs(30),
        || {
            h.vm(VM)
                .filter(|v| v["role"] == role && v["awaiting_takeover"].is_string())
        },
    );
    assert_eq!(held["state"], "p", "held, so paused: {held}");
    let reason = held["awaiting_takeover"].as_str().unwrap_or_default();
    assert!(reason.contains(lost) && reason.contains("lost"), "{reason}");
}

/// `b` protects the VM to its peer, a checkpoint committed.
fn wait_protecting(b: &Agent, what: &str) {
    wait_for(what, Duration::from_secs(120), || {
        info(b)["protection"]["last_checkpoint"]["epoch"]
            .as_u64()
            .filter(|e| *e >= 1)
    });
}

#[test]
fn the_cluster_decides_every_failover() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::standard("clu").expect("LAN of namespace hosts");
    let files = PairFiles::new(DISK_BYTES);
    let mut a = agent(&lan, "a", &files.images, &files.key);
    let b = agent(&lan, "b", &files.store_b, &files.key);
    let b_listen = format!("{}:{REPL_PORT}", lan.addr("b"));

    let client = start_records_vm(
        &a,
        &img,
        VM,
        (VM_IP, "52:54:00:c6:13:3f"),
        &files.disk,
        lan.host("c"),
    );
    // Not held: nothing to take over.
    let out = a.cli(&["takeover", VM]);
    assert!(!out.ok, "a takeover of a VM that waits for none");
    assert!(
        out.stderr.contains("not waiting for a takeover"),
        "{}",
        out.stderr
    );

    // 1. The primary's host dies: the standby waits for the cluster.
    let mut follow =
        ProtectFollower::start_healing(&a, VM, &b_listen, &["-i", "100", "--timeout", "1000"])
            .unwrap_or_else(|e| panic!("{e}\n{}", b.log_text()));
    follow.checkpoint_after(0).unwrap();
    session_goes_on(&client, 50, &a, "protected");
    a.kill_hard();
    drop(follow);
    let killed = Instant::now();
    wait_held(&b, "backup", "primary");
    // Decided to wait, and nothing runs the VM: no line can reach the
    // client until the takeover.
    let waited_at = client.received();
    assert!(
        b.log_text()
            .contains("PRIMARY LOST: the standby waits for the cluster"),
        "{}",
        b.log_text()
    );
    let out = b.cli(&["takeover", "--json", VM]);
    assert!(out.ok, "takeover: {}\n{}", out.stderr, b.log_text());
    let took = killed.elapsed();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("takeover --json");
    assert_eq!(v["role"], "unprotected", "{v}");
    assert!(v["awaiting_takeover"].is_null(), "{v}");
    assert_eq!(
        client.received(),
        waited_at,
        "a line arrived while nothing ran the VM"
    );
    session_goes_on(&client, 100, &b, "after the takeover on b");
    assert!(b.log_text().contains("FAILOVER: primary lost"));
    eprintln!(
        "1. a died; b held its standby and resumed at the takeover ({took:?} after the kill)"
    );

    // 2. a back: b protects the VM back to it by itself (changed-only);
    //    then a dies as the backup.
    a.restart().unwrap();
    wait_protecting(&b, "b protecting the VM back to a");
    let plan = a.last_sync_plan();
    assert!(plan.contains("mode=Changed"), "{plan}");
    session_goes_on(&client, 50, &b, "protected back to a");
    a.kill_hard();
    wait_held(&b, "unprotected", "backup");
    // Held: neither the guest nor its output goes on.
    let held_at = client.received();
    let out = b.cli(&["unpause", VM]);
    assert!(!out.ok, "an unpause lifted the cluster's hold");
    let out = b.cli(&[
        "protect",
        "-d",
        VM,
        &format!("{}:{REPL_PORT}", lan.addr("a")),
    ]);
    assert!(!out.ok && out.stderr.contains("takeover"), "{}", out.stderr);
    assert_eq!(client.received(), held_at, "output left the held primary");
    let out = b.cli(&["takeover", VM]);
    assert!(out.ok, "takeover: {}\n{}", out.stderr, b.log_text());
    let v = info(&b);
    assert!(v["state"] == "r" || v["state"] == "b", "runs again: {v}");
    session_goes_on(&client, 100, &b, "after the takeover of the held primary");
    eprintln!("2. a died as the backup; b held its guest until the takeover");

    // 3. Only the link fails (both hosts live): both sides hold. The
    //    operator (or the cluster) lets the primary go on; its next
    //    session reaches the held standby's host, which discards the
    //    standby (its primary is alive) and takes the new session.
    a.restart().unwrap();
    wait_protecting(&b, "b protecting the VM to a again");
    lan.cut("b").unwrap();
    wait_held(&b, "unprotected", "backup");
    wait_held(&a, "backup", "primary");
    lan.restore("b").unwrap();
    let out = b.cli(&["takeover", VM]);
    assert!(out.ok, "takeover: {}\n{}", out.stderr, b.log_text());
    wait_protecting(&b, "b protecting the VM to a after the cut");
    assert!(
        a.log_text()
            .contains("the primary this standby waited after is back"),
        "{}",
        a.log_text()
    );
    assert!(
        !a.log_text().contains("FAILOVER"),
        "a ran the VM:\n{}",
        a.log_text()
    );
    session_goes_on(&client, 100, &b, "after the cut");
    let n = records_intact(&b, VM, "at the end");
    eprintln!(
        "3. a cut link: both held; after the takeover on b, a's held standby gave way to b's new session; {n} records intact"
    );
}
