//! The initramfs writer: round trip, `cpio -it` listing, determinism.

use remus_image::cpio::{self, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use remus_image::init::{INIT_SCRIPT, InitramfsInputs, build_initramfs};
use remus_image::modinfo::{ModInfo, Module};

fn module(name: &str, deps: &[&str]) -> Module {
    Module {
        info: ModInfo {
            name: name.into(),
            depends: deps.iter().map(|s| s.to_string()).collect(),
            vermagic: None,
        },
        path: format!("/x/{name}.ko").into(),
        data: format!("ELF of {name}").into_bytes(),
    }
}

fn sample() -> Vec<u8> {
    let modules = [
        module("virtio_ring", &[]),
        module("virtio", &["virtio_ring"]),
    ];
    build_initramfs(&InitramfsInputs {
        busybox: b"busybox bytes",
        guest_bin: b"guest bytes",
        modules: &modules,
        image_info: "recipe 1\n",
    })
    .unwrap()
}

#[test]
fn same_inputs_give_identical_bytes() {
    assert_eq!(sample(), sample());
}

#[test]
fn round_trip_layout() {
    let entries = cpio::read(&sample()).unwrap();
    let get = |p: &str| {
        entries
            .iter()
            .find(|e| e.path == p)
            .unwrap_or_else(|| panic!("{p} missing"))
    };
    assert_eq!(get("init").data, INIT_SCRIPT.as_bytes());
    assert_eq!(get("init").mode, S_IFREG | 0o755);
    assert_eq!(get("bin/busybox").data, b"busybox bytes");
    assert_eq!(get("bin/remus-guest").data, b"guest bytes");
    assert_eq!(get("bin/sh").mode & S_IFMT, S_IFLNK);
    assert_eq!(get("dev/console").mode, S_IFCHR | 0o600);
    assert_eq!(get("dev/console").rdev, (5, 1));
    assert_eq!(get("proc").mode, S_IFDIR | 0o755);
    assert_eq!(get("tmp").mode, S_IFDIR | 0o1777);
    assert_eq!(get("etc/remus/modules").data, b"virtio_ring\nvirtio\n");
    assert_eq!(get("lib/modules/virtio.ko").data, b"ELF of virtio");
    // Parents before children (the kernel unpacks in order).
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
}

/// The system `cpio` (if installed) agrees with our reader.
#[test]
fn system_cpio_lists_it() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("cpio")
        .arg("-it")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        eprintln!("skipped: no cpio command");
        return;
    };
    child.stdin.take().unwrap().write_all(&sample()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let listed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let ours: Vec<String> = cpio::read(&sample())
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(listed, ours);
    for want in [
        "init",
        "bin/busybox",
        "bin/remus-guest",
        "dev/console",
        "lib/modules/virtio.ko",
    ] {
        assert!(listed.iter().any(|l| l == want), "{want} not listed");
    }
}

#[test]
fn cache_key_changes_with_inputs() {
    use remus_image::cache_key;
    let a = cache_key("k_1_amd64.deb", "b_1_amd64.deb", "aa");
    assert_eq!(a, cache_key("k_1_amd64.deb", "b_1_amd64.deb", "aa"));
    assert_ne!(a, cache_key("k_2_amd64.deb", "b_1_amd64.deb", "aa"));
    assert_ne!(a, cache_key("k_1_amd64.deb", "b_1_amd64.deb", "ab"));
}
