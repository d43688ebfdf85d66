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

/// (QEMU binary, CPU model, machine).
type ProbeKey = (std::path::PathBuf, String, String);

/// Whether QEMU itself can start a VM with KVM for this CPU model and
/// machine. The ioctl probe above can pass on hosts where QEMU's KVM setup
/// still fails (seen on nested hosts: QEMU aborts setting MSRs for the
/// `host` and `max` models), so `auto` also starts QEMU once, stopped
/// (`-S`), and waits for QMP: QEMU sets up the vCPUs before QMP answers.
/// Results are cached per (QEMU binary, CPU model, machine).
pub fn qemu_kvm_usable(qemu: &std::path::Path, cpu: &str, machine: &str) -> Result<(), String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static CACHE: OnceLock<Mutex<HashMap<ProbeKey, Result<(), String>>>> = OnceLock::new();
    let key = (qemu.to_path_buf(), cpu.to_string(), machine.to_string());
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(r) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return r.clone();
    }
    let r = kvm_usable().and_then(|()| qemu_probe(qemu, cpu, machine));
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, r.clone());
    r
}

fn qemu_probe(qemu: &std::path::Path, cpu: &str, machine: &str) -> Result<(), String> {
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "remus-kvm-probe-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("probe dir: {e}"))?;
    let sock = dir.join("qmp.sock");
    let log = dir.join("qemu.log");
    let result = (|| {
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut child = Command::new(qemu)
            .args(["-accel", "kvm", "-cpu", cpu, "-machine", machine])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-m",
                "32",
                "-S",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let verdict = loop {
            if let Ok(Some(st)) = child.try_wait() {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let last = said.lines().last().unwrap_or("").trim().to_string();
                break Err(format!("QEMU with KVM (cpu {cpu}) exited ({st}): {last}"));
            }
            if let Ok(q) = remus_qmp::Qmp::connect(&sock, Duration::from_millis(100)) {
                let alive = q.status().is_ok();
                let _ = q.execute_timeout("quit", None, Duration::from_secs(2));
                break if alive {
                    Ok(())
                } else {
                    Err("QEMU with KVM did not answer query-status".to_string())
                };
            }
            if std::time::Instant::now() > deadline {
                break Err("QEMU with KVM did not start within 10 s".to_string());
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        verdict
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
