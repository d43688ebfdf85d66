//! A VM that boots from its disk through the firmware (SeaBIOS, syslinux,
//! no `kernel` in its config), on a qcow2 image served by
//! qemu-storage-daemon, through the real CLI, agents and QEMU: it is
//! protected (the backup creates its own qcow2 copy, which the initial
//! sync fills), its primary is killed, and the backup's copy runs on from
//! the acknowledged state. Afterwards the backup's image is a valid,
//! sparse qcow2 with the same guest-visible contents as the primary's.
//! Two more disks, placed on the backup by its operator's placement file
//! (`vms/dboot.toml`): vdb is raw on the primary and qcow2 on the backup
//! (each host keeps its format; the contents are brought in step), and
//! vdc has `replicate = false` (shared storage: the backup's own file is
//! left as it is).

use std::time::{Duration, Instant};

use remus_testbed::bootdisk::make_boot_disk;
use remus_testbed::{
    Agent, Binaries, DiskHosts, GuestImage, ProtectFollower, last_tick, now_ms, run_ok, ticks,
};

fn bins() -> Binaries {
    remus_testbed::test_bins!()
}

/// Once a checkpoint taken after the guest's last seen tick is
/// acknowledged, kills the primary; the backup's copy must run on from
/// that tick or later, ticking in order. Returns the failover time (ms).
fn kill_after_acked_tick(
    primary: &mut Agent,
    backup: &Agent,
    mut follow: ProtectFollower,
    vm: &str,
) -> u64 {
    follow.checkpoint_after(0).unwrap();
    let seen_at = now_ms();
    let seen = last_tick(&primary.console(vm)).unwrap();
    follow.checkpoint_after(seen_at).unwrap();
    let killed = Instant::now();
    primary.kill_hard();
    drop(follow);
    let ms = backup
        .wait_failover(vm, killed, Duration::from_secs(30))
        .unwrap();
    let text = backup
        .wait_console(vm, Duration::from_secs(30), "ticks after failover", |c| {
            ticks(c).len() >= 3
        })
        .unwrap();
    let got = ticks(&text);
    assert!(
        got[0] >= seen,
        "resumed at tick {} < acknowledged {seen}",
        got[0]
    );
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    ms
}

#[test]
fn qcow2_boot_disk_is_protected_and_fails_over() {
    let img = GuestImage::find().expect("guest image");
    let hosts = DiskHosts::new().unwrap();
    let (pdir, bdir, listen) = (&hosts.pdir, &hosts.bdir, &hosts.listen);
    // The boot disk: raw first, then converted to qcow2 (zeroes become
    // unallocated clusters). The command line is on the disk.
    let raw = pdir.path().join("boot.raw");
    make_boot_disk(
        &img,
        &raw,
        128,
        32,
        "console=ttyS0 quiet remus.workload=tick",
    )
    .expect("boot disk");
    let disk = pdir.path().join("boot.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();

    // vdb: raw here with data, an empty qcow2 of the same size there.
    let vdb = pdir.path().join("data.img");
    let data: Vec<u8> = (0..(8usize << 20)).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&vdb, &data).unwrap();
    let theirs_vdb = bdir.path().join("data.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            theirs_vdb.to_str().unwrap(),
            "8M",
        ],
    );
    // vdc: not replicated; each host has its own file.
    let vdc = pdir.path().join("shared.img");
    std::fs::write(&vdc, vec![b'p'; 1 << 20]).unwrap();
    std::fs::write(bdir.path().join("shared.img"), vec![b'b'; 1 << 20]).unwrap();
    let more = format!(
        "[[disk]]\npath = \"{}\"\ntarget = \"vdb\"\n[[disk]]\npath = \"{}\"\ntarget = \"vdc\"\nreplicate = false\n",
        vdb.display(),
        vdc.display()
    );

    let backup = hosts.backup(&bins()).expect("backup agent");
    // The backup's operator places vdb and vdc; vda goes to the backup's
    // image directory, created in the primary's format.
    let placement = backup.dir.path().join("vms");
    std::fs::create_dir_all(&placement).unwrap();
    std::fs::write(
        placement.join("dboot.toml"),
        format!(
            "[[disk]]\ntarget = \"vdb\"\npath = \"{}\"\nformat = \"qcow2\"\n\
             [[disk]]\ntarget = \"vdc\"\npath = \"{}\"\n",
            theirs_vdb.display(),
            bdir.path().join("shared.img").display()
        ),
    )
    .unwrap();
    let mut primary = hosts.primary(&bins()).unwrap();
    let cfg = primary.write_file(
        "vm.toml",
        &GuestImage::disk_boot_config("dboot", &disk, "qcow2", &more),
    );
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    primary
        .wait_console("dboot", Duration::from_secs(120), "tick 2", |c| {
            last_tick(c) >= Some(2)
        })
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", primary.log_text()));
    let console = primary.console("dboot");
    assert!(
        console.contains("SYSLINUX") || console.contains("syslinux"),
        "booted through the disk's boot loader: {console}"
    );

    let mut follow = ProtectFollower::start(&primary, "dboot", listen, &["-i", "100"])
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    let synced = follow
        .event("disk_synced")
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    // Only the chunks holding the boot partition's data travel, not the
    // whole 128 MiB.
    let sent = synced["sent_bytes"].as_u64().unwrap();
    assert!(sent > 0 && sent < 40 << 20, "{synced}");
    let ms = kill_after_acked_tick(&mut primary, &backup, follow, "dboot");
    eprintln!(
        "boot-from-disk VM on qcow2: failover in {ms} ms, {} bytes synced",
        sent
    );
    let out = backup.cli(&["destroy", "dboot"]);
    assert!(out.ok, "{}", out.stderr);

    // The backup made a qcow2 of its own: valid, sparse, and the same
    // guest-visible bytes as the primary's (the guest wrote nothing).
    let theirs = hosts.backup_image("dboot", "vda");
    let t = theirs.to_str().unwrap();
    let info = run_ok("qemu-img", &["info", "--output=json", t]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 128u64 << 20, "{info}");
    assert!(
        v["actual-size"].as_u64().unwrap() < 48 << 20,
        "the backup's copy is not sparse: {info}"
    );
    run_ok("qemu-img", &["check", t]);
    // compare fails on the first byte that differs.
    run_ok("qemu-img", &["compare", disk.to_str().unwrap(), t]);
    // vdb: still qcow2 on the backup, with the primary's raw contents.
    let info = run_ok("qemu-img", &["info", theirs_vdb.to_str().unwrap()]);
    assert!(info.contains("qcow2"), "{info}");
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            vdb.to_str().unwrap(),
            theirs_vdb.to_str().unwrap(),
        ],
    );
    // vdc: not replicated, so the backup's file is its own.
    assert_eq!(
        std::fs::read(bdir.path().join("shared.img")).unwrap(),
        vec![b'b'; 1 << 20]
    );
}

/// The backup (listening) and the primary of `hosts`, the primary
/// running VM `name` from a boot disk through OVMF (`firmware = "uefi"`),
/// its guest ticking.
fn uefi_vm(hosts: &DiskHosts, name: &str) -> (Agent, Agent) {
    let img = GuestImage::find().expect("guest image");
    let disk = hosts.pdir.path().join(format!("{name}.raw"));
    make_boot_disk(
        &img,
        &disk,
        64,
        32,
        "console=ttyS0 quiet remus.workload=tick",
    )
    .expect("boot disk");
    let backup = hosts.backup(&bins()).expect("backup agent");
    let primary = hosts.primary(&bins()).unwrap();
    let cfg = primary.write_file(
        "vm.toml",
        &GuestImage::disk_boot_config(name, &disk, "raw", "firmware = \"uefi\"\n"),
    );
    let out = primary.cli(&["create", cfg.to_str().unwrap()]);
    assert!(out.ok, "create: {}", out.stderr);
    primary
        .wait_console(name, Duration::from_secs(120), "tick 2", |c| {
            last_tick(c) >= Some(2)
        })
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", primary.log_text()));
    (backup, primary)
}

/// The same boot disk through OVMF (`firmware = "uefi"`): it boots from
/// syslinux.efi, is protected (the backup starts its standby with OVMF
/// and a variable store of its own) and fails over; the guest runs on
/// from the acknowledged state.
#[test]
fn uefi_boot_disk_is_protected_and_fails_over() {
    let hosts = DiskHosts::new().unwrap();
    let listen = &hosts.listen;
    let (backup, mut primary) = uefi_vm(&hosts, "uefi");
    let vars = primary.state_dir.join("vms/uefi/uefi-vars.fd");
    assert!(vars.is_file(), "the VM's own UEFI variable store");
    let qemu_log =
        std::fs::read_to_string(primary.state_dir.join("vms/uefi/qemu.log")).unwrap_or_default();
    assert!(
        primary.log_text().contains("if=pflash"),
        "QEMU started with OVMF: {qemu_log}"
    );

    let follow = ProtectFollower::start(&primary, "uefi", listen, &["-i", "100"])
        .unwrap_or_else(|e| panic!("{e}\n{}", backup.log_text()));
    let ms = kill_after_acked_tick(&mut primary, &backup, follow, "uefi");
    eprintln!("UEFI boot from disk: failover in {ms} ms");
    let out = backup.cli(&["destroy", "uefi"]);
    assert!(out.ok, "{}", out.stderr);
}

/// A UEFI VM's device state travels as QEMU's full stream (the guest
/// writes its variable store, RAM outside the shared file), never
/// device-only: its migration saves the last checkpoint's state to a file
/// and sends it whole, and the destination loads it at the switch-over.
/// The guest runs on there from where it was, its disk with it.
#[test]
fn uefi_vm_migrates_with_the_full_stream() {
    let hosts = DiskHosts::new().unwrap();
    let listen = &hosts.listen;
    let (dest, src) = uefi_vm(&hosts, "uefim");

    let before = last_tick(&src.console("uefim")).unwrap();
    let out = src.cli(&["migrate", "--json", "uefim", listen]);
    assert!(out.ok, "migrate: {}\n{}", out.stderr, src.log_text());
    assert!(src.vm("uefim").is_none(), "source still lists the VM");
    assert!(dest.vm("uefim").is_some(), "destination lists the VM");
    let text = dest
        .wait_console(
            "uefim",
            Duration::from_secs(60),
            "ticks after migration",
            |c| ticks(c).len() >= 3,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", dest.log_text()));
    remus_testbed::assert_ticks_go_on(&text, before);
    // The full stream went whole, from a file; nothing loaded early.
    let taken = src.last_log_line("migration: guest stopped for the last checkpoint");
    assert!(taken.contains("streamed=false"), "{taken}");
    let dest_log = dest.log_text();
    assert!(!dest_log.contains("as it arrives"), "{dest_log}");
    assert!(
        dest_log.contains("switch-over: VM resumed here"),
        "{dest_log}"
    );
    let out = dest.cli(&["destroy", "uefim"]);
    assert!(out.ok, "{}", out.stderr);
}
