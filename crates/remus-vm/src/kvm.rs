//! Does KVM really work here?
//!
//! `/dev/kvm` can exist and open while virtualisation is unusable (nested
//! setups without VMX, a broken host, a nested paravirtualised KVM that
//! runs trivial code and fails every real guest). `accel = "auto"` must
//! pick KVM only when it runs a guest like ours, so two probes run, the
//! second only if the first passes:
//!
//! 1. [`kvm_usable`]: the kernel's API directly. A VM with 64 KiB of
//!    memory at the reset vector filled with `hlt`, one vCPU, expecting
//!    `KVM_EXIT_HLT`. Cheap, and it names the ioctl that fails. The ioctl
//!    numbers are the kernel's stable ABI (`include/uapi/linux/kvm.h`);
//!    they are written out here because no maintained crate exposes them
//!    without pulling a whole VMM framework.
//! 2. [`boot_probe`]: QEMU itself, with the VM's CPU model and machine
//!    type and the machine's firmware, boots a tiny guest
//!    ([`crate::probe_guest`]) that enters long mode with paging and
//!    reports back from 64-bit code.

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

/// How long the boot probe may take. A working KVM boots it in well under
/// a second (firmware included); TCG on a loaded 2-core machine within a
/// few seconds.
pub const BOOT_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether QEMU runs a 64-bit guest with KVM for this CPU model and
/// machine: the ioctl probe above, then [`boot_probe`] of the probe guest
/// (long mode with paging, through the machine's own firmware). A host
/// can pass the first and fail the second (a nested, paravirtualised KVM
/// that runs `hlt` but dies as soon as a guest enables paging). The
/// verdict is cached per (QEMU binary, CPU model, machine) for the life
/// of the process: the agent probes once at start.
pub fn qemu_kvm_usable(qemu: &std::path::Path, cpu: &str, machine: &str) -> Result<(), String> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    // One cell per key, so that concurrent callers of the same key wait
    // for one probe instead of starting their own.
    type Cell = Arc<OnceLock<Result<(), String>>>;
    static CACHE: OnceLock<Mutex<HashMap<ProbeKey, Cell>>> = OnceLock::new();
    let key = (qemu.to_path_buf(), cpu.to_string(), machine.to_string());
    let cell = CACHE
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_default()
        .clone();
    cell.get_or_init(|| {
        kvm_usable()
            .map_err(|why| format!("KVM does not run guest code here: {why}"))
            .and_then(|()| {
                boot_probe(qemu, "kvm", cpu, machine, BOOT_PROBE_TIMEOUT)
                    .map(|took| {
                        tracing::debug!(
                            cpu,
                            machine,
                            ms = took.as_millis() as u64,
                            "KVM boot probe passed"
                        );
                    })
                    .map_err(|why| format!("KVM present but cannot run a 64-bit guest: {why}"))
            })
    })
    .clone()
}

/// Boots the probe guest ([`crate::probe_guest`]) in QEMU with `accel`,
/// `cpu` and `machine`, and waits until it has written its marker from
/// 64-bit code and left through `isa-debug-exit`. Returns how long that
/// took, or why it did not happen (QEMU's own error line when it gave
/// one, e.g. "KVM internal error. Suberror: 1").
pub fn boot_probe(
    qemu: &std::path::Path,
    accel: &str,
    cpu: &str,
    machine: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::sync::mpsc;

    // The image lives in a memory file that QEMU opens as /dev/fd/N:
    // nothing on disk, so an agent killed mid-probe leaves nothing behind
    // (a file in /tmp would stay).
    let image = memfd_image(&crate::probe_guest::image())?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&image);
    let kernel = format!("/dev/fd/{fd}");
    let started = std::time::Instant::now();
    let mut command = Command::new(qemu);
    command
        .args(["-accel", accel, "-cpu", cpu, "-machine", machine])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // A guest that faults beyond repair triple-faults; without a
        // reboot QEMU then exits at once instead of looping in firmware.
        .args(["-m", "64", "-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(&kernel)
        .args([
            "-device",
            &format!(
                "isa-debug-exit,iobase={:#x},iosize=0x04",
                crate::probe_guest::DEBUG_EXIT_PORT
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The probe QEMU dies with the thread that waits for it: a KVM
    // internal error leaves QEMU paused, not gone, and an agent killed
    // during the probe would otherwise leave it behind for good.
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The image's fd (close-on-exec in the agent) stays open in
            // QEMU only.
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;

    enum Seen {
        Serial(Vec<u8>),
        Stderr(String),
    }
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(Seen::Serial(buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(Seen::Stderr(line)).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);

    let deadline = started + timeout;
    let mut serial = Vec::new();
    let mut stderr: Vec<String> = Vec::new();
    let marker = crate::probe_guest::MARKER.as_bytes();
    let verdict = loop {
        let now = std::time::Instant::now();
        if now >= deadline {
            break Err(format!(
                "the probe guest did not finish within {} s{}",
                timeout.as_secs(),
                said(&serial, &stderr)
            ));
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(200))) {
            Ok(Seen::Serial(b)) => serial.extend(b),
            Ok(Seen::Stderr(l)) => {
                // QEMU stops the VM on a KVM internal error but does not
                // exit: the line itself is the verdict.
                let fatal = l.contains("internal error") || l.contains("KVM_");
                stderr.push(l.clone());
                if fatal {
                    break Err(l.trim().to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed: QEMU has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map_err(|e| e.to_string())?;
                let ran = serial.windows(marker.len()).any(|w| w == marker);
                break match status.code() {
                    Some(code) if code == crate::probe_guest::EXIT_STATUS && ran => {
                        Ok(started.elapsed())
                    }
                    _ => Err(format!(
                        "QEMU exited ({status}) before the probe guest finished{}",
                        said(&serial, &stderr)
                    )),
                };
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    for r in readers {
        let _ = r.join();
    }
    verdict
}

/// `bytes` in an anonymous memory file (close-on-exec).
fn memfd_image(bytes: &[u8]) -> Result<std::fs::File, String> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: a constant NUL-terminated name; the returned fd, if valid,
    // is ours alone and owned by the File from here.
    let fd = unsafe { libc::memfd_create(c"remus-probe".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "memory file for the probe guest: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: see above.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(bytes)
        .map_err(|e| format!("write the probe guest: {e}"))?;
    Ok(f)
}

/// What QEMU and the guest said, for an error message: QEMU's last error
/// line, else the guest's last serial line.
fn said(serial: &[u8], stderr: &[String]) -> String {
    if let Some(l) = crate::qemu_log::last_error_line(stderr.iter().map(String::as_str)) {
        return format!("; QEMU said: {l}");
    }
    let text = String::from_utf8_lossy(serial);
    match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(l) => format!("; last serial line: {l}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe guest itself is right: under TCG (which emulates exactly
    /// what it does) it reaches 64-bit code and reports back, on both
    /// machine types. A broken image would make every KVM host look
    /// broken, so this is what the KVM verdict rests on.
    #[test]
    fn probe_guest_boots_under_tcg() {
        let qemu = std::path::Path::new("qemu-system-x86_64");
        for machine in ["q35", "microvm"] {
            let took = boot_probe(qemu, "tcg", "max", machine, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("probe guest on {machine} under TCG: {e}"));
            eprintln!(
                "probe guest on {machine} under TCG: {} ms",
                took.as_millis()
            );
        }
        // A CPU without cmpxchg16b takes the plain-store path.
        boot_probe(qemu, "tcg", "qemu64,-cx16", "q35", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("probe guest without CX16: {e}"));
    }

    /// The probe can say no: a CPU without long mode faults at the EFER
    /// write and the probe reports it at once, not after its timeout.
    #[test]
    fn probe_fails_without_long_mode() {
        let qemu = std::path::Path::new("qemu-system-x86_64");
        let err = boot_probe(qemu, "tcg", "qemu64,-lm", "q35", Duration::from_secs(60))
            .expect_err("no long mode, no marker");
        assert!(err.contains("before the probe guest finished"), "{err}");
    }

    /// On this host, whatever it is, the KVM verdict comes with a reason
    /// when it is no, and within the timeout.
    #[test]
    fn kvm_verdict_has_a_reason() {
        let qemu = std::path::Path::new("qemu-system-x86_64");
        let started = std::time::Instant::now();
        match qemu_kvm_usable(qemu, "host", "q35") {
            Ok(()) => eprintln!("KVM runs a 64-bit guest here"),
            Err(why) => {
                eprintln!("KVM not usable: {why}");
                assert!(why.len() > 20, "a reason, not just a word: {why}");
            }
        }
        assert!(started.elapsed() < BOOT_PROBE_TIMEOUT + Duration::from_secs(5));
    }

    /// A process killed while its probe runs takes the probe's QEMU with
    /// it (QEMU stays alive, paused, after a KVM internal error). The
    /// probe runs in a child process of this test with a stand-in "QEMU"
    /// that only sleeps; the child is killed with SIGKILL and the
    /// stand-in must be gone too.
    #[test]
    fn the_probe_dies_with_its_process() {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(fake) = std::env::var("REMUS_PROBE_CHILD_QEMU") {
            let _ = boot_probe(
                std::path::Path::new(&fake),
                "kvm",
                "host",
                "q35",
                Duration::from_secs(600),
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("qemu.pid");
        let fake = dir.path().join("qemu");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho $$ > {}.tmp\nmv {0}.tmp {0}\nexec sleep 600\n",
                pidfile.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kvm::tests::the_probe_dies_with_its_process",
                "--nocapture",
            ])
            .env("REMUS_PROBE_CHILD_QEMU", &fake)
            .spawn()
            .unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(30);
        let pid: i32 = loop {
            if let Ok(t) = std::fs::read_to_string(&pidfile) {
                break t.trim().parse().unwrap();
            }
            assert!(
                std::time::Instant::now() < until,
                "the stand-in QEMU never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // A pidfd becomes readable when the process ends (a zombie its
        // new parent has yet to reap counts as ended).
        // SAFETY: pidfd_open takes a pid and flags; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let mut pfd = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        if ready != 1 {
            // SAFETY: kill has no preconditions; this test started it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(pidfd) };
        assert_eq!(
            ready, 1,
            "the probe's QEMU outlived the process that ran the probe"
        );
    }
}
