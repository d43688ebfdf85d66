//! Output-driven epochs through the real agents, QEMU and network (hosts a,
//! b and a client c as network namespaces). The guest answers each line
//! of a TCP session at once; output commit holds every reply until the
//! backup has acknowledged the checkpoint of the state that sent it, so a
//! reply leaves when its epoch ends.
//!
//! At `-i 1000`:
//! - with output-driven epochs (the default `--min-interval`), an epoch
//!   ends once output waits: the replies come as a steady stream, never a
//!   whole interval apart, and there are many more checkpoints than one a
//!   second;
//! - with `--min-interval 0`, every epoch lasts the second: the replies
//!   come in bursts about a second apart, as before output-driven epochs.
//!
//! (That nothing leaves before its checkpoint is acknowledged is what the
//! network test's failovers check.)

use std::time::Duration;

use remus_testbed::{
    Agent, Binaries, GuestImage, Lan, ProtectFollower, SeqClient, now_ms, wait_for, write_key,
};

const VM: &str = "ep";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7500;

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

/// Protects the VM on `a` to `peer` at -i 1000 (with `extra`), connects a
/// client from c and returns the longest wait between two of its replies
/// over 300 lines, and the checkpoints committed meanwhile.
fn replies_under_protection(
    a: &Agent,
    b: &Agent,
    lan: &Lan,
    peer: &str,
    extra: &[&str],
) -> (Duration, u64) {
    let mut args = vec!["-i", "1000", "--timeout", "3000"];
    args.extend_from_slice(extra);
    let mut follow = ProtectFollower::start(a, VM, peer, &args).unwrap();
    follow.checkpoint_after(0).unwrap();
    let client = SeqClient::start(
        lan.host("c"),
        format!("{VM_IP}:7000").parse().unwrap(),
        Duration::from_millis(5),
    )
    .unwrap_or_else(|e| panic!("connect: {e}\n{}", a.console(VM)));
    client.wait_received(20, Duration::from_secs(30)).unwrap();
    let epoch_after = |f: &mut ProtectFollower| {
        f.checkpoint_after(now_ms()).unwrap()["epoch"]
            .as_u64()
            .unwrap()
    };
    let first = epoch_after(&mut follow);
    client
        .wait_received(client.received() + 300, Duration::from_secs(60))
        .unwrap();
    let last = epoch_after(&mut follow);
    assert_eq!(client.error(), None);
    let gap = client.longest_gap();
    drop(client);
    let out = a.cli(&["protect", "--stop", VM]);
    assert!(out.ok, "protect --stop: {}", out.stderr);
    // The session has ended once the VM lists no protection here and the
    // backup has dropped its standby.
    wait_for("the session's end", Duration::from_secs(30), || {
        (a.vm(VM).is_some_and(|v| v["protection"].is_null()) && b.vm(VM).is_none()).then_some(())
    });
    (gap, last - first)
}

#[test]
fn replies_leave_when_output_waits_not_at_the_interval() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::standard("ep").expect("LAN of namespace hosts");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let key = key.to_str().unwrap();
    let a = Agent::start(&bins(), Some(lan.host("a")), &["--key", key]).unwrap();
    let listen = format!("{}:{REPL_PORT}", lan.addr("b"));
    let b = Agent::start(
        &bins(),
        Some(lan.host("b")),
        &["--key", key, "--listen", &listen],
    )
    .unwrap();
    let cfg = a.write_file(
        "ep.toml",
        &img.config(
            VM,
            &format!("remus.workload=tick,seqserver remus.ip={VM_IP}/24"),
            "[[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:c6:12:6c\"\n",
        ),
    );
    let out = a.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    a.wait_console(VM, Duration::from_secs(90), "seqserver", |c| {
        c.contains("seqserver: listening")
    })
    .unwrap();

    let (gap, checkpoints) = replies_under_protection(&a, &b, &lan, &listen, &[]);
    eprintln!("output-driven: longest wait between replies {gap:?}, {checkpoints} checkpoints");
    assert!(
        gap < Duration::from_millis(400),
        "with output-driven epochs a reply never waits for a 1 s interval's end: {gap:?}"
    );
    // 300 lines at 5 ms take at least 1.5 s: one checkpoint a second would
    // be 2 or 3.
    assert!(checkpoints >= 10, "{checkpoints} checkpoints");

    let (gap, checkpoints) =
        replies_under_protection(&a, &b, &lan, &listen, &["--min-interval", "0"]);
    eprintln!("fixed epochs: longest wait between replies {gap:?}, {checkpoints} checkpoints");
    assert!(
        gap > Duration::from_millis(700),
        "with fixed 1 s epochs the replies come in bursts a second apart: {gap:?}"
    );
}
