//! Building the static `remus-guest` binary with cargo.

use crate::Reporter;
use crate::cmd;
use crate::error::{Error, Result};
use object::Endianness;
use object::elf::PT_INTERP;
use object::read::elf::{ElfFile64, ProgramHeader};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
pub const GUEST_PACKAGE: &str = "remus-guest";
pub const GUEST_RUSTFLAGS: &str = "-C target-feature=+crt-static";

/// The separate target dir (RUSTFLAGS differ from the host build, so sharing
/// `target/` would make each build invalidate the other).
pub fn guest_target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("guest-build")
}

/// The cargo invocation that builds the guest binary. `--target` is named
/// explicitly so that RUSTFLAGS apply only to target code: build scripts and
/// proc-macros stay dynamic host binaries.
pub fn cargo_command(workspace: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace)
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "-p",
            GUEST_PACKAGE,
            "--target-dir",
        ])
        .arg(guest_target_dir(workspace))
        // CARGO_ENCODED_RUSTFLAGS (set by an outer cargo) would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env("RUSTFLAGS", GUEST_RUSTFLAGS)
        // Small binary: no debug info in the guest (the host profile keeps debug = 1).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    c
}

/// Builds the guest binary and returns its path (cargo is a no-op when
/// nothing changed). Checks that the result is statically linked.
pub fn build_guest(workspace: &Path, rep: &Reporter) -> Result<PathBuf> {
    let mut c = cargo_command(workspace);
    rep.step(&format!(
        "building the guest binary: RUSTFLAGS=\"{GUEST_RUSTFLAGS}\" {}",
        cmd::display(&c)
    ));
    if rep.quiet {
        cmd::output(&mut c)?;
    } else {
        cmd::run_visible(&mut c)?;
    }
    let bin = guest_target_dir(workspace)
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_PACKAGE);
    let data = std::fs::read(&bin).map_err(Error::io("read guest binary", &bin))?;
    check_static(&bin, &data)?;
    Ok(bin)
}

/// Errors unless `data` is an x86_64 ELF without a program interpreter.
pub fn check_static(path: &Path, data: &[u8]) -> Result<()> {
    let err = |detail: String| Error::GuestBinary {
        path: path.to_path_buf(),
        detail,
    };
    let elf =
        ElfFile64::<Endianness>::parse(data).map_err(|e| err(format!("not an ELF64 file: {e}")))?;
    let endian = elf.endian();
    for ph in elf.elf_program_headers() {
        if ph.p_type(endian) == PT_INTERP {
            return Err(err(
                "dynamically linked (has PT_INTERP); it would not run in the busybox initramfs"
                    .into(),
            ));
        }
    }
    Ok(())
}
