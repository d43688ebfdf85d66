//! Kernel modules: read each module's own `.modinfo` ELF section and derive
//! the load order from its `depends=` list.
//!
//! The Debian kernel package ships no `modules.dep` (depmod writes it at
//! install time, and kmod is not on a fresh build machine), so the order is
//! derived here. A wrong order makes `insmod` fail with "Unknown symbol".

use crate::error::{Error, Result};
use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSection};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The modules the guest needs (roots; their dependencies are added).
/// virtio_mmio is for `-M microvm` guests. ext4 (for the `fsload` workload;
/// pulls in jbd2, mbcache, crc16) asks for the `crc32c` crypto algorithm
/// only through a `softdep=`, which `depends=` does not name, so
/// crc32c_generic is listed before it (crc32c-intel would need SSE4.2).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_mmio",
    "crc32c_generic",
    "ext4",
];

/// What `.modinfo` says about one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=` (falls back to the file name), with `-` normalised to `_`.
    pub name: String,
    pub depends: Vec<String>,
    pub vermagic: Option<String>,
}

/// Module names use `_` and `-` interchangeably; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Parses the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo_section(data: &[u8], fallback_name: &str) -> ModInfo {
    let mut info = ModInfo {
        name: normalize(fallback_name),
        depends: Vec::new(),
        vermagic: None,
    };
    for field in data.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let field = String::from_utf8_lossy(field);
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        match k {
            "name" => info.name = normalize(v),
            "depends" => {
                info.depends = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(normalize)
                    .collect()
            }
            "vermagic" => info.vermagic = Some(v.to_string()),
            _ => {}
        }
    }
    info
}

/// Reads `.modinfo` from the ELF bytes of a `.ko`.
pub fn read_modinfo(ko: &[u8], fallback_name: &str) -> Result<ModInfo> {
    let err = |detail: String| Error::Module {
        module: fallback_name.to_string(),
        detail,
    };
    let elf =
        ElfFile64::<Endianness>::parse(ko).map_err(|e| err(format!("not an ELF64 object: {e}")))?;
    let sec = elf
        .section_by_name(".modinfo")
        .ok_or_else(|| err("no .modinfo section".into()))?;
    let data = sec
        .data()
        .map_err(|e| err(format!("reading .modinfo: {e}")))?;
    Ok(parse_modinfo_section(data, fallback_name))
}

/// Index of the `.ko` files under `lib/modules/<release>/kernel`: module name → path.
pub fn index_modules(kernel_dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut map = BTreeMap::new();
    let mut stack = vec![kernel_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in std::fs::read_dir(&dir).map_err(Error::io("read module directory", &dir))? {
            let ent = ent.map_err(Error::io("read module directory", &dir))?;
            let path = ent.path();
            let ft = ent.file_type().map_err(Error::io("stat", &path))?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".ko") {
                map.insert(normalize(stem), path);
            } else if let Some((stem, _)) = name.split_once(".ko.") {
                // Compressed (.ko.xz/.ko.zst): busybox insmod cannot load these as is.
                map.entry(normalize(stem)).or_insert(path);
            }
        }
    }
    Ok(map)
}

/// Names of built-in modules from `lib/modules/<release>/modules.builtin`.
pub fn read_builtin(path: &Path) -> Result<HashSet<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(Error::io("read modules.builtin", path)(e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(normalize)
        .collect())
}

/// Orders `roots` and everything they depend on so that each module comes
/// after its dependencies (depth-first post-order; ties keep the order of
/// `roots`, then of each `depends=` list, so the result is deterministic).
/// Names in `builtin` are skipped (the kernel already has them).
/// `lookup(name)` returns the module's `.modinfo`, or None if there is no such module.
pub fn load_order(
    roots: &[&str],
    builtin: &HashSet<String>,
    mut lookup: impl FnMut(&str) -> Result<Option<ModInfo>>,
) -> Result<Vec<ModInfo>> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        needed_by: Option<&str>,
        builtin: &HashSet<String>,
        lookup: &mut dyn FnMut(&str) -> Result<Option<ModInfo>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
        out: &mut Vec<ModInfo>,
    ) -> Result<()> {
        let name = normalize(name);
        if builtin.contains(&name) {
            return Ok(());
        }
        match marks.get(&name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                path.push(name);
                return Err(Error::ModuleCycle(path.join(" -> ")));
            }
            None => {}
        }
        let info = lookup(&name)?.ok_or_else(|| Error::Module {
            module: name.clone(),
            detail: match needed_by {
                Some(by) => format!("not found in the kernel package (needed by {by})"),
                None => "not found in the kernel package (and not built in)".into(),
            },
        })?;
        marks.insert(name.clone(), Mark::Visiting);
        path.push(name.clone());
        for dep in &info.depends {
            visit(dep, Some(&name), builtin, lookup, marks, path, out)?;
        }
        path.pop();
        marks.insert(name, Mark::Done);
        out.push(info);
        Ok(())
    }

    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    let mut path = Vec::new();
    for root in roots {
        visit(
            root,
            None,
            builtin,
            &mut lookup,
            &mut marks,
            &mut path,
            &mut out,
        )?;
    }
    Ok(out)
}

/// A module resolved for the initramfs: its `.modinfo` and file contents.
#[derive(Debug, Clone)]
pub struct Module {
    pub info: ModInfo,
    pub path: PathBuf,
    pub data: Vec<u8>,
}

/// Resolves [`GUEST_MODULES`] (or `roots`) against an extracted kernel tree
/// `lib/modules/<release>`, returning the modules in load order.
pub fn resolve_modules(release_dir: &Path, roots: &[&str]) -> Result<Vec<Module>> {
    let index = index_modules(&release_dir.join("kernel"))?;
    let builtin = read_builtin(&release_dir.join("modules.builtin"))?;
    let mut loaded: BTreeMap<String, (PathBuf, Vec<u8>)> = BTreeMap::new();
    let order = load_order(roots, &builtin, |name| {
        let Some(path) = index.get(name) else {
            return Ok(None);
        };
        if path.extension().is_some_and(|e| e != "ko") {
            return Err(Error::Module {
                module: name.to_string(),
                detail: format!(
                    "{} is compressed; busybox insmod needs an uncompressed .ko",
                    path.display()
                ),
            });
        }
        let data = std::fs::read(path).map_err(Error::io("read module", path))?;
        let info = read_modinfo(&data, name)?;
        loaded.insert(name.to_string(), (path.clone(), data));
        Ok(Some(info))
    })?;
    Ok(order
        .into_iter()
        .map(|info| {
            let (path, data) = loaded.remove(&info.name).unwrap_or_default();
            Module { info, path, data }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &[&str])]) -> BTreeMap<String, ModInfo> {
        entries
            .iter()
            .map(|(n, d)| {
                (
                    n.to_string(),
                    ModInfo {
                        name: n.to_string(),
                        depends: d.iter().map(|s| s.to_string()).collect(),
                        vermagic: None,
                    },
                )
            })
            .collect()
    }

    fn order(
        t: &BTreeMap<String, ModInfo>,
        roots: &[&str],
        builtin: &[&str],
    ) -> Result<Vec<String>> {
        let b: HashSet<String> = builtin.iter().map(|s| s.to_string()).collect();
        Ok(load_order(roots, &b, |n| Ok(t.get(n).cloned()))?
            .into_iter()
            .map(|m| m.name)
            .collect())
    }

    #[test]
    fn deps_come_first_and_once() {
        let t = table(&[
            ("virtio_net", &["net_failover", "virtio_ring", "virtio"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
            ("virtio", &["virtio_ring"]),
            ("virtio_ring", &[]),
        ]);
        assert_eq!(
            order(&t, &["virtio_net", "virtio"], &[]).unwrap(),
            [
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn builtin_skipped_missing_and_cycles_fail() {
        let t = table(&[("a", &["b", "c"]), ("b", &[]), ("x", &["y"]), ("y", &["x"])]);
        assert_eq!(order(&t, &["a"], &["c"]).unwrap(), ["b", "a"]);
        assert!(matches!(order(&t, &["a"], &[]), Err(Error::Module { .. })));
        assert!(matches!(order(&t, &["x"], &[]), Err(Error::ModuleCycle(_))));
    }

    #[test]
    fn modinfo_section_parsing() {
        let data = b"license=GPL\0depends=virtio,virtio-ring\0retpoline=Y\0name=virtio_net\0vermagic=6.1.0 SMP\0";
        let m = parse_modinfo_section(data, "x");
        assert_eq!(m.name, "virtio_net");
        assert_eq!(m.depends, ["virtio", "virtio_ring"]);
        assert_eq!(m.vermagic.as_deref(), Some("6.1.0 SMP"));
        assert!(
            parse_modinfo_section(b"depends=\0", "failover")
                .depends
                .is_empty()
        );
    }
}
