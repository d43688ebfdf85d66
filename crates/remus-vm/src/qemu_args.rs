//! The QEMU command line of a Remus-ready VM (DESIGN 3.1, 3.5, 3.6).
//!
//! Everything that checkpointing relies on is fixed here, in one place:
//! guest RAM in a shared memory-backend-file (so the agent can read and
//! write guest pages), QMP on a unix socket, the serial console on a unix
//! socket with a log, no default devices, no VGA, no NIC option ROMs, disks
//! from the agent's NBD server and NICs from the agent's frame relay.
//! The function is pure so that tests can check the exact arguments.

use std::path::PathBuf;

use remus_config::{Machine, VmConfig};

use crate::paths::VmPaths;

/// The accelerator after `auto` has been resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    Tcg,
    Kvm,
}

impl ResolvedAccel {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedAccel::Tcg => "tcg",
            ResolvedAccel::Kvm => "kvm",
        }
    }
}

/// CPU model under TCG when the config names none.
pub const DEFAULT_TCG_CPU: &str = "max";
/// CPU model under KVM when the config names none.
pub const DEFAULT_KVM_CPU: &str = "host";

/// The disk, NIC and console connections are QEMU's clients of sockets
/// the agent serves; QEMU outlives an agent restart (see
/// `Vm::detach`) and connects again to the next agent:
///
/// - disks: while the agent is away, QEMU holds the guest's requests for
///   up to this many seconds and re-sends them once reconnected (only
///   after that would the guest see I/O errors);
pub const NBD_RECONNECT_DELAY_S: u32 = 60;
/// - NICs and the console: QEMU tries again this often (frames and console
///   output while nobody listens are dropped, as on a cable pulled out).
pub const RECONNECT_MS: u32 = 200;

/// Everything needed to build the command line besides the config.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub config: &'a VmConfig,
    pub paths: &'a VmPaths,
    /// Guest RAM file (shared with the agent).
    pub ram_file: PathBuf,
    pub accel: ResolvedAccel,
    /// Start with `-incoming defer` (a standby waiting for state).
    pub incoming: bool,
    /// The standby loads device-only state ([`crate::devstate`]): QEMU
    /// expects no configuration section, and stays paused after the load
    /// (`-S`; such a stream says the guest was running).
    pub devices_only_state: bool,
    /// UEFI firmware: (read-only code, this VM's variable store).
    pub uefi: Option<(PathBuf, PathBuf)>,
}

/// Builds QEMU's argument list (without the program name).
pub fn qemu_args(l: &Launch<'_>) -> Vec<String> {
    let c = l.config;
    let p = l.paths;
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    let mem = format!("{}M", c.memory);

    push(&["-name", &format!("{},debug-threads=on", c.name)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // Keep QEMU (and its state) when the guest powers off: `list` shows
    // it as shut down (`s`) until it is destroyed, as xl does.
    push(&["-no-shutdown"]);
    // QEMU's seccomp filter: the guest-facing process may not use obsolete
    // system calls, gain privileges, start programs or change scheduling
    // and resource limits (the agent pins vCPUs from outside). As libvirt
    // does with `seccomp_sandbox`.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    push(&["-accel", l.accel.as_str()]);
    let cpu = c.cpu.clone().unwrap_or_else(|| match l.accel {
        ResolvedAccel::Tcg => DEFAULT_TCG_CPU.into(),
        ResolvedAccel::Kvm => DEFAULT_KVM_CPU.into(),
    });
    push(&["-cpu", &cpu]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=ram0,size={mem},mem-path={},share=on",
            l.ram_file.display()
        ),
    ]);
    let machine = match c.machine {
        Machine::Q35 => "q35",
        Machine::Microvm => "microvm",
    };
    push(&["-machine", &format!("{machine},memory-backend=ram0")]);
    push(&["-m", &mem, "-smp", &c.vcpus.to_string()]);

    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            p.qmp_socket().display()
        ),
        "-mon",
        "chardev=qmp0,mode=control",
    ]);
    // QEMU connects to the agent's console hub while it initialises (see
    // console.rs: a server-side chardev would drop output nobody reads).
    push(&[
        "-chardev",
        &format!(
            "socket,id=con0,path={},server=off,reconnect-ms={RECONNECT_MS}",
            p.console_socket().display(),
        ),
        "-serial",
        "chardev:con0",
    ]);

    if let Some(k) = &c.kernel {
        push(&["-kernel", &k.display().to_string()]);
    }
    if let Some((code, vars)) = &l.uefi {
        // The code read-only; the variables in a store of the VM's own.
        // Both are RAM-backed in QEMU, so their contents travel in the
        // device state of every checkpoint.
        let esc = |p: &PathBuf| p.display().to_string().replace(',', ",,");
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", esc(code)),
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", esc(vars)),
        ]);
    }
    if let Some(i) = &c.initrd {
        push(&["-initrd", &i.display().to_string()]);
    }
    if !c.cmdline.is_empty() {
        push(&["-append", &c.cmdline]);
    }

    let (blk, net) = match c.machine {
        Machine::Q35 => ("virtio-blk-pci", "virtio-net-pci"),
        Machine::Microvm => ("virtio-blk-device", "virtio-net-device"),
    };
    for (i, d) in c.disks_in_order().into_iter().enumerate() {
        let node = format!("disk-{}", d.target);
        // Without a kernel the firmware boots from the first disk.
        let boot = if c.kernel.is_none() && i == 0 {
            ",bootindex=0"
        } else {
            ""
        };
        push(&[
            "-blockdev",
            &format!(
                "driver=nbd,node-name={node},server.type=unix,server.path={},export={},reconnect-delay={NBD_RECONNECT_DELAY_S}{}",
                p.disk_socket(&d.target).display(),
                d.target,
                if d.readonly { ",read-only=on" } else { "" }
            ),
            "-device",
            &format!("{blk},drive={node},id=dev-{}{boot}", d.target),
        ]);
    }
    for (i, _) in c.vifs.iter().enumerate() {
        let id = format!("net{i}");
        let rom = if c.machine == Machine::Q35 {
            ",romfile="
        } else {
            ""
        };
        push(&[
            "-netdev",
            &format!(
                "stream,id={id},server=off,addr.type=unix,addr.path={},reconnect-ms={RECONNECT_MS}",
                p.vif_socket(i).display()
            ),
            "-device",
            &format!("{net},netdev={id},mac={}{rom},id=dev-{id}", c.vif_mac(i)),
        ]);
    }
    if l.incoming {
        push(&["-incoming", "defer"]);
    }
    if l.devices_only_state {
        push(&["-global", "migration.send-configuration=off", "-S"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> VmConfig {
        VmConfig::from_toml_str(
            &format!(
                "name = \"t\"\nmemory = 256\nvcpus = 2\nkernel = \"/k\"\ninitrd = \"/i\"\ncmdline = \"console=ttyS0\"\n{extra}"
            ),
            Path::new("/"),
        )
        .unwrap()
    }

    fn joined(c: &VmConfig, accel: ResolvedAccel, incoming: bool) -> String {
        joined_as(c, accel, incoming, false)
    }

    fn joined_as(
        c: &VmConfig,
        accel: ResolvedAccel,
        incoming: bool,
        devices_only_state: bool,
    ) -> String {
        let paths = VmPaths::new(Path::new("/s/vms/t"));
        qemu_args(&Launch {
            config: c,
            paths: &paths,
            ram_file: "/dev/shm/t.ram".into(),
            accel,
            incoming,
            devices_only_state,
            uefi: None,
        })
        .join(" ")
    }

    #[test]
    fn a_standby_for_device_only_state_expects_no_configuration_and_stays_paused() {
        let c = cfg("");
        let a = joined_as(&c, ResolvedAccel::Tcg, true, true);
        assert!(
            a.contains("-incoming defer -global migration.send-configuration=off -S"),
            "{a}"
        );
        // The full stream's standby, and any VM that runs, as before.
        for a in [
            joined(&c, ResolvedAccel::Tcg, true),
            joined(&c, ResolvedAccel::Tcg, false),
        ] {
            assert!(
                !a.contains("send-configuration") && !a.contains(" -S"),
                "{a}"
            );
        }
    }

    #[test]
    fn remus_layout_is_fixed() {
        let c = cfg(
            "[[disk]]\npath = \"/d.img\"\ntarget = \"vdb\"\n[[disk]]\npath = \"/c.img\"\ntarget = \"vda\"\nreadonly = true\n[[vif]]\nbridge = \"br0\"\nmac = \"52:54:00:00:00:01\"\n",
        );
        let a = joined(&c, ResolvedAccel::Tcg, false);
        for want in [
            "-nodefaults",
            "-display none",
            "memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/t.ram,share=on",
            "-machine q35,memory-backend=ram0",
            "-accel tcg",
            "-cpu max",
            "-smp 2",
            "path=/s/vms/t/qmp.sock,server=on,wait=off",
            // QEMU connects again to an agent that restarted.
            "socket,id=con0,path=/s/vms/t/console.sock,server=off,reconnect-ms=200",
            "server.path=/s/vms/t/disk-vda.sock,export=vda,reconnect-delay=60,read-only=on",
            "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,romfile=",
            "addr.path=/s/vms/t/vif0.sock,reconnect-ms=200",
        ] {
            assert!(a.contains(want), "missing '{want}' in {a}");
        }
        // Disks are attached in target order, whatever the file order.
        assert!(a.find("export=vda").unwrap() < a.find("export=vdb").unwrap());
        assert!(!a.contains("-incoming"));
        assert!(!a.contains("-vga") && !a.contains("-device VGA"));
    }

    #[test]
    fn without_a_kernel_the_firmware_boots_the_first_disk() {
        let c = VmConfig::from_toml_str(
            "name = \"t\"\nmemory = 256\n[[disk]]\npath = \"/d.img\"\ntarget = \"vdb\"\n[[disk]]\npath = \"/c.img\"\ntarget = \"vda\"\n",
            Path::new("/"),
        )
        .unwrap();
        let a = joined(&c, ResolvedAccel::Tcg, false);
        assert!(!a.contains("-kernel") && !a.contains("-append"), "{a}");
        assert!(a.contains("drive=disk-vda,id=dev-vda,bootindex=0"), "{a}");
        assert_eq!(a.matches("bootindex").count(), 1, "{a}");
        assert!(!a.contains("pflash"), "SeaBIOS by default: {a}");
        // With a kernel nothing is marked bootable.
        let k = cfg("[[disk]]\npath = \"/d.img\"\ntarget = \"vda\"\n");
        assert!(!joined(&k, ResolvedAccel::Tcg, false).contains("bootindex"));
        // UEFI: the code read-only, the VM's own variable store.
        let paths = VmPaths::new(Path::new("/s/vms/t"));
        let a = qemu_args(&Launch {
            config: &c,
            paths: &paths,
            ram_file: "/dev/shm/t.ram".into(),
            accel: ResolvedAccel::Tcg,
            incoming: false,
            devices_only_state: false,
            uefi: Some(("/fw/CODE.fd".into(), "/s/vms/t/uefi-vars.fd".into())),
        })
        .join(" ");
        assert!(
            a.contains("if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd")
                && a.contains("if=pflash,format=raw,unit=1,file=/s/vms/t/uefi-vars.fd"),
            "{a}"
        );
    }

    #[test]
    fn microvm_uses_mmio_devices_and_kvm_host_cpu() {
        let c = cfg(
            "machine = \"microvm\"\n[[disk]]\npath = \"/d.img\"\ntarget = \"vda\"\n[[vif]]\nbridge = \"br0\"\n",
        );
        let a = joined(&c, ResolvedAccel::Kvm, true);
        assert!(a.contains("virtio-blk-device"), "{a}");
        assert!(a.contains("virtio-net-device"), "{a}");
        assert!(!a.contains("romfile"), "{a}");
        assert!(a.contains("-accel kvm -cpu host"), "{a}");
        assert!(a.ends_with("-incoming defer"), "{a}");
    }
}
