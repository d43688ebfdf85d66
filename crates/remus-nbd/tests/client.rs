//! The NBD client against this crate's server, and against a real
//! `qemu-storage-daemon` serving a qcow2 image (with a backing file): data
//! round-trips, zeroes read back as zeroes and leave the image sparse, a
//! read past the end is refused, a read-only export refuses writes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use remus_nbd::qsd::{image_size, qcow2_virtual_size};
use remus_nbd::{BlockBackend, FileBackend, NbdClient, NbdServer, StorageDaemon};

const MIB: u64 = 1 << 20;

fn exercise(c: &dyn BlockBackend, size: u64) {
    assert_eq!(c.size(), size);
    // Larger than one request: split and reassembled.
    let big: Vec<u8> = (0..(9 * MIB) as usize)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    c.write_at(&big, 3 * MIB + 17, false).unwrap();
    let mut back = vec![0u8; big.len()];
    c.read_at(&mut back, 3 * MIB + 17).unwrap();
    assert!(back == big, "9 MiB written and read back differ");
    c.write_at(b"durable", 100, true).unwrap();
    c.write_zeroes(28 * MIB, 2 * MIB, true, false).unwrap();
    c.flush().unwrap();
    // Zeroes (may punch) and trims read back as zeroes.
    c.write_zeroes(4 * MIB, 2 * MIB, true, false).unwrap();
    c.trim(8 * MIB, MIB).unwrap();
    let mut z = vec![1u8; (2 * MIB) as usize];
    c.read_at(&mut z, 4 * MIB).unwrap();
    assert!(z.iter().all(|b| *b == 0));
    let mut z = vec![1u8; MIB as usize];
    c.read_at(&mut z, 8 * MIB).unwrap();
    assert!(z.iter().all(|b| *b == 0));
    let mut d = [0u8; 7];
    c.read_at(&mut d, 100).unwrap();
    assert_eq!(&d, b"durable");
    // Past the end: refused before anything is sent.
    let mut x = [0u8; 8];
    let e = c.read_at(&mut x, size - 4).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
}

#[test]
fn client_against_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::start(
        &sock,
        "vda",
        Arc::new(FileBackend::open(&img, false).unwrap()),
    )
    .unwrap();
    let c = NbdClient::connect_unix(&sock, "vda").unwrap();
    exercise(&c, 32 * MIB);
    drop(c);
    // An unknown export is refused by name.
    let e = NbdClient::connect_unix(&sock, "nope").err().unwrap();
    assert!(e.to_string().contains("nope"), "{e}");
    server.shutdown();
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn daemon(img: &Path, ro: bool, dir: &Path, name: &str) -> StorageDaemon {
    let chain = remus_nbd::qsd::backing_chain(Path::new("qemu-img"), img).expect("backing chain");
    StorageDaemon::start(
        Path::new("qemu-storage-daemon"),
        img,
        "qcow2",
        &chain,
        ro,
        &dir.join(format!("{name}.sock")),
        "vda",
        &dir.join(format!("{name}.log")),
    )
    .expect("qemu-storage-daemon")
}

#[test]
fn client_against_qemu_storage_daemon_on_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut data = vec![0u8; (32 * MIB) as usize];
    data[(20 * MIB) as usize..(20 * MIB) as usize + 5].copy_from_slice(b"base!");
    std::fs::write(&base, &data).unwrap();
    let img = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(
        qcow2_virtual_size(&base).is_err(),
        "a raw file is not qcow2"
    );
    assert_eq!(image_size(&img, "qcow2").unwrap(), 32 * MIB);
    assert!(
        std::fs::metadata(&img).unwrap().len() < MIB,
        "a fresh overlay is small"
    );
    let d = daemon(&img, false, dir.path(), "rw");
    let c = d.connect().unwrap();
    // The backing file shows through.
    let mut b = [0u8; 5];
    c.read_at(&mut b, 20 * MIB).unwrap();
    assert_eq!(&b, b"base!");
    exercise(&c, 32 * MIB);
    drop(c);
    drop(d);
    // The base is untouched; the overlay holds the writes, and what was
    // zeroed is not allocated as data.
    assert_eq!(std::fs::read(&base).unwrap(), data);
    let map = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let at = |off: u64| {
        v.iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .cloned()
            .unwrap()
    };
    // Zeroed after being written: recorded as zero in the overlay (not
    // as data, and not falling through to the backing file).
    assert_eq!(at(4 * MIB)["zero"], true, "{map}");
    assert_eq!(at(4 * MIB)["depth"], 0, "{map}");
    assert_eq!(at(8 * MIB)["zero"], true, "{map}");
    // Zeroes over a region never written: nothing allocated for them.
    assert_eq!(at(28 * MIB)["zero"], true, "{map}");
    assert_eq!(at(28 * MIB)["data"], false, "{map}");
    assert_eq!(at(3 * MIB + 4096 * 8)["data"], true, "{map}");
    qemu_img(&["check", img.to_str().unwrap()]);
    // Read-only: writes are refused by the server.
    let d = daemon(&img, true, dir.path(), "ro");
    let c = d.connect().unwrap();
    assert!(c.read_only());
    assert!(c.write_at(b"x", 0, false).is_err());
    // The daemon dies: the request fails, and so does every later one,
    // saying why (never a read of a half-received stream).
    drop(d);
    let mut b = [0u8; 512];
    let e = c.read_at(&mut b, 0).unwrap_err();
    assert!(e.to_string().contains("vda"), "{e}");
    let e = c.read_at(&mut b, 0).unwrap_err().to_string();
    assert!(e.contains("connection lost earlier"), "{e}");
}

/// The backing chain is pinned with formats: a raw base image whose bytes
/// happen to be a qcow2 header naming a host file as *its* backing (what
/// a guest could write to its raw disk) is served as the raw bytes it is;
/// the daemon never opens the file the header names.
#[test]
fn a_raw_base_that_looks_like_qcow2_stays_raw() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("host-secret");
    std::fs::write(&secret, vec![b'S'; 4096]).unwrap();
    // A qcow2 header pointing at the host file, as a guest could write.
    let lure = dir.path().join("lure.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        secret.to_str().unwrap(),
        lure.to_str().unwrap(),
        "1M",
    ]);
    let mut base_bytes = std::fs::read(&lure).unwrap();
    base_bytes.resize(4 * MIB as usize, 0);
    let base = dir.path().join("base.raw");
    std::fs::write(&base, &base_bytes).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
    ]);
    let chain = remus_nbd::qsd::backing_chain(Path::new("qemu-img"), &top).unwrap();
    assert_eq!(
        chain,
        vec![remus_nbd::qsd::ChainLink {
            path: base.clone(),
            format: "raw".into()
        }]
    );
    let d = daemon(&top, true, dir.path(), "pinned");
    let c = d.connect().unwrap();
    let mut head = [0u8; 4];
    c.read_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"QFI\xfb", "the base's own bytes, not its 'backing'");
    let fds: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(fds.contains(&top) && fds.contains(&base), "{fds:?}");
    assert!(
        !fds.contains(&secret),
        "the daemon opened the host file: {fds:?}"
    );
}
