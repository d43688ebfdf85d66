//! A VM with two NICs on two bridges behaves as its config says: eth0
//! (first `[[vif]]`) is on the LAN bridge br0 with its MAC, eth1 on host
//! a's own bridge br1 with the other MAC; a TCP session runs through each
//! (from client host c over the LAN, and from host a over br1). Protected,
//! both sessions keep flowing, so both NICs' output is committed and
//! released per checkpoint. After the primary is killed, the session over
//! the LAN carries on from the backup (br1 is private to each host, so
//! the other one ends with host a, as it must).

use std::time::{Duration, Instant};

use remus_testbed::{Agent, Binaries, GuestImage, Lan, ProtectFollower, SeqClient, write_key};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const IP0: &str = "198.18.0.10";
const IP1: &str = "198.19.0.10";
const MAC0: &str = "52:54:00:c6:12:0e";
const MAC1: &str = "52:54:00:c6:12:1e";
const REPL_PORT: u16 = 7100;

#[test]
fn two_nics_each_on_its_bridge_with_its_mac_both_committed() {
    let img = GuestImage::find().expect("guest image");
    let lan = Lan::standard("nic").expect("LAN of namespace hosts");
    // br1: a bridge of each VM host's own, not on the LAN.
    lan.host("a").add_bridge("br1", "198.19.0.1/24").unwrap();
    lan.host("b").add_bridge("br1", "198.19.0.2/24").unwrap();
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
    let mut primary =
        Agent::start(&bins(), Some(lan.host("a")), &["--key", key_s]).expect("agent in host a");
    let cfg = primary.write_file(
        "vm.toml",
        &img.config(
            "nics",
            &format!("remus.workload=tick,seqserver remus.ip={IP0}/24 remus.ip1={IP1}/24"),
            &format!(
                "[[vif]]\nbridge = \"br0\"\nmac = \"{MAC0}\"\n[[vif]]\nbridge = \"br1\"\nmac = \"{MAC1}\"\n"
            ),
        ),
    );
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    primary
        .wait_console("nics", Duration::from_secs(90), "seqserver", |c| {
            c.contains("seqserver: listening")
        })
        .unwrap();

    // One session through each NIC.
    let lan_client = SeqClient::start(
        lan.host("c"),
        format!("{IP0}:7000").parse().unwrap(),
        Duration::from_millis(5),
    )
    .unwrap_or_else(|e| panic!("over br0: {e}\n{}", primary.console("nics")));
    let local_client = SeqClient::start(
        lan.host("a"),
        format!("{IP1}:7000").parse().unwrap(),
        Duration::from_millis(5),
    )
    .unwrap_or_else(|e| panic!("over br1: {e}\n{}", primary.console("nics")));
    for c in [&lan_client, &local_client] {
        c.wait_received(50, Duration::from_secs(30)).unwrap();
    }
    // Each address answered from the MAC its NIC was given, and each tap
    // is on the bridge its vif names.
    let neigh = |host: &str, ip: &str| {
        lan.host(host)
            .exec_ok("ip", &["neigh", "show", ip])
            .unwrap()
    };
    let n0 = neigh("c", IP0);
    assert!(n0.contains(MAC0), "{IP0} from {n0}");
    let n1 = neigh("a", IP1);
    assert!(n1.contains(MAC1), "{IP1} from {n1}");
    let on_br1 = lan
        .host("a")
        .exec_ok("ip", &["-o", "link", "show", "master", "br1"])
        .unwrap();
    assert_eq!(on_br1.lines().count(), 1, "one tap on br1: {on_br1}");

    // Protected: both NICs' output is held per checkpoint and released
    // when the backup acknowledges it; both sessions keep flowing.
    let mut follow = ProtectFollower::start(
        &primary,
        "nics",
        &listen,
        &["-i", "100", "--timeout", "1000"],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    follow.checkpoint_after(0).unwrap();
    for c in [&lan_client, &local_client] {
        let n = c.received();
        c.wait_received(n + 100, Duration::from_secs(30)).unwrap();
        assert_eq!(c.error(), None);
    }
    let p = primary.vm("nics").unwrap();
    assert!(p["protection"]["held_frames"].is_u64(), "{p}");

    // Failover: the LAN session goes on from b.
    let killed = Instant::now();
    primary.kill_hard();
    drop(follow);
    let ms = backup
        .wait_failover("nics", killed, Duration::from_secs(30))
        .unwrap();
    let n = lan_client.received();
    lan_client
        .wait_received(n + 100, Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "the LAN session did not survive: {e}\n{}",
                backup.console("nics")
            )
        });
    assert_eq!(lan_client.error(), None);
    eprintln!("two NICs: failover {ms} ms; the LAN session carried on");
    drop(lan_client);
    drop(local_client);
    let out = backup.cli(&["destroy", "nics"]);
    assert!(out.ok, "{}", out.stderr);
}
