//! The compatibility promise, checked rather than written: the agent of
//! the previous landed version of remus ([`PREVIOUS`], a commit of this
//! repository, built here from its own history) and this one protect each
//! other's VM, in both directions, through a failover each way, as hosts
//! in the middle of a rolling upgrade do.
//!
//! 1. This version's a protects the VM to the previous version's b:
//!    checkpoints commit; a change of the running session's timeout
//!    (`protect --set`, which the previous backup cannot take) is refused
//!    with the reason and the session runs on; a's agent is restarted
//!    (SIGTERM, `--on-stop keep`): the previous backup never offered to
//!    keep its standby across that (no Resumable), so the session is
//!    ended in order, not suspended, and protected again by the next
//!    agent; a's plug is pulled and b (previous) resumes the VM.
//! 2. b (previous) protects it back to this version's a (a changed-only
//!    resync of a's stale copy); b's plug is pulled and a resumes it.
//! 3. a protects it to a fourth host d of this version, with device-only
//!    state; a's plug is pulled and d resumes it, in a QEMU started to
//!    load device-only state. d cannot protect that QEMU to the previous
//!    version's b (whose standby would load only QEMU's full stream, which
//!    such a QEMU saves without the configuration section): refused at
//!    the setup with the reason, and the VM runs on at d.
//!
//! The TCP session survives the three failovers, and every record the
//! guest wrote is on its disk at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, HostSpec, Lan, PairFiles, ProtectFollower, SeqClient, lan_agent,
    records_intact, start_records_vm, wait_for,
};

/// The last version that landed before the agent could restart under its
/// VMs (and before protocol 6 gained `Tune` and its setup fields).
const PREVIOUS: &str = "331e3da01ff2b9427a8ab0bca1f2ba4ec6aab1fc";

const VM: &str = "cmp";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7400;

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `cmd`, with its output in `log`; the log's tail in the panic.
fn run_logged(mut cmd: Command, log: &Path, what: &str) {
    let out = std::fs::File::create(log).unwrap();
    let st = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    if !st.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        panic!(
            "{what} failed ({st}):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// The previous version's `remus` and `remusd` (and the dirty-tracking
/// preload beside them), built once from this repository's history into
/// `target/compat/COMMIT` and reused from there.
fn previous_bins() -> Binaries {
    let root = repo_root();
    let dir = root.join("target/compat").join(&PREVIOUS[..12]);
    let built = dir.join("target/debug");
    let bins = Binaries {
        remus: built.join("remus"),
        remusd: built.join("remusd"),
    };
    if bins.remusd.exists()
        && bins.remus.exists()
        && built.join("libremus_dirty_preload.so").exists()
    {
        return bins;
    }
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    // The commit's tree, as it was: `git archive` piped into `tar`.
    let have = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["cat-file", "-e", &format!("{PREVIOUS}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have,
        "commit {PREVIOUS} (the previous version) is not in this clone's history; a shallow clone lacks it: `git fetch --unshallow`"
    );
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("git -C \"$1\" archive --format=tar \"$2\" | tar -x -C \"$3\"")
        .arg("sh")
        .arg(&root)
        .arg(PREVIOUS)
        .arg(&src);
    run_logged(sh, &dir.join("archive.log"), "extract the previous version");
    eprintln!("building the previous version {PREVIOUS} (a few minutes, once)");
    // The agent and the CLI, then the preload (a cdylib: `--bins` would
    // leave it out).
    for (n, args) in [
        ["-p", "remus", "--bins"].as_slice(),
        ["-p", "remus-dirty-preload"].as_slice(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .current_dir(&src)
            .args(["build", "--locked"])
            .args(args)
            .arg("--target-dir")
            .arg(dir.join("target"))
            // This build's own settings must not leak into the old tree's.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR");
        run_logged(
            cargo,
            &dir.join(format!("build-{n}.log")),
            "build the previous version",
        );
    }
    for f in [
        &bins.remusd,
        &bins.remus,
        &built.join("libremus_dirty_preload.so"),
    ] {
        assert!(
            f.exists(),
            "the previous version's build made no {}",
            f.display()
        );
    }
    bins
}

fn session_goes_on(client: &SeqClient, host: &Agent, what: &str) {
    let at = client.received();
    client
        .wait_received(at + 100, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{what}: the session stalled: {e}\n{}", host.console(VM)));
    assert_eq!(client.error(), None, "{what}");
}

/// Pulls `from`'s plug; `to` resumes the VM and the session goes on
/// (`what` names the step). The failover's time, ms.
fn fail_over(client: &SeqClient, from: &mut Agent, to: &Agent, what: &str) -> u64 {
    let t = Instant::now();
    from.kill_hard();
    let ms = to
        .wait_failover(VM, t, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    session_goes_on(client, to, what);
    ms
}

/// The device state's bytes in a checkpoint event.
fn device_bytes(cp: &serde_json::Value) -> u64 {
    cp["raw_bytes"].as_u64().unwrap() - 4096 * cp["dirty_pages"].as_u64().unwrap()
}

/// Protects the VM on `from` to `to_listen`, waiting for a committed
/// checkpoint, which it returns (the follower ends when dropped; the
/// session goes on).
fn protect(from: &Agent, to_listen: &str) -> serde_json::Value {
    let mut f =
        ProtectFollower::start_healing(from, VM, to_listen, &["-i", "100", "--timeout", "1000"])
            .unwrap_or_else(|e| panic!("protect: {e}\n{}", from.log_text()));
    f.checkpoint_after(0).unwrap_or_else(|e| {
        panic!(
            "protect from {}: {e}\nits log:\n{}",
            from.bins.remusd.display(),
            from.log_text()
        )
    })
}

#[test]
fn the_previous_version_and_this_one_protect_each_other() {
    let old = previous_bins();
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::new(
        "cmp",
        &[
            HostSpec::vm("a", "198.18.0.1/24"),
            HostSpec::vm("b", "198.18.0.2/24"),
            HostSpec::client("c", "198.18.0.3/24"),
            HostSpec::vm("d", "198.18.0.4/24"),
        ],
    )
    .expect("LAN of namespace hosts");
    let files = PairFiles::new(256 << 20);
    let store_d = files.top.path().join("d");
    std::fs::create_dir_all(&store_d).unwrap();
    let mut a = lan_agent(
        &bins(),
        &lan,
        ("a", REPL_PORT),
        &files.images,
        &files.key,
        &["--on-stop", "keep"],
    );
    let mut b = lan_agent(
        &old,
        &lan,
        ("b", REPL_PORT),
        &files.store_b,
        &files.key,
        &[],
    );
    let a_listen = format!("{}:{REPL_PORT}", lan.addr("a"));
    let b_listen = format!("{}:{REPL_PORT}", lan.addr("b"));
    let client = start_records_vm(
        &a,
        &img,
        VM,
        (VM_IP, "52:54:00:c6:12:5b"),
        &files.disk,
        lan.host("c"),
    );

    // 1. This version protects to the previous one, which does not load
    //    device-only state: it is sent QEMU's full stream (300-400 KB,
    //    against about 80 KB between two agents of this version).
    let cp = protect(&a, &b_listen);
    let dev = device_bytes(&cp);
    assert!(
        dev > 200_000,
        "device state of {dev} bytes to the previous backup: {cp}"
    );
    session_goes_on(&client, &a, "protected to the previous version");
    let set = a.cli(&["protect", "--set", VM, "--timeout", "3000"]);
    assert!(
        !set.ok && set.stderr.contains("older"),
        "a timeout change the previous backup cannot take must be refused with the reason: {}",
        set.stderr
    );
    eprintln!("1. --set refused: {}", set.stderr.trim());
    session_goes_on(&client, &a, "after the refused --set");
    a.stop_agent_only().unwrap();
    assert!(
        !a.log_text().contains("protection SUSPENDED"),
        "suspended to a backup that cannot resume: {}",
        a.log_text()
    );
    wait_for("b to drop its standby", Duration::from_secs(30), || {
        b.vm(VM).is_none().then_some(())
    });
    a.restart().unwrap();
    wait_for(
        "a to protect the VM again",
        Duration::from_secs(120),
        || {
            a.vm(VM)
                .filter(|v| v["role"] == "primary" && !v["protection"]["last_checkpoint"].is_null())
                .map(|_| ())
        },
    );
    session_goes_on(&client, &a, "protected again after a's restart");
    eprintln!(
        "1. a's agent restarted under the previous backup: session ended in order, protected again"
    );
    let ms = fail_over(
        &client,
        &mut a,
        &b,
        "after the failover to the previous version",
    );
    eprintln!("1. the previous version resumed the VM in {ms} ms");

    // 2. The previous version protects it back to this one.
    a.restart().unwrap();
    wait_for("a to list its copy stale", Duration::from_secs(30), || {
        a.vm(VM).filter(|v| v["role"] == "stale").map(|_| ())
    });
    protect(&b, &a_listen);
    session_goes_on(&client, &b, "protected back to this version");
    let ms = fail_over(
        &client,
        &mut b,
        &a,
        "after the failover back to this version",
    );
    eprintln!("2. this version resumed the VM in {ms} ms");

    // 3. Two agents of this version: device-only state.
    let d = lan_agent(&bins(), &lan, ("d", REPL_PORT), &store_d, &files.key, &[]);
    let d_listen = format!("{}:{REPL_PORT}", lan.addr("d"));
    let cp = protect(&a, &d_listen);
    let dev = device_bytes(&cp);
    assert!(
        dev < 200_000,
        "device state of {dev} bytes between two agents of this version: {cp}"
    );
    session_goes_on(&client, &a, "protected to d");
    let ms = fail_over(&client, &mut a, &d, "after the failover to d");
    eprintln!("3. d resumed the VM from device-only state in {ms} ms");
    b.restart().unwrap();
    wait_for("b to list its copy stale", Duration::from_secs(30), || {
        b.vm(VM).filter(|v| v["role"] == "stale").map(|_| ())
    });
    let refused = ProtectFollower::start(&d, VM, &b_listen, &["-i", "100", "--timeout", "1000"])
        .and_then(|mut f| f.checkpoint_after(0));
    let e = match refused {
        Ok(cp) => panic!("d's QEMU was protected to the previous version: {cp}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("device-only state") && e.contains("upgrade"),
        "the refusal must say why and what to do: {e}"
    );
    eprintln!("3. protecting it to the previous version refused: {e}");
    session_goes_on(&client, &d, "after the refused protect");
    let n = records_intact(&d, VM, "after three failovers");
    assert!(n > 0);
    eprintln!("3. {n} records intact");
    drop(client);
}
