//! `channel_records`: the encrypted channel's record layer
//! (`remus_proto::channel`), the very code a replication connection runs,
//! over bytes that arrive from the network.
//!
//! Two kinds of input (the first byte's low bit):
//! - **raw**: the rest is what a peer without the key sends. Nothing may
//!   come out: the reader ends with an error (or a clean end when nothing
//!   arrived), never with plaintext.
//! - **sealed**: messages a real sender seals (lengths and fill bytes from
//!   the input, up to [`MAX_TOTAL`] bytes in all, so records of every size
//!   and multi-record writes occur), then one change on the way (a flipped
//!   bit, a cut, a dropped, repeated or swapped record, inserted bytes),
//!   then reads of sizes from the input (small ones take the buffered
//!   path, large ones decrypt straight into the caller's buffer).
//!
//! Asserted for sealed inputs: what comes out is exactly the plaintext of
//! the records that arrived unchanged before the first change, whole; then
//! the reader fails (altered, replayed, reordered or cut records) and
//! stays failed, unless the change only cut the stream at a record
//! boundary, which is a clean end (the frame layer above notices a cut
//! frame).

use std::io::ErrorKind;

use remus_proto::channel::fuzzing::{Receiver, Sender, pair};

use crate::Reader;

/// Most plaintext a sealed input makes the sender write.
pub const MAX_TOTAL: usize = 300_000;
/// The record header: a big-endian u16 length.
const LEN_PREFIX: usize = 2;
/// The AEAD tag in each record.
const TAG: usize = remus_proto::channel::TAG_LEN;

/// One change made to the sealed bytes on the way.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    None,
    FlipBit { at: u32, bit: u8 },
    CutAt(u32),
    DropRecord(u16),
    RepeatRecord(u16),
    SwapWithNext(u16),
    Insert { at: u32, byte: u8, count: u8 },
}

/// A sealed input, as the corpus generator writes it.
pub struct Sealed {
    /// (length, fill byte) of each message written.
    pub messages: Vec<(u32, u8)>,
    pub change: Change,
    /// Read sizes, used in turn.
    pub reads: Vec<u8>,
}

impl Sealed {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![1u8, self.messages.len() as u8];
        for &(len, fill) in &self.messages {
            v.extend(&len.to_be_bytes()[1..]);
            v.push(fill);
        }
        let (kind, a, b): (u8, u32, u16) = match self.change {
            Change::None => (0, 0, 0),
            Change::FlipBit { at, bit } => (1, at, u16::from(bit)),
            Change::CutAt(at) => (2, at, 0),
            Change::DropRecord(i) => (3, u32::from(i), 0),
            Change::RepeatRecord(i) => (4, u32::from(i), 0),
            Change::SwapWithNext(i) => (5, u32::from(i), 0),
            Change::Insert { at, byte, count } => (6, at, u16::from_be_bytes([byte, count])),
        };
        v.push(kind);
        v.extend(a.to_be_bytes());
        v.extend(b.to_be_bytes());
        v.extend(&self.reads);
        v
    }
}

/// The keys of both ends: fixed, so that a crash reproduces.
const PSK: [u8; 32] = [0x5a; 32];

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let Some(mode) = r.u8() else { return };
    if mode & 1 == 0 {
        let wire = r.rest();
        let (_, receiver) = pair(&PSK);
        let (out, end) = read_all(&receiver, wire, &[255]);
        assert!(
            out.is_empty(),
            "{} bytes of plaintext from a peer without the key",
            out.len()
        );
        match end {
            Ok(()) => assert!(
                wire.is_empty(),
                "clean end after {} bytes of garbage",
                wire.len()
            ),
            Err(kind) => assert!(!wire.is_empty(), "{kind:?} with nothing sent"),
        }
        return;
    }
    let Some(sealed) = parse_sealed(&mut r) else {
        return;
    };
    check_sealed(&sealed);
}

fn parse_sealed(r: &mut Reader<'_>) -> Option<Sealed> {
    let n = usize::from(r.u8()? % 8) + 1;
    let mut messages = Vec::with_capacity(n);
    let mut total = 0usize;
    for _ in 0..n {
        let b = r.take(3)?;
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        let len = len.min((MAX_TOTAL - total) as u32);
        total += len as usize;
        messages.push((len, r.u8()?));
    }
    let kind = r.u8()?;
    let a = r.u32()?;
    let b = r.u16()?;
    let change = match kind % 7 {
        0 => Change::None,
        1 => Change::FlipBit {
            at: a,
            bit: (b % 8) as u8,
        },
        2 => Change::CutAt(a),
        3 => Change::DropRecord(a as u16),
        4 => Change::RepeatRecord(a as u16),
        5 => Change::SwapWithNext(a as u16),
        _ => {
            let [byte, count] = b.to_be_bytes();
            Change::Insert { at: a, byte, count }
        }
    };
    let reads = r.rest().to_vec();
    Some(Sealed {
        messages,
        change,
        reads,
    })
}

/// The plaintext and the wire bytes of `messages` written by a real
/// sender, with the start of each record.
fn seal(sender: &Sender, messages: &[(u32, u8)]) -> (Vec<u8>, Vec<u8>) {
    let mut plain = Vec::new();
    let mut wire = Vec::new();
    for &(len, fill) in messages {
        let msg: Vec<u8> = (0..len as usize).map(|i| fill ^ (i as u8)).collect();
        let mut rest = &msg[..];
        while !rest.is_empty() {
            let n = sender.write(&mut wire, rest).expect("writing to a Vec");
            assert!(n > 0 && n <= rest.len(), "write took {n} of {}", rest.len());
            rest = &rest[n..];
        }
        plain.extend(msg);
    }
    (plain, wire)
}

/// The (start, end) of each record of a well-formed stream.
fn records(wire: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[at], wire[at + 1]]));
        assert!(len > TAG, "the sender sealed an empty record");
        v.push((at, at + LEN_PREFIX + len));
        at += LEN_PREFIX + len;
    }
    assert_eq!(
        at,
        wire.len(),
        "the sender's records do not tile its output"
    );
    v
}

fn change(wire: &[u8], recs: &[(usize, usize)], c: Change) -> Vec<u8> {
    let mut m = wire.to_vec();
    let rec = |i: u16| recs.get(usize::from(i) % recs.len().max(1)).copied();
    match c {
        Change::None => {}
        Change::FlipBit { at, bit } => {
            if !m.is_empty() {
                let i = at as usize % m.len();
                m[i] ^= 1 << bit;
            }
        }
        Change::CutAt(at) => m.truncate(at as usize % (m.len() + 1)),
        Change::DropRecord(i) => {
            if let Some((s, e)) = rec(i) {
                m.drain(s..e);
            }
        }
        Change::RepeatRecord(i) => {
            if let Some((s, e)) = rec(i) {
                let copy = wire[s..e].to_vec();
                m.splice(e..e, copy);
            }
        }
        Change::SwapWithNext(i) => {
            if let Some((s, e)) = rec(i) {
                if let Some(&(_, e2)) = recs.iter().find(|&&(s2, _)| s2 == e) {
                    let swapped = [&wire[e..e2], &wire[s..e]].concat();
                    m.splice(s..e2, swapped);
                }
            }
        }
        Change::Insert { at, byte, count } => {
            let i = at as usize % (m.len() + 1);
            m.splice(i..i, std::iter::repeat_n(byte, usize::from(count) + 1));
        }
    }
    m
}

fn check_sealed(s: &Sealed) {
    let (sender, receiver) = pair(&PSK);
    let (plain, wire) = seal(&sender, &s.messages);
    let recs = records(&wire);
    let arrived = change(&wire, &recs, s.change);
    // The records that arrived unchanged before the first change.
    let same = wire
        .iter()
        .zip(&arrived)
        .take_while(|(a, b)| a == b)
        .count();
    let whole: Vec<_> = recs.iter().take_while(|&&(_, e)| e <= same).collect();
    let expected_len: usize = whole.iter().map(|&&(s, e)| e - s - LEN_PREFIX - TAG).sum();
    let clean_cut =
        same == arrived.len() && (same == 0 || whole.last().is_some_and(|&&(_, e)| e == same));
    let reads = if s.reads.is_empty() {
        &[255u8][..]
    } else {
        &s.reads
    };
    let (out, end) = read_all(&receiver, &arrived, reads);
    assert!(
        out == plain[..expected_len],
        "{:?}: {} bytes came out, {} expected (the {} whole records before the change)",
        s.change,
        out.len(),
        expected_len,
        whole.len()
    );
    match end {
        Ok(()) => assert!(clean_cut, "{:?}: a clean end after a change", s.change),
        Err(kind) => {
            assert!(
                !clean_cut,
                "{:?}: {kind:?} on an unchanged stream",
                s.change
            );
            assert!(
                matches!(kind, ErrorKind::InvalidData | ErrorKind::UnexpectedEof),
                "{kind:?}"
            );
        }
    }
}

/// Reads everything `receiver` gives from `wire` with read sizes from
/// `sizes` (in turn; size = 1 + b × 277, 1 to 70 636 bytes), until a clean
/// end or an error; after an error, one more read must fail too.
fn read_all(receiver: &Receiver, wire: &[u8], sizes: &[u8]) -> (Vec<u8>, Result<(), ErrorKind>) {
    let mut src = wire;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 + 255 * 277];
    for &b in sizes.iter().cycle() {
        let want = 1 + usize::from(b) * 277;
        match receiver.read(&mut src, &mut buf[..want]) {
            Ok(0) => return (out, Ok(())),
            Ok(n) => {
                assert!(n <= want);
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) => {
                let again = receiver.read(&mut src, &mut buf[..want]);
                assert!(again.is_err(), "the channel read again after: {e}");
                return (out, Err(e.kind()));
            }
        }
        assert!(out.len() <= MAX_TOTAL, "more plaintext than was sealed");
    }
    unreachable!("cycle() over a non-empty slice never ends")
}

/// Seeds for the corpus generator.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("raw-empty".to_string(), vec![0u8]),
        ("raw-short-len".to_string(), vec![0u8, 0, 5, 1, 2, 3]),
        (
            "raw-record".to_string(),
            [&[0u8, 0, 20][..], &[7; 20]].concat(),
        ),
    ];
    let msgs = vec![(100, 1), (70_000, 2), (3, 3)];
    for (name, change) in [
        ("none", Change::None),
        ("flip", Change::FlipBit { at: 40, bit: 3 }),
        ("flip-len", Change::FlipBit { at: 0, bit: 0 }),
        ("cut-mid", Change::CutAt(500)),
        ("cut-boundary", Change::CutAt(118)),
        ("drop", Change::DropRecord(1)),
        ("repeat", Change::RepeatRecord(0)),
        ("swap", Change::SwapWithNext(1)),
        (
            "insert",
            Change::Insert {
                at: 118,
                byte: 0,
                count: 1,
            },
        ),
    ] {
        for (reads, sizes) in [("small", vec![0u8, 1, 3]), ("large", vec![255u8])] {
            let s = Sealed {
                messages: msgs.clone(),
                change,
                reads: sizes,
            };
            v.push((format!("sealed-{name}-{reads}"), s.encode()));
        }
    }
    v
}
