//! Split-brain protection through the real CLI, agents, QEMU, network
//! namespaces and a real three-member etcd cluster (host e): primary a,
//! backup b, client c holding a TCP session with the guest. Each case
//! cuts something and checks, with a watcher sampling both copies' run
//! states every 10 ms and the switch port the VM's frames arrive from,
//! that two copies never run at once:
//! - the replication link only (a and b still reach etcd, and one etcd
//!   member dies meanwhile): a runs on, b never resumes;
//! - the primary isolated from everything: a holds its output and pauses
//!   itself, b resumes after its grace (taking the key from a's tenure),
//!   the client's session survives; plugged back in, a is listed stale
//!   and never runs;
//! - the backup isolated: a runs on unprotected and says so; b never
//!   resumes;
//! - the arbiter down (two of three members): a pauses itself, b does
//!   not resume; once etcd is back, a runs again, still protected;
//! - `remus failback`: the key moves with the VM to b, which runs it and
//!   protects it back to a, the client's session whole;
//! - `remus failback` while b cannot reach etcd: b never resumes, a takes
//!   its key back and runs on;
//! - a partial partition (a cut from b and etcd, not from the client): b
//!   resumes, and nothing a sent after its last acknowledged checkpoint
//!   reached the client;
//! - the primary's agent restarted: it pins its key before it exits, the
//!   next agent adopts the running VM, b never resumes;
//! - the primary's agent and QEMU killed: b takes the key from a's
//!   tenure at once (no wait for the lease) and resumes.

use std::time::{Duration, Instant};

use remus_testbed::etcd::EtcdCluster;
use remus_testbed::lan::HostSpec;
use remus_testbed::watch::{RunWatch, WatchReport};
use remus_testbed::{Agent, Binaries, GuestImage, Lan, ProtectFollower, SeqClient, write_key};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const VM_IP: &str = "198.18.0.10";
const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xc6, 0x12, 0x0b];
const ETCD_IP: &str = "198.18.0.5";
const REPL_PORT: u16 = 7100;
/// Lease TTL (s) and fence margin (ms) of both agents.
const TTL_S: u64 = 2;
const MARGIN_MS: u64 = 500;

struct Site {
    // Field order is drop order: agents (and their VMs) first, then etcd,
    // then the LAN whose namespaces they live in.
    a: Agent,
    b: Agent,
    etcd: EtcdCluster,
    _kd: tempfile::TempDir,
    lan: Lan,
    img: GuestImage,
}

impl Site {
    fn new() -> Site {
        let img = GuestImage::find().expect("guest image");
        let lan = Lan::new(
            "arb",
            &[
                HostSpec::vm("a", "198.18.0.1/24"),
                HostSpec::vm("b", "198.18.0.2/24"),
                HostSpec::client("c", "198.18.0.3/24"),
                HostSpec::client("e", &format!("{ETCD_IP}/24")),
            ],
        )
        .expect("LAN of namespace hosts");
        let etcd = EtcdCluster::start(3, ETCD_IP, Some(lan.host("e"))).expect("etcd in host e");
        let kd = tempfile::tempdir().unwrap();
        let key = write_key(kd.path());
        let endpoints = etcd.endpoints().join(",");
        let agent = |host: &str, extra: &[&str]| {
            let mut args = vec![
                "--key",
                key.to_str().unwrap(),
                "--arbiter",
                &endpoints,
                "--arbiter-prefix",
                "/remus-test",
                "--host-name",
                host,
            ];
            let ttl = TTL_S.to_string();
            let margin = MARGIN_MS.to_string();
            args.extend(["--arbiter-ttl", &ttl, "--arbiter-margin-ms", &margin]);
            // A restart leaves the VMs running (case 8), as remusd does
            // by default; the testbed kills what is left at the end.
            args.extend(["--on-stop", "keep"]);
            args.extend(extra);
            Agent::start(&bins(), Some(lan.host(host)), &args)
                .unwrap_or_else(|e| panic!("agent on {host}: {e}"))
        };
        // Both listen: a failback protects the VM back to a.
        let listen = |h: &str| format!("{}:{REPL_PORT}", lan.addr(h));
        let a = agent("a", &["--listen", &listen("a")]);
        let b = agent("b", &["--listen", &listen("b")]);
        Site {
            a,
            b,
            etcd,
            _kd: kd,
            lan,
            img,
        }
    }

    /// A guest on a serving the sequence protocol to a client on c,
    /// protected to b (checkpoints every 100 ms, 1 s timeout), and a
    /// watcher on both copies.
    fn protected_vm(&self, vm: &str) -> (SeqClient, ProtectFollower, RunWatch) {
        let cfg = self.a.write_file(
            &format!("{vm}.toml"),
            &self.img.config(
                vm,
                &format!("remus.workload=tick,seqserver remus.ip={VM_IP}/24"),
                "[[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:c6:12:0b\"\n",
            ),
        );
        let out = self.a.cli(&["create", cfg.to_str().unwrap()]);
        assert!(out.ok, "create: {}", out.stderr);
        self.a
            .wait_console(vm, Duration::from_secs(90), "seqserver", |c| {
                c.contains("seqserver: listening")
            })
            .unwrap();
        let client = SeqClient::start(
            self.lan.host("c"),
            format!("{VM_IP}:7000").parse().unwrap(),
            Duration::from_millis(5),
        )
        .unwrap_or_else(|e| panic!("{vm}: connect: {e}\n{}", self.a.console(vm)));
        client.wait_received(50, Duration::from_secs(30)).unwrap();
        let peer = format!("{}:{REPL_PORT}", self.lan.addr("b"));
        let mut follow =
            ProtectFollower::start(&self.a, vm, &peer, &["-i", "100", "--timeout", "1000"])
                .unwrap_or_else(|e| panic!("{e}\nbackup log:\n{}", self.b.log_text()));
        follow.checkpoint_after(0).unwrap();
        let before = client.received();
        client
            .wait_received(before + 20, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{vm}: no output while protected: {e}"));
        let arb = self.a.vm(vm).expect("listed")["arbiter"].clone();
        assert_eq!(arb["state"], "leased", "{vm}: {arb}");
        assert_eq!(arb["holder"], "a", "{vm}: {arb}");
        let info = self.a.cli(&["info"]);
        assert!(
            info.stdout.contains("as 'a'") && info.stdout.contains("answers ("),
            "{}",
            info.stdout
        );
        let watch = RunWatch::start(
            &self.lan,
            &[("a", &self.a.socket), ("b", &self.b.socket)],
            vm,
            VM_MAC,
        )
        .expect("watcher");
        (client, follow, watch)
    }

    /// Destroys the VM on both hosts (whichever have it).
    /// Destroys the VM on both hosts (whichever have it). A destroy on a
    /// protected primary is a primary failure to its backup, which then
    /// decides (takes the freed key and resumes, or discards): its copy
    /// is destroyed once it has.
    fn clean(&self, vm: &str) {
        for ag in [&self.a, &self.b] {
            wait_for(
                "the copy's fate to be decided",
                Duration::from_secs(30),
                || ag.vm(vm).is_none_or(|v| v["role"] != "backup"),
            );
            if ag.vm(vm).is_some() {
                let out = ag.cli(&["destroy", vm]);
                assert!(out.ok, "destroy {vm}: {}", out.stderr);
            }
        }
    }
}

/// Polls `f` every 10 ms until it is true; the error names `what`.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

/// The client's session goes on: `more` further lines (within 60 s) from
/// the copy on `host`, whose console a failure shows.
fn session_goes_on(client: &SeqClient, more: u64, host: &Agent, vm: &str, what: &str) {
    let n = client.received();
    client
        .wait_received(n + more, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what}: the session stalled: {e}\n{}", host.console(vm)));
}

/// The client saw no error, and the guest on `host` no gap or duplicate
/// in what it received.
fn session_whole(client: &SeqClient, host: &Agent, vm: &str) {
    assert_eq!(client.error(), None);
    let console = host.console(vm);
    assert!(
        !console.contains("gap") && !console.contains("duplicate"),
        "{console}"
    );
}

fn arbiter_state(agent: &Agent, vm: &str) -> Option<String> {
    agent.vm(vm)?["arbiter"]["state"].as_str().map(String::from)
}

/// The VM's key as etcd has it (asked with etcdctl from host e): the
/// host it names and its lease (0: none, pinned).
fn etcd_key(site: &Site, vm: &str) -> (String, i64) {
    let endpoints = site.etcd.endpoints().join(",");
    let key = format!("/remus-test/vms/{vm}/runner");
    let e = site.lan.host("e");
    let get = |extra: &[&str]| {
        let mut args = vec!["--endpoints", &endpoints, "get", &key];
        args.extend(extra);
        e.exec_ok("etcdctl", &args).expect("etcdctl get")
    };
    let holder = get(&["--print-value-only"]).trim().to_string();
    let json: serde_json::Value =
        serde_json::from_str(&get(&["-w", "json"])).expect("etcdctl json");
    // etcd leaves the field out when there is no lease.
    let lease = json["kvs"][0]["lease"].as_i64().unwrap_or(0);
    (holder, lease)
}

fn blackhole(lan: &Lan, host: &str, to: &str, add: bool) {
    let dst = format!("{}/32", lan.addr(to));
    lan.host(host)
        .exec_ok(
            "ip",
            &["route", if add { "add" } else { "del" }, "blackhole", &dst],
        )
        .unwrap();
}

fn check(report: &WatchReport, case: &str) {
    eprint!("{case}:\n{}", report.summary());
    report
        .check_never_two()
        .unwrap_or_else(|e| panic!("{case}: {e}\n{}", report.summary()));
    for h in ["a", "b"] {
        let (p50, _) = report.intervals(h);
        assert!(
            p50 <= Duration::from_millis(15),
            "{case}: {h} sampled every {p50:?}, not every 10 ms"
        );
    }
}

/// After a partition that must leave the VM with a alone: b discards its
/// copy, a's key is pinned, the client's session goes on, and the watch
/// saw b never run.
fn a_runs_alone(
    site: &Site,
    vm: &str,
    client: &SeqClient,
    watch: RunWatch,
    case: &str,
) -> WatchReport {
    wait_for("b to discard its copy", Duration::from_secs(30), || {
        site.b.vm(vm).is_none()
    });
    wait_for("a's key pinned", Duration::from_secs(10), || {
        arbiter_state(&site.a, vm).as_deref() == Some("pinned")
    });
    session_goes_on(client, 100, &site.a, vm, case);
    let report = watch.stop();
    check(&report, case);
    assert!(!report.ever_ran("b"), "{case}: b resumed a second copy");
    report
}

#[test]
fn two_copies_never_run_at_once() {
    let mut site = Site::new();

    // 1. The replication link is cut; both hosts reach etcd, which loses
    //    a member meanwhile. a renews and runs on; b must not resume.
    {
        let vm = "arb1";
        let (client, mut follow, watch) = site.protected_vm(vm);
        site.etcd.kill(0);
        blackhole(&site.lan, "a", "b", true);
        blackhole(&site.lan, "b", "a", true);
        let lost = follow.event("backup_lost").unwrap();
        eprintln!("link cut: {lost}");
        // b gave its copy up (the key is a's: pinned once a ran alone).
        let report = a_runs_alone(&site, vm, &client, watch, "link cut");
        assert!(report.frames_from("b").is_empty());
        assert_eq!(client.error(), None);
        assert!(
            site.b.log_text().contains("NOT resuming"),
            "b's log must say why"
        );
        blackhole(&site.lan, "a", "b", false);
        blackhole(&site.lan, "b", "a", false);
        site.etcd.restart(0).unwrap();
        drop(client);
        site.clean(vm);
    }

    // 2. The primary is cut off from everything.
    {
        let vm = "arb2";
        let (client, follow, watch) = site.protected_vm(vm);
        let cut = Instant::now();
        site.lan.cut("a").unwrap();
        let fenced = wait_for("a to fence itself", Duration::from_secs(10), || {
            arbiter_state(&site.a, vm).as_deref() == Some("fenced")
        });
        // Within the lease time, less the margin, after the last renewal
        // (at most a renewal period before the cut).
        assert!(
            fenced <= Duration::from_millis(TTL_S * 1000 - MARGIN_MS + 400),
            "a fenced {fenced:?} after the cut"
        );
        let failover = site
            .b
            .wait_failover(vm, cut, Duration::from_secs(30))
            .unwrap();
        eprintln!("primary isolated: a fenced after {fenced:?}, b resumed after {failover} ms");
        // The session goes on from b: nothing the client had was lost.
        session_goes_on(&client, 100, &site.b, vm, "after the failover");
        session_whole(&client, &site.b, vm);
        wait_for("b's key pinned", Duration::from_secs(10), || {
            arbiter_state(&site.b, vm).as_deref() == Some("pinned")
        });
        drop(follow);
        // Plugged back in, a learns that b holds the key: stale, paused,
        // and it refuses to be unpaused.
        site.lan.restore("a").unwrap();
        wait_for("a to see it is stale", Duration::from_secs(20), || {
            arbiter_state(&site.a, vm).as_deref() == Some("stale")
        });
        let a_vm = site.a.vm(vm).unwrap();
        assert_eq!(a_vm["state"], "p", "{a_vm}");
        assert_eq!(a_vm["arbiter"]["holder"], "b", "{a_vm}");
        let out = site.a.cli(&["unpause", vm]);
        assert!(!out.ok && out.stderr.contains("fence"), "{}", out.stderr);
        // A while longer with a plugged in: still only b.
        session_goes_on(&client, 50, &site.b, vm, "a plugged back in");
        let report = watch.stop();
        check(&report, "primary isolated");
        assert!(report.ever_ran("b"));
        drop(client);
        site.clean(vm);
    }

    // 3. The backup is cut off from everything: a runs on unprotected.
    {
        let vm = "arb3";
        let (client, mut follow, watch) = site.protected_vm(vm);
        site.lan.cut("b").unwrap();
        let lost = follow.event("backup_lost").unwrap();
        eprintln!("backup isolated: {lost}");
        let a_vm = site.a.vm(vm).unwrap();
        assert_eq!(a_vm["role"], "unprotected", "{a_vm}");
        // b tries for its whole takeover window, then gives up.
        a_runs_alone(&site, vm, &client, watch, "backup isolated");
        site.lan.restore("b").unwrap();
        drop(client);
        site.clean(vm);
    }

    // 4. The arbiter loses its quorum while everything else works: a
    //    pauses itself, b does not resume; etcd back, a runs on.
    {
        let vm = "arb4";
        let (client, mut follow, watch) = site.protected_vm(vm);
        site.etcd.kill(1);
        site.etcd.kill(2);
        let fenced = wait_for("a to fence itself", Duration::from_secs(10), || {
            arbiter_state(&site.a, vm).as_deref() == Some("fenced")
        });
        eprintln!("arbiter down: a fenced after {fenced:?}");
        // `remus info` says the arbiter does not answer (the member left
        // alone still answers status requests, not reads).
        let info = site.a.cli(&["info"]);
        assert!(info.stdout.contains("UNREACHABLE"), "{}", info.stdout);
        // Output already acknowledged drains; then nothing more.
        std::thread::sleep(Duration::from_millis(500));
        let n = client.received();
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(client.received(), n, "the fenced VM kept talking");
        site.etcd.restart(1).unwrap();
        site.etcd.restart(2).unwrap();
        let lifted = wait_for("a's fence lifted", Duration::from_secs(20), || {
            arbiter_state(&site.a, vm).as_deref() == Some("leased")
        });
        eprintln!("arbiter back: fence lifted after {lifted:?}");
        session_goes_on(&client, 100, &site.a, vm, "fence lifted");
        assert_eq!(client.error(), None);
        // Still protected: checkpoints go on.
        follow.checkpoint_after(remus_testbed::now_ms()).unwrap();
        let report = watch.stop();
        check(&report, "arbiter down");
        assert!(!report.ever_ran("b"), "b resumed a second copy");
        drop(follow);
        drop(client);
        site.clean(vm);
    }

    // 5. A planned switch-over: a gives the key up with its last
    //    checkpoint, b takes it, resumes, and protects the VM back to a.
    {
        let vm = "arb5";
        let (client, follow, watch) = site.protected_vm(vm);
        let out = site.a.cli(&["failback", vm]);
        assert!(
            out.ok,
            "failback: {}\na:\n{}\nb:\n{}",
            out.stderr,
            site.a.log_text(),
            site.b.log_text()
        );
        assert!(out.stderr.contains("guest was paused"), "{}", out.stderr);
        session_goes_on(&client, 100, &site.b, vm, "after the failback");
        // b runs it, protected back to a on a lease of its own.
        let back = wait_for(
            "b to protect the VM back to a",
            Duration::from_secs(30),
            || {
                site.b.vm(vm).is_some_and(|v| {
                    v["role"] == "primary"
                        && v["arbiter"]["state"] == "leased"
                        && v["arbiter"]["holder"] == "b"
                })
            },
        );
        eprintln!(
            "failback: {}; b listed as protecting back {back:?} after the client's next 100 lines",
            out.stderr.trim()
        );
        // In etcd too: b's key on a lease (that a's takeover could wait
        // out), not pinned.
        let (holder, lease) = etcd_key(&site, vm);
        assert_eq!(holder, "b");
        assert_ne!(lease, 0, "b's key is not on a lease after protecting back");
        wait_for("a to hold the standby", Duration::from_secs(30), || {
            site.a.vm(vm).is_some_and(|v| v["role"] == "backup")
        });
        session_goes_on(&client, 100, &site.b, vm, "protected back");
        session_whole(&client, &site.b, vm);
        let report = watch.stop();
        check(&report, "failback");
        assert!(report.ever_ran("b"), "b never ran the VM");
        // b is the primary now: end its protection, then clean up.
        let out = site.b.cli(&["protect", "--stop", vm]);
        assert!(out.ok, "protect --stop on b: {}", out.stderr);
        drop(follow);
        drop(client);
        site.clean(vm);
    }

    // 6. A failback while b cannot reach etcd: b cannot take the key, so
    //    it must not resume; a takes its key back and runs on.
    {
        let vm = "arb6";
        let (client, follow, watch) = site.protected_vm(vm);
        blackhole(&site.lan, "b", "e", true);
        let out = site.a.cli(&["failback", vm]);
        assert!(
            !out.ok,
            "failback succeeded without the arbiter: {}",
            out.stderr
        );
        eprintln!("failback with b cut from etcd: {}", out.stderr.trim());
        wait_for("a's key pinned", Duration::from_secs(30), || {
            arbiter_state(&site.a, vm).as_deref() == Some("pinned")
        });
        assert_eq!(etcd_key(&site, vm), ("a".to_string(), 0));
        let a_vm = site.a.vm(vm).unwrap();
        assert!(a_vm["state"] == "r" || a_vm["state"] == "b", "{a_vm}");
        assert_eq!(a_vm["role"], "unprotected", "{a_vm}");
        session_goes_on(&client, 100, &site.a, vm, "after a failed failback");
        assert_eq!(client.error(), None);
        wait_for("b to discard its copy", Duration::from_secs(30), || {
            site.b.vm(vm).is_none()
        });
        blackhole(&site.lan, "b", "e", false);
        let report = watch.stop();
        check(&report, "failback without the arbiter");
        assert!(!report.ever_ran("b"), "b resumed without the key");
        drop(follow);
        drop(client);
        site.clean(vm);
    }

    // 7. A partial partition: a loses b and etcd but still reaches its
    //    client. b takes the key from a's tenure after its grace (a
    //    cannot pin it) and resumes from the last acknowledged
    //    checkpoint, so a must not let out anything
    //    the backup does not hold: no output of unacknowledged epochs,
    //    and no live output after the loss, until its key is pinned
    //    (never, here). The cut comes just after a renewal, so that a
    //    learns of the loss (1 s timeout) before its lease would fence
    //    it (TTL less the margin): the window in which it would
    //    otherwise run on with its output unheld.
    {
        let vm = "arb7";
        let (client, mut follow, watch) = site.protected_vm(vm);
        wait_for("a's lease just renewed", Duration::from_secs(10), || {
            site.a.vm(vm).is_some_and(|v| {
                v["arbiter"]["fence_in_ms"]
                    .as_i64()
                    .is_some_and(|ms| ms >= (TTL_S * 1000 - MARGIN_MS) as i64 - 150)
            })
        });
        // a's routes to b and to etcd, both ways.
        let routes = [("a", "b"), ("b", "a"), ("a", "e"), ("e", "a")];
        let cut = Instant::now();
        for (from, to) in routes {
            blackhole(&site.lan, from, to, true);
        }
        let lost = follow.event("backup_lost").unwrap();
        eprintln!(
            "partial partition: a lost b after {:?}: {lost}",
            cut.elapsed()
        );
        let failover = site
            .b
            .wait_failover(vm, cut, Duration::from_secs(30))
            .unwrap();
        eprintln!("partial partition: b resumed after {failover} ms");
        // The client's session goes on from b with nothing lost: what it
        // got from a was all in the checkpoint b resumed from.
        session_goes_on(&client, 100, &site.b, vm, "after the partial partition");
        session_whole(&client, &site.b, vm);
        for (from, to) in routes {
            blackhole(&site.lan, from, to, false);
        }
        wait_for("a to see it is stale", Duration::from_secs(20), || {
            arbiter_state(&site.a, vm).as_deref() == Some("stale")
        });
        session_goes_on(&client, 50, &site.b, vm, "a reconnected");
        session_whole(&client, &site.b, vm);
        let report = watch.stop();
        check(&report, "partial partition");
        assert!(report.ever_ran("b"));
        drop(follow);
        drop(client);
        site.clean(vm);
    }

    // 8. The primary's agent restarts (SIGTERM, `--on-stop keep`): the
    //    session ends in order, a holds the guest until its key is pinned
    //    (b may not have read the goodbye, and could take the key from
    //    a's tenure), the old agent waits for that pin before it exits,
    //    and the next one adopts the running VM. b never runs it.
    {
        let vm = "arb8";
        let (client, follow, watch) = site.protected_vm(vm);
        site.a.stop_agent_only().unwrap();
        let log = site.a.log_text();
        assert!(
            !log.contains("the agent stops before the VM's key was pinned"),
            "{log}"
        );
        assert_eq!(
            etcd_key(&site, vm),
            ("a".to_string(), 0),
            "pinned to a\na:\n{log}\nb:\n{}",
            site.b.log_text()
        );
        drop(follow);
        site.a.restart().unwrap();
        wait_for("a's agent to adopt the VM", Duration::from_secs(60), || {
            site.a
                .vm(vm)
                .is_some_and(|v| v["state"] == "r" || v["state"] == "b")
        });
        session_goes_on(&client, 100, &site.a, vm, "after a's agent restarted");
        assert_eq!(client.error(), None);
        let report = watch.stop();
        check(&report, "primary's agent restarted");
        assert!(!report.ever_ran("b"), "b resumed a second copy");
        drop(client);
        site.clean(vm);
    }

    // 9. The primary's agent and QEMU are killed (last: a stays dead).
    //    The connection closes, so b does not wait: it takes the key
    //    from a's tenure while a's lease still runs (the session's
    //    outputs were all held, so nothing of a's newer state got out),
    //    resumes, and the client's session goes on whole.
    {
        let vm = "arb9";
        let (client, follow, watch) = site.protected_vm(vm);
        let killed = Instant::now();
        site.a.kill_hard();
        let failover = site
            .b
            .wait_failover(vm, killed, Duration::from_secs(30))
            .unwrap();
        eprintln!("primary killed: b resumed after {failover} ms");
        let log = site.b.log_text();
        assert!(
            log.contains("from the primary's tenure without waiting for its lease"),
            "b did not take the key from a's tenure:\n{log}"
        );
        session_goes_on(&client, 100, &site.b, vm, "after the primary was killed");
        session_whole(&client, &site.b, vm);
        wait_for("b's key pinned", Duration::from_secs(10), || {
            arbiter_state(&site.b, vm).as_deref() == Some("pinned")
        });
        assert_eq!(etcd_key(&site, vm), ("b".to_string(), 0));
        // a's agent is gone, so the watcher cannot ask it (it counts a as
        // possibly running): a's QEMU is checked gone instead, and the
        // switch saw no frame from a once b ran.
        assert!(site.a.qemu_pids().is_empty(), "a's QEMU survived SIGKILL");
        let report = watch.stop();
        eprint!("primary killed:\n{}", report.summary());
        let b_from = report.running_spans("b").first().expect("b ran").0;
        let late: Vec<_> = report
            .frames_from("a")
            .into_iter()
            .filter(|t| *t >= b_from)
            .collect();
        assert!(late.is_empty(), "frames from a after b ran: {late:?}");
        drop(follow);
        drop(client);
        let out = site.b.cli(&["destroy", vm]);
        assert!(out.ok, "destroy {vm}: {}", out.stderr);
    }
}
