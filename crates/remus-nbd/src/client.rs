//! An NBD client as a [`BlockBackend`]: the agent's replicating disk layer
//! in front of another NBD server, such as `qemu-storage-daemon` serving a
//! qcow2 image (QEMU's own block layer parses the format; remus never
//! does).
//!
//! Fixed newstyle handshake with `NBD_OPT_GO` (the export's size and
//! transmission flags come from `NBD_INFO_EXPORT`), then simple replies
//! only, one request in flight (a mutex around the connection).
//! Requests larger than [`MAX_REQUEST`] are split.
//!
//! Written here rather than taken from a crate: the `nbd` crates on
//! crates.io offer a `Read + Write + Seek` client without `FUA`,
//! `WRITE_ZEROES` or `NO_HOLE`, which the replicated disk needs to keep
//! images sparse and durable; and the protocol constants are shared with
//! this crate's server (`doc/proto.md` of NetworkBlockDevice/nbd).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::backend::BlockBackend;
use crate::proto::*;

/// Largest single request sent (qemu-storage-daemon takes up to 32 MiB).
pub const MAX_REQUEST: usize = 4 << 20;

struct Conn {
    s: UnixStream,
    handle: u64,
    /// A request failed half-way: the stream is out of step for good.
    broken: Option<String>,
}

/// A connected NBD export.
pub struct NbdClient {
    conn: Mutex<Conn>,
    size: u64,
    flags: u16,
    what: String,
}

fn bad(what: &str, msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what}: {}", msg.into()),
    )
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdClient {
    /// Connects to `export` on the server at unix socket `path`.
    pub fn connect_unix(path: &Path, export: &str) -> io::Result<NbdClient> {
        let what = format!("NBD export '{export}' at {}", path.display());
        let mut s = UnixStream::connect(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{what}: connect: {e}")))?;
        // The handshake has a deadline; requests do not (a slow disk is
        // waited for, as QEMU would).
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (size, flags) = handshake(&mut s, export).map_err(|e| bad(&what, e.to_string()))?;
        s.set_read_timeout(None)?;
        Ok(NbdClient {
            conn: Mutex::new(Conn {
                s,
                handle: 0,
                broken: None,
            }),
            size,
            flags,
            what,
        })
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Sends one request and reads its simple reply (into `read` for a
    /// read).
    fn request(
        &self,
        cmd: u16,
        cmd_flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
        read: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &c.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{}: connection lost earlier ({why})", self.what),
            ));
        }
        match self.exchange(&mut c, cmd, cmd_flags, offset, len, payload, read) {
            Ok(Ok(())) => Ok(()),
            // The server answered with an error: the stream is in step.
            // NBD error numbers are the Linux errno values.
            Ok(Err(errno)) => Err(io::Error::from_raw_os_error(errno as i32)),
            // The stream failed mid-request: every later request fails
            // with the reason rather than misread what follows.
            Err(e) => {
                c.broken = Some(e.to_string());
                Err(io::Error::new(e.kind(), format!("{}: {e}", self.what)))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        c: &mut Conn,
        cmd: u16,
        cmd_flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
        read: Option<&mut [u8]>,
    ) -> io::Result<Result<(), u32>> {
        c.handle += 1;
        let handle = c.handle;
        let mut hdr = Vec::with_capacity(28);
        hdr.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&cmd_flags.to_be_bytes());
        hdr.extend_from_slice(&cmd.to_be_bytes());
        hdr.extend_from_slice(&handle.to_be_bytes());
        hdr.extend_from_slice(&offset.to_be_bytes());
        hdr.extend_from_slice(&len.to_be_bytes());
        c.s.write_all(&hdr)?;
        if let Some(p) = payload {
            c.s.write_all(p)?;
        }
        let magic = read_u32(&mut c.s)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply magic {magic:#x}"),
            ));
        }
        let err = read_u32(&mut c.s)?;
        let h = read_u64(&mut c.s)?;
        if h != handle {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply for handle {h}, sent {handle}"),
            ));
        }
        if err != 0 {
            return Ok(Err(err));
        }
        if let Some(buf) = read {
            c.s.read_exact(buf)?;
        }
        Ok(Ok(()))
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {len} bytes at {offset} beyond {}",
                    self.what, self.size
                ),
            ));
        }
        Ok(())
    }

    /// Runs `f(offset, len)` over `len` bytes in pieces of at most
    /// [`MAX_REQUEST`].
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u32, usize) -> io::Result<()>,
    ) -> io::Result<()> {
        self.check_range(offset, len)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MAX_REQUEST as u64);
            f(offset + done, n as u32, done as usize)?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let c = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut hdr = Vec::with_capacity(28);
        hdr.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&0u16.to_be_bytes());
        hdr.extend_from_slice(&CMD_DISC.to_be_bytes());
        hdr.extend_from_slice(&0u64.to_be_bytes());
        hdr.extend_from_slice(&[0u8; 12]);
        let _ = c.s.write_all(&hdr);
    }
}

/// The client side of the fixed newstyle handshake with `NBD_OPT_GO`:
/// the export's size and transmission flags.
fn handshake(s: &mut UnixStream, export: &str) -> io::Result<(u64, u16)> {
    let e = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if read_u64(s)? != NBDMAGIC {
        return Err(e("not an NBD server (bad magic)".into()));
    }
    if read_u64(s)? != IHAVEOPT {
        return Err(e("old-style NBD server; newstyle is required".into()));
    }
    let sflags = read_u16(s)?;
    if sflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(e("server does not speak fixed newstyle".into()));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if sflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    let name = export.as_bytes();
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt)?;
    let mut export_info = None;
    loop {
        if read_u64(s)? != OPTION_REPLY_MAGIC {
            return Err(e("bad option reply magic".into()));
        }
        let _opt = read_u32(s)?;
        let rtype = read_u32(s)?;
        let len = read_u32(s)? as usize;
        if len > 1 << 20 {
            return Err(e(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        match rtype {
            REP_ACK => break,
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([data[10], data[11]]);
                export_info = Some((size, flags));
            }
            t if t & REP_ERR_BIT != 0 => {
                return Err(e(format!(
                    "server refused export '{export}' (error {:#x}): {}",
                    t,
                    String::from_utf8_lossy(&data)
                )));
            }
            _ => {}
        }
    }
    export_info.ok_or_else(|| e("server sent no export information".into()))
}

impl BlockBackend for NbdClient {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.has(FLAG_READ_ONLY)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.pieces(offset, buf.len() as u64, |off, n, at| {
            self.request(
                CMD_READ,
                0,
                off,
                n,
                None,
                Some(&mut buf[at..at + n as usize]),
            )
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let flags = if fua && self.has(FLAG_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.pieces(offset, buf.len() as u64, |off, n, at| {
            self.request(
                CMD_WRITE,
                flags,
                off,
                n,
                Some(&buf[at..at + n as usize]),
                None,
            )
        })?;
        if fua && !self.has(FLAG_SEND_FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.has(FLAG_SEND_FLUSH) {
            self.request(CMD_FLUSH, 0, 0, 0, None, None)
        } else {
            Ok(())
        }
    }

    /// A trim must read back as zeroes (the replicated disk relies on it,
    /// as a file's punched hole does), which NBD's TRIM does not promise:
    /// it is sent as WRITE_ZEROES that may punch holes.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        if !self.has(FLAG_SEND_WRITE_ZEROES) {
            let zeroes = vec![0u8; (len as usize).min(MAX_REQUEST)];
            return self.pieces(offset, len, |off, n, _| {
                self.write_at(&zeroes[..n as usize], off, fua)
            });
        }
        let mut flags = 0;
        if !may_trim {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if fua && self.has(FLAG_SEND_FUA) {
            flags |= CMD_FLAG_FUA;
        }
        self.pieces(offset, len, |off, n, _| {
            self.request(CMD_WRITE_ZEROES, flags, off, n, None, None)
        })?;
        if fua && !self.has(FLAG_SEND_FUA) {
            self.flush()?;
        }
        Ok(())
    }
}
