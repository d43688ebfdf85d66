//! `manifest.json`: what an image was built from, and the cache key.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageInfo {
    pub package: String,
    pub version: String,
    /// The .deb file name in the download cache.
    pub deb: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub recipe_version: u32,
    /// sha256 over the recipe version, the .deb file names, the guest
    /// binary's hash, the init script and the module list.
    pub cache_key: String,
    pub kernel: PackageInfo,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    pub busybox: PackageInfo,
    pub guest_binary: FileInfo,
    /// Modules in the order /init loads them.
    pub modules: Vec<String>,
    /// Output file name (`vmlinuz`, `initrd.img`, and `vmlinux` when it
    /// could be made) → hash and size.
    pub outputs: BTreeMap<String, FileInfo>,
    /// Suggested kernel command line (add `remus.workload=`, `remus.ip=`).
    pub kernel_cmdline: String,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read(path).map_err(Error::io("read manifest", path))?;
        serde_json::from_slice(&text).map_err(|source| Error::Manifest {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serialises");
        s.push('\n');
        s
    }
}
