//! `--from-libvirt` on domain definitions shaped like `virsh dumpxml`
//! output: what carries over, what is noted, what is refused.

use std::path::{Path, PathBuf};

use remus_config::libvirt::{LibvirtError, from_libvirt_xml};
use remus_config::{DiskFormat, Firmware, Machine};

/// What virt-manager makes for a Debian guest on q35 (trimmed of
/// addresses), with a bridged NIC.
const VIRT_MANAGER_Q35: &str = r#"
<domain type='kvm'>
  <name>debian12</name>
  <uuid>6f1c1f6e-2b1c-4a59-9a53-0a1c1c9f0e11</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/><vmport state='off'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/debian12.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <interface type='bridge'>
      <mac address='52:54:00:3a:1b:7c'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='tablet' bus='usb'/>
    <input type='mouse' bus='ps2'/>
    <graphics type='spice' autoport='yes'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
"#;

#[test]
fn a_virt_manager_domain_converts_with_notes() {
    let c = from_libvirt_xml(VIRT_MANAGER_Q35, Path::new("/")).unwrap();
    let v = &c.config;
    assert_eq!(v.name, "debian12");
    assert_eq!((v.memory, v.vcpus), (2048, 2));
    assert_eq!(v.machine, Machine::Q35);
    assert_eq!((v.kernel.as_ref(), v.firmware), (None, Firmware::Bios));
    assert_eq!(v.disks.len(), 1);
    let d = &v.disks[0];
    assert_eq!(
        (d.path.as_path(), d.format, d.target.as_str(), d.readonly),
        (
            Path::new("/var/lib/libvirt/images/debian12.qcow2"),
            DiskFormat::Qcow2,
            "vda",
            false
        )
    );
    assert_eq!(v.vifs.len(), 1);
    assert_eq!(v.vifs[0].bridge, "br0");
    assert_eq!(v.vif_mac(0).to_string(), "52:54:00:3a:1b:7c");
    let notes = c.notes.join("\n");
    for want in [
        "empty cdrom drive sda dropped",
        "graphics dropped",
        "video dropped",
        "channel dropped",
        "memballoon dropped",
        "rng dropped",
        "input device (tablet) dropped",
    ] {
        assert!(notes.contains(want), "missing note '{want}' in:\n{notes}");
    }
    // It round-trips through the TOML remus reads.
    let toml = toml::to_string(v).unwrap();
    let back = remus_config::VmConfig::from_toml_str(&toml, Path::new("/")).unwrap();
    assert_eq!(&back, v);
}

#[test]
fn uefi_sata_and_raw_carry_over_with_the_disk_renamed() {
    let xml = r#"<domain type='kvm'>
  <name>win-like</name>
  <memory unit='GiB'>4</memory>
  <vcpu>4</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='images/sys.img'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/data.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <source bridge='lan0'/>
      <model type='e1000e'/>
    </interface>
  </devices>
</domain>"#;
    let c = from_libvirt_xml(xml, Path::new("/etc/vms")).unwrap();
    let v = &c.config;
    assert_eq!((v.memory, v.vcpus, v.firmware), (4096, 4, Firmware::Uefi));
    let disks: Vec<(PathBuf, &str, DiskFormat, bool)> = v
        .disks
        .iter()
        .map(|d| (d.path.clone(), d.target.as_str(), d.format, d.readonly))
        .collect();
    // The virtio disk keeps vda; the SATA one becomes the next free name,
    // with its relative path resolved.
    assert_eq!(
        disks,
        vec![
            (
                PathBuf::from("/etc/vms/images/sys.img"),
                "vdb",
                DiskFormat::Raw,
                false
            ),
            (
                PathBuf::from("/srv/data.qcow2"),
                "vda",
                DiskFormat::Qcow2,
                true
            ),
        ]
    );
    let notes = c.notes.join("\n");
    assert!(
        notes.contains("disk sda (sata) becomes virtio disk vdb"),
        "{notes}"
    );
    assert!(notes.contains("(e1000e) becomes virtio-net"), "{notes}");
    assert!(notes.contains("UEFI"), "{notes}");
}

#[test]
fn direct_kernel_boot_carries_over() {
    let xml = r#"<domain type='kvm'>
  <name>appliance</name>
  <memory unit='MiB'>256</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <kernel>/boot/vmlinuz</kernel>
    <initrd>/boot/initrd.img</initrd>
    <cmdline>console=ttyS0 root=/dev/vda</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/srv/app.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"#;
    let v = from_libvirt_xml(xml, Path::new("/")).unwrap().config;
    assert_eq!(v.kernel.as_deref(), Some(Path::new("/boot/vmlinuz")));
    assert_eq!(v.initrd.as_deref(), Some(Path::new("/boot/initrd.img")));
    assert_eq!(v.cmdline, "console=ttyS0 root=/dev/vda");
    assert_eq!((v.memory, v.vcpus), (256, 1));
}

#[test]
fn what_remus_cannot_carry_is_refused_all_at_once() {
    let xml = r#"<domain type='kvm'>
  <name>workstation</name>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='vmdk'/>
      <source file='/srv/old.vmdk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/sdb'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:00:00:09'/>
      <source network='default'/>
    </interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
    </hostdev>
    <redirdev bus='usb' type='spicevmc'/>
    <sound model='ich9'/>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <filesystem type='mount'><source dir='/srv/share'/><target dir='share'/></filesystem>
  </devices>
</domain>"#;
    let e = from_libvirt_xml(xml, Path::new("/")).unwrap_err();
    let LibvirtError::Unsupported(items) = &e else {
        panic!("{e}")
    };
    let all = items.join("\n");
    for want in [
        "machine 'pc-i440fx-7.2'",
        "image format 'vmdk'",
        "disk vdb of type 'block'",
        "cdrom sda with media",
        "libvirt network 'default'",
        "host device passthrough (pci)",
        "USB redirection",
        "sound device (ich9)",
        "TPM",
        "shared host filesystem",
    ] {
        assert!(all.contains(want), "'{want}' not refused:\n{all}");
    }
    assert_eq!(items.len(), 10, "{all}");
    assert!(
        e.to_string()
            .starts_with("this domain cannot be protected by remus")
    );
}

#[test]
fn not_a_domain_is_a_parse_error() {
    for (xml, want) in [
        ("<network><name>x</name></network>", "not <domain>"),
        ("<domain><name>x</name>", "not a libvirt domain"),
        ("<domain><memory>1</memory><os/></domain>", "no <name>"),
        (
            "<domain><name>x</name><memory unit='KiB'>1000</memory><os/></domain>",
            "whole number of MiB",
        ),
    ] {
        let e = from_libvirt_xml(xml, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{xml}: {e}");
    }
}

#[test]
fn more_disks_than_virtio_names_are_refused_by_count() {
    let disks: String = (0..27)
        .map(|i| {
            format!(
                "<disk type='file' device='disk'><source file='/d{i}.img'/><target dev='sd{i}' bus='sata'/></disk>"
            )
        })
        .collect();
    let xml = format!(
        "<domain><name>many</name><memory unit='MiB'>256</memory><os><type machine='q35'>hvm</type></os><devices>{disks}</devices></domain>"
    );
    match from_libvirt_xml(&xml, Path::new("/")) {
        Err(LibvirtError::Unsupported(items)) => {
            assert_eq!(items, vec!["more than 26 disks".to_string()], "{items:?}")
        }
        other => panic!("27 disks must be refused by count: {other:?}"),
    }
    // 26 fit: vda..vdz.
    let xml = xml.replace("<disk type='file' device='disk'><source file='/d26.img'/><target dev='sd26' bus='sata'/></disk>", "");
    let c = from_libvirt_xml(&xml, Path::new("/")).unwrap();
    assert_eq!(c.config.disks.last().unwrap().target, "vdz");
}
