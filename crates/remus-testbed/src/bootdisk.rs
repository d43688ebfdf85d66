//! A bootable disk holding the test guest: an MBR (syslinux's), one FAT
//! partition with syslinux, the guest's kernel and initramfs, and the
//! kernel command line in `syslinux.cfg` — what a VM that boots through
//! its firmware needs. Built from files only (sfdisk, mkfs.fat --offset,
//! mtools, syslinux --offset): no loop device, no mount.
//!
//! It boots through SeaBIOS (syslinux in the MBR and the partition) and
//! through OVMF (syslinux.efi at the removable-media path).
//!
//! Packages: fdisk, dosfstools, mtools, syslinux, syslinux-common,
//! syslinux-efi (`scripts/install-deps.sh`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::GuestImage;

/// Where the partition starts (sector 2048: 1 MiB).
const PART_START: u64 = 1 << 20;
/// syslinux's MBR boot code.
const MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// syslinux for UEFI (package syslinux-efi): the same disk also boots
/// through OVMF, from the removable-media path `\EFI\BOOT\BOOTX64.EFI`.
const EFI_LOADER: &str = "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi";
const EFI_LDLINUX: &str = "/usr/lib/syslinux/modules/efi64/ldlinux.e64";

fn run(prog: &str, args: &[&str], input: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut cmd = Command::new(prog);
    // mtools would warn that the FAT is smaller than the disk file.
    cmd.env("MTOOLS_SKIP_CHECK", "1");
    cmd.args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("run {prog} (scripts/install-deps.sh installs it)"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{prog} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Writes a raw disk image of `size_mib` MiB at `out` that boots `img`
/// with kernel command line `cmdline`. Its FAT partition takes
/// `part_mib` MiB from 1 MiB on; the rest of the disk is free.
pub fn make_boot_disk(
    img: &GuestImage,
    out: &Path,
    size_mib: u64,
    part_mib: u64,
    cmdline: &str,
) -> Result<()> {
    if part_mib + 1 > size_mib {
        bail!("a {part_mib} MiB partition does not fit a {size_mib} MiB disk");
    }
    // syslinux loads a bzImage, not the uncompressed vmlinux.
    let kernel = img.kernel.with_file_name("vmlinuz");
    let o = out.to_str().context("disk path")?;
    std::fs::File::create(out)?.set_len(size_mib << 20)?;
    let sectors = (part_mib << 20) / 512;
    run(
        "sfdisk",
        &["--quiet", o],
        Some(&format!(
            "label: dos\nstart={}, size={sectors}, type=6, bootable\n",
            PART_START / 512
        )),
    )?;
    run(
        "mkfs.fat",
        &[
            "-F",
            "16",
            "-n",
            "REMUSBOOT",
            "--offset",
            &(PART_START / 512).to_string(),
            o,
            &(part_mib * 1024).to_string(),
        ],
        None,
    )?;
    let cfg = out.with_extension("syslinux.cfg");
    std::fs::write(
        &cfg,
        format!(
            "SERIAL 0 115200\nDEFAULT remus\nTIMEOUT 0\nLABEL remus\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {cmdline}\n"
        ),
    )?;
    let fat = format!("{o}@@{PART_START}");
    run("mmd", &["-i", &fat, "::/EFI", "::/EFI/BOOT"], None)?;
    for (src, dest) in [
        (kernel.as_path(), "/vmlinuz"),
        (img.initrd.as_path(), "/initrd.img"),
        (cfg.as_path(), "/syslinux.cfg"),
        (Path::new(EFI_LOADER), "/EFI/BOOT/BOOTX64.EFI"),
        (Path::new(EFI_LDLINUX), "/EFI/BOOT/ldlinux.e64"),
        (cfg.as_path(), "/EFI/BOOT/syslinux.cfg"),
    ] {
        let src = src.to_str().context("path")?;
        run("mcopy", &["-i", &fat, src, &format!("::{dest}")], None)?;
    }
    let _ = std::fs::remove_file(&cfg);
    run(
        "syslinux",
        &["--install", "--offset", &PART_START.to_string(), o],
        None,
    )?;
    // The MBR's boot code (its first 440 bytes; the partition table
    // after it stays).
    let mbr = std::fs::read(MBR).with_context(|| format!("{MBR} (package syslinux-common)"))?;
    let n = mbr.len().min(440);
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(out)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&mbr[..n])?;
    Ok(())
}
