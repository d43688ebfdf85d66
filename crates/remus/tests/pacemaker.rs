//! A protected VM run by a real Pacemaker cluster: three namespace hosts
//! a, b and c, each with corosync, Pacemaker and a remus agent run with
//! `--failover-by cluster`, and the resource agent `ocf:remus:vm` as a
//! promotable clone (two instances: the VM and its standby), fenced by
//! `stonith:null` (the test pulls a host's plug itself, then the cluster
//! "fences" it). A client on a fourth host holds a TCP session with the
//! guest, which writes checked records to its disk.
//!
//! 1. Pacemaker starts the clone on a and b (c only votes, by a
//!    constraint): the VM's home a cold-starts it (promote), and protects
//!    it to b, the unpromoted instance.
//! 2. Host a dies (its agent, QEMU, corosync and Pacemaker killed):
//!    Pacemaker fences it and promotes b, whose standby resumes at the
//!    takeover. The TCP session survives.
//! 3. a comes back (its copy stale): its instance starts again and b
//!    protects the VM to it with a changed-only resync.
//! 4. `crm_resource --move --promoted` moves the VM home to a with a
//!    switch-over at a checkpoint (demote = remus failback).
//! 5. The constraint goes: the clone may run on c too. Host b, the
//!    standby's, dies: a holds its guest (paused, output held) until
//!    Pacemaker has fenced b, then runs on; the clone's second instance
//!    starts on c, and a protects the VM there by itself (protection
//!    rebuilt on the surviving third host).
//!
//! One failover in all, the session intact, and every record on the disk
//! intact.

use std::path::Path;
use std::time::{Duration, Instant};

use remus_testbed::pacemaker::Cluster;
use remus_testbed::{
    Agent, Binaries, GuestImage, HostSpec, Lan, PairFiles, SeqClient, connect_seq_client,
    lan_agent, records_intact, records_vm_config, wait_for,
};

const VM: &str = "pcm";
const VM_IP: &str = "198.18.0.10";
const REPL_PORT: u16 = 7400;
const DISK_BYTES: u64 = 64 << 20;

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

fn agent(lan: &Lan, h: &str, store: &Path, key: &Path) -> Agent {
    let extra = ["--host-name", h, "--failover-by", "cluster"];
    lan_agent(&bins(), lan, (h, REPL_PORT), store, key, &extra)
}

/// `n` more lines reach the client within 120 s, with no gap, duplicate
/// or reset.
fn session_goes_on(client: &SeqClient, n: u64, what: &str, logs: &dyn Fn() -> String) {
    let at = client.received();
    client
        .wait_received(at + n, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{what}: the session stalled: {e}\n{}", logs()));
    assert_eq!(client.error(), None, "{what}");
}

/// The VM runs on `h` as primary, protected to `peer` with a committed
/// checkpoint.
fn wait_protected_to(h: &Agent, peer: &str, within: Duration, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = h.vm(VM)
            && v["role"] == "primary"
            && v["protection"]["peer"] == peer
            && v["protection"]["last_checkpoint"]["epoch"].as_u64() >= Some(1)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{VM} not protected to {peer} within {within:?}: {:?}\n{}",
            h.vm(VM),
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cib(cluster: &Cluster, on: &str, section: &str, xml: &str) {
    cluster
        .node(on)
        .run_ok("cibadmin", &["-C", "-o", section, "-X", xml])
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn pacemaker_fails_over_reprotects_and_moves_the_vm() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::new(
        "pcm",
        &[
            HostSpec::vm("a", "198.18.0.1/24"),
            HostSpec::vm("b", "198.18.0.2/24"),
            HostSpec::vm("c", "198.18.0.3/24"),
            HostSpec::client("cl", "198.18.0.9/24"),
        ],
    )
    .expect("LAN of namespace hosts");
    let files = PairFiles::new(DISK_BYTES);
    let store_c = files.top.path().join("c");
    std::fs::create_dir_all(&store_c).unwrap();
    let mut a = agent(&lan, "a", &files.images, &files.key);
    let mut b = agent(&lan, "b", &files.store_b, &files.key);
    let c = agent(&lan, "c", &store_c, &files.key);
    let addr = |h: &str| format!("{}:{REPL_PORT}", lan.addr(h));

    let ra = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/ocf/remus-vm");
    let mut cluster = Cluster::start(&lan, &["a", "b", "c"], &[("remus", "vm", &ra)])
        .unwrap_or_else(|e| panic!("cluster: {e}"));
    // Each node's resource agent finds its own remus agent at the default
    // socket path, in the node's private /run.
    for (h, ag) in [("a", &a), ("b", &b), ("c", &c)] {
        cluster
            .node_mut(h)
            .link_in_run("remus/remusd.sock", &ag.socket)
            .unwrap();
    }
    let paths = [
        ("a", a.log.clone()),
        ("b", b.log.clone()),
        ("c", c.log.clone()),
        ("pacemaker on b", cluster.node("b").pacemaker_log_path()),
    ];
    let logs = move || {
        paths
            .iter()
            .map(|(what, p)| {
                format!(
                    "--- {what}:\n{}\n",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<String>()
    };

    // The VM's config on its home, a; the guest serves the client on cl.
    let cfg = records_vm_config(&a, &img, VM, (VM_IP, "52:54:00:c6:14:3f"), &files.disk);
    let peers = format!("a={} b={} c={}", addr("a"), addr("b"), addr("c"));
    let remus = bins().remus;
    cib(
        &cluster,
        "a",
        "resources",
        r#"<primitive id="fence-null" class="stonith" type="null"><instance_attributes id="fn-ia"><nvpair id="fn-hl" name="hostlist" value="a b c"/></instance_attributes></primitive>"#,
    );
    cib(
        &cluster,
        "a",
        "resources",
        &format!(
            r#"<clone id="vm-clone"><meta_attributes id="vm-clone-meta">
<nvpair id="m1" name="promotable" value="true"/><nvpair id="m2" name="promoted-max" value="1"/>
<nvpair id="m3" name="promoted-node-max" value="1"/><nvpair id="m4" name="clone-max" value="2"/>
<nvpair id="m5" name="clone-node-max" value="1"/><nvpair id="m6" name="notify" value="true"/></meta_attributes>
<primitive id="vm" class="ocf" provider="remus" type="vm"><instance_attributes id="vm-ia">
<nvpair id="p1" name="vm" value="{VM}"/><nvpair id="p2" name="peers" value="{peers}"/>
<nvpair id="p3" name="config" value="{}"/><nvpair id="p4" name="home" value="a"/>
<nvpair id="p5" name="protect_options" value="-i 100 --timeout 1000"/><nvpair id="p6" name="remus" value="{}"/>
</instance_attributes><operations>
<op id="vm-start" name="start" timeout="60s" interval="0"/><op id="vm-stop" name="stop" timeout="60s" interval="0"/>
<op id="vm-promote" name="promote" timeout="120s" interval="0"/><op id="vm-demote" name="demote" timeout="120s" interval="0"/>
<op id="vm-mon-p" name="monitor" interval="2s" timeout="30s" role="Promoted"/>
<op id="vm-mon-u" name="monitor" interval="3s" timeout="30s" role="Unpromoted"/>
</operations></primitive></clone>"#,
            cfg.display(),
            remus.display()
        ),
    );
    cib(
        &cluster,
        "a",
        "constraints",
        r#"<rsc_location id="vm-on-a" rsc="vm-clone" node="a" score="100"/>"#,
    );
    cib(
        &cluster,
        "a",
        "constraints",
        r#"<rsc_location id="vm-on-b" rsc="vm-clone" node="b" score="50"/>"#,
    );
    // c only votes, until step 5 allows the clone there.
    cib(
        &cluster,
        "a",
        "constraints",
        r#"<rsc_location id="vm-not-c" rsc="vm-clone" node="c" score="-INFINITY"/>"#,
    );

    // 1. Cold start on a, protected to b.
    wait_protected_to(&a, &addr("b"), Duration::from_secs(180), &logs);
    let client = connect_seq_client(&a, VM, VM_IP, lan.host("cl"));
    session_goes_on(&client, 50, "protected on a", &logs);
    eprintln!("1. Pacemaker cold-started the VM on a and protected it to b");

    // 2. The primary's host a dies: Pacemaker fences it and promotes b,
    //    whose standby resumes at the takeover.
    let killed = Instant::now();
    a.kill_hard();
    cluster.node_mut("a").kill();
    wait_for("the VM running on b", Duration::from_secs(300), || {
        b.vm(VM).filter(|v| v["role"] == "unprotected")
    });
    assert!(
        b.log_text()
            .contains("TAKEOVER: the cluster says the primary is gone"),
        "{}",
        with_cluster(&cluster, &logs)
    );
    session_goes_on(&client, 100, "after the failover to b", &logs);
    eprintln!(
        "2. a died: Pacemaker promoted b (the standby took over) {:?} after the kill",
        killed.elapsed()
    );

    // 3. a is back (its copy stale): its instance starts again, and b
    //    protects the VM to it with a changed-only resync (b's change
    //    records since its takeover, and a's own of what it wrote last).
    a.restart().unwrap();
    cluster.node_mut("a").start().unwrap();
    wait_protected_to(&b, &addr("a"), Duration::from_secs(300), &|| {
        with_cluster(&cluster, &logs)
    });
    let plan = a.last_sync_plan();
    assert!(plan.contains("mode=Changed"), "{plan}");
    session_goes_on(&client, 50, "protected to a again", &logs);
    eprintln!("3. a back: b protects the VM to it (changed-only resync)");

    // 4. The VM moves home to a with a switch-over at a checkpoint.
    let crm = |args: &[&str]| {
        cluster
            .node("c")
            .run_ok("crm_resource", args)
            .unwrap_or_else(|e| panic!("{e}"));
    };
    crm(&["-r", "vm-clone", "--move", "--promoted", "--node", "a"]);
    wait_protected_to(&a, &addr("b"), Duration::from_secs(300), &|| {
        with_cluster(&cluster, &logs)
    });
    crm(&["-r", "vm-clone", "--clear"]);
    assert!(
        b.log_text().contains("SWITCHED OVER"),
        "{}",
        with_cluster(&cluster, &logs)
    );
    session_goes_on(&client, 100, "after the move home to a", &logs);
    eprintln!("4. moved home to a by crm_resource --move (a switch-over)");

    // 5. The clone may run on c too now. The standby's host b dies: a
    //    holds its guest until Pacemaker has fenced b and reports its
    //    instance stopped, then runs on; the second instance starts on
    //    c, and a protects the VM there by itself.
    cluster
        .node("c")
        .run_ok(
            "cibadmin",
            &[
                "-D",
                "-o",
                "constraints",
                "-X",
                r#"<rsc_location id="vm-not-c"/>"#,
            ],
        )
        .unwrap();
    let killed = Instant::now();
    b.kill_hard();
    cluster.node_mut("b").kill();
    wait_protected_to(&a, &addr("c"), Duration::from_secs(300), &|| {
        with_cluster(&cluster, &logs)
    });
    let a_log = a.log_text();
    assert!(
        a_log.contains("BACKUP LOST: the VM is held paused")
            && a_log.contains("TAKEOVER: the cluster says the backup is gone"),
        "{}",
        with_cluster(&cluster, &logs)
    );
    session_goes_on(&client, 100, "after b's loss", &logs);
    // One failover in all (step 2), and nothing ran twice.
    assert_eq!(
        b.log_text().matches("FAILOVER").count(),
        1,
        "{}",
        b.log_text()
    );
    assert!(!a.log_text().contains("FAILOVER"), "{}", a.log_text());
    assert!(!c.log_text().contains("FAILOVER"), "{}", c.log_text());
    let n = records_intact(&a, VM, "at the end");
    eprintln!(
        "5. b died: a held its guest until Pacemaker fenced b, then protects the VM to c ({:?} after the kill); {n} records intact",
        killed.elapsed()
    );
}

/// The agents' logs, then what the cluster says (crm_mon from a node that
/// is up) and the tail of every node's logs.
fn with_cluster(cluster: &Cluster, logs: &dyn Fn() -> String) -> String {
    let mon = cluster
        .nodes
        .iter()
        .find(|n| n.is_up())
        .and_then(|n| n.run("crm_mon", &["-1", "-A"]).ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("{}\n--- crm_mon:\n{mon}\n{}", logs(), cluster.log_tails(60))
}
