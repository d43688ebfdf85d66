//! Shared helpers for the integration tests: image files, a server fixture,
//! and a small hand-written NBD client (its byte layouts are spelled out here
//! on purpose rather than borrowed from `remus_nbd::proto`, so a mistake in
//! the crate's encoders cannot hide itself).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use remus_nbd::{FileBackend, NbdServer, NbdServerHandle};

pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REPLY_MAGIC: u32 = 0x6744_6698;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub const ERR_UNSUP: u32 = 0x8000_0001;
pub const ERR_INVALID: u32 = 0x8000_0003;
pub const ERR_UNKNOWN: u32 = 0x8000_0006;
pub const ERR_TOO_BIG: u32 = 0x8000_0009;

/// A raw image of `size` bytes filled with `fill`.
pub fn make_image(dir: &Path, name: &str, size: usize, fill: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![fill; size]).expect("write image");
    path
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub server: Option<NbdServerHandle>,
}

impl Fixture {
    pub fn new(export: &str, size: usize, fill: u8, read_only: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = make_image(dir.path(), "disk.raw", size, fill);
        let socket = dir.path().join("nbd.sock");
        let backend = FileBackend::open(&image, read_only).expect("open image");
        let server = NbdServer::start(&socket, export, Arc::new(backend)).expect("start server");
        Fixture {
            dir,
            image,
            socket,
            server: Some(server),
        }
    }

    pub fn server(&self) -> &NbdServerHandle {
        self.server.as_ref().expect("server running")
    }

    pub fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read image")
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// A minimal NBD client speaking raw bytes.
pub struct RawClient {
    pub sock: UnixStream,
    pub handshake_flags: u16,
}

impl RawClient {
    /// Connects and reads the greeting (does not send client flags).
    pub fn connect(path: &Path) -> Self {
        let sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = RawClient {
            sock,
            handshake_flags: 0,
        };
        let g = c.read_n(18);
        assert_eq!(&g[0..8], NBDMAGIC, "greeting starts with NBDMAGIC");
        assert_eq!(&g[8..16], IHAVEOPT, "greeting has IHAVEOPT");
        c.handshake_flags = be16(&g[16..18]);
        c
    }

    /// Connects and sends the given client flags.
    pub fn connect_with_flags(path: &Path, client_flags: u32) -> Self {
        let mut c = Self::connect(path);
        c.send(&client_flags.to_be_bytes());
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("send");
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.sock.read_exact(&mut buf).expect("read from server");
        buf
    }

    /// True if the server has closed the connection (EOF or reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.sock.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(IHAVEOPT);
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn read_opt_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..20]) as usize;
        OptReply {
            option: be32(&h[8..12]),
            reply_type: be32(&h[12..16]),
            data: self.read_n(len),
        }
    }

    /// Payload for NBD_OPT_INFO / NBD_OPT_GO.
    pub fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Sends NBD_OPT_GO and collects replies up to the final one.
    /// Returns (all info replies, final reply).
    pub fn go(&mut self, name: &str, infos: &[u16]) -> (Vec<Vec<u8>>, OptReply) {
        self.send_option(7, &Self::info_payload(name, infos));
        let mut info = Vec::new();
        loop {
            let r = self.read_opt_reply();
            assert_eq!(r.option, 7);
            if r.reply_type == 3 {
                info.push(r.data);
            } else {
                return (info, r);
            }
        }
    }

    /// Full handshake (fixed newstyle + NO_ZEROES, then GO). Returns (size, transmission flags).
    pub fn open(path: &Path, name: &str) -> (Self, u64, u16) {
        let mut c = Self::connect_with_flags(path, 0b11);
        let (infos, fin) = c.go(name, &[3]);
        assert_eq!(fin.reply_type, 1, "GO acknowledged");
        let export = infos
            .iter()
            .find(|i| be16(&i[0..2]) == 0)
            .expect("NBD_INFO_EXPORT present");
        assert_eq!(export.len(), 12);
        (c, be64(&export[2..10]), be16(&export[10..12]))
    }

    pub fn send_request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = Vec::with_capacity(28);
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.send(&m);
    }

    /// Reads a simple reply header: (error, cookie).
    pub fn read_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(be32(&h[0..4]), REPLY_MAGIC, "simple reply magic");
        (be32(&h[4..8]), be64(&h[8..16]))
    }

    /// Sends a request and returns its error, checking the cookie echoes.
    pub fn simple(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u32 {
        let cookie = 0x1234_5678_9abc_def0 ^ offset ^ u64::from(cmd);
        self.send_request(flags, cmd, cookie, offset, len);
        self.send(payload);
        let (err, c) = self.read_reply();
        assert_eq!(c, cookie, "reply echoes the cookie");
        err
    }

    /// NBD_CMD_READ that must succeed.
    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let cookie = 0xfeed_0000 + offset;
        self.send_request(0, 0, cookie, offset, len);
        let (err, c) = self.read_reply();
        assert_eq!(c, cookie);
        assert_eq!(err, 0, "read at {offset} len {len} succeeds");
        self.read_n(len as usize)
    }

    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.simple(flags, 1, offset, data.len() as u32, data)
    }

    pub fn disconnect(mut self) {
        self.send_request(0, 2, 0, 0, 0);
        assert!(self.is_closed(), "server closes after NBD_CMD_DISC");
    }
}

/// Path to a QEMU tool, or None (with a note) when it is not installed and
/// the caller allowed skipping via REMUS_SKIP_QEMU_TESTS=1.
pub fn qemu_tool(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var_os("REMUS_SKIP_QEMU_TESTS").is_some() {
        eprintln!("SKIP: {name} not installed and REMUS_SKIP_QEMU_TESTS is set");
        return None;
    }
    panic!("{name} not found: run scripts/install-deps.sh (or set REMUS_SKIP_QEMU_TESTS=1)");
}

pub fn nbd_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// One backend call as seen by [`RecordingBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        len: usize,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
}

/// Wraps a backend and records every call the server makes, in order.
pub struct RecordingBackend<B> {
    pub inner: B,
    pub calls: std::sync::Mutex<Vec<Call>>,
}

impl<B> RecordingBackend<B> {
    pub fn new(inner: B) -> Self {
        RecordingBackend {
            inner,
            calls: std::sync::Mutex::new(Vec::new()),
        }
    }
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn log(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
}

impl<B: remus_nbd::BlockBackend> remus_nbd::BlockBackend for RecordingBackend<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.log(Call::Read {
            offset,
            len: buf.len(),
        });
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.log(Call::Write {
            offset,
            len: buf.len(),
            fua,
        });
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.log(Call::Flush);
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.log(Call::Trim { offset, len });
        self.inner.trim(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.log(Call::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        });
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
}
