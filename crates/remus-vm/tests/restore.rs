//! Checkpoint and restore with real QEMU: device state saved from a
//! running guest (QEMU's full stream with `x-ignore-shared`, or device
//! state only) plus a copy of its RAM file restore into a second QEMU
//! started with `-incoming defer` (for device-only state, started for
//! it), and the guest carries on from where it was, not from boot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use remus_config::VmConfig;
use remus_testbed::{GuestImage, last_tick, ticks};
use remus_vm::{QemuBinary, ResolvedAccel, StartOptions, Vm, VmPaths, devstate};

fn wait_log(path: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(cfg: &VmConfig, dir: &Path, ram: &Path, incoming: bool, devices_only: bool) -> Vm {
    Vm::start(
        cfg.clone(),
        VmPaths::new(dir),
        StartOptions {
            qemu: QemuBinary::default(),
            ram_file: ram.to_path_buf(),
            accel: ResolvedAccel::Tcg,
            tap_names: vec![],
            incoming,
            devices_only_state: devices_only,
        },
    )
    .expect("start QEMU")
}

/// A source a and a destination b: their directories and RAM files, and
/// the device state's file, in a temporary directory (gone on drop).
struct Scratch {
    tmp: tempfile::TempDir,
    cfg: VmConfig,
    dirs: (PathBuf, PathBuf),
    rams: (PathBuf, PathBuf),
    dev: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let img = GuestImage::find().expect("guest image");
        let tmp = tempfile::Builder::new()
            .prefix("remus-restore")
            .tempdir_in("/tmp")
            .unwrap();
        let cfg = VmConfig::from_toml_str(&img.config("rs", "remus.workload=tick", ""), tmp.path())
            .unwrap();
        let p = |n: &str| tmp.path().join(n);
        Scratch {
            cfg,
            dirs: (p("a"), p("b")),
            rams: (p("a.ram"), p("b.ram")),
            dev: p("dev.state"),
            tmp,
        }
    }

    /// Boots the source, stops it once it has ticked `n` times, saves its
    /// device state (device-only) and copies its RAM to b's file, then
    /// ends it: the last tick before the save.
    fn devices_saved_after(&self, n: u64) -> u64 {
        let a = start(&self.cfg, &self.dirs.0, &self.rams.0, false, false);
        let log_a = VmPaths::new(&self.dirs.0).console_log();
        wait_log(&log_a, &format!("tick {n}"), |t| last_tick(t) >= Some(n));
        a.qmp().execute("stop", None).unwrap();
        devstate::save_devices(a.qmp(), &self.dev).unwrap();
        let at_save = last_tick(&std::fs::read_to_string(&log_a).unwrap()).unwrap();
        std::fs::copy(&self.rams.0, &self.rams.1).unwrap();
        a.destroy();
        at_save
    }
}

#[test]
fn restore_continues_the_guest() {
    let full = restore(false);
    let devices_only = restore(true);
    // Device-only state leaves out the firmware and ACPI blocks.
    assert!(
        devices_only * 2 < full,
        "device-only state {devices_only} bytes, full stream {full}"
    );
}

/// Saves, restores and checks the guest goes on; the state's size.
fn restore(devices_only: bool) -> u64 {
    let Scratch {
        tmp: _tmp,
        cfg,
        dirs: (dir_a, dir_b),
        rams: (ram_a, ram_b),
        dev,
    } = Scratch::new();

    let a = start(&cfg, &dir_a, &ram_a, false, false);
    let log_a = VmPaths::new(&dir_a).console_log();
    wait_log(&log_a, "tick 5 on the source", |t| last_tick(t) >= Some(5));

    // Every VM is started trackable (preload built by `cargo build`).
    let mut tracker = a.dirty_tracker().expect("dirty tracking active");
    let first = tracker.scan().unwrap();
    assert!(first.page_count() > 0, "a booted guest has written pages");
    // QEMU offers "oob" on the agent's QMP socket and the client enables
    // it (QEMU then reads a command while the one before runs); in-band
    // commands still run one after the other: the status sent right
    // behind the `stop` is read after it.
    assert!(a.qmp().oob, "QEMU offers oob on the agent's QMP socket");
    let stop = a.qmp().send("stop", None).unwrap();
    let status = a.qmp().send("query-status", None).unwrap();
    let wait = std::time::Duration::from_secs(30);
    stop.wait(wait).unwrap();
    assert_eq!(status.wait(wait).unwrap()["status"], "paused");
    devstate::prepare(a.qmp()).unwrap();
    if devices_only {
        devstate::save_devices(a.qmp(), &dev).unwrap();
    } else {
        devstate::save(a.qmp(), &dev).unwrap();
    }
    // Stopped still: `postmigrate` after the full stream, `paused` after
    // device-only state.
    let want = if devices_only {
        "paused"
    } else {
        "postmigrate"
    };
    assert_eq!(
        a.qmp().status().unwrap(),
        want,
        "the save left the guest stopped"
    );
    let at_save = last_tick(&std::fs::read_to_string(&log_a).unwrap()).unwrap();
    std::fs::copy(&ram_a, &ram_b).unwrap();
    let size = std::fs::metadata(&dev).unwrap().len();
    assert!(
        size > 0 && size < 4 << 20,
        "device state is small: {size} bytes"
    );
    // The source resumes after a save (as it does after every checkpoint).
    a.unpause().unwrap();
    wait_log(&log_a, "source ticking after save", |t| {
        last_tick(t) >= Some(at_save + 2)
    });
    a.destroy();

    let b = start(&cfg, &dir_b, &ram_b, true, devices_only);
    assert_eq!(b.devices_only_state(), devices_only);
    assert_eq!(b.qmp().status().unwrap(), "inmigrate");
    // A standby is ready to load from its start: nothing is set at the
    // resume, where it would be guest downtime.
    let caps = b.qmp().execute("query-migrate-capabilities", None).unwrap();
    for cap in ["x-ignore-shared", "events"] {
        assert!(
            caps.as_array()
                .unwrap()
                .iter()
                .any(|c| c["capability"] == cap && c["state"] == true),
            "{cap} is not set on the standby: {caps}"
        );
    }
    // ...and listens for its device state already.
    let info = b.qmp().execute("query-migrate", None).unwrap();
    assert_eq!(info["status"], "setup", "{info}");
    // One call loads and runs it: QEMU starts the VM itself at the end
    // of the load.
    devstate::load_and_run(b.qmp(), &dev, &b.paths.incoming_socket()).unwrap();
    assert_eq!(b.qmp().status().unwrap(), "running");
    let log_b = VmPaths::new(&dir_b).console_log();
    let text = wait_log(&log_b, "ticks on the restored copy", |t| {
        ticks(t).len() >= 3
    });
    let got = ticks(&text);
    // A restart would print tick 1. The restored guest goes on from the
    // checkpoint (a line still in the UART when it was saved may repeat).
    assert!(
        got[0] >= at_save && got[0] <= at_save + 2,
        "restored guest continued at {} after saving at {at_save}: {text}",
        got[0]
    );
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    b.destroy();
    size
}

/// Why the two agents agree on the format first: device-only state in a
/// standby started for the full stream fails to load (QEMU ends), with
/// an error rather than a hang.
#[test]
fn device_only_state_needs_a_standby_started_for_it() {
    let sc = Scratch::new();
    sc.devices_saved_after(2);
    let (cfg, (_, dir_b), (_, ram_b), dev) = (&sc.cfg, &sc.dirs, &sc.rams, &sc.dev);
    let b = start(cfg, dir_b, ram_b, true, false);
    let t = Instant::now();
    let e = devstate::load_and_run(b.qmp(), dev, &b.paths.incoming_socket())
        .expect_err("loaded without the configuration section");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "{e} after {:?}",
        t.elapsed()
    );
    b.destroy();
}

/// A migration's early load ([`devstate::begin_load`]): the state goes in
/// ahead but for its last byte; only the switch-over's
/// [`devstate::Loading::run`] lets the VM run, and QEMU starts it itself
/// as the load ends, whether it took its `cont` with the connection
/// opened ahead ([`devstate::connect_incoming`]) or at the switch-over,
/// while the load waited. A load dropped instead is one byte short:
/// QEMU's load fails and that QEMU never runs the VM, though it took
/// its `cont`.
#[test]
fn an_early_load_runs_the_vm_only_at_its_switch_over() {
    let sc = Scratch::new();
    let at_save = sc.devices_saved_after(2);
    let (cfg, (_, dir_b), (_, ram_b), dev) = (&sc.cfg, &sc.dirs, &sc.rams, &sc.dev);
    let copy = |name: &str| {
        let (dir, ram) = (
            sc.tmp.path().join(name),
            sc.tmp.path().join(format!("{name}.ram")),
        );
        std::fs::copy(ram_b, &ram).unwrap();
        (dir, ram)
    };
    let ((dir_c, ram_c), (dir_d, ram_d)) = (copy("c"), copy("d"));

    // Switched over: runs, started by QEMU at the end of its load.
    for (dir, ram, ahead) in [(dir_b, ram_b, true), (&dir_d, &ram_d, false)] {
        let b = start(cfg, dir, ram, true, true);
        let socket = b.paths.incoming_socket();
        let to = ahead.then(|| devstate::connect_incoming(b.qmp(), &socket).unwrap());
        let loading = devstate::begin_load(b.qmp(), dev, &socket, to).unwrap();
        let loaded = loading.run(b.qmp()).unwrap();
        assert!(
            loaded.started_by_load,
            "QEMU started the VM as its load ended (cont ahead: {ahead}): {loaded:?}"
        );
        assert_eq!(b.qmp().status().unwrap(), "running");
        let text = wait_log(
            &VmPaths::new(dir).console_log(),
            "ticks on the switched-over copy",
            |t| ticks(t).len() >= 2,
        );
        assert!(ticks(&text)[0] >= at_save, "{text}");
        b.destroy();
    }

    // Not switched over: the load fails, the VM never runs there, though
    // QEMU took its `cont` ahead.
    let c = start(cfg, &dir_c, &ram_c, true, true);
    let events = c.qmp().subscribe();
    let socket = c.paths.incoming_socket();
    let to = devstate::connect_incoming(c.qmp(), &socket).unwrap();
    let loading = devstate::begin_load(c.qmp(), dev, &socket, Some(to)).unwrap();
    drop(loading);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let failed = loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(ev) => {
                let failed = ev.name == "MIGRATION" && ev.data["status"] == "failed";
                seen.push(ev.name);
                if failed {
                    break true;
                }
            }
            // QEMU ended (its QMP connection gone) or never said.
            Err(_) => break false,
        }
    };
    assert!(
        failed || c.exit_status().is_some(),
        "the load neither failed nor ended QEMU: {seen:?}"
    );
    assert!(!seen.iter().any(|n| n == "RESUME"), "{seen:?}");
    assert!(
        c.qmp().status().map_or(true, |s| s != "running"),
        "the VM runs"
    );
    c.destroy();
}
