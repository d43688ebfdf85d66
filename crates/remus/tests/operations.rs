//! Operations through the real agents, QEMU, network and a real
//! Prometheus server (Debian's `prometheus`): hosts a and b run agents
//! with `--metrics` and `--hook-dir`, Prometheus runs on host c and
//! scrapes both every second; the guest serves a TCP session to c and
//! writes records to a replicated disk.
//!
//! 1. a protects the VM to b (wanted, not `--manual`): Prometheus reads
//!    the checkpoints, the roles and the age of b's last commit.
//! 2. `remus protect --set` changes the running session: checkpoints
//!    come at the new interval with no new copy, and the backup takes the
//!    new timeout (a 2 s silence of the primary is no failover at 5 s).
//! 3. a's plug is pulled: b fails over; b's `failover` hook runs with the
//!    event in its environment; Prometheus counts the failover on b and
//!    sees a down.
//! 4. a's agent comes back (its copy is stale): b protects the VM back to
//!    a by itself, with a changed-only resync, and says
//!    `protection-restored`.
//! 5. a's agent is killed again (now the backup): b reports
//!    `backup-lost`, and protects again by itself once a is back.
//! 6. `remus protect --stop` clears the wish: the next loss is not healed.
//!
//! The TCP session survives all of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use remus_testbed::{
    Agent, Binaries, GuestImage, Lan, PairFiles, ProtectFollower, SeqClient, lan_agent, last_tick,
    start_records_vm, wait_for, write_key,
};

const VM: &str = "ops";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7100;
const METRICS_PORT: u16 = 9477;
const PROM_PORT: u16 = 9090;
const DISK_BYTES: u64 = 256 << 20;

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

/// An agent on host `h`: replication, metrics on its LAN address, hooks
/// from `hooks`, its copies of peers' disks in `store`.
fn agent(lan: &Lan, h: &str, store: &Path, key: &Path, hooks: &Path) -> Agent {
    let metrics = format!("{}:{METRICS_PORT}", lan.addr(h));
    let extra = [
        "--metrics",
        &metrics,
        "--hook-dir",
        hooks.to_str().unwrap(),
        "--hook-timeout",
        "5",
        "--host-name",
        h,
    ];
    lan_agent(&bins(), lan, (h, REPL_PORT), store, key, &extra)
}

/// A hook directory whose one hook appends a line per event to `log`.
fn hook_dir(top: &Path, h: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = top.join(format!("hooks-{h}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = top.join(format!("events-{h}.log"));
    let hook = dir.join("10-record");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1|$REMUS_VM|$REMUS_ROLE|$REMUS_PEER|$REMUS_EPOCH|$REMUS_HOST|$REMUS_REASON\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o700)).unwrap();
    (dir, log)
}

/// The events host `h`'s hook recorded: (event, the other fields).
fn events(log: &Path) -> Vec<(String, Vec<String>)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.split('|').map(str::to_string);
            (f.next().unwrap_or_default(), f.collect())
        })
        .collect()
}

fn wait_event(log: &Path, event: &str, n: usize) -> Vec<String> {
    wait_for(
        &format!("hook run #{n} for {event} ({})", log.display()),
        Duration::from_secs(120),
        || {
            events(log)
                .into_iter()
                .filter(|(e, _)| e == event)
                .nth(n - 1)
                .map(|(_, f)| f)
        },
    )
}

/// Prometheus on host c, scraping both agents every second; killed on
/// drop.
struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    fn start(lan: &Lan, dir: &Path) -> Prometheus {
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: remus\n    static_configs:\n      - targets: ['{}:{METRICS_PORT}', '{}:{METRICS_PORT}']\n",
                lan.addr("a"),
                lan.addr("b")
            ),
        )
        .unwrap();
        let listen = format!("{}:{PROM_PORT}", lan.addr("c"));
        let child = lan
            .host("c")
            .command(Path::new("prometheus"))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("run prometheus (scripts/install-deps.sh installs it)");
        let p = Prometheus {
            child,
            url: format!("http://{listen}"),
        };
        wait_for("Prometheus to answer", Duration::from_secs(60), || {
            p.try_query(lan, "up").ok()
        });
        p
    }

    fn try_query(&self, lan: &Lan, expr: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let out = lan
            .host("c")
            .exec(
                "promtool",
                &["query", "instant", "-o", "json", &self.url, expr],
            )
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        let val = s["value"][1].as_str()?.parse().ok()?;
                        Some((s["metric"].clone(), val))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until `expr` (about host `h`'s agent) has a sample for which
    /// `ok` holds; returns its value.
    fn wait(&self, lan: &Lan, h: &str, expr: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let instance = format!("{}:{METRICS_PORT}", lan.addr(h));
        wait_for(
            &format!("{expr} on {h} in Prometheus"),
            Duration::from_secs(60),
            || {
                self.try_query(lan, expr)
                    .ok()?
                    .into_iter()
                    .find(|(m, v)| m["instance"] == instance.as_str() && ok(*v))
                    .map(|(_, v)| v)
            },
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The session with the client goes on.
fn session_flows(client: &SeqClient, host: &Agent, what: &str) {
    let at = client.received();
    client
        .wait_received(at + 100, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{what}: the session stalled: {e}\n{}", host.console(VM)));
    assert_eq!(client.error(), None, "{what}");
}

#[test]
fn metrics_hooks_and_protection_that_heals_itself() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::standard("ops").expect("LAN of namespace hosts");
    let files = PairFiles::new(DISK_BYTES);
    let (hooks_a, log_a) = hook_dir(files.top.path(), "a");
    let (hooks_b, log_b) = hook_dir(files.top.path(), "b");
    let prom = Prometheus::start(&lan, files.top.path());
    let mut a = agent(&lan, "a", &files.images, &files.key, &hooks_a);
    let b = agent(&lan, "b", &files.store_b, &files.key, &hooks_b);
    let a_listen = format!("{}:{REPL_PORT}", lan.addr("a"));
    let b_listen = format!("{}:{REPL_PORT}", lan.addr("b"));

    let client = start_records_vm(
        &a,
        &img,
        VM,
        (VM_IP, "52:54:00:c6:12:2e"),
        &files.disk,
        lan.host("c"),
    );

    // 1. Protection, as Prometheus sees it.
    let mut follow = ProtectFollower::start_healing(
        &a,
        VM,
        &b_listen,
        // Fixed epochs: the interval alone paces the checkpoints, so that
        // step 2 sees `--set -i` take effect.
        &[
            "-i",
            "100",
            "--timeout",
            "1000",
            "--max-rate",
            "400M",
            "--min-interval",
            "0",
        ],
    )
    .unwrap();
    follow.checkpoint_after(0).unwrap();
    let wanted = a.vm(VM).unwrap();
    assert_eq!(wanted["wanted"], b_listen.as_str(), "{wanted}");
    let table = a.cli(&["list"]).stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(VM) && l.contains("primary") && l.contains(&b_listen)),
        "{table}"
    );
    let sel = format!("{{vm=\"{VM}\"}}");
    let cps = prom.wait(&lan, "a", &format!("remus_checkpoints_total{sel}"), |v| {
        v >= 5.0
    });
    prom.wait(&lan, "a", &format!("remus_vm_protected{sel}"), |v| v == 1.0);
    prom.wait(
        &lan,
        "a",
        &format!("remus_vm_protection_wanted{sel}"),
        |v| v == 1.0,
    );
    prom.wait(
        &lan,
        "a",
        "remus_vm_info{vm=\"ops\",role=\"primary\"}",
        |v| v == 1.0,
    );
    prom.wait(
        &lan,
        "b",
        "remus_vm_info{vm=\"ops\",role=\"backup\"}",
        |v| v == 1.0,
    );
    prom.wait(
        &lan,
        "a",
        &format!("remus_checkpoint_pause_seconds_count{sel}"),
        |v| v >= 5.0,
    );
    prom.wait(
        &lan,
        "a",
        &format!("remus_checkpoint_bytes_total{{vm=\"{VM}\",kind=\"raw\"}}"),
        |v| v > 0.0,
    );
    // The backup's commits are seconds old at most (checkpoints every
    // 100 ms, scraped every second).
    let age = prom.wait(
        &lan,
        "b",
        &format!("remus_vm_last_checkpoint_age_seconds{sel}"),
        |v| v < 5.0,
    );
    prom.wait(&lan, "b", "remus_build_info", |v| v == 1.0);
    eprintln!("1. protected: {cps} checkpoints counted on a, b's last commit {age:.2} s old");

    // 2. Live tuning.
    let bad = a.cli(&["protect", "--set", VM, "--timeout", "60"]);
    assert!(
        !bad.ok && bad.stderr.contains("at least twice the interval"),
        "{}",
        bad.stderr
    );
    let out = a.cli(&["protect", "--set", VM, "-i", "50", "--timeout", "5000"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr.contains("every 50 ms") && out.stderr.contains("5000 ms"),
        "{}",
        out.stderr
    );
    let p = &a.vm(VM).unwrap()["protection"];
    assert_eq!(
        (p["interval_ms"].as_u64(), p["timeout_ms"].as_u64()),
        (Some(50), Some(5000)),
        "{p}"
    );
    assert_eq!(a.vm(VM).unwrap()["role"], "primary");
    // The same session goes on (no new initial copy) at the new pace.
    let set_at = remus_testbed::now_ms();
    let mut last_epoch = follow.checkpoint_after(set_at + 200).unwrap()["epoch"]
        .as_u64()
        .unwrap();
    let mut taken = Vec::new();
    while taken.len() < 21 {
        let ev = follow.next_event().unwrap();
        assert_ne!(ev["event"], "initial_sync", "no new copy: {ev}");
        if ev["event"] == "checkpoint" {
            let e = ev["epoch"].as_u64().unwrap();
            assert!(
                e == last_epoch + 1,
                "one session, epoch after epoch: {last_epoch} then {ev}"
            );
            last_epoch = e;
            taken.push(ev["taken_at_ms"].as_u64().unwrap());
        }
    }
    let mut gaps: Vec<u64> = taken.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_unstable();
    let median = gaps[gaps.len() / 2];
    assert!(
        median < 80,
        "checkpoints every {median} ms after -i 50 (was 100): {gaps:?}"
    );
    // b heard of the new timeout: 2 s of silence from a is no failover.
    a.freeze();
    std::thread::sleep(Duration::from_secs(2));
    a.thaw();
    follow
        .checkpoint_after(remus_testbed::now_ms())
        .unwrap_or_else(|e| {
            panic!(
                "after a 2 s freeze at --timeout 5000: {e}\nb:\n{}\na:\n{}",
                b.log_text(),
                a.log_text()
            )
        });
    assert_eq!(b.vm(VM).unwrap()["role"], "backup", "{}", b.log_text());
    assert!(
        b.log_text()
            .contains("the primary changed the failover timeout")
    );
    let out = a.cli(&["protect", "--set", VM, "-i", "100", "--timeout", "1000"]);
    assert!(out.ok, "{}", out.stderr);
    // The wish follows: what the agent sets up again after a loss.
    let wish: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.state_dir.join("protection").join(format!("{VM}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            wish["request"]["interval_ms"].as_u64(),
            wish["request"]["timeout_ms"].as_u64()
        ),
        (Some(100), Some(1000)),
        "{wish}"
    );
    eprintln!(
        "2. --set: checkpoints every {median} ms at -i 50; a 2 s freeze survived at --timeout 5000"
    );

    // 3. Failover: b's hook and counters.
    session_flows(&client, &a, "before the failover");
    let killed = Instant::now();
    a.kill_hard();
    drop(follow);
    let ms = b
        .wait_failover(VM, killed, Duration::from_secs(60))
        .unwrap();
    let f = wait_event(&log_b, "failover", 1);
    assert_eq!(f[0], VM, "{f:?}");
    assert_eq!(f[2], a_listen, "the peer is the old primary: {f:?}");
    assert!(f[3].parse::<u64>().is_ok_and(|e| e > 0), "an epoch: {f:?}");
    assert_eq!(f[4], "b", "{f:?}");
    assert!(f[5].contains("primary lost") || !f[5].is_empty(), "{f:?}");
    prom.wait(&lan, "b", &format!("remus_failovers_total{sel}"), |v| {
        v == 1.0
    });
    prom.wait(&lan, "a", "up", |v| v == 0.0);
    // b wants to protect back to a, and cannot yet.
    prom.wait(
        &lan,
        "b",
        &format!("remus_vm_protection_wanted{sel}"),
        |v| v == 1.0,
    );
    assert_eq!(b.vm(VM).unwrap()["wanted"], a_listen.as_str());
    // The VM's own rate cap came with it (in the session setup): the copy
    // back is capped as the copy here was.
    let wish: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.state_dir.join(format!("protection/{VM}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(wish["request"]["max_rate"], 400 << 20, "{wish}");
    session_flows(&client, &b, "after the failover");
    eprintln!("3. failover in {ms} ms; b's hook ran: {f:?}");

    // 4. a's agent is back; b protects back to it by itself.
    let back_at = Instant::now();
    a.restart().unwrap();
    wait_role_of(&b, VM, "primary");
    wait_role_of(&a, VM, "backup");
    let restored = wait_event(&log_b, "protection-restored", 1);
    assert_eq!(restored[2], a_listen, "{restored:?}");
    let plan = b.last_sync_plan();
    assert!(plan.contains("Changed"), "a changed-only resync: {plan}");
    // The resync is done on both sides: b's copy went to a.
    wait_event(&log_a, "resync-done", 1);
    session_flows(&client, &b, "after protecting back");
    eprintln!(
        "4. protected back to a within {:.1} s of its agent's restart",
        back_at.elapsed().as_secs_f64()
    );

    // 5. The backup (a) dies: b heals once it is back.
    a.kill_hard();
    let lost = wait_event(&log_b, "backup-lost", 1);
    assert_eq!(lost[2], a_listen, "{lost:?}");
    prom.wait(&lan, "b", &format!("remus_backup_lost_total{sel}"), |v| {
        v == 1.0
    });
    prom.wait(&lan, "b", &format!("remus_vm_protected{sel}"), |v| v == 0.0);
    let table = b.cli(&["list"]).stdout;
    assert!(table.contains("not yet: retrying"), "{table}");
    a.restart().unwrap();
    wait_event(&log_b, "protection-restored", 2);
    wait_role_of(&a, VM, "backup");
    prom.wait(&lan, "b", &format!("remus_vm_protected{sel}"), |v| v == 1.0);
    session_flows(&client, &b, "after healing");
    eprintln!("5. backup lost and protection restored by itself");

    // 6. --stop clears the wish: the next loss stays unhealed.
    let out = b.cli(&["protect", "--stop", VM]);
    assert!(out.ok, "{}", out.stderr);
    wait_role_of(&b, VM, "unprotected");
    assert!(b.vm(VM).unwrap().get("wanted").is_none());
    prom.wait(
        &lan,
        "b",
        &format!("remus_vm_protection_wanted{sel}"),
        |v| v == 0.0,
    );
    assert!(b.log_text().contains("protection no longer wanted"));
    // Nothing sets it up again: a has no standby, b stays unprotected
    // through several of the healer's sweeps.
    let restored_before = events(&log_b)
        .iter()
        .filter(|(e, _)| e == "protection-restored")
        .count();
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(role_of(&b, VM).as_deref(), Some("unprotected"));
    assert!(a.vm(VM).is_none(), "{:?}", a.vm(VM));
    assert_eq!(
        events(&log_b)
            .iter()
            .filter(|(e, _)| e == "protection-restored")
            .count(),
        restored_before
    );
    session_flows(&client, &b, "at the end");
}

/// Several VMs per host pair, protected in both directions at once (a
/// protects two to b, b protects one to a), then a's plug is pulled:
/// both VMs a ran resume on b, the VM a backed up runs on unprotected on
/// b, and when a's agent is back every one of them is protected to a
/// again by the agents themselves (a's two back after their failover, b's
/// one after its lost backup).
#[test]
fn many_vms_both_directions_and_one_host_dies() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::standard("many").expect("LAN of namespace hosts");
    let kd = tempfile::tempdir().unwrap();
    let key = write_key(kd.path());
    let top = tempfile::tempdir_in("/tmp").unwrap();
    let (hooks_a, _) = hook_dir(top.path(), "a");
    let (hooks_b, log_b) = hook_dir(top.path(), "b");
    let store = [top.path().join("a"), top.path().join("b")];
    for d in &store {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut a = agent(&lan, "a", &store[0], &key, &hooks_a);
    let b = agent(&lan, "b", &store[1], &key, &hooks_b);
    let listen = |h: &str| format!("{}:{REPL_PORT}", lan.addr(h));
    let from_a = ["m-a1", "m-a2"];
    let from_b = ["m-b1"];
    for (host, names) in [(&a, &from_a[..]), (&b, &from_b[..])] {
        for n in names {
            let cfg = host.write_file(
                &format!("{n}.toml"),
                &img.config(n, "remus.workload=tick", ""),
            );
            let out = host.cli(&["create", cfg.to_str().unwrap()]);
            assert!(out.ok, "create {n}: {}", out.stderr);
        }
    }
    for (host, names) in [(&a, &from_a[..]), (&b, &from_b[..])] {
        for n in names {
            host.wait_console(n, Duration::from_secs(120), "ticks", |c| {
                remus_testbed::last_tick(c).is_some()
            })
            .unwrap();
        }
    }
    // Both directions at once, through the agents' own wishes.
    let mut follows = Vec::new();
    for (host, peer, names) in [(&a, "b", &from_a[..]), (&b, "a", &from_b[..])] {
        for n in names {
            let mut f = ProtectFollower::start_healing(
                host,
                n,
                &listen(peer),
                &["-i", "100", "--timeout", "1000"],
            )
            .unwrap();
            f.checkpoint_after(0).unwrap();
            follows.push(f);
        }
    }
    for n in from_a {
        assert_eq!(role_of(&a, n).as_deref(), Some("primary"), "{n}");
        assert_eq!(role_of(&b, n).as_deref(), Some("backup"), "{n}");
    }
    assert_eq!(role_of(&b, "m-b1").as_deref(), Some("primary"));
    assert_eq!(role_of(&a, "m-b1").as_deref(), Some("backup"));

    // a dies with two primaries and one standby on it.
    let killed = Instant::now();
    a.kill_hard();
    drop(follows);
    for n in from_a {
        let ms = b.wait_failover(n, killed, Duration::from_secs(60)).unwrap();
        eprintln!("{n}: failover to b in {ms} ms");
    }
    let lost = wait_event(&log_b, "backup-lost", 1);
    assert_eq!(lost[0], "m-b1", "{lost:?}");
    let failovers: Vec<String> = events(&log_b)
        .into_iter()
        .filter(|(e, _)| e == "failover")
        .map(|(_, f)| f[0].clone())
        .collect();
    assert_eq!(failovers.len(), 2, "{failovers:?}");
    // Everything runs on b now, unprotected, and wants a back.
    for n in ["m-a1", "m-a2", "m-b1"] {
        let v = b.vm(n).unwrap_or_else(|| panic!("{n} not on b"));
        assert!(v["state"] == "r" || v["state"] == "b", "{v}");
        assert_eq!(v["wanted"], listen("a").as_str(), "{v}");
        let t = last_tick(&b.console(n)).unwrap_or(0);
        b.wait_console(n, Duration::from_secs(30), "ticks on b", |c| {
            last_tick(c) > Some(t)
        })
        .unwrap();
    }

    // a is back: the agents protect all three to it by themselves.
    a.restart().unwrap();
    for n in ["m-a1", "m-a2", "m-b1"] {
        wait_role_of(&b, n, "primary");
        wait_role_of(&a, n, "backup");
    }
    let restored = wait_for("three restorations", Duration::from_secs(120), || {
        let r: Vec<String> = events(&log_b)
            .into_iter()
            .filter(|(e, _)| e == "protection-restored")
            .map(|(_, f)| f[0].clone())
            .collect();
        (r.len() >= 3).then_some(r)
    });
    for n in ["m-a1", "m-a2", "m-b1"] {
        assert!(restored.iter().any(|r| r == n), "{n}: {restored:?}");
    }
}

fn role_of(h: &Agent, vm: &str) -> Option<String> {
    h.vm(vm)
        .and_then(|v| v["role"].as_str().map(str::to_string))
}

fn wait_role_of(h: &Agent, vm: &str, want: &str) {
    let start = Instant::now();
    while role_of(h, vm).as_deref() != Some(want) {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{vm}: no role {want}: {:?}\n{}",
            h.vm(vm),
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
