//! Remus core through the real CLI and agents: protect a running guest to
//! a backup agent, pull the primary's plug (SIGKILL of its agent and QEMU)
//! at random moments, and check that the backup resumes the guest from at
//! least the last acknowledged state, never from boot.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, ProtectFollower, free_port, last_tick, now_ms, ticks, write_key,
};

fn bins() -> Binaries {
    Binaries {
        remus: PathBuf::from(env!("CARGO_BIN_EXE_remus")),
        remusd: PathBuf::from(env!("CARGO_BIN_EXE_remusd")),
    }
}

/// A cheap pseudo-random number (no extra crate for a test's jitter).
fn jitter(seed: u64, max_ms: u64) -> u64 {
    let x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(now_ms().wrapping_mul(1442695040888963407));
    (x >> 33) % max_ms.max(1)
}

/// One round: boot on a fresh primary, protect, kill at a random moment,
/// check the backup. Returns the failover time in ms.
fn round(img: &GuestImage, backup: &Agent, port: u16, key: &std::path::Path, n: u64) -> u64 {
    let key_s = key.to_str().unwrap();
    let mut primary = Agent::start(&bins(), None, &["--key", key_s]).expect("primary agent");
    let vm = format!("ha{n}");
    let cfg = primary.write_file("vm.toml", &img.config(&vm, "remus.workload=tick", ""));
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    primary
        .wait_console(&vm, Duration::from_secs(90), "tick 2", |c| {
            last_tick(c) >= Some(2)
        })
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
    assert_eq!(primary.vm(&vm).unwrap()["role"], "primary");

    // Let the guest run a random while (0–1.5 s), note its last tick and
    // when, then wait for a checkpoint taken after that moment to be
    // acknowledged: the backup then holds at least that tick.
    std::thread::sleep(Duration::from_millis(jitter(n, 1500)));
    let seen_at = now_ms();
    let seen = last_tick(&primary.console(&vm)).unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let failover_ms = loop {
        if let Some(v) = backup.vm(&vm)
            && v["role"] == "unprotected"
            && (v["state"] == "r" || v["state"] == "b")
        {
            break killed.elapsed().as_millis() as u64;
        }
        assert!(
            Instant::now() < deadline,
            "backup did not fail over: {:?}\n{}",
            backup.vm(&vm),
            backup.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
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
    let out = backup.cli(&["destroy", &vm]);
    assert!(out.ok, "{}", out.stderr);
    failover_ms
}

#[test]
fn failover_at_random_moments() {
    let img = GuestImage::find().expect("guest image");
    let keydir = tempfile::tempdir().unwrap();
    let key = write_key(keydir.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let backup = Agent::start(
        &bins(),
        None,
        &["--listen", &listen, "--key", key.to_str().unwrap()],
    )
    .expect("backup agent");
    let rounds: u64 = std::env::var("REMUS_FAILOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (mut killed, mut frozen) = (Vec::new(), Vec::new());
    for n in 0..rounds {
        let t = round(&img, &backup, port, &key, n);
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
