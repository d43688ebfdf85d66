//! Output commit through the real CLI, agents, QEMU and network: three
//! hosts as network namespaces on one LAN (primary a, backup b, client c).
//! A client on c holds a TCP session with the protected guest that streams
//! sequence numbers both ways; the primary's plug is pulled at random
//! moments (SIGKILL of its agent and QEMU: 10 rounds; every third round
//! its network cable instead, 4 rounds, so the backup must notice
//! silence, and the isolated primary is killed afterwards); every time,
//! the session carries
//! on from the backup with no gap, no duplicate and no reset, because the
//! guest's output (its data and its ACKs) never left before the backup
//! held the state that sent it.

use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, Lan, ProtectFollower, SeqClient, jitter, write_key,
};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7100;

/// The guest: tick, the sequence server, an address on the LAN, a NIC on
/// the host's br0 with a fixed MAC (it keeps MAC and IP across hosts).
fn vm_config(img: &GuestImage, name: &str) -> String {
    img.config(
        name,
        &format!("remus.workload=tick,seqserver remus.ip={VM_IP}/24"),
        "[[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:c6:12:0a\"\n",
    )
}

/// One round; returns (failover ms, the longest pause the client saw).
fn round(img: &GuestImage, lan: &Lan, backup: &Agent, key: &str, n: u64) -> (u64, Duration) {
    let mut primary = Agent::start(&bins(), Some(lan.host("a")), &["--key", key]).unwrap();
    let vm = format!("net{n}");
    let cfg = primary.write_file("vm.toml", &vm_config(img, &vm));
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    primary
        .wait_console(&vm, Duration::from_secs(90), "seqserver", |c| {
            c.contains("seqserver: listening")
        })
        .unwrap();
    let client = SeqClient::start(
        lan.host("c"),
        format!("{VM_IP}:7000").parse().unwrap(),
        Duration::from_millis(5),
    )
    .unwrap_or_else(|e| panic!("round {n}: connect: {e}\n{}", primary.console(&vm)));
    client.wait_received(50, Duration::from_secs(30)).unwrap();

    let peer = format!("{}:{REPL_PORT}", lan.addr("b"));
    let mut follow =
        ProtectFollower::start(&primary, &vm, &peer, &["-i", "100", "--timeout", "1000"])
            .unwrap_or_else(|e| panic!("{e}\nbackup log:\n{}", backup.log_text()));
    follow.checkpoint_after(0).unwrap();
    // The session runs protected for a random while: output now waits
    // for its checkpoint, and still flows.
    let before = client.received();
    client
        .wait_received(before + 20, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("round {n}: no output while protected: {e}"));
    std::thread::sleep(Duration::from_millis(200 + jitter(n, 1500)));
    std::thread::sleep(Duration::from_millis(jitter(n + 3, 100)));
    let killed = Instant::now();
    let cable = n % 3 == 2;
    if cable {
        lan.cut("a").unwrap();
    } else {
        primary.kill_hard();
    }
    let failover_ms = backup
        .wait_failover(&vm, killed, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("round {n}: {e}"));
    drop(follow);
    if cable {
        // Silence, not a reset: the backup waited for its timeout (1 s).
        assert!(
            (850..=2500).contains(&failover_ms),
            "round {n}: a cut cable must be given the timeout, failover came after {failover_ms} ms"
        );
    }
    // The same session goes on from the backup: 200 more lines, none
    // missing, none twice, no reset.
    let at_kill = client.received();
    client
        .wait_received(at_kill + 200, Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "round {n}: the session did not survive the failover: {e}\nguest console on b:\n{}",
                backup.console(&vm)
            )
        });
    assert_eq!(client.error(), None, "round {n}");
    // And the guest saw the client's numbers arrive in order too.
    let console = backup.console(&vm);
    assert!(
        !console.contains("gap") && !console.contains("duplicate") && !console.contains("garbage"),
        "round {n}: {console}"
    );
    let pause = client.longest_gap();
    eprintln!(
        "round {n}: failover {failover_ms} ms; the client's longest wait for a line {} ms; {} lines received",
        pause.as_millis(),
        client.received()
    );
    drop(client);
    let out = backup.cli(&["destroy", &vm]);
    assert!(out.ok, "{}", out.stderr);
    if cable {
        // The isolated primary ran on (no arbiter in this test): end it before
        // its cable goes back in.
        primary.kill_hard();
        lan.restore("a").unwrap();
    }
    (failover_ms, pause)
}

#[test]
fn tcp_session_survives_primary_kills() {
    let img = GuestImage::find().expect("guest image");
    // Declared first: dropped after the agents that live in its hosts.
    let lan = Lan::standard("nf").expect("LAN of namespace hosts");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let key_s = key.to_str().unwrap();
    let listen = format!("{}:{REPL_PORT}", lan.addr("b"));
    let backup = Agent::start(
        &bins(),
        Some(lan.host("b")),
        &["--listen", &listen, "--key", key_s],
    )
    .expect("backup agent in host b");
    let rounds: u64 = std::env::var("REMUS_NET_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let mut pauses = Vec::new();
    for n in 0..rounds {
        let (ms, gap) = round(&img, &lan, &backup, key_s, n);
        pauses.push((ms, gap.as_millis() as u64));
    }
    pauses.sort_unstable_by_key(|p| p.1);
    eprintln!(
        "{rounds} rounds: client's longest pause per round, median {} ms, max {} ms",
        pauses[pauses.len() / 2].1,
        pauses[pauses.len() - 1].1
    );
}
