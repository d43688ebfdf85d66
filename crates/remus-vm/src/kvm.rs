//! Does KVM really work here?
//!
//! `/dev/kvm` can exist and open while virtualisation is unusable (nested
//! setups without VMX, a broken host). `accel = "auto"` must pick KVM only
//! when it runs guest code, so the probe creates a VM with 64 KiB of
//! memory at the reset vector filled with `hlt`, runs one vCPU and expects
//! a `KVM_EXIT_HLT`. The ioctl numbers are the kernel's stable ABI
//! (`include/uapi/linux/kvm.h`); they are written out here because no
//! maintained crate exposes them without pulling a whole VMM framework.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
const KVM_RUN: libc::c_ulong = 0xAE80;
const KVM_EXIT_HLT: u32 = 5;

#[repr(C)]
struct UserspaceMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// Ok when KVM ran a guest instruction; otherwise why not.
pub fn kvm_usable() -> Result<(), String> {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            // KVM_RUN on a broken host could hang: probe on a thread with a
            // deadline (a hung probe thread is leaked, once per process).
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("kvm-probe".into())
                .spawn(move || {
                    let _ = tx.send(probe());
                });
            if let Err(e) = spawned {
                return Err(format!("cannot start KVM probe: {e}"));
            }
            rx.recv_timeout(Duration::from_secs(3))
                .unwrap_or_else(|_| Err("KVM_RUN did not return within 3 s".into()))
        })
        .clone()
}

fn ioctl(fd: &impl AsRawFd, req: libc::c_ulong, arg: libc::c_ulong) -> Result<libc::c_int, String> {
    // SAFETY: the requests used here take an integer or a pointer to a
    // struct that outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error().to_string())
    } else {
        Ok(r)
    }
}

fn probe() -> Result<(), String> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let api = ioctl(&kvm, KVM_GET_API_VERSION, 0)?;
    if api != 12 {
        return Err(format!("unexpected KVM API version {api}"));
    }
    let vm_fd = ioctl(&kvm, KVM_CREATE_VM, 0).map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    // SAFETY: a fresh fd returned by the kernel, owned from here on.
    let vm = unsafe { OwnedFd::from_raw_fd(vm_fd) };

    const SIZE: usize = 0x10000;
    // SAFETY: anonymous private mapping, unmapped below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    struct Unmap(*mut libc::c_void, usize);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }
    let _unmap = Unmap(mem, SIZE);
    // SAFETY: the mapping is SIZE bytes and writable. 0xF4 = hlt.
    unsafe { std::ptr::write_bytes(mem as *mut u8, 0xF4, SIZE) };
    let region = UserspaceMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0xFFFF_0000,
        memory_size: SIZE as u64,
        userspace_addr: mem as u64,
    };
    ioctl(
        &vm,
        KVM_SET_USER_MEMORY_REGION,
        &region as *const _ as libc::c_ulong,
    )
    .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let vcpu_fd = ioctl(&vm, KVM_CREATE_VCPU, 0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    // SAFETY: fresh fd from the kernel.
    let vcpu = unsafe { OwnedFd::from_raw_fd(vcpu_fd) };
    let run_size = ioctl(&kvm, KVM_GET_VCPU_MMAP_SIZE, 0)? as usize;
    // SAFETY: mapping the vcpu's kvm_run area as the KVM API documents.
    let run = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            run_size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu.as_raw_fd(),
            0,
        )
    };
    if run == libc::MAP_FAILED {
        return Err("mmap of kvm_run failed".into());
    }
    let _unmap_run = Unmap(run, run_size);
    ioctl(&vcpu, KVM_RUN, 0).map_err(|e| format!("KVM_RUN: {e}"))?;
    // struct kvm_run: u8, u8, u8[6], then u32 exit_reason at offset 8.
    // SAFETY: run_size is at least one page.
    let exit_reason = unsafe { std::ptr::read_volatile((run as *const u8).add(8) as *const u32) };
    if exit_reason == KVM_EXIT_HLT {
        Ok(())
    } else {
        Err(format!(
            "test guest exited with reason {exit_reason}, not HLT"
        ))
    }
}
