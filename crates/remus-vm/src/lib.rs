//! The VM supervisor: launches stock QEMU with the Remus-ready layout and
//! drives it over QMP.
//!
//! - [`qemu_args`]: the exact command line (shared RAM file, QMP, console,
//!   NBD disks, stream NICs).
//! - [`vm`]: a running VM: process, QMP, disk servers, NIC relays.
//! - [`state`]: run states and roles with xl's letters.
//! - [`kvm`]: whether KVM really works on this host.
//! - [`cpuset`]: xl-style CPU lists for `vcpu-pin`.

pub mod console;
pub mod cpuset;
pub mod devstate;
pub mod kvm;
pub mod logfile;
pub mod paths;
pub mod probe_guest;
pub mod qemu_args;
pub mod qemu_log;
pub mod state;
pub mod vm;

pub use paths::VmPaths;
pub use qemu_args::ResolvedAccel;
pub use state::{Role, RunState};
pub use vm::{ProcId, Processes, QemuBinary, StartOptions, Vm, VmError, qemu_tool};

use remus_config::Accel;

/// Resolves the configured accelerator for this host: KVM only when both
/// the kernel runs guest code and QEMU starts with KVM for this CPU model
/// and machine.
pub fn resolve_accel(
    accel: Accel,
    qemu: &std::path::Path,
    cpu: Option<&str>,
    machine: remus_config::Machine,
) -> Result<ResolvedAccel, String> {
    let cpu = cpu.unwrap_or(qemu_args::DEFAULT_KVM_CPU);
    let machine = machine.to_string();
    match accel {
        Accel::Tcg => Ok(ResolvedAccel::Tcg),
        Accel::Kvm => kvm::qemu_kvm_usable(qemu, cpu, &machine)
            .map(|()| ResolvedAccel::Kvm)
            .map_err(|why| format!("accel = \"kvm\" but KVM does not work on this host: {why}")),
        Accel::Auto => Ok(match kvm::qemu_kvm_usable(qemu, cpu, &machine) {
            Ok(()) => ResolvedAccel::Kvm,
            Err(why) => {
                tracing::info!(reason = %why, "KVM not usable; using TCG");
                ResolvedAccel::Tcg
            }
        }),
    }
}

/// QEMU's version as (major, minor), from `qemu-system-x86_64 --version`.
pub fn qemu_version(qemu: &std::path::Path) -> Result<(u32, u32), String> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (install QEMU 10: scripts/install-deps.sh)",
                qemu.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text)
        .ok_or_else(|| format!("cannot parse QEMU version from '{}'", text.trim()))
}

fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split("version ").nth(1)?;
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The oldest QEMU remus supports (needs `file:`/`fd:` migration with
/// `x-ignore-shared`, `-netdev stream`, `announce-self`).
pub const MIN_QEMU: (u32, u32) = (10, 0);

#[cfg(test)]
mod tests {
    #[test]
    fn qemu_version_parses() {
        assert_eq!(
            super::parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0))
        );
        assert_eq!(
            super::parse_qemu_version("QEMU emulator version 7.2.15"),
            Some((7, 2))
        );
        assert_eq!(super::parse_qemu_version("nonsense"), None);
    }

    #[test]
    fn kvm_probe_answers_without_hanging() {
        // Whatever the host, the probe gives an answer (and a reason when no).
        match super::kvm::kvm_usable() {
            Ok(()) => eprintln!("KVM usable on this host"),
            Err(why) => {
                eprintln!("KVM not usable: {why}");
                assert!(!why.is_empty());
            }
        }
    }
}
