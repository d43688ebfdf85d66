//! The foundation through the real CLI and agent with real QEMU guests.
//!
//! `guest_lifecycle` boots one guest and walks it through its life (it is
//! slow under TCG, so the checks share one boot): ticks advance, pause
//! stops them (state p), unpause resumes them, data written by the guest
//! reaches the image through the agent's NBD server and data put in the
//! image by the host is read by the guest, the console takes input, vCPUs
//! can be pinned, a second create of the same name is refused, destroy
//! removes QEMU.

use std::time::Duration;

use remus_testbed::{Agent, Binaries, GuestImage, Netns, last_tick, process_alive, ticks};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn guest_lifecycle() {
    let img = GuestImage::find().expect("guest image");
    let agent = Agent::start(&bins(), None, &[]).expect("agent");

    // A disk with a marker line at offset 0 for the guest to read.
    let disk = agent.dir.path().join("disk.img");
    let marker = format!("host-marker-{}", std::process::id());
    {
        let mut data = format!("{marker}\n").into_bytes();
        data.resize(4 << 20, 0);
        std::fs::write(&disk, &data).unwrap();
    }
    let cfg = img.config(
        "life",
        "remus.workload=tick,disk-probe:/dev/vda",
        &format!(
            "[[disk]]\npath = \"{}\"\ntarget = \"vda\"\n",
            disk.display()
        ),
    );
    let cfg_path = agent.write_file("life.toml", &cfg);
    let out = agent.cli(&["create", cfg_path.to_str().unwrap()]);
    assert!(out.ok, "create failed: {}{}", out.stderr, agent.log_text());

    // A second create of the same name is refused, naming the VM.
    let again = agent.cli(&["create", cfg_path.to_str().unwrap()]);
    assert!(!again.ok);
    assert!(
        again.stderr.contains("'life' already exists"),
        "{}",
        again.stderr
    );

    // The guest boots and counts.
    agent
        .wait_console("life", BOOT, "tick 3", |c| last_tick(c) >= Some(3))
        .unwrap();
    let all = ticks(&agent.console("life"));
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks must increase by one: {all:?}\n{}",
        agent.console("life")
    );
    let st = agent.vm("life").expect("listed")["state"].clone();
    assert!(st == "r" || st == "b", "running VM shows r or b, got {st}");

    // The disk probe: the guest read the host's marker through NBD and
    // wrote a block the host then finds in the image file.
    let console = agent
        .wait_console("life", BOOT, "disk-probe result", |c| {
            c.contains("disk-probe ok") || c.contains("disk-probe error")
        })
        .unwrap();
    assert!(console.contains("disk-probe ok"), "{console}");
    assert!(
        console.contains(&format!("disk-probe read: {marker}")),
        "guest should read the host's marker: {console}"
    );
    // The line may follow the shell's prompt on the same console line.
    let wrote = console
        .lines()
        .find_map(|l| {
            let at = l.find("disk-probe wrote: ")?;
            Some(l[at + "disk-probe wrote: ".len()..].trim())
        })
        .unwrap_or_else(|| panic!("probe reports what it wrote: {console}"))
        .to_string();
    let image = std::fs::read(&disk).unwrap();
    let block = &image[1 << 20..(1 << 20) + 4096];
    let text = String::from_utf8_lossy(block);
    assert!(
        text.starts_with(&wrote),
        "image at 1 MiB should hold '{wrote}', holds {:?}",
        &text[..wrote.len().min(text.len())]
    );

    // Pause: state p, and the counter stops.
    let out = agent.cli(&["pause", "life"]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(agent.vm("life").expect("listed")["state"], "p");
    let table = agent.cli(&["list"]).stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("life") && l.contains("--p---")),
        "{table}"
    );
    let at_pause = last_tick(&agent.console("life")).unwrap();
    // A paused guest emits nothing: wait several tick periods and compare.
    // (There is no event for "nothing happened"; this wait is the property.)
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        last_tick(&agent.console("life")).unwrap(),
        at_pause,
        "ticks must stop while paused"
    );
    let again = agent.cli(&["pause", "life"]);
    assert!(
        !again.ok && again.stderr.contains("already paused"),
        "{}",
        again.stderr
    );

    // Unpause: counting resumes from where it stopped.
    let out = agent.cli(&["unpause", "life"]);
    assert!(out.ok, "{}", out.stderr);
    agent
        .wait_console("life", BOOT, "ticks after unpause", |c| {
            last_tick(c) >= Some(at_pause + 3)
        })
        .unwrap();
    let all = ticks(&agent.console("life"));
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");

    // Console input reaches the guest's shell.
    let word = format!("remus-echo-{}", std::process::id());
    let out = agent.cli_stdin(
        &["console", "life"],
        Some(format!("\necho {word}-$((6*7))\n").as_bytes()),
    );
    assert!(out.ok, "{}", out.stderr);
    agent
        .wait_console("life", BOOT, "shell output", |c| {
            c.contains(&format!("{word}-42"))
        })
        .unwrap();

    // vcpu-pin: the vCPU thread's affinity changes.
    let out = agent.cli(&["vcpu-pin", "life", "0", "1"]);
    assert!(out.ok, "{}", out.stderr);
    let v = agent.cli(&["vcpu-list", "--json", "life"]);
    let v: serde_json::Value = serde_json::from_str(&v.stdout).unwrap();
    assert_eq!(v[0]["affinity"], serde_json::json!([1]), "{v}");
    let out = agent.cli(&["vcpu-pin", "life", "5", "0"]);
    assert!(
        !out.ok && out.stderr.contains("vCPU 5 does not exist"),
        "{}",
        out.stderr
    );
    let out = agent.cli(&["vcpu-pin", "life", "0", "999"]);
    assert!(!out.ok && out.stderr.contains("CPU 999"), "{}", out.stderr);

    // --json has the documented fields.
    let list = agent.list();
    let vm = list.iter().find(|v| v["name"] == "life").unwrap();
    for key in ["name", "id", "mem_mib", "vcpus", "state", "role", "time_s"] {
        assert!(vm.get(key).is_some(), "list --json lacks {key}: {vm}");
    }
    assert_eq!(vm["mem_mib"], 256);
    // accel = "auto" booted with what the agent reports as usable here.
    let host: serde_json::Value =
        serde_json::from_str(&agent.cli(&["info", "--json"]).stdout).unwrap();
    let want = if host["kvm"] == true { "kvm" } else { "tcg" };
    assert_eq!(vm["accel"], want, "host: {host}");
    assert_eq!(vm["role"], "unprotected");

    // Destroy: QEMU is gone, the VM is no longer listed.
    let pid = vm["pid"].as_u64().unwrap() as u32;
    let out = agent.cli(&["destroy", "life"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(!process_alive(pid), "QEMU {pid} must be gone after destroy");
    assert!(agent.list().is_empty());
    let out = agent.cli(&["destroy", "life"]);
    assert!(
        !out.ok && out.stderr.contains("no VM named 'life'"),
        "{}",
        out.stderr
    );
}

/// A NIC on a bridge inside a namespace: the guest answers pings through
/// QEMU's stream netdev, the agent's relay and a real tap on the bridge.
#[test]
fn guest_network_through_relay() {
    let img = GuestImage::find().expect("guest image");
    let ns = Netns::new("fnd").expect("netns");
    ns.add_bridge("br0", "198.18.0.1/24").unwrap();
    let agent = Agent::start(&bins(), Some(&ns), &[]).expect("agent");
    let cfg = img.config(
        "net",
        "remus.workload=tick remus.ip=198.18.0.2/24",
        "[[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:18:00:02\"\n",
    );
    let p = agent.write_file("net.toml", &cfg);
    let out = agent.cli(&["create", p.to_str().unwrap()]);
    assert!(out.ok, "create: {}{}", out.stderr, agent.log_text());
    agent
        .wait_console("net", BOOT, "init done", |c| c.contains("init done"))
        .unwrap();
    // The guest's address comes up asynchronously after init: retry the
    // ping a few times (each attempt is itself bounded).
    let mut last = String::new();
    let ok = (0..20).any(|_| {
        let o = ns
            .exec("ping", &["-c", "1", "-W", "2", "198.18.0.2"])
            .unwrap();
        last = String::from_utf8_lossy(&o.stdout).into_owned();
        o.status.success()
    });
    assert!(
        ok,
        "guest did not answer ping: {last}\n{}",
        agent.console("net")
    );
    let mac = ns.exec_ok("ip", &["neigh", "show", "198.18.0.2"]).unwrap();
    assert!(mac.contains("52:54:00:18:00:02"), "{mac}");
}

#[test]
fn bad_vif_bridge_is_a_clear_error() {
    let img = GuestImage::find().expect("guest image");
    let ns = Netns::new("fndbr").expect("netns");
    let agent = Agent::start(&bins(), Some(&ns), &[]).expect("agent");
    let cfg = img.config("nobr", "", "[[vif]]\nbridge = \"br-missing\"\n");
    let p = agent.write_file("nobr.toml", &cfg);
    let out = agent.cli(&["create", p.to_str().unwrap()]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("br-missing") && out.stderr.contains("does not exist"),
        "{}",
        out.stderr
    );
    assert!(
        agent.list().is_empty(),
        "a failed create leaves nothing behind"
    );
    assert!(agent.qemu_pids().is_empty());
}

/// A VM whose QEMU dies early says so: `remus list` shows it crashed with
/// how long after its start and QEMU's last error line, and the agent logs
/// exactly one line that quotes it. The QEMU here is a wrapper that starts
/// the real one and fails it a second into the VM's life with an error
/// line, as a broken host would (a nested KVM's "KVM internal error" is
/// such a line); the probe and `--version` go to the real QEMU untouched.
#[test]
fn a_vm_that_crashes_early_says_why() {
    let img = GuestImage::find().expect("guest image");
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("qemu-that-breaks");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\n\
         case \" $* \" in *\" -name \"*) ;; *) exec qemu-system-x86_64 \"$@\" ;; esac\n\
         qemu-system-x86_64 \"$@\" &\n\
         qemu=$!\n\
         sleep 1\n\
         echo 'qemu-system-x86_64: test: injected failure, the host broke' >&2\n\
         kill -9 $qemu\n\
         wait $qemu\n\
         exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let agent = Agent::start(&bins(), None, &["--qemu", wrapper.to_str().unwrap()]).expect("agent");
    let cfg = agent.write_file("early.toml", &img.config("early", "", ""));
    let out = agent.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}{}", out.stderr, agent.log_text());

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // QMP breaks (state c) a moment before the waiter has QEMU's exit
    // and last words: the report follows.
    let vm = loop {
        let vm = agent.vm("early").expect("listed");
        if vm["state"] == "c" && vm["crash"].is_string() {
            break vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no crash report within 30 s: {vm}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let crash = vm["crash"]
        .as_str()
        .unwrap_or_else(|| panic!("no crash report: {vm}"));
    assert!(crash.starts_with("QEMU exited (exit code 1) "), "{crash}");
    assert!(
        crash.contains(
            " s after start; QEMU said: qemu-system-x86_64: test: injected failure, the host broke"
        ),
        "{crash}"
    );
    let human = agent.cli(&["list"]);
    assert!(
        human.stdout.contains(&format!("early: crashed: {crash}")),
        "{}",
        human.stdout
    );
    let log = agent.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("VM crashed")).collect();
    assert_eq!(lines.len(), 1, "one log line: {log}");
    assert!(
        lines[0].contains("injected failure") && lines[0].contains("early"),
        "{}",
        lines[0]
    );
    // Destroying it is not another crash.
    assert!(agent.cli(&["destroy", "early"]).ok);
    assert_eq!(agent.log_text().matches("VM crashed").count(), 1);
}

/// Everything of a running VM is private to the agent's user: the state
/// directories (0700), the RAM file (0600, in a private directory of the
/// agent's own inside the RAM directory), its sockets, logs and config.
#[test]
fn a_vms_files_are_private() {
    use std::os::unix::fs::MetadataExt;
    let img = GuestImage::find().expect("guest image");
    let agent = Agent::start(&bins(), None, &[]).expect("agent");
    let cfg = agent.write_file("priv.toml", &img.config("priv", "remus.workload=tick", ""));
    assert!(agent.cli(&["create", cfg.to_str().unwrap()]).ok);
    agent
        .wait_console("priv", BOOT, "tick 1", |c| last_tick(c) >= Some(1))
        .unwrap();
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
    for d in ["", "vms", "vms/priv", "logs", "copies"] {
        let p = agent.state_dir.join(d);
        assert_eq!(mode(&p), 0o700, "{}", p.display());
    }
    let vm_dir = agent.state_dir.join("vms/priv");
    for e in std::fs::read_dir(&vm_dir).unwrap() {
        let p = e.unwrap().path();
        let m = mode(&p);
        assert_eq!(m & 0o077, 0, "{} is mode {m:o}", p.display());
    }
    // The RAM file: in the agent's own directory within the RAM dir.
    let ram_dirs: Vec<_> = std::fs::read_dir(agent.ram_dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("remus-")
        })
        .collect();
    assert_eq!(ram_dirs.len(), 1, "{ram_dirs:?}");
    assert_eq!(mode(&ram_dirs[0]), 0o700);
    let ram = ram_dirs[0].join("priv.ram");
    assert_eq!(mode(&ram), 0o600, "{}", ram.display());
    assert_eq!(std::fs::metadata(&ram).unwrap().uid(), 0);
    // QEMU's own files too (it runs with the agent's umask).
    let pid = agent.vm("priv").unwrap()["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let umask = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    assert!(umask.ends_with("0077"), "QEMU's {umask}");
    assert!(agent.cli(&["destroy", "priv"]).ok);
    assert!(!ram.exists(), "the RAM file goes with the VM");
}
