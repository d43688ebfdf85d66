//! remus-image: builds the guest image used by the remus demo and tests — a
//! Debian kernel plus a busybox initramfs holding the virtio and ext4 modules
//! and the static `remus-guest` binary.
//!
//! Offline after one download: the kernel package (named by
//! `linux-image-amd64`'s dependency) and `busybox-static` are fetched with
//! `apt-get download` into a cache directory, unpacked with `dpkg-deb -x`
//! into a temporary directory (nothing is installed on the host), and the
//! initramfs is written by [`cpio`] deterministically.
//!
//! Outputs in the out directory (default `<workspace>/target/guest-image`):
//! `vmlinuz`, `initrd.img` (uncompressed newc cpio), `vmlinux` (the same
//! kernel uncompressed, bootable by QEMU through its PVH entry point — boots
//! several seconds faster under TCG, see [`vmlinux`]; left out with a
//! warning if the host has no `xz`) and `manifest.json`.
//! The guest's kernel command-line contract is documented in [`init`].
//!
//! The workspace root is `CARGO_MANIFEST_DIR/../..` as compiled in, if it
//! still holds `crates/remus-guest`; otherwise the nearest ancestor of the
//! current directory that does.

pub mod apt;
pub mod cmd;
pub mod cpio;
pub mod error;
pub mod guest;
pub mod init;
pub mod manifest;
pub mod modinfo;
pub mod vmlinux;

pub use error::{Error, Result};
pub use manifest::Manifest;

use manifest::{FileInfo, MANIFEST_FILE, PackageInfo};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the recipe (layout, script, module set, ...) changes in a way
/// the cache key would not otherwise see.
pub const RECIPE_VERSION: u32 = 4;

pub const VMLINUZ_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd.img";
pub const VMLINUX_FILE: &str = "vmlinux";
/// Minimal command line for the image (serial console).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet";

/// Progress messages on stderr (`remus-image: ...`), unless quiet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reporter {
    pub quiet: bool,
}

impl Reporter {
    pub fn step(&self, msg: &str) {
        if !self.quiet {
            eprintln!("remus-image: {msg}");
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn is_workspace(dir: &Path) -> bool {
    dir.join("Cargo.toml").is_file() && dir.join("crates/remus-guest/Cargo.toml").is_file()
}

/// The remus workspace root (see the crate docs for the search order).
pub fn find_workspace_root() -> Result<PathBuf> {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if is_workspace(&compiled) {
        return Ok(compiled.canonicalize().unwrap_or(compiled));
    }
    let cwd = std::env::current_dir().map_err(Error::io("current directory", "."))?;
    cwd.ancestors()
        .find(|d| is_workspace(d))
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::NoWorkspace {
            searched: format!(
                "{} and the ancestors of {}",
                compiled.display(),
                cwd.display()
            ),
        })
}

pub fn default_out_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("guest-image")
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/remus/debs`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("remus").join("debs")
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub workspace: PathBuf,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Rebuild even if the out dir's manifest has the same cache key.
    pub force: bool,
    pub quiet: bool,
}

impl BuildOptions {
    /// Defaults: workspace found by [`find_workspace_root`], out dir
    /// `<workspace>/target/guest-image`, cache [`default_cache_dir`].
    pub fn with_defaults() -> Result<BuildOptions> {
        let workspace = find_workspace_root()?;
        Ok(BuildOptions {
            out_dir: default_out_dir(&workspace),
            cache_dir: default_cache_dir(),
            workspace,
            force: false,
            quiet: false,
        })
    }
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The out dir already held an image with the same cache key.
    UpToDate {
        out_dir: PathBuf,
        manifest: Manifest,
    },
    Built {
        out_dir: PathBuf,
        manifest: Manifest,
    },
}

/// The cache key of an image: same key ⇒ same inputs ⇒ same outputs.
pub fn cache_key(kernel_deb: &str, busybox_deb: &str, guest_sha256: &str) -> String {
    let text = format!(
        "recipe {RECIPE_VERSION}\nkernel-deb {kernel_deb}\nbusybox-deb {busybox_deb}\n\
         guest-sha256 {guest_sha256}\ninit-sha256 {}\nmodules {}\n",
        sha256_hex(init::INIT_SCRIPT.as_bytes()),
        modinfo::GUEST_MODULES.join(",")
    );
    sha256_hex(text.as_bytes())
}

/// Some(manifest) if `out_dir` holds an image with `key` whose outputs all
/// exist with their recorded sizes. (Outputs are written by rename, so a size
/// check catches missing or replaced files; the sha256 values are not
/// recomputed here, since hashing the 66 MB vmlinux takes seconds in a debug
/// build. Use `--force` after editing outputs by hand.)
pub fn is_up_to_date(out_dir: &Path, key: &str) -> Option<Manifest> {
    let m = Manifest::read(&out_dir.join(MANIFEST_FILE)).ok()?;
    if m.cache_key != key
        || !m.outputs.contains_key(VMLINUZ_FILE)
        || !m.outputs.contains_key(INITRD_FILE)
    {
        return None;
    }
    for (name, info) in &m.outputs {
        let meta = std::fs::metadata(out_dir.join(name)).ok()?;
        if meta.len() != info.size {
            return None;
        }
    }
    Some(m)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(Error::io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename into place", path))
}

fn file_info(data: &[u8]) -> FileInfo {
    FileInfo {
        sha256: sha256_hex(data),
        size: data.len() as u64,
    }
}

/// Unpacks a .deb into `dest` with `dpkg-deb -x`.
pub fn extract_deb(deb: &Path, dest: &Path) -> Result<()> {
    cmd::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest)).map(|_| ())
}

/// The single `boot/vmlinuz-<release>` of an extracted kernel package.
pub fn find_vmlinuz(root: &Path, package: &str) -> Result<(PathBuf, String)> {
    let boot = root.join("boot");
    let mut found = Vec::new();
    for ent in
        std::fs::read_dir(&boot).map_err(Error::io("read extracted kernel package", &boot))?
    {
        let ent = ent.map_err(Error::io("read extracted kernel package", &boot))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(rel) = name.strip_prefix("vmlinuz-") {
            found.push((ent.path(), rel.to_string()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(Error::PackageContents {
            package: package.to_string(),
            detail: format!("expected one boot/vmlinuz-*, found {n}"),
        }),
    }
}

/// Builds (or finds up to date) the guest image.
pub fn build(opts: &BuildOptions) -> Result<Outcome> {
    let rep = Reporter { quiet: opts.quiet };
    rep.step("resolving packages");
    let candidates = apt::query_candidates();
    let kernel = apt::ensure_kernel(&opts.cache_dir, &candidates, &rep)?;
    let busybox = apt::ensure_busybox(&opts.cache_dir, &candidates, &rep)?;

    let guest_path = guest::build_guest(&opts.workspace, &rep)?;
    let guest_bin =
        std::fs::read(&guest_path).map_err(Error::io("read guest binary", &guest_path))?;
    let guest_info = file_info(&guest_bin);

    let key = cache_key(
        &kernel.file_name(),
        &busybox.file_name(),
        &guest_info.sha256,
    );
    if !opts.force
        && let Some(manifest) = is_up_to_date(&opts.out_dir, &key)
    {
        return Ok(Outcome::UpToDate {
            out_dir: opts.out_dir.clone(),
            manifest,
        });
    }

    let tmp = tempfile::Builder::new()
        .prefix("remus-image-")
        .tempdir()
        .map_err(Error::io(
            "create temporary directory",
            std::env::temp_dir(),
        ))?;
    let root = tmp.path();
    rep.step(&format!("extracting {}", kernel.file_name()));
    extract_deb(&kernel.path, root)?;
    rep.step(&format!("extracting {}", busybox.file_name()));
    extract_deb(&busybox.path, root)?;

    let (vmlinuz_path, release) = find_vmlinuz(root, &kernel.package)?;
    let release_dir = root.join("lib/modules").join(&release);
    rep.step(&format!("resolving module load order for kernel {release}"));
    let modules = modinfo::resolve_modules(&release_dir, modinfo::GUEST_MODULES)?;
    let module_names: Vec<String> = modules.iter().map(|m| m.info.name.clone()).collect();
    rep.step(&format!("modules: {}", module_names.join(" ")));

    let bb_path = root.join("bin/busybox");
    let busybox_bin = std::fs::read(&bb_path).map_err(|e| Error::PackageContents {
        package: busybox.package.clone(),
        detail: format!("{}: {e}", bb_path.display()),
    })?;
    let vmlinuz = std::fs::read(&vmlinuz_path).map_err(Error::io("read kernel", &vmlinuz_path))?;
    rep.step("unpacking an uncompressed PVH vmlinux");
    let vmlinux = match vmlinux::extract_vmlinux(&vmlinuz, root) {
        Ok(v) => Some(v),
        Err(e) => {
            // Not fatal: vmlinuz still boots, only slower.
            eprintln!("remus-image: warning: no vmlinux output: {e}");
            None
        }
    };

    let image_info = format!(
        "recipe {RECIPE_VERSION}\nkernel {} {} ({release})\nbusybox {} {}\n",
        kernel.package, kernel.version, busybox.package, busybox.version
    );
    rep.step("writing the initramfs");
    let initrd = init::build_initramfs(&init::InitramfsInputs {
        busybox: &busybox_bin,
        guest_bin: &guest_bin,
        modules: &modules,
        image_info: &image_info,
    })?;

    let manifest = Manifest {
        recipe_version: RECIPE_VERSION,
        cache_key: key,
        kernel: PackageInfo {
            package: kernel.package.clone(),
            version: kernel.version.clone(),
            deb: kernel.file_name(),
        },
        kernel_release: release,
        busybox: PackageInfo {
            package: busybox.package.clone(),
            version: busybox.version.clone(),
            deb: busybox.file_name(),
        },
        guest_binary: guest_info,
        modules: module_names,
        outputs: BTreeMap::from_iter(
            [
                Some((VMLINUZ_FILE.to_string(), file_info(&vmlinuz))),
                Some((INITRD_FILE.to_string(), file_info(&initrd))),
                vmlinux
                    .as_ref()
                    .map(|v| (VMLINUX_FILE.to_string(), file_info(v))),
            ]
            .into_iter()
            .flatten(),
        ),
        kernel_cmdline: DEFAULT_CMDLINE.to_string(),
    };

    std::fs::create_dir_all(&opts.out_dir)
        .map_err(Error::io("create out directory", &opts.out_dir))?;
    // The manifest goes last: a half-written image never looks up to date.
    let _ = std::fs::remove_file(opts.out_dir.join(MANIFEST_FILE));
    write_atomic(&opts.out_dir.join(VMLINUZ_FILE), &vmlinuz)?;
    write_atomic(&opts.out_dir.join(INITRD_FILE), &initrd)?;
    match &vmlinux {
        Some(v) => write_atomic(&opts.out_dir.join(VMLINUX_FILE), v)?,
        None => {
            let _ = std::fs::remove_file(opts.out_dir.join(VMLINUX_FILE));
        }
    }
    write_atomic(
        &opts.out_dir.join(MANIFEST_FILE),
        manifest.to_json().as_bytes(),
    )?;
    Ok(Outcome::Built {
        out_dir: opts.out_dir.clone(),
        manifest,
    })
}
