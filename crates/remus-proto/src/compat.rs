//! What two hosts must agree on before one may hold the other's VM state.
//!
//! A checkpoint is raw guest memory and QEMU device state: it can only be
//! resumed by a QEMU with the same memory size, vCPU count, machine type and
//! CPU model, the same disks (by guest-visible target and size) and the same
//! NICs (by MAC). The agent fills a [`VmCompat`] from its own configuration;
//! this crate deliberately does not depend on the config crate.

use std::fmt;

use crate::wire::{Cursor, DecodeError, put_str, put_u16, put_u32, put_u64};

/// One disk as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCompat {
    /// Guest-visible name, e.g. "vda".
    pub target: String,
    pub size_bytes: u64,
}

/// The replication-relevant shape of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmCompat {
    pub memory_mib: u64,
    pub vcpus: u32,
    /// QEMU machine type, e.g. "q35".
    pub machine: String,
    /// QEMU CPU model, e.g. "max"; empty for QEMU's default.
    pub cpu_model: String,
    pub disks: Vec<DiskCompat>,
    /// NIC MAC addresses, in device order.
    pub macs: Vec<[u8; 6]>,
}

struct Mac<'a>(&'a [u8; 6]);

impl fmt::Display for Mac<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl VmCompat {
    /// Compares the primary's view (`self`) with the backup's (`other`) and
    /// lists every mismatch in operator words, e.g.
    /// "memory: primary 256 MiB, backup 512 MiB".
    pub fn check(&self, other: &VmCompat) -> Result<(), Vec<String>> {
        self.check_sides(other, "primary", "backup")
    }

    /// Like [`VmCompat::check`] with the two sides named by the caller
    /// ("source"/"destination" for a migration).
    pub fn check_sides(
        &self,
        other: &VmCompat,
        ours: &str,
        theirs: &str,
    ) -> Result<(), Vec<String>> {
        let mut out = Vec::new();
        let mut field = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: {ours} {a}, {theirs} {b}"));
            }
        };
        field(
            "memory",
            format!("{} MiB", self.memory_mib),
            format!("{} MiB", other.memory_mib),
        );
        field("vcpus", self.vcpus.to_string(), other.vcpus.to_string());
        field("machine", quoted(&self.machine), quoted(&other.machine));
        field(
            "cpu model",
            quoted(&self.cpu_model),
            quoted(&other.cpu_model),
        );

        for d in &self.disks {
            match other.disks.iter().find(|o| o.target == d.target) {
                None => out.push(format!(
                    "disk {}: {ours} has it, {theirs} does not",
                    d.target
                )),
                Some(o) if o.size_bytes != d.size_bytes => out.push(format!(
                    "disk {} size: {ours} {} bytes, {theirs} {} bytes",
                    d.target, d.size_bytes, o.size_bytes
                )),
                Some(_) => {}
            }
        }
        for o in &other.disks {
            if !self.disks.iter().any(|d| d.target == o.target) {
                out.push(format!(
                    "disk {}: {theirs} has it, {ours} does not",
                    o.target
                ));
            }
        }

        if self.macs != other.macs {
            let list = |m: &[[u8; 6]]| {
                if m.is_empty() {
                    "none".to_string()
                } else {
                    m.iter()
                        .map(|m| Mac(m).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            out.push(format!(
                "network interfaces (MACs in order): {ours} {}, {theirs} {}",
                list(&self.macs),
                list(&other.macs)
            ));
        }

        if out.is_empty() { Ok(()) } else { Err(out) }
    }

    pub(crate) fn encode(&self, p: &mut Vec<u8>) {
        put_u64(p, self.memory_mib);
        put_u32(p, self.vcpus);
        put_str(p, &self.machine);
        put_str(p, &self.cpu_model);
        let disks = &self.disks[..self.disks.len().min(u16::MAX as usize)];
        put_u16(p, disks.len() as u16);
        for d in disks {
            put_str(p, &d.target);
            put_u64(p, d.size_bytes);
        }
        let macs = &self.macs[..self.macs.len().min(u16::MAX as usize)];
        put_u16(p, macs.len() as u16);
        for m in macs {
            p.extend_from_slice(m);
        }
    }

    pub(crate) fn decode(c: &mut Cursor<'_>) -> Result<VmCompat, DecodeError> {
        let memory_mib = c.u64("compat.memory_mib")?;
        let vcpus = c.u32("compat.vcpus")?;
        let machine = c.string("compat.machine")?;
        let cpu_model = c.string("compat.cpu_model")?;
        // Counts are bounded by u16 and each entry needs bytes that must be
        // present, so a lying count fails on the payload end, not on memory.
        let n = c.u16("compat.disk_count")?;
        let mut disks = Vec::new();
        for _ in 0..n {
            disks.push(DiskCompat {
                target: c.string("compat.disk.target")?,
                size_bytes: c.u64("compat.disk.size_bytes")?,
            });
        }
        let n = c.u16("compat.mac_count")?;
        let mut macs = Vec::new();
        for _ in 0..n {
            macs.push(c.array("compat.mac")?);
        }
        Ok(VmCompat {
            memory_mib,
            vcpus,
            machine,
            cpu_model,
            disks,
            macs,
        })
    }
}

fn quoted(s: &str) -> String {
    if s.is_empty() {
        "(default)".to_string()
    } else {
        format!("{s:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmCompat {
        VmCompat {
            memory_mib: 256,
            vcpus: 2,
            machine: "q35".into(),
            cpu_model: "max".into(),
            disks: vec![DiskCompat {
                target: "vda".into(),
                size_bytes: 1 << 30,
            }],
            macs: vec![[0x52, 0x54, 0, 0x12, 0x34, 0x56]],
        }
    }

    #[test]
    fn equal_configs_are_compatible() {
        assert_eq!(vm().check(&vm()), Ok(()));
    }

    #[test]
    fn every_mismatch_is_listed_in_operator_words() {
        let mut b = vm();
        b.memory_mib = 512;
        b.vcpus = 4;
        b.machine = "pc".into();
        b.cpu_model = String::new();
        b.disks[0].size_bytes = 2 << 30;
        b.disks.push(DiskCompat {
            target: "vdb".into(),
            size_bytes: 1,
        });
        b.macs.clear();
        let errs = vm().check(&b).unwrap_err();
        assert_eq!(
            errs,
            vec![
                "memory: primary 256 MiB, backup 512 MiB",
                "vcpus: primary 2, backup 4",
                "machine: primary \"q35\", backup \"pc\"",
                "cpu model: primary \"max\", backup (default)",
                "disk vda size: primary 1073741824 bytes, backup 2147483648 bytes",
                "disk vdb: backup has it, primary does not",
                "network interfaces (MACs in order): primary 52:54:00:12:34:56, backup none",
            ]
        );
    }
}
