//! The guest of the KVM probe: a 16 KiB ELF that QEMU boots like a kernel
//! (`-kernel`, through the PVH entry that q35 and microvm both support)
//! and that does what every 64-bit guest does first: load page tables,
//! enable PAE and long mode, turn paging on, far-jump into a 64-bit code
//! segment; then what a kernel does next: change its live page tables
//! (with `lock cmpxchg16b`, as Linux's allocator does on its own data) and
//! use the new mappings; and last, from 64-bit code (RIP-relative loads),
//! write [`MARKER`] to COM1 and leave through `isa-debug-exit` with
//! [`EXIT_VALUE`].
//!
//! Why a hand-made image: the ioctl probe in `kvm.rs` runs one `hlt` in real
//! mode, which a nested, paravirtualised KVM passes while it fails every
//! Linux guest. Seen on such a host: Linux ran about a hundred times
//! slower than it should and then died with "KVM internal error.
//! Suberror: 1 ... emulation failure" on a `lock cmpxchg16b`; that is
//! shadow paging (no EPT/NPT), where writes to page-table pages are
//! emulated and KVM's emulator has no cmpxchg16b. Only guest code of that
//! kind, through the same QEMU, machine and firmware, tells. A real kernel is not at hand on an installed host, and
//! no assembler is needed: the few instructions below are written out as
//! bytes, each with its mnemonic, and the image is checked under TCG by the
//! unit test in `kvm.rs` (which is what proves the bytes right).
//!
//! Layout (physical = virtual, loaded at 1 MiB):
//!
//! ```text
//! 0x100000  code (32-bit entry, then 64-bit)
//! 0x100200  GDT: null, 64-bit code (selector 0x08), data (0x10)
//! 0x100220  GDTR for lgdt
//! 0x100240  the marker string, NUL-terminated
//! 0x101000  PML4   [0] -> PDPT
//! 0x102000  PDPT   [0] -> PD
//! 0x103000  PD     [0] -> 2 MiB page at 0 (identity, covers the code)
//! ```

/// What the probe guest writes to its serial port from 64-bit code.
pub const MARKER: &str = "remus-probe: long mode with paging ok\n";
/// The value written to `isa-debug-exit`; QEMU exits with `2 * v + 1`.
pub const EXIT_VALUE: u8 = 0x2a;
/// Written instead when a page-table change did not take effect.
pub const FAIL_VALUE: u8 = 0x15;
/// QEMU's exit status after the guest wrote [`EXIT_VALUE`].
pub const EXIT_STATUS: i32 = (EXIT_VALUE as i32) * 2 + 1;
/// The I/O port of the `isa-debug-exit` device the probe adds.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

const LOAD: u64 = 0x10_0000;
const SEG_OFFSET: usize = 0x1000;
const SEG_SIZE: usize = 0x4000;
const GDT: usize = 0x200;
const GDTR: usize = 0x220;
const MSG: usize = 0x240;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
/// The PVH note, in the file before the loaded segment.
const NOTE_OFFSET: usize = 0x100;
const NOTE_SIZE: usize = 24;

/// A few lines of machine code with labels for short jumps, so that no
/// jump offset is counted by hand.
struct Asm {
    code: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    /// (position of the rel8 byte, label it jumps to)
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn new() -> Asm {
        Asm {
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }
    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }
    fn emit32(&mut self, op: &[u8], imm: u32) {
        self.emit(op);
        self.emit(&imm.to_le_bytes());
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.code.len()));
    }
    /// A short jump (`opcode rel8`) to `label`.
    fn jump8(&mut self, opcode: u8, label: &'static str) {
        self.emit(&[opcode, 0]);
        self.fixups.push((self.code.len() - 1, label));
    }
    fn finish(mut self) -> Vec<u8> {
        for (at, name) in &self.fixups {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .expect("label defined");
            let rel = target as i64 - (*at as i64 + 1);
            self.code[*at] = i8::try_from(rel).expect("short jump") as u8;
        }
        self.code
    }
}

/// The loaded segment: code, GDT, marker, page tables.
fn segment() -> Vec<u8> {
    let mut s = vec![0u8; SEG_SIZE];
    let abs = |off: usize| LOAD as u32 + off as u32;
    let mut a = Asm::new();
    // 32-bit protected mode, paging off (the PVH entry state).
    a.emit(&[0xfa]); // cli
    a.emit(&[0xfc]); // cld
    a.emit32(&[0xb8], abs(PML4)); // mov eax, PML4
    a.emit(&[0x0f, 0x22, 0xd8]); // mov cr3, eax
    a.emit(&[0x0f, 0x20, 0xe0]); // mov eax, cr4
    a.emit(&[0x83, 0xc8, 0x20]); // or eax, 0x20 (PAE)
    a.emit(&[0x0f, 0x22, 0xe0]); // mov cr4, eax
    a.emit32(&[0xb9], 0xc000_0080); // mov ecx, EFER
    a.emit(&[0x0f, 0x32]); // rdmsr
    a.emit32(&[0x0d], 0x100); // or eax, LME
    a.emit(&[0x0f, 0x30]); // wrmsr
    a.emit(&[0x0f, 0x20, 0xc0]); // mov eax, cr0
    a.emit32(&[0x0d], 0x8000_0001); // or eax, PG | PE
    a.emit(&[0x0f, 0x22, 0xc0]); // mov cr0, eax
    a.emit32(&[0x0f, 0x01, 0x15], abs(GDTR)); // lgdt [GDTR]
    // jmp far 0x08:long64 (ptr16:32: offset, then selector)
    let long64 = a.code.len() + 7;
    a.emit32(&[0xea], abs(long64));
    a.emit(&[0x08, 0x00]);

    // 64-bit, paging on. Change the live page tables the way a kernel
    // does (a locked compare-and-exchange on its entries), then use the
    // new mappings: PD[2] maps 4 MiB and PD[3] maps 6 MiB, both onto the
    // physical 2 MiB at 6 MiB. Under shadow paging (a nested KVM without
    // EPT/NPT) every write to a page-table page traps into KVM's
    // instruction emulator, which cannot emulate cmpxchg16b: the guest
    // dies with "KVM internal error", as Linux does there.
    a.emit32(&[0xb8], 1); // mov eax, 1
    a.emit(&[0x0f, 0xa2]); // cpuid
    a.emit(&[0x0f, 0xba, 0xe1, 0x0d]); // bt ecx, 13 (CX16)
    a.jump8(0x73, "no_cx16"); // jnc no_cx16
    a.emit(&[0x31, 0xc0]); // xor eax, eax   } expected: both
    a.emit(&[0x31, 0xd2]); // xor edx, edx   } entries empty
    a.emit32(&[0xbb], 0x60_0083); // mov ebx, 6 MiB | PS | RW | P
    a.emit(&[0x89, 0xd9]); // mov ecx, ebx
    a.emit32(&[0xbf], abs(PD + 16)); // mov edi, &PD[2]
    a.emit(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]); // lock cmpxchg16b [rdi]
    a.jump8(0x75, "fail"); // jnz fail (the entries were not empty)
    a.jump8(0xeb, "mapped"); // jmp mapped
    a.label("no_cx16");
    a.emit32(&[0xbf], abs(PD + 16)); // mov edi, &PD[2]
    a.emit32(&[0xc7, 0x07], 0x60_0083); // mov dword [rdi], 6 MiB | PS | RW | P
    a.emit32(&[0xc7, 0x47, 0x08], 0x60_0083); // mov dword [rdi + 8], same
    a.label("mapped");
    a.emit32(&[0x0f, 0x01, 0x3c, 0x25], 0x40_0000); // invlpg [4 MiB]
    a.emit32(&[0x0f, 0x01, 0x3c, 0x25], 0x60_0000); // invlpg [6 MiB]
    a.emit32(&[0xbf], 0x40_0000); // mov edi, 4 MiB
    a.emit32(&[0xb8], 0x5a5a_a5a5); // mov eax, pattern
    a.emit(&[0x89, 0x07]); // mov [rdi], eax        (through PD[2])
    a.emit32(&[0x8b, 0x14, 0x25], 0x60_0000); // mov edx, [6 MiB] (through PD[3])
    a.emit(&[0x39, 0xd0]); // cmp eax, edx
    a.jump8(0x75, "fail"); // jne fail

    // Report from 64-bit code: RIP-relative addressing exists only here.
    let lea_end = a.code.len() + 7;
    a.emit(&[0x48, 0x8d, 0x35]); // lea rsi, [rip + MSG]
    a.emit(&((MSG as i64 - lea_end as i64) as i32).to_le_bytes());
    a.emit(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3F8 (COM1)
    a.label("print");
    a.emit(&[0xac]); // lodsb
    a.emit(&[0x84, 0xc0]); // test al, al
    a.jump8(0x74, "printed"); // jz printed
    a.emit(&[0xee]); // out dx, al
    a.jump8(0xeb, "print"); // jmp print
    a.label("printed");
    a.emit(&[0xb0, EXIT_VALUE]); // mov al, EXIT_VALUE
    a.jump8(0xeb, "exit"); // jmp exit
    a.label("fail");
    a.emit(&[0xb0, FAIL_VALUE]); // mov al, FAIL_VALUE
    a.label("exit");
    a.emit(&[0xe6, DEBUG_EXIT_PORT as u8]); // out DEBUG_EXIT_PORT, al
    a.label("halt"); // only reached without the exit device
    a.emit(&[0xfa, 0xf4]); // cli; hlt
    a.jump8(0xeb, "halt"); // jmp halt
    let code = a.finish();
    assert!(code.len() < GDT, "probe code overlaps its GDT");
    s[..code.len()].copy_from_slice(&code);

    let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        s[GDT + 8 * i..GDT + 8 * i + 8].copy_from_slice(&d.to_le_bytes());
    }
    s[GDTR..GDTR + 2].copy_from_slice(&((gdt.len() * 8 - 1) as u16).to_le_bytes());
    s[GDTR + 2..GDTR + 6].copy_from_slice(&abs(GDT).to_le_bytes());
    s[MSG..MSG + MARKER.len()].copy_from_slice(MARKER.as_bytes());

    let entry = |table: &mut [u8], at: usize, value: u64| {
        table[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    entry(&mut s, PML4, (LOAD + PDPT as u64) | 0x3); // present, writable
    entry(&mut s, PDPT, (LOAD + PD as u64) | 0x3);
    entry(&mut s, PD, 0x83); // present, writable, 2 MiB page at 0
    s
}

/// The whole ELF64 file: header, a PT_LOAD for the segment and a PT_NOTE
/// carrying the PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub fn image() -> Vec<u8> {
    let mut f = vec![0u8; SEG_OFFSET];
    let put = |f: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        f[at..at + bytes.len()].copy_from_slice(bytes);
    };
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    // ELF header.
    put(&mut f, 0, b"\x7fELF");
    put(&mut f, 4, &[2, 1, 1]); // 64-bit, little-endian, version 1
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut f, 20, &1u32.to_le_bytes()); // EV_CURRENT
    put(&mut f, 24, &LOAD.to_le_bytes()); // e_entry
    put(&mut f, 32, &(EHDR as u64).to_le_bytes()); // e_phoff
    put(&mut f, 52, &(EHDR as u16).to_le_bytes()); // e_ehsize
    put(&mut f, 54, &(PHDR as u16).to_le_bytes()); // e_phentsize
    put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
    put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize (no sections)

    let phdr = |f: &mut Vec<u8>, at: usize, p: [u64; 6], kind: u32, flags: u32| {
        put(f, at, &kind.to_le_bytes());
        put(f, at + 4, &flags.to_le_bytes());
        for (i, v) in p.iter().enumerate() {
            put(f, at + 8 + 8 * i, &v.to_le_bytes());
        }
    };
    let seg = SEG_SIZE as u64;
    // PT_LOAD, R+W+X: offset, vaddr, paddr, filesz, memsz, align.
    phdr(
        &mut f,
        EHDR,
        [SEG_OFFSET as u64, LOAD, LOAD, seg, seg, 0x1000],
        1,
        7,
    );
    // PT_NOTE, R.
    let n = NOTE_OFFSET as u64;
    let ns = NOTE_SIZE as u64;
    phdr(&mut f, EHDR + PHDR, [n, 0, 0, ns, ns, 4], 4, 4);
    // The note: namesz 4 ("Xen\0"), descsz 8, type 18, the entry address
    // as 8 bytes (readers take 4 or 8; the upper half is zero).
    put(&mut f, NOTE_OFFSET, &4u32.to_le_bytes());
    put(&mut f, NOTE_OFFSET + 4, &8u32.to_le_bytes());
    put(&mut f, NOTE_OFFSET + 8, &18u32.to_le_bytes());
    put(&mut f, NOTE_OFFSET + 12, b"Xen\0");
    put(&mut f, NOTE_OFFSET + 16, &LOAD.to_le_bytes());
    f.extend(segment());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_layout() {
        let img = image();
        assert_eq!(img.len(), SEG_OFFSET + SEG_SIZE);
        assert_eq!(&img[..4], b"\x7fELF");
        let seg = &img[SEG_OFFSET..];
        // The far jump lands on the byte after it.
        let jmp = seg.iter().position(|&b| b == 0xea).unwrap();
        let target = u32::from_le_bytes(seg[jmp + 1..jmp + 5].try_into().unwrap());
        assert_eq!(target as u64, LOAD + jmp as u64 + 7);
        // The RIP-relative lea points at the marker.
        let lea = seg
            .windows(3)
            .position(|w| w == [0x48, 0x8d, 0x35])
            .unwrap();
        let rel = i32::from_le_bytes(seg[lea + 3..lea + 7].try_into().unwrap());
        assert_eq!((lea as i64 + 7 + rel as i64) as usize, MSG);
        assert_eq!(&seg[MSG..MSG + MARKER.len()], MARKER.as_bytes());
        assert_eq!(seg[MSG + MARKER.len()], 0);
    }
}
