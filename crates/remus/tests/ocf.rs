//! The resource agent `ocf:remus:vm` (packaging/ocf/remus-vm) against
//! `ocf-tester` (Debian's resource-agents) and a real agent, QEMU and
//! guest: ocf-tester checks the meta-data against the OCF DTD, then runs
//! validate-all, monitor, start, notify, promote and demote (twice each,
//! also on a resource already in that state) and stop, with the exit codes
//! the OCF spec demands. Promote on the VM's home node is a cold start
//! (`remus create`); demote of an unprotected VM stops it. The agent's log
//! must show that those really happened, and nothing may be left running.
//!
//! Then a few answers ocf-tester does not check: monitor says promoted (8)
//! while the VM runs, migrate_to refuses a VM with no standby at the
//! target, validate-all refuses a bad `peers`, and a promote on a node
//! that is not the VM's home (with no copy there) is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use remus_testbed::{Agent, Binaries, GuestImage};

const VM: &str = "ocfvm";
const NODE: &str = "node1";

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

/// The resource agent, copied where the user `nobody` can read it
/// (ocf-tester runs meta-data as nobody).
fn install_ra(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/ocf/remus-vm");
    let ra = dir.join("vm");
    std::fs::copy(&src, &ra).expect("copy the resource agent");
    std::fs::set_permissions(&ra, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    ra
}

/// Runs the resource agent's `action` with these OCF_RESKEY_ parameters.
fn ra(ra: &Path, action: &str, params: &[(&str, &str)], rsctmp: &Path) -> Output {
    let mut cmd = Command::new(ra);
    cmd.arg(action)
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_RESOURCE_INSTANCE", "vmres")
        .env("HA_RSCTMP", rsctmp);
    for (k, v) in params {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
    cmd.output().expect("run the resource agent")
}

#[test]
fn the_resource_agent_passes_ocf_tester_with_a_real_vm() {
    let img = GuestImage::find().expect("guest image");
    let agent = Agent::start(&bins(), None, &["--failover-by", "cluster"]).expect("agent");
    let cfg = agent.write_file(
        &format!("{VM}.toml"),
        &img.config(VM, "remus.workload=tick", ""),
    );
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let ra_path = install_ra(dir.path());
    let rsctmp = dir.path().join("rsctmp");
    let socket = agent.socket.to_str().unwrap();
    let remus = bins().remus;
    let remus = remus.to_str().unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let peers = "node1=198.18.0.1:7300 node2=198.18.0.2:7300";
    let params = [
        ("vm", VM),
        ("peers", peers),
        ("config", cfg_s),
        ("home", NODE),
        ("socket", socket),
        ("remus", remus),
        ("CRM_meta_on_node", NODE),
    ];

    let mut cmd = Command::new("ocf-tester");
    cmd.args(["-n", "vmres"]);
    for (k, v) in &params {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    let out = cmd
        .arg(&ra_path)
        .env("HA_RSCTMP", &rsctmp)
        .output()
        .expect("ocf-tester (resource-agents) is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("passed all tests"),
        "ocf-tester:\n{stdout}\n{stderr}\nagent log:\n{}",
        agent.log_text()
    );
    // Its promotes were cold starts of the real VM, and its demotes
    // stopped it: two of each.
    let log = agent.log_text();
    assert!(log.matches("creating VM").count() >= 2, "{log}");
    assert!(log.matches("destroying").count() >= 2, "{log}");
    assert!(agent.vm(VM).is_none(), "left running: {:?}", agent.vm(VM));

    // Monitor while promoted: 8; after the stop: 7.
    let run = |action: &str, p: &[(&str, &str)]| ra(&ra_path, action, p, &rsctmp);
    assert_eq!(run("start", &params).status.code(), Some(0));
    assert_eq!(run("promote", &params).status.code(), Some(0));
    let v = agent.vm(VM).expect("runs after the promote");
    assert_eq!(v["role"], "unprotected", "{v}");
    assert_eq!(run("monitor", &params).status.code(), Some(8));
    // A migration is a switch-over to the standby: with none, refused.
    let mut to = params.to_vec();
    to.push(("CRM_meta_migrate_target", "node2"));
    let out = run("migrate_to", &to);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("protected to 'nobody'"), "{err}");
    assert!(
        agent.vm(VM).is_some(),
        "a refused migration left the VM running"
    );
    assert_eq!(run("demote", &params).status.code(), Some(0));
    assert_eq!(run("monitor", &params).status.code(), Some(0));
    assert_eq!(run("stop", &params).status.code(), Some(0));
    assert_eq!(run("monitor", &params).status.code(), Some(7));

    // A bad peers list: not configured (6), with the reason.
    let mut bad = params.to_vec();
    bad[1] = ("peers", "node1=198.18.0.1");
    let out = run("validate-all", &bad);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ocf-exit-reason:") && err.contains("NODE=HOST:PORT"),
        "{err}"
    );

    // Not its home and no copy here: a promote would start an old copy.
    let mut away = params.to_vec();
    away[6] = ("CRM_meta_on_node", "node2");
    assert_eq!(run("start", &away).status.code(), Some(0));
    let out = run("promote", &away);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not its home"), "{err}");
    assert!(agent.vm(VM).is_none());
    assert_eq!(run("stop", &away).status.code(), Some(0));
}
