//! Where this host keeps its copy of a VM that a peer sends it: the
//! backup owns its storage.
//!
//! A peer's session setup describes its VM with its own configuration,
//! host paths included. None of those paths is used here: a peer (or
//! anyone who could alter the setup) would otherwise choose which file
//! of this host becomes a guest's disk, or which host bridge a guest is
//! plugged into. From the peer this host takes only the VM's *shape*:
//! name, memory, vCPUs, machine, CPU model, kernel command line, disk
//! targets, sizes and formats, MACs. Everything that touches this host is
//! decided here, from the first of:
//!
//! 1. **this host's own record of the VM** (`copies/NAME/config.json`),
//!    written when the VM ran here or its copy was kept here: a resync to
//!    a host that ran the VM reuses its disks where they were;
//! 2. **the operator's placement file** `VM_CONFIG_DIR/NAME.toml`
//!    (`remusd --vm-config-dir`, default `/etc/remus/vms`): `kernel`,
//!    `initrd`, `[[disk]] target/path/format`, `[[vif]] index/bridge`;
//! 3. **defaults under this host's own roots**: disks as
//!    `IMAGE_DIR/NAME/TARGET.img` (`--image-dir`, default
//!    `STATE_DIR/images`), created sparse at the peer's size in the
//!    peer's format and recorded; a kernel or initrd by its *file name*
//!    only, in `--boot-dir` (default `STATE_DIR/boot`); a bridge only if
//!    it is one of `--peer-bridges`.
//!
//! What none of them provides is refused with a message that says what to
//! set. A name from the wire (VM, kernel, initrd) is used only as a name:
//! never empty, `.`, `..`, or containing `/` or NUL.
//!
//! Formats are never probed from an image's bytes (a guest controls its
//! disk's first bytes): an image's format is the record's, the
//! placement's, or what this host created it as; an image found in the
//! image directory without a record is raw.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use remus_config::{DiskFormat, VmConfig};
use serde::{Deserialize, Serialize};

/// Where a host keeps copies it receives (from `remusd`'s settings).
#[derive(Debug, Clone)]
pub struct Storage {
    pub image_dir: PathBuf,
    pub boot_dir: PathBuf,
    pub vm_config_dir: PathBuf,
    /// Bridges a VM from a peer may be plugged into by its own bridge name.
    pub peer_bridges: Vec<String>,
}

/// The operator's placement of one VM's copy on this host
/// (`VM_CONFIG_DIR/NAME.toml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Kernel for a VM that boots one directly.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<PlacedDisk>,
    #[serde(default, rename = "vif")]
    pub vifs: Vec<PlacedVif>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacedDisk {
    pub target: String,
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    /// A file the copy may only read (a shared ISO or base image): the
    /// guest gets it read-only and a peer cannot replicate onto it.
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacedVif {
    /// The NIC's number, from 0, in the order of the VM's `[[vif]]`s.
    pub index: usize,
    pub bridge: String,
}

/// An image this host creates for a copy (it is missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    pub target: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    pub size: u64,
}

/// The formats of the images this host created in a VM's image directory
/// (`IMAGE_DIR/NAME/images.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct ImageRecord {
    formats: BTreeMap<String, DiskFormat>,
}

/// Longest placement or record file read.
const MAX_FILE: u64 = 64 * 1024;
/// Longest kernel command line taken from a peer.
const MAX_CMDLINE: usize = 4096;
/// Longest CPU model taken from a peer.
const MAX_CPU: usize = 128;

/// A name from the wire, used only as a file name.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(format!("{what} {name:?} is not a plain file name"));
    }
    Ok(())
}

fn read_small(path: &Path) -> Result<Option<String>, String> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut text = String::new();
    f.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!(
            "{}: larger than {} KiB",
            path.display(),
            MAX_FILE / 1024
        ));
    }
    Ok(Some(text))
}

impl Storage {
    /// The placement file of VM `name`, if the operator wrote one.
    pub fn placement(&self, name: &str) -> Result<Option<Placement>, String> {
        check_name("VM", name)?;
        let path = self.vm_config_dir.join(format!("{name}.toml"));
        let Some(text) = read_small(&path)? else {
            return Ok(None);
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn vm_image_dir(&self, name: &str) -> PathBuf {
        self.image_dir.join(name)
    }

    fn image_record(&self, name: &str) -> Result<ImageRecord, String> {
        let path = self.vm_image_dir(name).join("images.json");
        match read_small(&path)? {
            None => Ok(ImageRecord::default()),
            Some(text) => {
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
        }
    }

    /// Records that this host created `target`'s image of VM `name` in
    /// `format` (written before the image, so an image never exists here
    /// unrecorded by our doing).
    pub fn record_created(
        &self,
        name: &str,
        target: &str,
        format: DiskFormat,
    ) -> Result<(), String> {
        let dir = self.vm_image_dir(name);
        create_private_dir(&dir)?;
        // The root too (it may be a link the operator made): others who
        // can write there could swap the VM's directory.
        check_not_writable_by_others(&self.image_dir)?;
        let mut rec = self.image_record(name)?;
        rec.formats.insert(target.to_string(), format);
        let path = dir.join("images.json");
        let tmp = dir.join("images.json.tmp");
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| e.to_string())?;
        // A leftover of an interrupted write is ours: replaced, never
        // followed (the directory is private and checked).
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| format!("{}: {e}", path.display()))
    }

    /// This host's configuration of its copy of `theirs` (a peer's VM
    /// config, of which only the shape is used), given this host's own
    /// `record` of the VM if it has one, and the disk sizes the peer
    /// announced (`sizes`: target → bytes). Returns the configuration and
    /// the images to create before the copy starts.
    pub fn local_config(
        &self,
        theirs: &VmConfig,
        record: Option<&VmConfig>,
        sizes: &BTreeMap<String, u64>,
    ) -> Result<(VmConfig, Vec<NewImage>), String> {
        let name = &theirs.name;
        // The peer's values are checked as values before any of them
        // (a disk target, say) goes into a path here.
        theirs.validate().map_err(|e| e.to_string())?;
        check_name("VM", name)?;
        if let Some(cpu) = &theirs.cpu
            && (cpu.len() > MAX_CPU
                || !cpu
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._+-,=".contains(c)))
        {
            return Err(format!("CPU model {cpu:?} is not a QEMU CPU model name"));
        }
        if theirs.cmdline.len() > MAX_CMDLINE || theirs.cmdline.chars().any(char::is_control) {
            return Err(format!(
                "the kernel command line is over {MAX_CMDLINE} bytes or holds control characters"
            ));
        }
        let placement = self.placement(name)?.unwrap_or_default();
        let place_file = self.vm_config_dir.join(format!("{name}.toml"));
        let mut cfg = theirs.clone();
        // Boot files: ours, never the peer's paths.
        for (what, wire, own_rec, own_place) in [
            (
                "kernel",
                theirs.kernel.as_ref(),
                record.and_then(|r| r.kernel.clone()),
                placement.kernel.clone(),
            ),
            (
                "initrd",
                theirs.initrd.as_ref(),
                record.and_then(|r| r.initrd.clone()),
                placement.initrd.clone(),
            ),
        ] {
            let resolved = match wire {
                None => None,
                Some(path) => Some(match own_rec.or(own_place) {
                    Some(p) => p,
                    None => {
                        let file = path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .ok_or_else(|| format!("the peer's {what} has no file name"))?;
                        check_name(what, file)?;
                        let here = self.boot_dir.join(file);
                        if !here.is_file() {
                            return Err(format!(
                                "VM '{name}' boots its {what} directly and this host has none for it: put it at {} or set {what} = \"...\" in {}",
                                here.display(),
                                place_file.display()
                            ));
                        }
                        here
                    }
                }),
            };
            match what {
                "kernel" => cfg.kernel = resolved,
                _ => cfg.initrd = resolved,
            }
        }
        // Disks: by target; the format never comes from the image's bytes.
        let images = self.image_record(name)?;
        let mut create = Vec::new();
        for d in cfg.disks.iter_mut() {
            let from_record = record.and_then(|r| r.disks.iter().find(|x| x.target == d.target));
            let from_place = placement.disks.iter().find(|x| x.target == d.target);
            // Whether this host's own file may be written comes from this
            // host too: a peer cannot replicate onto a file the record or
            // the placement holds read-only.
            let local_readonly = match (from_record, from_place) {
                (Some(r), _) => Some(r.readonly),
                (None, Some(p)) => Some(p.readonly),
                (None, None) => None,
            };
            if local_readonly == Some(true) {
                if d.replicate && !d.readonly {
                    return Err(format!(
                        "disk {} of VM '{name}' is read-only on this host ({}), but the peer replicates it: make it read-only there, or change {}",
                        d.target,
                        if from_record.is_some() {
                            "this host's record of the VM"
                        } else {
                            "its placement"
                        },
                        place_file.display()
                    ));
                }
                d.readonly = true;
            }
            match (from_record, from_place) {
                (Some(r), _) => {
                    d.path = r.path.clone();
                    d.format = r.format;
                }
                (None, Some(p)) => {
                    d.path = p.path.clone();
                    d.format = p.format;
                }
                (None, None) => {
                    let path = self.vm_image_dir(name).join(format!("{}.img", d.target));
                    if path.exists() {
                        d.format = images
                            .formats
                            .get(&d.target)
                            .copied()
                            .unwrap_or(DiskFormat::Raw);
                    } else if d.replicate && !d.readonly {
                        let size = *sizes.get(&d.target).ok_or_else(|| {
                            format!("disk {}: the peer did not say its size", d.target)
                        })?;
                        create.push(NewImage {
                            target: d.target.clone(),
                            path: path.clone(),
                            format: d.format,
                            size,
                        });
                    } else {
                        return Err(format!(
                            "disk {} of VM '{name}' is not replicated and this host has no image for it: put one at {} or set [[disk]] target = \"{}\" path = \"...\" in {}",
                            d.target,
                            path.display(),
                            d.target,
                            place_file.display()
                        ));
                    }
                    d.path = path;
                }
            }
        }
        // NICs: a bridge of ours.
        for (i, v) in cfg.vifs.iter_mut().enumerate() {
            let from_record = record.and_then(|r| r.vifs.get(i)).map(|r| r.bridge.clone());
            let from_place = placement
                .vifs
                .iter()
                .find(|p| p.index == i)
                .map(|p| p.bridge.clone());
            v.bridge = match from_record.or(from_place) {
                Some(b) => b,
                None if self.peer_bridges.contains(&v.bridge) => v.bridge.clone(),
                None => {
                    return Err(format!(
                        "VM '{name}' wants NIC {i} on bridge '{}', which this host does not let peers use: allow it with peer-bridges = [\"{}\"] in remusd's settings, or set [[vif]] index = {i} bridge = \"...\" in {}",
                        v.bridge,
                        v.bridge,
                        place_file.display()
                    ));
                }
            };
        }
        cfg.validate().map_err(|e| e.to_string())?;
        Ok((cfg, create))
    }
}

/// Creates `dir` (and its parents) readable by this user only, and checks
/// that it is a directory (not a symlink) owned by this user or root that
/// nobody else can write to: root creates and truncates images in it, so
/// a directory others can write would let them plant links to host files.
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        return Err(format!("{} is not a directory (a symlink?)", dir.display()));
    }
    if meta.uid() != ours && meta.uid() != 0 {
        return Err(format!(
            "{} belongs to user {}, not to this agent's user or root",
            dir.display(),
            meta.uid()
        ));
    }
    check_not_writable_by_others(dir)
}

/// Refuses a directory that users other than its owner can write to.
fn check_not_writable_by_others(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "other users can write to {} (mode {:o}): chmod go-w it",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(dir: &Path) -> Storage {
        Storage {
            image_dir: dir.join("images"),
            boot_dir: dir.join("boot"),
            vm_config_dir: dir.join("vms"),
            peer_bridges: vec!["br0".into()],
        }
    }

    fn theirs(extra: &str) -> VmConfig {
        toml::from_str(&format!(
            "name = \"web\"\nmemory = 256\nkernel = \"/etc/shadow/vmlinuz\"\n{extra}"
        ))
        .unwrap()
    }

    fn sizes() -> BTreeMap<String, u64> {
        [("vda".to_string(), 1 << 20)].into()
    }

    #[test]
    fn the_peers_paths_are_never_used() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        std::fs::create_dir_all(&s.boot_dir).unwrap();
        std::fs::write(s.boot_dir.join("vmlinuz"), b"k").unwrap();
        let (cfg, create) = s
            .local_config(
                &theirs("[[disk]]\npath = \"/etc/shadow\"\ntarget = \"vda\"\nformat = \"qcow2\"\n[[vif]]\nbridge = \"br0\"\n"),
                None,
                &sizes(),
            )
            .unwrap();
        assert_eq!(
            cfg.kernel.as_deref(),
            Some(s.boot_dir.join("vmlinuz").as_path())
        );
        assert_eq!(cfg.disks[0].path, s.image_dir.join("web/vda.img"));
        assert_eq!(
            create,
            vec![NewImage {
                target: "vda".into(),
                path: s.image_dir.join("web/vda.img"),
                format: DiskFormat::Qcow2,
                size: 1 << 20
            }]
        );
        assert_eq!(cfg.vifs[0].bridge, "br0");
    }

    #[test]
    fn what_this_host_does_not_provide_is_refused_with_what_to_set() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        let e = s.local_config(&theirs(""), None, &sizes()).unwrap_err();
        assert!(
            e.contains("boots its kernel directly") && e.contains("web.toml"),
            "{e}"
        );
        std::fs::create_dir_all(&s.boot_dir).unwrap();
        std::fs::write(s.boot_dir.join("vmlinuz"), b"k").unwrap();
        let e = s
            .local_config(&theirs("[[vif]]\nbridge = \"br-mgmt\"\n"), None, &sizes())
            .unwrap_err();
        assert!(e.contains("'br-mgmt'") && e.contains("peer-bridges"), "{e}");
        let e = s
            .local_config(&theirs("cpu = \"max -object x\"\n"), None, &sizes())
            .unwrap_err();
        assert!(e.contains("CPU model"), "{e}");
    }

    #[test]
    fn names_from_the_wire_are_names() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_name("kernel", bad).is_err(), "{bad:?}");
        }
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        let mut t = theirs("");
        t.kernel = Some("/boot/..".into());
        assert!(s.local_config(&t, None, &sizes()).is_err());
    }

    #[test]
    fn the_record_then_the_placement_decide() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        std::fs::create_dir_all(&s.vm_config_dir).unwrap();
        std::fs::write(
            s.vm_config_dir.join("web.toml"),
            "kernel = \"/srv/k\"\n[[disk]]\ntarget = \"vda\"\npath = \"/srv/web.qcow2\"\nformat = \"qcow2\"\n[[vif]]\nindex = 0\nbridge = \"br-vm\"\n",
        )
        .unwrap();
        let t =
            theirs("[[disk]]\npath = \"/x\"\ntarget = \"vda\"\n[[vif]]\nbridge = \"br-mgmt\"\n");
        let (cfg, create) = s.local_config(&t, None, &sizes()).unwrap();
        assert!(create.is_empty());
        assert_eq!(cfg.disks[0].path, PathBuf::from("/srv/web.qcow2"));
        assert_eq!(cfg.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(cfg.vifs[0].bridge, "br-vm");
        assert_eq!(cfg.kernel, Some("/srv/k".into()));
        // This host's own record wins over both.
        let mut rec = t.clone();
        rec.kernel = Some("/own/k".into());
        rec.disks[0].path = "/own/web.img".into();
        rec.vifs[0].bridge = "br-own".into();
        let (cfg, _) = s.local_config(&t, Some(&rec), &sizes()).unwrap();
        assert_eq!(cfg.disks[0].path, PathBuf::from("/own/web.img"));
        assert_eq!(cfg.disks[0].format, DiskFormat::Raw);
        assert_eq!(cfg.vifs[0].bridge, "br-own");
        assert_eq!(cfg.kernel, Some("/own/k".into()));
    }

    /// An image in the image directory is raw unless this host recorded
    /// creating it otherwise, whatever its first bytes say.
    #[test]
    fn formats_come_from_records_not_bytes() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        std::fs::create_dir_all(&s.boot_dir).unwrap();
        std::fs::write(s.boot_dir.join("vmlinuz"), b"k").unwrap();
        let img = s.image_dir.join("web/vda.img");
        create_private_dir(img.parent().unwrap()).unwrap();
        let mut bytes = b"QFI\xfb".to_vec();
        bytes.resize(1 << 20, 0);
        std::fs::write(&img, bytes).unwrap();
        let t = theirs("[[disk]]\npath = \"/x\"\ntarget = \"vda\"\nformat = \"qcow2\"\n");
        let (cfg, create) = s.local_config(&t, None, &sizes()).unwrap();
        assert!(create.is_empty());
        assert_eq!(cfg.disks[0].format, DiskFormat::Raw);
        s.record_created("web", "vda", DiskFormat::Qcow2).unwrap();
        let (cfg, _) = s.local_config(&t, None, &sizes()).unwrap();
        assert_eq!(cfg.disks[0].format, DiskFormat::Qcow2);
    }

    /// A file the operator placed read-only (a shared ISO, a base image)
    /// is never written for a peer: a peer that replicates onto it is
    /// refused; one that has it read-only too gets it read-only.
    #[test]
    fn a_disk_placed_read_only_is_never_replicated_onto() {
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        std::fs::create_dir_all(&s.boot_dir).unwrap();
        std::fs::write(s.boot_dir.join("vmlinuz"), b"k").unwrap();
        std::fs::create_dir_all(&s.vm_config_dir).unwrap();
        std::fs::write(
            s.vm_config_dir.join("web.toml"),
            "[[disk]]\ntarget = \"vdb\"\npath = \"/srv/shared.iso\"\nreadonly = true\n",
        )
        .unwrap();
        let e = s
            .local_config(
                &theirs("[[disk]]\npath = \"/x\"\ntarget = \"vdb\"\nreplicate = true\n"),
                None,
                &[("vdb".to_string(), 1 << 20)].into(),
            )
            .unwrap_err();
        assert!(
            e.contains("read-only on this host") && e.contains("vdb"),
            "{e}"
        );
        let (cfg, create) = s
            .local_config(
                &theirs("[[disk]]\npath = \"/x\"\ntarget = \"vdb\"\nreplicate = false\n"),
                None,
                &[("vdb".to_string(), 1 << 20)].into(),
            )
            .unwrap();
        assert!(create.is_empty());
        assert!(cfg.disks[0].readonly, "the guest gets it read-only");
        assert_eq!(cfg.disks[0].path, PathBuf::from("/srv/shared.iso"));
    }

    /// Root creates and truncates images in the image directory: a VM's
    /// directory that is a symlink, or a root others can write to, is
    /// refused before anything is created there.
    #[test]
    fn image_directories_others_could_plant_links_in_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = storage(d.path());
        std::fs::create_dir_all(&s.image_dir).unwrap();
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, s.image_dir.join("web")).unwrap();
        let e = s.record_created("web", "vda", DiskFormat::Raw).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        assert!(!elsewhere.join("images.json").exists());
        std::fs::remove_file(s.image_dir.join("web")).unwrap();
        std::fs::set_permissions(&s.image_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = s.record_created("web", "vda", DiskFormat::Raw).unwrap_err();
        assert!(
            e.contains("other users can write") && e.contains("777"),
            "{e}"
        );
        std::fs::set_permissions(&s.image_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        s.record_created("web", "vda", DiskFormat::Raw).unwrap();
    }
}
