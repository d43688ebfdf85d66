//! Boots the real image under QEMU (TCG) with a virtio-blk disk and checks
//! the workloads. Ignored by default (it builds the image, takes ~10–30 s of
//! CPU and should not run in parallel with other QEMU suites):
//!
//!     cargo test -p remus-image --test boot -- --ignored --nocapture
//!
//! Uses `vmlinux` (PVH) when the image has it, else `vmlinuz`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
#[ignore = "boots QEMU; run with --ignored"]
fn boots_ticks_and_probes_the_disk() {
    let opts = remus_image::BuildOptions::with_defaults().unwrap();
    let out_dir = match remus_image::build(&opts).unwrap() {
        remus_image::Outcome::UpToDate { out_dir, .. }
        | remus_image::Outcome::Built { out_dir, .. } => out_dir,
    };
    let kernel = [remus_image::VMLINUX_FILE, remus_image::VMLINUZ_FILE]
        .iter()
        .map(|f| out_dir.join(f))
        .find(|p| p.exists())
        .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.img");
    let mut img = vec![0u8; 4 << 20];
    img[..20].copy_from_slice(b"boot-test-marker 77\n");
    std::fs::write(&disk, &img).unwrap();

    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-M",
            "q35",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(out_dir.join(remus_image::INITRD_FILE))
        .args([
            "-append",
            "console=ttyS0 quiet remus.workload=tick,disk-probe:/dev/vda",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });

    let mut console = String::new();
    let mut first_tick = None;
    let deadline = start + Duration::from_secs(180);
    let done = |c: &str| {
        c.contains("tick 3") && (c.contains("disk-probe ok") || c.contains("disk-probe error"))
    };
    while !done(&console) && Instant::now() < deadline {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            console.push_str(&String::from_utf8_lossy(&chunk));
            if first_tick.is_none() && console.contains("tick 1") {
                first_tick = Some(start.elapsed());
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "{console}\n--- first tick after {first_tick:?} ({})",
        kernel.display()
    );

    assert!(
        console.contains(remus_image::init::INIT_DONE_LINE),
        "no init-done line"
    );
    let ticks: Vec<u64> = console
        .split("tick ")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(
        ticks.len() >= 3 && ticks[..3] == [1, 2, 3],
        "ticks: {ticks:?}"
    );
    assert!(console.contains("disk-probe read: boot-test-marker 77"));
    assert!(console.contains("disk-probe ok"), "probe did not finish ok");
    let wrote = console
        .lines()
        .find_map(|l| l.split("disk-probe wrote: ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let after = std::fs::read(&disk).unwrap();
    let block = &after[1 << 20..(1 << 20) + 4096];
    assert!(
        block.starts_with(format!("{wrote}\n").as_bytes()),
        "disk at 1 MiB: {:?}",
        &block[..48]
    );
    assert!(block[wrote.len() + 1..].iter().all(|&b| b == 0));
}
