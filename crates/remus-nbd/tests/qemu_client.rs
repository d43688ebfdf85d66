//! Tests against QEMU's own NBD client (`qemu-io`, `qemu-img`), checking
//! both what QEMU reports and the bytes that land in the image on the host.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn run(tool: &Path, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .output()
        .expect("spawn qemu tool");
    eprintln!(
        "$ {} {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        tool.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_all(bytes: &[u8], value: u8, what: &str) {
    if let Some(pos) = bytes.iter().position(|&b| b != value) {
        panic!(
            "{what}: byte {pos} is {:#x}, expected {value:#x}",
            bytes[pos]
        );
    }
}

#[test]
fn qemu_io_write_read_discard_zero_flush_land_in_the_image() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let fx = Fixture::new("disk0", MIB, 0x5a, false);
    let uri = nbd_uri("disk0", &fx.socket);
    let out = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "discard 64k 64k",
            "-c",
            "write -z 128k 64k",
            "-c",
            "write -z -u 192k 64k",
            "-c",
            "write -f -P 0xcd 256k 4k",
            "-c",
            "read -P 0x5a 260k 4k",
            "-c",
            "flush",
        ],
    );
    assert!(out.status.success(), "qemu-io failed");
    let text = stdout(&out);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    for line in [
        "wrote 65536/65536 bytes at offset 0",
        "read 65536/65536 bytes at offset 0",
        "discard 65536/65536 bytes at offset 65536",
        "wrote 65536/65536 bytes at offset 131072",
        "wrote 65536/65536 bytes at offset 196608",
        "wrote 4096/4096 bytes at offset 262144",
        "read 4096/4096 bytes at offset 266240",
    ] {
        assert!(text.contains(line), "missing {line:?} in qemu-io output");
    }

    let img = fx.image_bytes();
    assert_eq!(img.len(), MIB, "image size unchanged");
    assert_all(&img[..64 * KIB], 0xab, "written range");
    assert_all(&img[64 * KIB..128 * KIB], 0, "discarded range (punched)");
    assert_all(&img[128 * KIB..192 * KIB], 0, "write -z range");
    assert_all(&img[192 * KIB..256 * KIB], 0, "write -z -u range");
    assert_all(&img[256 * KIB..260 * KIB], 0xcd, "FUA write range");
    assert_all(&img[260 * KIB..], 0x5a, "untouched tail");

    let s = fx.server().stats();
    assert_eq!(s.errors, 0, "{s:?}");
    assert_eq!(s.writes, 2, "{s:?}");
    assert_eq!(s.bytes_written, (64 + 4) as u64 * KIB as u64, "{s:?}");
    assert!(s.reads >= 2, "{s:?}");
    assert_eq!(
        s.trims, 1,
        "the discard reached the server as NBD_CMD_TRIM: {s:?}"
    );
    assert_eq!(s.write_zeroes, 2, "{s:?}");
    assert!(s.flushes >= 1, "{s:?}");
    assert_eq!(s.connections, 1, "{s:?}");
}

#[test]
fn qemu_splits_large_requests_at_the_advertised_32mib_maximum() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    // 48 MiB write: only works if qemu honours NBD_INFO_BLOCK_SIZE's maximum
    // payload (the server hangs up on writes above 32 MiB).
    let fx = Fixture::new("big", 64 * MIB, 0, false);
    let uri = nbd_uri("big", &fx.socket);
    let out = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x77 4M 48M",
            "-c",
            "read -P 0x77 4M 48M",
        ],
    );
    assert!(out.status.success(), "qemu-io failed");
    let text = stdout(&out);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(text.contains("wrote 50331648/50331648 bytes at offset 4194304"));
    let img = fx.image_bytes();
    assert_all(&img[..4 * MIB], 0, "head");
    assert_all(&img[4 * MIB..52 * MIB], 0x77, "written");
    assert_all(&img[52 * MIB..], 0, "tail");
    let s = fx.server().stats();
    assert!(s.writes >= 2, "48 MiB arrived in several writes: {s:?}");
    assert_eq!(s.bytes_written, 48 * MIB as u64);
    assert_eq!(s.errors, 0);
}

#[test]
fn qemu_img_info_and_compare_see_the_export() {
    let (Some(qemu_img), Some(qemu_io)) = (qemu_tool("qemu-img"), qemu_tool("qemu-io")) else {
        return;
    };
    let fx = Fixture::new("cmp", 3 * MIB, 0x11, false);
    let uri = nbd_uri("cmp", &fx.socket);

    let info = run(&qemu_img, &["info", "--output=json", &uri]);
    assert!(info.status.success());
    let json = stdout(&info);
    assert!(
        json.contains(&format!("\"virtual-size\": {}", 3 * MIB)),
        "virtual-size in {json}"
    );

    // Make the export differ from a reference copy at one byte, via NBD.
    let reference = fx.dir.path().join("reference.raw");
    std::fs::copy(&fx.image, &reference).unwrap();
    let same = run(
        &qemu_img,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            reference.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(same.status.code(), Some(0), "identical before the write");
    assert!(stdout(&same).contains("Images are identical"));

    let w = run(
        &qemu_io,
        &["-f", "raw", &uri, "-c", "write -P 0x22 1048577 1"],
    );
    assert!(w.status.success());
    let diff = run(
        &qemu_img,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            reference.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(diff.status.code(), Some(1), "images differ after the write");
    assert!(
        stdout(&diff).contains("Content mismatch at offset 1048576"),
        "{}",
        stdout(&diff)
    );
    assert_eq!(fx.image_bytes()[1_048_577], 0x22);
}

#[test]
fn qemu_reports_a_clear_error_for_an_unknown_export_and_the_server_survives() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let fx = Fixture::new("real", MIB, 0x33, false);
    let bad = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            &nbd_uri("nope", &fx.socket),
            "-c",
            "read 0 512",
        ],
    );
    assert!(!bad.status.success(), "opening a missing export must fail");
    let err = stderr(&bad);
    assert!(
        err.contains("export \"nope\" not found"),
        "qemu shows the server's reason: {err}"
    );

    let good = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            &nbd_uri("real", &fx.socket),
            "-c",
            "read -P 0x33 0 4k",
        ],
    );
    assert!(good.status.success());
    assert!(!stdout(&good).contains("Pattern verification failed"));
}

#[test]
fn qemu_empty_export_name_reaches_the_default_export() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let fx = Fixture::new("named", MIB, 0x44, false);
    let uri = format!("nbd+unix://?socket={}", fx.socket.display());
    let out = run(&qemu_io, &["-f", "raw", &uri, "-c", "read -P 0x44 0 4k"]);
    assert!(out.status.success());
    assert!(!stdout(&out).contains("Pattern verification failed"));
    assert!(stdout(&out).contains("read 4096/4096 bytes at offset 0"));
}

#[test]
fn qemu_read_only_export_reads_but_refuses_writes() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let fx = Fixture::new("ro", MIB, 0x66, true);
    let uri = nbd_uri("ro", &fx.socket);
    let read = run(
        &qemu_io,
        &["-r", "-f", "raw", &uri, "-c", "read -P 0x66 0 64k"],
    );
    assert!(read.status.success());
    assert!(stdout(&read).contains("read 65536/65536 bytes at offset 0"));
    assert!(!stdout(&read).contains("Pattern verification failed"));

    // Opened read-write, qemu sees NBD_FLAG_READ_ONLY and refuses to open.
    let write = run(&qemu_io, &["-f", "raw", &uri, "-c", "write -P 0x01 0 4k"]);
    assert!(
        !write.status.success(),
        "a write to a read-only export must fail"
    );
    assert!(!stdout(&write).contains("wrote"));
    assert!(
        stderr(&write).contains("Permission denied"),
        "qemu reports the export as not writable"
    );
    assert_all(&fx.image_bytes(), 0x66, "read-only image unchanged");
    assert_eq!(fx.server().stats().writes, 0);
}

#[test]
fn two_qemu_clients_at_once_write_disjoint_ranges() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let fx = Fixture::new("multi", 2 * MIB, 0, false);
    let uri = nbd_uri("multi", &fx.socket);
    let spawn = |pattern: &str, offset: &str| {
        Command::new(&qemu_io)
            .args([
                "-f",
                "raw",
                &uri,
                "-c",
                &format!("write -P {pattern} {offset} 1M"),
                "-c",
                &format!("read -P {pattern} {offset} 1M"),
            ])
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn("0xa1", "0"));
        let b = s.spawn(|| spawn("0xb2", "1M"));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", stderr(o));
        assert!(!stdout(o).contains("Pattern verification failed"));
    }
    let img = fx.image_bytes();
    assert_all(&img[..MIB], 0xa1, "first client's range");
    assert_all(&img[MIB..], 0xb2, "second client's range");
    assert_eq!(fx.server().stats().connections, 2);
}

#[test]
fn qemu_flags_reach_the_backend_as_fua_and_may_trim() {
    let Some(qemu_io) = qemu_tool("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "rec.raw", MIB, 0x10);
    let socket = dir.path().join("rec.sock");
    let rec = std::sync::Arc::new(RecordingBackend::new(
        remus_nbd::FileBackend::open(&image, false).unwrap(),
    ));
    let server = remus_nbd::NbdServer::start(&socket, "rec", rec.clone()).unwrap();
    let out = run(
        &qemu_io,
        &[
            // qemu-io defaults to writethrough (every write FUA); use writeback.
            "-t",
            "writeback",
            "-f",
            "raw",
            &nbd_uri("rec", &socket),
            "-c",
            "write -f -P 0x01 0 4k",
            "-c",
            "write -P 0x02 4k 4k",
            "-c",
            "write -z 8k 4k",
            "-c",
            "write -z -u 12k 4k",
            "-c",
            "discard 16k 4k",
        ],
    );
    assert!(out.status.success());
    server.shutdown();
    let calls: Vec<Call> = rec
        .calls()
        .into_iter()
        .filter(|c| !matches!(c, Call::Read { .. } | Call::Flush))
        .collect();
    assert_eq!(
        calls,
        vec![
            Call::Write {
                offset: 0,
                len: 4096,
                fua: true
            },
            Call::Write {
                offset: 4096,
                len: 4096,
                fua: false
            },
            Call::WriteZeroes {
                offset: 8192,
                len: 4096,
                may_trim: false,
                fua: false
            },
            Call::WriteZeroes {
                offset: 12288,
                len: 4096,
                may_trim: true,
                fua: false
            },
            Call::Trim {
                offset: 16384,
                len: 4096
            },
        ],
        "backend saw the requests in order with the client's flags"
    );
}
