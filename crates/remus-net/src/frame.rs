//! Framing of QEMU's `-netdev stream` protocol.
//!
//! On the unix stream socket every Ethernet frame is preceded by its length
//! as a 4-byte big-endian integer; there is nothing else on the wire (no
//! virtio-net header: the stream backend never negotiates one).
//!
//! [`FrameDecoder`] follows the shape of tokio mini-redis' `Frame::check` /
//! `Frame::parse`: bytes are appended as they arrive, [`check`] decides
//! whether a *complete* frame is buffered before anything is consumed, and a
//! bad length prefix is reported as a typed [`FrameError`]. Nothing here
//! panics on any input; a corrupt stream is the caller's cue to close that
//! one connection.

use thiserror::Error;

/// Size of the big-endian length prefix.
pub const HEADER_LEN: usize = 4;

/// Largest frame length accepted on the socket.
///
/// 65535 (largest possible MTU) plus an Ethernet header and VLAN tags, with
/// some margin. Anything bigger cannot be a frame and means the stream is
/// desynchronised or hostile.
pub const MAX_FRAME_LEN: usize = 65_550;

/// A length prefix that cannot describe an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Length prefix of 0 (or an attempt to encode an empty frame).
    #[error("frame length 0 on stream socket")]
    ZeroLength,
    /// Length prefix above [`MAX_FRAME_LEN`].
    #[error("frame length {len} exceeds maximum {max}", max = MAX_FRAME_LEN)]
    TooLong {
        /// The offending length.
        len: u64,
    },
}

fn validate_len(len: u64) -> Result<usize, FrameError> {
    if len == 0 {
        Err(FrameError::ZeroLength)
    } else if len > MAX_FRAME_LEN as u64 {
        Err(FrameError::TooLong { len })
    } else {
        // Fits: len <= MAX_FRAME_LEN.
        Ok(len as usize)
    }
}

/// The 4-byte big-endian prefix for a frame of `len` bytes.
pub fn encode_header(len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = validate_len(len as u64)?;
    Ok((len as u32).to_be_bytes())
}

/// Appends `frame`, length-prefixed, to `out`.
///
/// Empty or over-long frames are refused (the peer would reject them).
pub fn encode(frame: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let header = encode_header(frame.len())?;
    out.reserve(HEADER_LEN + frame.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(frame);
    Ok(())
}

/// Looks at the start of `buf` without consuming anything.
///
/// Returns `Ok(Some(n))` when a whole frame is buffered (`n` = prefix +
/// payload bytes), `Ok(None)` when more bytes are needed, and an error as
/// soon as the prefix is known to be invalid (even before the payload
/// arrives).
pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut prefix = [0u8; HEADER_LEN];
    prefix.copy_from_slice(header);
    let len = validate_len(u64::from(u32::from_be_bytes(prefix)))?;
    let total = HEADER_LEN + len;
    if buf.len() >= total {
        Ok(Some(total))
    } else {
        Ok(None)
    }
}

/// Incremental decoder for a byte stream of length-prefixed frames.
///
/// Feed it with [`push`](Self::push) and drain it with
/// [`next_frame`](Self::next_frame). After an error the decoder keeps
/// returning that error; the connection it belongs to should be closed and
/// the decoder [`reset`](Self::reset) or dropped.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames.
    consumed: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame (without its prefix), if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let pending = &self.buf[self.consumed..];
        match check(pending)? {
            None => Ok(None),
            Some(total) => {
                let start = self.consumed + HEADER_LEN;
                let end = self.consumed + total;
                self.consumed = end;
                Ok(Some(&self.buf[start..end]))
            }
        }
    }

    /// Bytes received but not yet returned as a frame (a partial frame).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// Forgets everything buffered (for a new connection).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.consumed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_zero_and_huge_lengths() {
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::ZeroLength));
        // Sticky: still an error.
        assert_eq!(d.next_frame(), Err(FrameError::ZeroLength));

        let mut d = FrameDecoder::new();
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLong {
                len: u64::from(u32::MAX)
            })
        );

        let mut d = FrameDecoder::new();
        d.push(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn max_len_accepted_and_partial_waits() {
        let frame = vec![0xab; MAX_FRAME_LEN];
        let mut wire = Vec::new();
        encode(&frame, &mut wire).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&wire[..wire.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), wire.len() - 1);
        d.push(&wire[wire.len() - 1..]);
        assert_eq!(d.next_frame().unwrap(), Some(&frame[..]));
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn encode_refuses_bad_frames() {
        let mut out = Vec::new();
        assert_eq!(encode(&[], &mut out), Err(FrameError::ZeroLength));
        assert!(matches!(
            encode(&vec![0; MAX_FRAME_LEN + 1], &mut out),
            Err(FrameError::TooLong { .. })
        ));
        assert!(out.is_empty());
        encode(&[1, 2, 3], &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 3, 1, 2, 3]);
    }

    #[test]
    fn error_message_is_readable() {
        assert_eq!(
            FrameError::TooLong { len: 70000 }.to_string(),
            "frame length 70000 exceeds maximum 65550"
        );
    }

    /// Drains every frame currently decodable; returns frames and whether
    /// the decoder hit an error.
    fn drain(d: &mut FrameDecoder, out: &mut Vec<Vec<u8>>) -> bool {
        loop {
            match d.next_frame() {
                Ok(Some(f)) => out.push(f.to_vec()),
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_streams_never_panic(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20)
        ) {
            let mut d = FrameDecoder::new();
            let mut frames = Vec::new();
            for c in &chunks {
                d.push(c);
                if drain(&mut d, &mut frames) {
                    break;
                }
            }
            let total: usize = chunks.iter().map(Vec::len).sum();
            let decoded: usize = frames.iter().map(|f| f.len() + HEADER_LEN).sum();
            prop_assert!(decoded <= total);
            for f in &frames {
                prop_assert!(!f.is_empty() && f.len() <= MAX_FRAME_LEN);
            }
        }

        #[test]
        fn small_length_prefixes_never_panic(
            len in 0u32..(MAX_FRAME_LEN as u32 + 10),
            tail in prop::collection::vec(any::<u8>(), 0..100),
        ) {
            let mut d = FrameDecoder::new();
            d.push(&len.to_be_bytes());
            d.push(&tail);
            let r = d.next_frame();
            match len {
                0 => prop_assert_eq!(r, Err(FrameError::ZeroLength)),
                l if l as usize > MAX_FRAME_LEN => prop_assert!(r.is_err()),
                l if l as usize <= tail.len() => prop_assert_eq!(r.unwrap().map(<[u8]>::len), Some(l as usize)),
                _ => prop_assert_eq!(r, Ok(None)),
            }
        }

        #[test]
        fn round_trip_split_anywhere(
            frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..2000), 0..10),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut wire = Vec::new();
            for f in &frames {
                encode(f, &mut wire).unwrap();
            }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for w in points.windows(2) {
                d.push(&wire[w[0]..w[1]]);
                prop_assert!(!drain(&mut d, &mut got));
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(d.buffered(), 0);
        }
    }
}
