//! Module ordering on the real Debian kernel package, from the download cache.
//! Skipped (with a message) when the .deb is not cached: run
//! `cargo run -p remus-image -- build` once first. Set REMUS_IMAGE_CACHE to
//! use another cache directory.

use remus_image::{apt, modinfo};
use std::path::PathBuf;

fn cache() -> PathBuf {
    std::env::var_os("REMUS_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(remus_image::default_cache_dir)
}

#[test]
fn virtio_modules_in_dependency_order() {
    let debs = apt::cached(&cache(), apt::is_kernel_image_package).unwrap();
    let Some(deb) = debs.last() else {
        eprintln!(
            "skipped: no linux-image-*-amd64 .deb in {}",
            cache().display()
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    remus_image::extract_deb(&deb.path, tmp.path()).unwrap();
    let (_vmlinuz, release) = remus_image::find_vmlinuz(tmp.path(), &deb.package).unwrap();
    let mods = modinfo::resolve_modules(
        &tmp.path().join("lib/modules").join(&release),
        modinfo::GUEST_MODULES,
    )
    .unwrap();
    let names: Vec<&str> = mods.iter().map(|m| m.info.name.as_str()).collect();
    eprintln!("load order: {names:?}");
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .unwrap_or_else(|| panic!("{n} not in {names:?}"))
    };
    assert!(pos("virtio_ring") < pos("virtio"));
    assert!(pos("virtio") < pos("virtio_pci"));
    assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
    assert!(pos("failover") < pos("net_failover"));
    assert!(pos("net_failover") < pos("virtio_net"));
    assert!(pos("virtio") < pos("virtio_blk"));
    assert!(pos("virtio") < pos("virtio_mmio"));
    // ext4's depends= (jbd2, mbcache, crc16) first; crc32c (a softdep) before it.
    for dep in ["jbd2", "mbcache", "crc16", "crc32c_generic"] {
        assert!(pos(dep) < pos("ext4"), "{dep} after ext4");
    }
    // Every module's dependencies come before it, and each appears once.
    for (i, m) in mods.iter().enumerate() {
        assert_eq!(names.iter().filter(|n| **n == m.info.name).count(), 1);
        for d in &m.info.depends {
            assert!(
                names[..i].contains(&d.as_str()),
                "{} needs {d} first",
                m.info.name
            );
        }
        assert!(m.data.starts_with(b"\x7fELF"));
        assert!(
            m.info
                .vermagic
                .as_deref()
                .unwrap_or("")
                .starts_with(&release)
        );
    }
}
