//! VM configuration: a TOML file in the spirit of Xen's `xl.cfg`.
//!
//! ```toml
//! name = "demo"
//! memory = 256          # MiB
//! vcpus = 1
//! kernel = "vmlinuz"    # relative paths are relative to this file
//! initrd = "initrd.img"
//! cmdline = "console=ttyS0 remus.workload=tick"
//! accel = "auto"        # auto | tcg | kvm
//!
//! [[disk]]
//! path = "disk.img"
//! target = "vda"
//! replicate = true
//!
//! [[vif]]
//! mac = "52:54:00:12:34:56"
//! bridge = "br0"
//! ```
//!
//! Parsing ([`VmConfig::from_toml_str`]) checks syntax and every field that
//! can be checked without looking at the machine, and resolves relative
//! paths. [`VmConfig::check_host`] then checks what depends on the host
//! (files exist). Every error names the field and the problem, as
//! `disk[0].path: ...`, so an operator can fix the file without guessing.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod libvirt;

/// Largest guest memory we accept, in MiB (4 TiB). A sanity bound that
/// catches unit mistakes (bytes given where MiB are meant).
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
/// Smallest guest memory that boots a Linux guest.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most vCPUs we accept.
pub const MAX_VCPUS: u32 = 255;

/// A configuration error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// TOML syntax error or a value of the wrong type (the message carries
    /// line and column from the TOML parser).
    #[error("config syntax: {0}")]
    Syntax(String),
    /// A field has an invalid value.
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
}

impl ConfigError {
    fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// How the VM's CPUs are emulated.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it really works on this host, else TCG.
    #[default]
    Auto,
    /// Software emulation (always available).
    Tcg,
    /// Hardware virtualisation; an error if KVM does not work here.
    Kvm,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

/// Firmware of a VM that boots from disk.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (QEMU's default).
    #[default]
    Bios,
    /// OVMF, with a UEFI variable store per VM.
    Uefi,
}

impl Firmware {
    pub fn is_bios(&self) -> bool {
        *self == Firmware::Bios
    }
}

/// The QEMU machine type.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// A PC with PCI Express (what most users' VMs are).
    #[default]
    Q35,
    /// A minimal machine with virtio-mmio devices: smaller device state and
    /// shorter checkpoint pauses, for appliance-style guests.
    Microvm,
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        })
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A locally administered unicast address derived from `seed` (the VM
    /// name and NIC index), so that both hosts of a protected VM derive the
    /// same MAC from the same config.
    pub fn derived(seed: &str) -> Mac {
        // FNV-1a: stable across Rust versions, unlike DefaultHasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Mac([0x52, 0x54, 0x00, b[5], b[6], b[7]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "'{s}' is not a MAC address (want six hex octets like 52:54:00:12:34:56)"
            ));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("'{s}': octet '{p}' must be two hex digits"));
            }
            m[i] = u8::from_str_radix(p, 16)
                .map_err(|_| format!("'{s}': octet '{p}' is not hexadecimal"))?;
        }
        if m[0] & 1 != 0 {
            return Err(format!(
                "'{s}' is a multicast address; a NIC needs a unicast MAC (first octet even)"
            ));
        }
        if m == [0; 6] {
            return Err(format!("'{s}' is the all-zero address"));
        }
        Ok(Mac(m))
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Mac {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Mac".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$",
            "description": "A unicast MAC address, six hex octets: 52:54:00:12:34:56."
        })
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

/// One virtual disk.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file on this host.
    pub path: PathBuf,
    /// Image format: `raw` (default; served by the agent itself) or
    /// `qcow2` (served by qemu-storage-daemon behind the agent;
    /// backing files work). Replication works on guest-visible blocks
    /// either way.
    #[serde(default, skip_serializing_if = "DiskFormat::is_raw")]
    pub format: DiskFormat,
    /// Guest device name, `vda`..`vdz`; disks are attached in target order.
    pub target: String,
    /// Replicate writes to the backup while protected (default true).
    #[serde(default = "yes")]
    pub replicate: bool,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// A disk image's format.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn is_raw(&self) -> bool {
        *self == DiskFormat::Raw
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// The format of the image at `path`, from its header: qcow2 when it
    /// starts with qcow2's magic (`QFI\xfb`), raw otherwise.
    pub fn of_image(path: &Path) -> DiskFormat {
        use std::io::Read;
        let mut h = [0u8; 4];
        let qcow2 = std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut h))
            .is_ok()
            && &h == b"QFI\xfb";
        if qcow2 {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        }
    }
}

/// One virtual NIC.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VifConfig {
    /// MAC address; derived from the VM name and NIC index when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// Existing Linux bridge the NIC's tap device is attached to.
    pub bridge: String,
}

fn yes() -> bool {
    true
}

fn default_vcpus() -> u32 {
    1
}

/// The whole VM configuration.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM name, unique on a host: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Guest memory in MiB.
    pub memory: u64,
    /// Number of virtual CPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Kernel to boot directly.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// CPU emulation.
    #[serde(default)]
    pub accel: Accel,
    /// Machine type.
    #[serde(default)]
    pub machine: Machine,
    /// Firmware for booting from disk (no `kernel`): `bios` (SeaBIOS,
    /// the default) or `uefi` (OVMF, when installed).
    #[serde(default, skip_serializing_if = "Firmware::is_bios")]
    pub firmware: Firmware,
    /// QEMU CPU model; the same model must be used on both hosts of a
    /// protected VM. Defaults to `max` (TCG) or `host` (KVM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Disks.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// NICs.
    #[serde(default, rename = "vif")]
    pub vifs: Vec<VifConfig>,
    /// When protected by an agent that has an arbiter (`remusd
    /// --arbiter`), an etcd lease decides which host may run the VM.
    /// `false` protects this VM without it. Default: true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub arbiter: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

impl VmConfig {
    /// Reads and validates a config file; relative paths in it are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let base = std::path::absolute(&base).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_toml_str(&text, &base)
    }

    /// Parses and validates config text; relative paths are resolved
    /// against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<VmConfig, ConfigError> {
        let mut cfg: VmConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string().trim().into()))?;
        cfg.resolve_paths(base_dir);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        if let Some(k) = self.kernel.as_mut() {
            abs(k);
        }
        if let Some(i) = self.initrd.as_mut() {
            abs(i);
        }
        for d in &mut self.disks {
            abs(&mut d.path);
        }
    }

    /// Checks every field that can be checked without touching the host.
    /// Used by the CLI before sending a config and by the agent on receipt
    /// (a config can arrive over the API without passing through a file).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        if self.memory < MIN_MEMORY_MIB {
            return Err(ConfigError::field(
                "memory",
                format!(
                    "{} MiB is too small (at least {MIN_MEMORY_MIB} MiB; the unit is MiB)",
                    self.memory
                ),
            ));
        }
        if self.memory > MAX_MEMORY_MIB {
            return Err(ConfigError::field(
                "memory",
                format!(
                    "{} MiB is more than the supported {MAX_MEMORY_MIB} MiB (the unit is MiB, not bytes)",
                    self.memory
                ),
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::field(
                "vcpus",
                format!("{} is out of range 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        match &self.kernel {
            // Boot from disk through the firmware.
            None => {
                if self.disks.is_empty() {
                    return Err(ConfigError::field(
                        "kernel",
                        "missing: give a kernel (direct boot) or a [[disk]] to boot from",
                    ));
                }
                if self.initrd.is_some() {
                    return Err(ConfigError::field(
                        "initrd",
                        "only with kernel (a VM that boots from disk loads its initrd itself)",
                    ));
                }
                if !self.cmdline.is_empty() {
                    return Err(ConfigError::field(
                        "cmdline",
                        "only with kernel (a VM that boots from disk takes its command line from its boot loader)",
                    ));
                }
                if self.machine == Machine::Microvm {
                    return Err(ConfigError::field(
                        "machine",
                        "microvm boots a kernel directly only; use q35 to boot from disk",
                    ));
                }
            }
            Some(k) if k.as_os_str().is_empty() => {
                return Err(ConfigError::field("kernel", "empty path"));
            }
            Some(_) => {
                if self.firmware == Firmware::Uefi {
                    return Err(ConfigError::field(
                        "firmware",
                        "uefi boots from disk: remove kernel, or use the default firmware",
                    ));
                }
            }
        }
        if let Some(i) = &self.initrd
            && i.as_os_str().is_empty()
        {
            return Err(ConfigError::field("initrd", "empty path"));
        }
        if self.cmdline.contains('\n') || self.cmdline.contains('\0') {
            return Err(ConfigError::field(
                "cmdline",
                "must be one line without NUL bytes",
            ));
        }
        if let Some(cpu) = &self.cpu
            && (cpu.is_empty()
                || !cpu
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return Err(ConfigError::field(
                "cpu",
                format!("'{cpu}' is not a QEMU CPU model name (letters, digits, - _ .)"),
            ));
        }
        let mut targets = HashSet::new();
        let mut paths = HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let f = |name: &str| format!("disk[{i}].{name}");
            if d.path.as_os_str().is_empty() {
                return Err(ConfigError::field(f("path"), "empty path"));
            }
            if !is_disk_target(&d.target) {
                return Err(ConfigError::field(
                    f("target"),
                    format!("'{}' is not a virtio disk name (vda .. vdz)", d.target),
                ));
            }
            if !targets.insert(d.target.clone()) {
                return Err(ConfigError::field(
                    f("target"),
                    format!("'{}' is used by another disk", d.target),
                ));
            }
            if !paths.insert(d.path.clone()) {
                return Err(ConfigError::field(
                    f("path"),
                    format!("{} is used by another disk", d.path.display()),
                ));
            }
        }
        let mut macs = HashSet::new();
        for (i, v) in self.vifs.iter().enumerate() {
            if !is_ifname(&v.bridge) {
                return Err(ConfigError::field(
                    format!("vif[{i}].bridge"),
                    format!(
                        "'{}' is not a valid interface name (1-15 characters, no '/', ':' or spaces)",
                        v.bridge
                    ),
                ));
            }
            let mac = self.vif_mac(i);
            if !macs.insert(mac) {
                return Err(ConfigError::field(
                    format!("vif[{i}].mac"),
                    format!("{mac} is used by another vif"),
                ));
            }
        }
        Ok(())
    }

    /// Checks what depends on the host: the files named exist and are of
    /// the right kind.
    /// [`check_files`](Self::check_files), then that each disk's declared
    /// format matches its image (a qcow2 image handed to a guest as raw
    /// would be destroyed by its first write): for configs an operator
    /// writes, never for a copy whose formats this host recorded itself
    /// (a guest decides its raw disk's first bytes).
    pub fn check_host(&self) -> Result<(), ConfigError> {
        self.check_files()?;
        for (i, d) in self.disks.iter().enumerate() {
            let field = format!("disk[{i}].path");
            let (path, t) = (d.path.display(), &d.target);
            let problem = match (d.format, DiskFormat::of_image(&d.path)) {
                (DiskFormat::Raw, DiskFormat::Qcow2) => Some(format!(
                    "{path} starts with a qcow2 header: say format = \"qcow2\" for disk {t} if it is a qcow2 image (a raw disk whose guest wrote such a header is refused here; it keeps running where it was created)"
                )),
                (DiskFormat::Qcow2, DiskFormat::Raw) => Some(format!(
                    "{path} is not a qcow2 image (format = \"qcow2\" for disk {t})"
                )),
                _ => None,
            };
            if let Some(p) = problem {
                return Err(ConfigError::field(&field, p));
            }
        }
        Ok(())
    }

    /// The kernel, initrd and disk images exist as regular files.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let file = |field: &str, p: &Path| -> Result<(), ConfigError> {
            match std::fs::metadata(p) {
                Ok(m) if m.is_file() => Ok(()),
                Ok(_) => Err(ConfigError::field(
                    field,
                    format!("{} is not a regular file", p.display()),
                )),
                Err(e) => Err(ConfigError::field(field, format!("{}: {e}", p.display()))),
            }
        };
        if let Some(k) = &self.kernel {
            file("kernel", k)?;
        }
        if let Some(i) = &self.initrd {
            file("initrd", i)?;
        }
        for (i, d) in self.disks.iter().enumerate() {
            file(&format!("disk[{i}].path"), &d.path)?;
        }
        Ok(())
    }

    /// The MAC of NIC `i`: the configured one or one derived from the name.
    pub fn vif_mac(&self, i: usize) -> Mac {
        self.vifs
            .get(i)
            .and_then(|v| v.mac)
            .unwrap_or_else(|| Mac::derived(&format!("{}/{i}", self.name)))
    }

    /// Disks in the order they are attached (by target name).
    pub fn disks_in_order(&self) -> Vec<&DiskConfig> {
        let mut d: Vec<&DiskConfig> = self.disks.iter().collect();
        d.sort_by(|a, b| a.target.cmp(&b.target));
        d
    }
}

/// Checks a VM name: 1–64 characters from `[A-Za-z0-9_.-]`, not starting
/// with `-` or `.` (names become file and socket names).
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::field("name", "must not be empty"));
    }
    if name.len() > 64 {
        return Err(ConfigError::field(
            "name",
            format!("'{name}' is longer than 64 characters"),
        ));
    }
    if name.starts_with('-') || name.starts_with('.') {
        return Err(ConfigError::field(
            "name",
            format!("'{name}' must not start with '-' or '.'"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(ConfigError::field(
            "name",
            format!("'{name}' contains '{c}'; use letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

fn is_disk_target(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 3 && &b[..2] == b"vd" && b[2].is_ascii_lowercase()
}

fn is_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 15
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|c| c.is_ascii_graphic() && c != b'/' && c != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "demo"
memory = 256
vcpus = 2
kernel = "vmlinuz"
initrd = "/abs/initrd.img"
cmdline = "console=ttyS0"
accel = "tcg"

[[disk]]
path = "disk.img"
target = "vda"

[[vif]]
mac = "52:54:00:12:34:56"
bridge = "br0"
"#;

    fn parse(s: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_toml_str(s, Path::new("/base"))
    }

    fn field_err(s: &str) -> (String, String) {
        match parse(s) {
            Err(ConfigError::Field { field, problem }) => (field, problem),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn good_config_parses_and_resolves_relative_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.name, "demo");
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/base/vmlinuz")));
        assert_eq!(c.initrd.as_deref(), Some(Path::new("/abs/initrd.img")));
        assert_eq!(c.disks[0].path, Path::new("/base/disk.img"));
        assert!(c.disks[0].replicate, "replicate defaults to true");
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.machine, Machine::Q35);
        assert_eq!(c.vif_mac(0).to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn json_round_trip_keeps_the_config() {
        let c = parse(GOOD).unwrap();
        let j = serde_json::to_string(&c).unwrap();
        let back: VmConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("memory = 256", "memory = 4", "memory"),
            ("memory = 256", "memory = 268435456", "memory"),
            ("vcpus = 2", "vcpus = 0", "vcpus"),
            ("name = \"demo\"", "name = \"de mo\"", "name"),
            ("name = \"demo\"", "name = \"\"", "name"),
            ("name = \"demo\"", "name = \"-x\"", "name"),
            ("target = \"vda\"", "target = \"sda\"", "disk[0].target"),
            ("bridge = \"br0\"", "bridge = \"a/b\"", "vif[0].bridge"),
            ("bridge = \"br0\"", "bridge = \"\"", "vif[0].bridge"),
            ("kernel = \"vmlinuz\"", "kernel = \"\"", "kernel"),
            // Without a kernel it boots from disk: no initrd then.
            ("kernel = \"vmlinuz\"", "", "initrd"),
            (
                "cmdline = \"console=ttyS0\"",
                "cmdline = \"a\\nb\"",
                "cmdline",
            ),
        ];
        for (from, to, field) in cases {
            let (f, problem) = field_err(&GOOD.replace(from, to));
            assert_eq!(&f, field, "case {to}: problem {problem}");
            assert!(!problem.is_empty());
        }
    }

    #[test]
    fn boot_from_disk_needs_a_disk_and_no_kernel_arguments() {
        let disk_boot = GOOD
            .replace("kernel = \"vmlinuz\"\n", "")
            .replace("initrd = \"/abs/initrd.img\"\n", "")
            .replace("cmdline = \"console=ttyS0\"\n", "");
        let c = parse(&disk_boot).unwrap();
        assert_eq!((c.kernel.as_ref(), c.firmware), (None, Firmware::Bios));
        let c = parse(&format!("firmware = \"uefi\"\n{disk_boot}")).unwrap();
        assert_eq!(c.firmware, Firmware::Uefi);
        let cases = [
            (
                disk_boot.replace("[[disk]]\npath = \"disk.img\"\ntarget = \"vda\"\n", ""),
                "kernel",
            ),
            (format!("cmdline = \"x\"\n{disk_boot}"), "cmdline"),
            (format!("machine = \"microvm\"\n{disk_boot}"), "machine"),
            (format!("firmware = \"uefi\"\n{GOOD}"), "firmware"),
        ];
        for (text, field) in cases {
            let (f, problem) = field_err(&text);
            assert_eq!(f, field, "{problem}");
        }
        assert!(parse(&format!("firmware = \"coreboot\"\n{disk_boot}")).is_err());
    }

    #[test]
    fn bad_macs_are_rejected_with_reason() {
        for (mac, why) in [
            ("52:54:00:12:34", "six hex octets"),
            ("53:54:00:12:34:56", "multicast"),
            ("52:54:00:12:34:zz", "not hexadecimal"),
            ("00:00:00:00:00:00", "all-zero"),
        ] {
            let err = parse(&GOOD.replace("52:54:00:12:34:56", mac)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(why), "{mac}: {msg}");
            assert!(
                msg.contains("line 15") && msg.contains("mac"),
                "{mac}: error should locate the field: {msg}"
            );
        }
    }

    #[test]
    fn duplicates_are_rejected() {
        let two_disks = format!("{GOOD}\n[[disk]]\npath = \"other.img\"\ntarget = \"vda\"\n");
        assert_eq!(field_err(&two_disks).0, "disk[1].target");
        let same_path = format!("{GOOD}\n[[disk]]\npath = \"disk.img\"\ntarget = \"vdb\"\n");
        assert_eq!(field_err(&same_path).0, "disk[1].path");
        let same_mac = format!("{GOOD}\n[[vif]]\nmac = \"52:54:00:12:34:56\"\nbridge = \"br1\"\n");
        assert_eq!(field_err(&same_mac).0, "vif[1].mac");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_syntax_errors_with_location() {
        let e = parse(&GOOD.replace("vcpus = 2", "vcpus = 2\nmemroy = 5")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("memroy"), "{msg}");
        assert!(msg.contains("line"), "{msg}");
        let e = parse(&GOOD.replace("vcpus = 2", "vcpus = \"two\"")).unwrap_err();
        assert!(e.to_string().contains("vcpus"), "{e}");
        let e = parse(&GOOD.replace("accel = \"tcg\"", "accel = \"xen\"")).unwrap_err();
        assert!(e.to_string().contains("accel"), "{e}");
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_distinct() {
        let a = Mac::derived("demo/0");
        assert_eq!(a, Mac::derived("demo/0"));
        assert_ne!(a, Mac::derived("demo/1"));
        assert_eq!(a.0[0] & 1, 0);
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        let cfg = parse(&GOOD.replace("mac = \"52:54:00:12:34:56\"\n", "")).unwrap();
        assert_eq!(cfg.vif_mac(0), Mac::derived("demo/0"));
    }

    #[test]
    fn check_host_names_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"i").unwrap();
        let text = GOOD.replace("/abs/initrd.img", "initrd.img");
        let cfg = VmConfig::from_toml_str(&text, dir.path()).unwrap();
        let err = cfg.check_host().unwrap_err();
        match err {
            ConfigError::Field { field, problem } => {
                assert_eq!(field, "disk[0].path");
                assert!(problem.contains("disk.img"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("disk.img"), b"").unwrap();
        cfg.check_host().unwrap();
        // The format must match the image: a qcow2 image handed over as
        // raw, or a raw one as qcow2, is refused by name.
        let mut qcow2_header = b"QFI\xfb".to_vec();
        qcow2_header.extend_from_slice(&[0u8; 100]);
        std::fs::write(dir.path().join("disk.img"), &qcow2_header).unwrap();
        let e = cfg.check_host().unwrap_err().to_string();
        assert!(
            e.contains("is a qcow2 image") && e.contains("format"),
            "{e}"
        );
        let mut q = cfg.clone();
        q.disks[0].format = DiskFormat::Qcow2;
        q.check_host().unwrap();
        std::fs::write(dir.path().join("disk.img"), b"raw bytes").unwrap();
        let e = q.check_host().unwrap_err().to_string();
        assert!(e.contains("not a qcow2 image"), "{e}");
        // Unknown formats are refused when parsing.
        let text = text.replace("target = \"vda\"", "target = \"vda\"\nformat = \"vmdk\"");
        assert!(VmConfig::from_toml_str(&text, dir.path()).is_err());
    }

    #[test]
    fn load_reports_unreadable_file() {
        let e = VmConfig::load(Path::new("/nonexistent/remus.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in ".{0,400}") {
            let _ = VmConfig::from_toml_str(&s, Path::new("/"));
        }
        #[test]
        fn mac_parser_never_panics(s in "[0-9a-fA-F:]{0,24}") {
            let _ = s.parse::<Mac>();
        }
    }
}
