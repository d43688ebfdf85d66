//! `diskload DEVICE [--region-mb 48] [--offset-mb 1]`: a block-device
//! workload whose every acknowledged write can be checked later, for
//! failover tests (guest memory and disk restored to the same checkpoint
//! must agree on how far the writer got).
//!
//! Writes 4 KiB records with O_DIRECT, one at a time, record k (k = 1, 2,
//! ...) at byte `offset + (k-1) * 4096`, and keeps `done` = the last k whose
//! `pwrite` returned. A record ([`encode`]): magic `RMSDLOAD`, run id (u64 LE,
//! random per process start), seq k (u64 LE), a payload derived from
//! (run, k), and a CRC-32C (LE) of everything before it in the last 4 bytes.
//!
//! Console lines (stdout):
//! * `diskload: run RUNID on DEVICE, region N records` at start (RUNID:
//!   16 hex digits; N is cut down to what fits on the device);
//! * `diskload: done K` about once a second (also once the region is full);
//! * `diskload: region full at K` once, when all N records are written
//!   (writing stops; verify can still be triggered);
//! * `diskload: error: ...` on a write error (then the program exits).
//!
//! Verification: before each record the writer checks whether
//! [`VERIFY_TRIGGER`] exists. If it does, it removes it, reads the region
//! back with O_DIRECT and prints exactly one line, `diskload verify ok: N
//! records` or `diskload verify FAILED: <what> at seq K (...)`; then it
//! carries on writing. Checked: records 1..=done are this run's, with the
//! right seq, checksum and payload; none of the next [`BEYOND_CHECKED`]
//! slots after `done` (within the region) holds a record of this run, i.e.
//! no write beyond what the writer saw complete reached the disk.

use crate::disk_probe::{Aligned, open_direct, random_value};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

pub const BLOCK: usize = 4096;
pub const MAGIC: &[u8; 8] = b"RMSDLOAD";
const RUN_AT: usize = 8;
const SEQ_AT: usize = 16;
const PAYLOAD_AT: usize = 24;
/// Where the CRC-32C (of bytes `..CRC_AT`) goes.
pub const CRC_AT: usize = BLOCK - 4;
/// The file whose existence triggers a verification.
pub const VERIFY_TRIGGER: &str = "/run/diskload.verify";
/// How many slots after `done` must not hold a record of this run.
pub const BEYOND_CHECKED: u64 = 256;
/// Records per read while verifying.
const READ_CHUNK: usize = 64;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
struct Args {
    device: String,
    region_mb: u64,
    offset_mb: u64,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let a = parse_args(args)?;
    let dev = Device::open(&a.device, a.offset_mb * MIB)?;
    let size = dev
        .size()
        .map_err(|e| format!("size of {}: {e}", a.device))?;
    let fits = size.saturating_sub(dev.offset) / BLOCK as u64;
    let region = (a.region_mb * MIB / BLOCK as u64).min(fits);
    if region == 0 {
        return Err(format!(
            "{} ({size} bytes) has no room for records after offset {} MiB",
            a.device, a.offset_mb
        ));
    }
    let run = random_value().max(1);
    say(&format!(
        "diskload: run {run:016x} on {}, region {region} records",
        a.device
    ));
    if !dev.direct {
        say("diskload: O_DIRECT refused; writing with O_DSYNC through the page cache");
    }

    let trigger = Path::new(VERIFY_TRIGGER);
    let mut block = Aligned::new(BLOCK);
    let mut chunk = Aligned::new(READ_CHUNK * BLOCK);
    let mut done = 0u64;
    let mut full_said = false;
    let mut report_at = Instant::now() + Duration::from_secs(1);
    loop {
        if trigger.exists() {
            let _ = std::fs::remove_file(trigger);
            say(&verify_line(verify(
                |seq, buf| dev.read(seq, buf),
                chunk.as_mut_slice(),
                run,
                done,
                region,
            )));
        }
        if done < region {
            let seq = done + 1;
            encode(run, seq, block.as_mut_slice());
            if let Err(e) = dev.write(seq, block.as_slice()) {
                let msg = format!("write of seq {seq} to {}: {e}", a.device);
                say(&format!("diskload: error: {msg}"));
                return Err(msg);
            }
            done = seq;
        } else {
            if !full_said {
                say(&format!("diskload: region full at {done}"));
                full_said = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let now = Instant::now();
        if now >= report_at {
            say(&format!("diskload: done {done}"));
            report_at = now + Duration::from_secs(1);
        }
    }
}

/// The one console line for a verification result.
pub fn verify_line(r: Result<u64, String>) -> String {
    match r {
        Ok(n) => format!("diskload verify ok: {n} records"),
        Err(e) => format!("diskload verify FAILED: {e}"),
    }
}

/// Prints a line to the console; output errors are ignored (the workload
/// carries on without a console).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut region_mb = 48;
    let mut offset_mb = 1;
    let pos = crate::options::parse(
        args,
        &mut [
            ("--region-mb", &mut region_mb),
            ("--offset-mb", &mut offset_mb),
        ],
        &mut [],
    )?;
    let [device] = pos.as_slice() else {
        return Err("usage: diskload DEVICE [--region-mb 48] [--offset-mb 1]".into());
    };
    if region_mb == 0 {
        return Err("--region-mb must be > 0".into());
    }
    if region_mb > 1 << 30 || offset_mb > 1 << 30 {
        return Err("--region-mb and --offset-mb must be at most 2^30".into());
    }
    Ok(Args {
        device: device.clone(),
        region_mb,
        offset_mb,
    })
}

/// The block device (or file), opened for O_DIRECT I/O when it allows it.
struct Device {
    file: File,
    /// Byte offset of record 1.
    offset: u64,
    direct: bool,
}

impl Device {
    fn open(path: &str, offset: u64) -> Result<Device, String> {
        // Without O_DIRECT, O_DSYNC keeps every record durable when written.
        let (file, direct) = open_direct(path, libc::O_DSYNC)?;
        Ok(Device {
            file,
            offset,
            direct,
        })
    }

    fn size(&self) -> std::io::Result<u64> {
        (&self.file).seek(SeekFrom::End(0))
    }

    fn at(&self, seq: u64) -> u64 {
        self.offset + (seq - 1) * BLOCK as u64
    }

    /// Writes one record (an aligned BLOCK) into slot `seq`.
    fn write(&self, seq: u64, block: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(block, self.at(seq))
    }

    /// Reads `buf.len() / BLOCK` slots starting at `seq` (buf aligned).
    fn read(&self, seq: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, self.at(seq))
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C of `data` (as iSCSI, ext4, ...: init and final xor 0xffffffff).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payload of record (run, seq), filling `out`.
fn fill_payload(run: u64, seq: u64, out: &mut [u8]) {
    let mut state = run ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    for chunk in out.chunks_mut(8) {
        let v = splitmix64(&mut state).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Writes record (run, seq) into `block` (BLOCK bytes).
pub fn encode(run: u64, seq: u64, block: &mut [u8]) {
    assert_eq!(block.len(), BLOCK, "a record is one block");
    block[..RUN_AT].copy_from_slice(MAGIC);
    block[RUN_AT..SEQ_AT].copy_from_slice(&run.to_le_bytes());
    block[SEQ_AT..PAYLOAD_AT].copy_from_slice(&seq.to_le_bytes());
    fill_payload(run, seq, &mut block[PAYLOAD_AT..CRC_AT]);
    let crc = crc32c(&block[..CRC_AT]);
    block[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

/// What a slot on the disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A record with a good checksum.
    Record { run: u64, seq: u64 },
    /// No record magic (never written by diskload, e.g. zeros).
    Empty,
    /// The magic, but a checksum that does not match (torn or corrupted).
    BadChecksum,
}

/// Classifies one BLOCK read from the disk.
pub fn decode(block: &[u8]) -> Slot {
    if block.len() != BLOCK || &block[..RUN_AT] != MAGIC {
        return Slot::Empty;
    }
    let stored = u32::from_le_bytes(block[CRC_AT..].try_into().expect("4 bytes"));
    if crc32c(&block[..CRC_AT]) != stored {
        return Slot::BadChecksum;
    }
    let u64_at = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
    Slot::Record {
        run: u64_at(RUN_AT),
        seq: u64_at(SEQ_AT),
    }
}

/// Ok if `block` is exactly record (run, seq); else what is wrong with it.
pub fn check(block: &[u8], run: u64, seq: u64) -> Result<(), String> {
    match decode(block) {
        Slot::Empty => Err("missing record".into()),
        Slot::BadChecksum => Err("bad checksum".into()),
        Slot::Record { run: r, .. } if r != run => Err(format!("record of another run {r:016x}")),
        Slot::Record { seq: s, .. } if s != seq => Err(format!("record with seq {s}")),
        Slot::Record { .. } => {
            let mut want = vec![0u8; CRC_AT - PAYLOAD_AT];
            fill_payload(run, seq, &mut want);
            if block[PAYLOAD_AT..CRC_AT] == want[..] {
                Ok(())
            } else {
                Err("wrong payload".into())
            }
        }
    }
}

/// Verifies the region: slots 1..=done hold records (run, k), and none of
/// the next [`BEYOND_CHECKED`] slots (up to `region`) holds a record of
/// `run`. `read(seq, buf)` fills `buf` with the slots from `seq` on; `buf`
/// (a multiple of BLOCK, aligned for O_DIRECT) is the read buffer.
/// Ok(done), or the first problem (with its seq) and how many slots have one.
pub fn verify(
    mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    buf: &mut [u8],
    run: u64,
    done: u64,
    region: u64,
) -> Result<u64, String> {
    let per = (buf.len() / BLOCK) as u64;
    assert!(per > 0, "verify needs a buffer of at least one block");
    let last = region.min(done + BEYOND_CHECKED).max(done);
    let (mut bad, mut first_bad) = (0u64, None);
    let (mut beyond, mut first_beyond) = (0u64, None);
    let mut seq = 1;
    while seq <= last {
        let n = per.min(last - seq + 1);
        let chunk = &mut buf[..n as usize * BLOCK];
        read(seq, chunk).map_err(|e| format!("read error at seq {seq}: {e}"))?;
        for (i, block) in chunk.chunks(BLOCK).enumerate() {
            let k = seq + i as u64;
            if k <= done {
                if let Err(what) = check(block, run, k) {
                    bad += 1;
                    first_bad.get_or_insert_with(|| format!("{what} at seq {k}"));
                }
            } else if let Slot::Record { run: r, seq: s } = decode(block)
                && r == run
            {
                beyond += 1;
                first_beyond.get_or_insert_with(|| {
                    format!("record {s} of this run beyond done {done} at seq {k}")
                });
            }
        }
        seq += n;
    }
    if let Some(what) = first_bad {
        return Err(format!("{what} ({bad} of {done} records bad)"));
    }
    if let Some(what) = first_beyond {
        return Err(format!(
            "{what} ({beyond} of the {} slots after done hold one)",
            last - done
        ));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u64 = 0x0123_4567_89ab_cdef;

    fn record(run: u64, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        encode(run, seq, &mut b);
        b
    }

    /// An in-memory region of `slots` blocks with records 1..=n of `run`.
    fn image(slots: u64, run: u64, n: u64) -> Vec<u8> {
        let mut img = vec![0u8; slots as usize * BLOCK];
        for k in 1..=n {
            let at = (k - 1) as usize * BLOCK;
            encode(run, k, &mut img[at..at + BLOCK]);
        }
        img
    }

    fn verify_image(img: &[u8], run: u64, done: u64) -> Result<u64, String> {
        let region = (img.len() / BLOCK) as u64;
        let mut buf = vec![0u8; 3 * BLOCK]; // odd chunking on purpose
        verify(
            |seq, b| {
                let at = (seq - 1) as usize * BLOCK;
                b.copy_from_slice(&img[at..at + b.len()]);
                Ok(())
            },
            &mut buf,
            run,
            done,
            region,
        )
    }

    #[test]
    fn crc32c_known_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn record_round_trips() {
        let b = record(RUN, 42);
        assert!(b.starts_with(MAGIC));
        assert_eq!(decode(&b), Slot::Record { run: RUN, seq: 42 });
        assert_eq!(check(&b, RUN, 42), Ok(()));
        assert_ne!(b, record(RUN, 43), "payload depends on seq");
        assert_ne!(
            b[PAYLOAD_AT..CRC_AT],
            record(RUN ^ 1, 42)[PAYLOAD_AT..CRC_AT]
        );
        assert_eq!(check(&b, RUN, 41), Err("record with seq 42".into()));
    }

    #[test]
    fn any_corrupted_byte_fails() {
        let good = record(RUN, 7);
        for at in [
            0,
            7,
            RUN_AT,
            SEQ_AT + 3,
            PAYLOAD_AT,
            2000,
            CRC_AT - 1,
            CRC_AT,
            BLOCK - 1,
        ] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            let e = check(&b, RUN, 7).unwrap_err();
            if at < RUN_AT {
                assert_eq!(decode(&b), Slot::Empty, "byte {at}");
                assert_eq!(e, "missing record");
            } else {
                assert_eq!(decode(&b), Slot::BadChecksum, "byte {at}");
                assert_eq!(e, "bad checksum");
            }
        }
        assert_eq!(decode(&[0u8; BLOCK]), Slot::Empty);
    }

    #[test]
    fn foreign_run_is_recognised() {
        let other = 0xfeed_0000_0000_0001;
        let b = record(other, 5);
        assert_eq!(decode(&b), Slot::Record { run: other, seq: 5 });
        assert_eq!(
            check(&b, RUN, 5),
            Err("record of another run feed000000000001".into())
        );
    }

    #[test]
    fn verify_good_region() {
        let img = image(400, RUN, 100);
        assert_eq!(verify_image(&img, RUN, 100), Ok(100));
        let e = verify_image(&img, RUN, 0).unwrap_err();
        assert!(e.contains("beyond done 0"), "{e}");
        // Full region: nothing after done to check.
        let full = image(50, RUN, 50);
        assert_eq!(verify_image(&full, RUN, 50), Ok(50));
        assert_eq!(verify_line(Ok(50)), "diskload verify ok: 50 records");
    }

    #[test]
    fn verify_finds_missing_corrupt_and_foreign_records() {
        let mut img = image(400, RUN, 100);
        let at = 49 * BLOCK; // seq 50
        img[at + 100] ^= 1;
        img[60 * BLOCK..61 * BLOCK].copy_from_slice(&record(RUN ^ 2, 61));
        let e = verify_image(&img, RUN, 100).unwrap_err();
        assert_eq!(e, "bad checksum at seq 50 (2 of 100 records bad)");
        assert_eq!(
            verify_line(Err(e)),
            "diskload verify FAILED: bad checksum at seq 50 (2 of 100 records bad)"
        );
        // Done ahead of the disk: the missing records are found.
        let img = image(400, RUN, 100);
        assert_eq!(
            verify_image(&img, RUN, 103).unwrap_err(),
            "missing record at seq 101 (3 of 103 records bad)"
        );
    }

    #[test]
    fn verify_finds_writes_beyond_done() {
        let img = image(400, RUN, 100);
        assert_eq!(
            verify_image(&img, RUN, 98).unwrap_err(),
            "record 99 of this run beyond done 98 at seq 99 (2 of the 256 slots after done hold one)"
        );
        // Records of another run (a previous boot) beyond done are fine ...
        let mut img = image(400, RUN ^ 3, 200);
        img[..50 * BLOCK].copy_from_slice(&image(50, RUN, 50));
        assert_eq!(verify_image(&img, RUN, 50), Ok(50));
        // ... and only BEYOND_CHECKED slots are looked at.
        let mut img = image(400, RUN, 10);
        let far = (10 + BEYOND_CHECKED) as usize * BLOCK;
        img[far..far + BLOCK].copy_from_slice(&record(RUN, 999));
        assert_eq!(verify_image(&img, RUN, 10), Ok(10));
        let near = (10 + BEYOND_CHECKED - 1) as usize * BLOCK;
        img[near..near + BLOCK].copy_from_slice(&record(RUN, 998));
        assert!(
            verify_image(&img, RUN, 10)
                .unwrap_err()
                .contains("at seq 266")
        );
    }

    #[test]
    fn device_writes_and_verifies_on_a_file() {
        let path = std::env::temp_dir().join(format!("remus-diskload-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 2 << 20]).unwrap();
        let dev = Device::open(path.to_str().unwrap(), 1 << 20).unwrap();
        assert_eq!(dev.size().unwrap(), 2 << 20);
        let mut block = Aligned::new(BLOCK);
        for k in 1..=20 {
            encode(RUN, k, block.as_mut_slice());
            dev.write(k, block.as_slice()).unwrap();
        }
        let mut chunk = Aligned::new(READ_CHUNK * BLOCK);
        let r = verify(|s, b| dev.read(s, b), chunk.as_mut_slice(), RUN, 20, 256);
        let on_disk = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r, Ok(20));
        assert_eq!(&on_disk[1 << 20..(1 << 20) + 8], MAGIC);
        assert!(on_disk[..1 << 20].iter().all(|&b| b == 0));
    }

    #[test]
    fn args() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_args(&s(&["/dev/vda"])),
            Ok(Args {
                device: "/dev/vda".into(),
                region_mb: 48,
                offset_mb: 1
            })
        );
        let a = parse_args(&s(&["/dev/vdb", "--region-mb", "8", "--offset-mb=0"])).unwrap();
        assert_eq!((a.region_mb, a.offset_mb), (8, 0));
        assert!(parse_args(&s(&[])).is_err());
        assert!(parse_args(&s(&["/dev/vda", "/dev/vdb"])).is_err());
        assert!(parse_args(&s(&["/dev/vda", "--region-mb", "0"])).is_err());
        assert!(parse_args(&s(&["/dev/vda", "--bogus", "1"])).is_err());
    }
}
