//! CLI and agent behaviour that needs no guest: errors an operator meets.

use std::io::{Read, Write};

use remus_testbed::{Agent, Binaries, cli};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

#[test]
fn no_agent_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = cli(&bins().remus, &sock, &["list"], None);
    assert!(!out.ok);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("no remus agent at"), "{}", out.stderr);
    assert!(
        out.stderr.contains(sock.to_str().unwrap()),
        "{}",
        out.stderr
    );
}

/// A rate cap that is no rate, or one meant in MiB/s written bare, is a
/// clear error before anything is asked of an agent.
#[test]
fn bad_rate_caps_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    for (args, want) in [
        (
            &["protect", "--max-rate", "50", "vm", "127.0.0.1:9"][..],
            "below the least rate cap",
        ),
        (
            &["migrate", "--max-rate", "50MB", "vm", "127.0.0.1:9"][..],
            "is not a rate",
        ),
    ] {
        let out = cli(&bins().remus, &sock, args, None);
        assert!(!out.ok, "{args:?}");
        assert!(
            out.stderr.contains("--max-rate") && out.stderr.contains(want),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("no remus agent"), "{}", out.stderr);
    }
    let out = std::process::Command::new(&bins().remusd)
        .args(["--config", "/dev/null", "--max-rate", "fast", "--check"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--max-rate") && err.contains("is not a rate"),
        "{err}"
    );
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("unused.sock");
    std::fs::write(dir.path().join("k"), b"kernel").unwrap();
    let cases = [
        ("memory = 4", "memory"),
        ("memory = 256\nvcpus = 0", "vcpus"),
        (
            "memory = 256\n[[disk]]\npath = \"missing.img\"\ntarget = \"vda\"",
            "disk[0].path",
        ),
        (
            "memory = 256\n[[disk]]\npath = \"k\"\ntarget = \"hda\"",
            "disk[0].target",
        ),
        (
            "memory = 256\n[[vif]]\nbridge = \"br0\"\nmac = \"01:00:00:00:00:01\"",
            "multicast",
        ),
        ("memory = 256\nbogus = 1", "bogus"),
    ];
    for (body, want) in cases {
        let p = dir.path().join("vm.toml");
        std::fs::write(&p, format!("name = \"x\"\nkernel = \"k\"\n{body}\n")).unwrap();
        let out = cli(
            &bins().remus,
            &sock,
            &["create", "--dry-run", p.to_str().unwrap()],
            None,
        );
        assert!(!out.ok, "{body} should fail");
        assert!(out.stderr.contains(want), "{body}: {}", out.stderr);
        assert!(
            out.stderr.contains("vm.toml"),
            "error names the file: {}",
            out.stderr
        );
    }
    let p = dir.path().join("ok.toml");
    std::fs::write(&p, "name = \"x\"\nkernel = \"k\"\nmemory = 64\n").unwrap();
    let out = cli(
        &bins().remus,
        &sock,
        &["create", "-n", p.to_str().unwrap()],
        None,
    );
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("config OK"), "{}", out.stdout);
}

#[test]
fn from_libvirt_prints_the_config_or_refuses_with_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("unused.sock");
    std::fs::write(dir.path().join("disk.qcow2"), b"QFI\xfb\0\0\0\x03").unwrap();
    let domain = |extra: &str| {
        format!(
            "<domain type='kvm'><name>imported</name><memory unit='MiB'>512</memory><vcpu>2</vcpu>\
             <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='disk.qcow2'/><target dev='vda' bus='virtio'/></disk>\
             <graphics type='vnc'/>{extra}</devices></domain>"
        )
    };
    let xml = dir.path().join("dom.xml");
    std::fs::write(&xml, domain("")).unwrap();
    let x = xml.to_str().unwrap();
    let out = cli(
        &bins().remus,
        &sock,
        &["create", "--from-libvirt", x, "--dry-run"],
        None,
    );
    assert!(out.ok, "{}", out.stderr);
    // stdout is a config remus reads; the notes and verdict are on stderr.
    let cfg = remus_config::VmConfig::from_toml_str(&out.stdout, dir.path()).unwrap();
    assert_eq!(
        (cfg.name.as_str(), cfg.memory, cfg.vcpus),
        ("imported", 512, 2)
    );
    assert_eq!(cfg.disks[0].path, dir.path().join("disk.qcow2"));
    assert_eq!(cfg.disks[0].format, remus_config::DiskFormat::Qcow2);
    assert!(
        out.stderr.contains("note: graphics dropped"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("config OK"), "{}", out.stderr);
    // Passthrough and sound: refused, each named, nothing created.
    std::fs::write(
        &xml,
        domain("<hostdev mode='subsystem' type='usb'/><sound model='ich9'/>"),
    )
    .unwrap();
    let out = cli(&bins().remus, &sock, &["create", "--from-libvirt", x], None);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("cannot be protected by remus")
            && out.stderr.contains("host device passthrough (usb)")
            && out.stderr.contains("sound device (ich9)"),
        "{}",
        out.stderr
    );
}

#[test]
fn unknown_vm_names_and_bad_requests_are_clear() {
    let agent = Agent::start(&bins(), None, &[]).unwrap();
    for cmd in [
        vec!["pause", "ghost"],
        vec!["unpause", "ghost"],
        vec!["destroy", "ghost"],
        vec!["console", "--dump", "ghost"],
        vec!["console", "ghost"],
        vec!["vcpu-pin", "ghost", "0", "0"],
        vec!["list", "ghost"],
    ] {
        let out = agent.cli(&cmd);
        assert!(!out.ok, "{cmd:?} should fail");
        assert!(
            out.stderr.contains("no VM named 'ghost'"),
            "{cmd:?}: {}",
            out.stderr
        );
    }
    // A weird name is still answered as "no such VM", not a transport error.
    let out = agent.cli(&["pause", "a b/../c"]);
    assert!(out.stderr.contains("no VM named"), "{}", out.stderr);

    // The API is plain HTTP/JSON on the socket (curl --unix-socket works).
    let answer = |req: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        // An agent that stops answering fails the test, not hangs it.
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    };
    let resp = answer("GET /v1/vms HTTP/1.1\r\nHost: remus\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.trim_end().ends_with("[]"), "{resp}");
    // One VM's record by name, for a name not on the host: 404, and the
    // agent still answers afterwards (it once deadlocked on its own lock
    // right here, taking every later request with it).
    for _ in 0..2 {
        let resp = answer("GET /v1/vms/ghost HTTP/1.1\r\nHost: remus\r\nConnection: close\r\n\r\n");
        assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
        assert!(resp.contains("no VM named 'ghost'"), "{resp}");
    }
    let resp = answer("GET /v1/vms HTTP/1.1\r\nHost: remus\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let bad = "{\"config\": 5}";
    let resp = answer(&format!(
        "POST /v1/vms HTTP/1.1\r\nHost: remus\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{bad}",
        bad.len()
    ));
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("\"error\""), "{resp}");

    // A config sent over the API is validated by the agent too.
    let body = r#"{"config": {"name": "bad name", "memory": 256, "kernel": "/nonexistent"}}"#;
    let resp = answer(&format!(
        "POST /v1/vms HTTP/1.1\r\nHost: remus\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("name"), "{resp}");

    // Missing kernel file: refused before QEMU starts, naming the field.
    let cfg = agent.write_file(
        "k.toml",
        "name = \"nok\"\nmemory = 64\nkernel = \"/nonexistent/vmlinuz\"\n",
    );
    let out = agent.cli(&["create", cfg.to_str().unwrap()]);
    assert!(!out.ok && out.stderr.contains("kernel"), "{}", out.stderr);
    assert!(agent.list().is_empty());
}

#[test]
fn second_agent_on_same_socket_is_refused() {
    let agent = Agent::start(&bins(), None, &[]).unwrap();
    // Its own state dir, the first one's RAM dir (not the host's
    // /dev/shm, where it would leave a directory of its own) and no host
    // config.
    let out = std::process::Command::new(&bins().remusd)
        .args(["--config", "/dev/null"])
        .arg("--state-dir")
        .arg(agent.dir.path().join("other"))
        .arg("--ram-dir")
        .arg(agent.ram_dir.path())
        .arg("--socket")
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another agent already listens"), "{err}");
    // The first agent still answers.
    assert!(agent.cli(&["list"]).ok);
}

#[test]
fn two_agents_side_by_side_and_a_port_clash() {
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (p1, p2) = (free_port(), free_port());
    let l1 = format!("127.0.0.1:{p1}");
    let l2 = format!("127.0.0.1:{p2}");
    // Replication peers must authenticate: --listen without --key is refused.
    let e = Agent::start(&bins(), None, &["--listen", &l1])
        .err()
        .expect("--listen without --key must fail")
        .to_string();
    assert!(e.contains("--listen needs --key"), "{e}");
    let kd = tempfile::tempdir().unwrap();
    let key = remus_testbed::write_key(kd.path());
    let key = key.to_str().unwrap();
    let a = Agent::start(&bins(), None, &["--listen", &l1, "--key", key]).unwrap();
    let b = Agent::start(&bins(), None, &["--listen", &l2, "--key", key]).unwrap();
    for (agent, listen) in [(&a, &l1), (&b, &l2)] {
        let out = agent.cli(&["info", "--json"]);
        assert!(out.ok, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["replication_listen"], listen.as_str());
        assert_eq!(v["state_dir"], agent.state_dir.to_str().unwrap());
    }
    // A third agent on the first one's port fails at start, saying why,
    // and never opens its API socket: nobody can reach an agent that is
    // about to exit (the testbed, which waits for the socket, once took
    // such an agent for a running one).
    let socket = a.dir.path().join("third.sock");
    let out = std::process::Command::new(&bins().remusd)
        .args(["--config", "/dev/null", "--listen", &l1, "--key", key])
        .arg("--state-dir")
        .arg(a.dir.path().join("third"))
        .arg("--socket")
        .arg(&socket)
        .arg("--ram-dir")
        .arg(a.ram_dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "port clash must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bind replication address"), "{err}");
    assert!(
        !socket.exists(),
        "the API socket was opened before the port"
    );
    assert!(a.cli(&["list"]).ok && b.cli(&["list"]).ok);
}

#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    let agent = Agent::start(&bins(), None, &[]).unwrap();
    // `remus info` prints several lines; the reader closes at once.
    let mut child = std::process::Command::new(&bins().remus)
        .arg("--socket")
        .arg(&agent.socket)
        .arg("info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// The API is for root, the agent's user and its API group only: the
/// socket is 0600 in a 0700 directory, and even when an operator opens
/// the socket's mode by mistake, the agent checks each caller's
/// credentials and closes the connection of anyone else.
#[test]
fn only_root_or_the_api_group_may_use_the_api() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let agent = Agent::start(&bins(), None, &[]).expect("agent");
    assert_eq!(
        std::fs::metadata(&agent.socket).unwrap().mode() & 0o777,
        0o600
    );
    let as_user = |uid: u32, gid: u32| {
        std::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".to_string(),
            ])
            .arg(&bins().remus)
            .arg("--socket")
            .arg(&agent.socket)
            .arg("list")
            .output()
            .unwrap()
    };
    // The file system says no first.
    let out = as_user(65534, 65534);
    assert!(!out.status.success());
    // Opened by mistake: the agent itself says no, and logs it.
    let dir = agent.socket.parent().unwrap();
    let open = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let dir_mode = std::fs::metadata(dir).unwrap().mode() & 0o777;
    open(dir, 0o755);
    open(&agent.socket, 0o666);
    let out = as_user(65534, 65534);
    open(dir, dir_mode);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        agent.log_text().contains("API connection refused")
            && agent.log_text().contains("uid=65534"),
        "{}",
        agent.log_text()
    );
    assert!(agent.cli(&["list"]).ok, "root still can");
}

/// With `--api-group`, members of that group may use the API.
#[test]
fn the_api_group_may_use_the_api() {
    use std::os::unix::fs::MetadataExt;
    // A group every Debian system has.
    let agent = Agent::start(&bins(), None, &["--api-group", "adm"]).expect("agent");
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    let adm = meta.gid();
    // The test's temp dir above the socket must let the member through.
    let mut p = agent.socket.parent().unwrap().parent();
    while let Some(d) = p {
        if d == std::path::Path::new("/") {
            break;
        }
        let m = std::fs::metadata(d).unwrap().mode();
        if m & 0o001 == 0 {
            std::fs::set_permissions(
                d,
                std::os::unix::fs::PermissionsExt::from_mode((m & 0o7777) | 0o711),
            )
            .unwrap();
        }
        p = d.parent();
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", &format!("--regid={adm}"), "--clear-groups"])
        .arg(&bins().remus)
        .arg("--socket")
        .arg(&agent.socket)
        .arg("list")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn remusd_check_says_whether_the_arbiter_answers() {
    let etcd = remus_testbed::etcd::EtcdCluster::start(1, "127.0.0.1", None).unwrap();
    let ep = etcd.endpoints()[0].clone();
    let check = |extra: &[&str]| {
        let out = std::process::Command::new(&bins().remusd)
            .args(["--config", "/dev/null", "--check", "--host-name", "h1"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = stdout
            .lines()
            .find(|l| l.starts_with("arbiter"))
            .unwrap_or_else(|| panic!("no arbiter line in:\n{stdout}"))
            .to_string();
        (out.status.success(), line)
    };
    let (_, line) = check(&[]);
    assert!(
        line.contains("none (split-brain protection needs --arbiter)"),
        "{line}"
    );
    let (_, line) = check(&["--arbiter", &ep]);
    assert!(
        line.starts_with("arbiter   ok: ") && line.contains("answers") && line.contains("\"h1\""),
        "{line}"
    );
    // A member that does not answer fails the check.
    drop(etcd);
    let (ok, line) = check(&["--arbiter", &ep]);
    assert!(
        !ok && line.contains("FAILED: no etcd endpoint answered"),
        "{line}"
    );
}
