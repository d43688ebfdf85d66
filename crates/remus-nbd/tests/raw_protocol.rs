//! Protocol conformance through a hand-written client on a raw socket:
//! handshake and option haggling, error numbers for bad requests, and that
//! the connection (or, where hanging up is correct, the server) keeps
//! working afterwards.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;

const SIZE: usize = 1024 * 1024;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;
const FLAG_DF: u16 = 4;

/// A request that must work after whatever went before: read 4 KiB at 0.
fn assert_still_serves(c: &mut RawClient, fill: u8) {
    let data = c.read(0, 4096);
    assert!(
        data.iter().all(|&b| b == fill),
        "follow-up read returns image data"
    );
}

fn assert_server_alive(fx: &Fixture, fill: u8) {
    let (mut c, size, _) = RawClient::open(&fx.socket, "disk");
    assert_eq!(size, SIZE as u64);
    assert_still_serves(&mut c, fill);
    c.disconnect();
}

#[test]
fn go_reports_size_flags_and_block_size() {
    let fx = Fixture::new("disk", SIZE, 0x42, false);
    let mut c = RawClient::connect(&fx.socket);
    assert_eq!(c.handshake_flags, 0b11, "FIXED_NEWSTYLE | NO_ZEROES");
    c.send(&3u32.to_be_bytes());
    let (infos, fin) = c.go("disk", &[3, 1]);
    assert_eq!(fin.reply_type, 1, "ACK");
    let export = infos.iter().find(|i| be16(i) == 0).expect("INFO_EXPORT");
    assert_eq!(be64(&export[2..10]), SIZE as u64);
    let flags = be16(&export[10..12]);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES; not READ_ONLY, not MULTI_CONN.
    assert_eq!(flags, 1 | 4 | 8 | 32 | 64, "transmission flags {flags:#x}");
    let bs = infos
        .iter()
        .find(|i| be16(i) == 3)
        .expect("INFO_BLOCK_SIZE when asked");
    assert_eq!(bs.len(), 14);
    assert_eq!(be32(&bs[2..6]), 1, "minimum block");
    assert_eq!(be32(&bs[6..10]), 4096, "preferred block");
    assert_eq!(be32(&bs[10..14]), 32 * 1024 * 1024, "maximum payload");
    let name = infos
        .iter()
        .find(|i| be16(i) == 1)
        .expect("INFO_NAME when asked");
    assert_eq!(&name[2..], b"disk");
    // No padding after GO: the very next bytes are our first reply.
    assert_still_serves(&mut c, 0x42);
    c.disconnect();
}

#[test]
fn go_without_info_requests_sends_only_export_info() {
    let fx = Fixture::new("disk", SIZE, 0, false);
    let mut c = RawClient::connect_with_flags(&fx.socket, 1);
    let (infos, fin) = c.go("disk", &[]);
    assert_eq!(fin.reply_type, 1);
    assert_eq!(infos.len(), 1);
    assert_eq!(be16(&infos[0]), 0);
}

#[test]
fn export_name_option_with_and_without_zero_padding() {
    let fx = Fixture::new("disk", SIZE, 0x17, false);
    for no_zeroes in [false, true] {
        let flags = if no_zeroes { 0b11 } else { 0b01 };
        let mut c = RawClient::connect_with_flags(&fx.socket, flags);
        c.send_option(1, b"disk");
        let r = c.read_n(10);
        assert_eq!(be64(&r[0..8]), SIZE as u64);
        assert_eq!(be16(&r[8..10]) & 1, 1, "HAS_FLAGS");
        if !no_zeroes {
            assert_eq!(c.read_n(124), vec![0u8; 124], "124 zero bytes");
        }
        // If padding were wrong, this reply would be misparsed.
        assert_still_serves(&mut c, 0x17);
        c.disconnect();
    }
}

#[test]
fn export_name_for_unknown_export_hangs_up_and_server_survives() {
    let fx = Fixture::new("disk", SIZE, 0x21, false);
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    c.send_option(1, b"other");
    assert!(
        c.is_closed(),
        "EXPORT_NAME cannot error, so the server hangs up"
    );
    assert_server_alive(&fx, 0x21);
}

#[test]
fn unknown_export_via_info_and_go_is_err_unknown_and_haggling_continues() {
    let fx = Fixture::new("disk", SIZE, 0x22, false);
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    c.send_option(6, &RawClient::info_payload("nope", &[]));
    let r = c.read_opt_reply();
    assert_eq!((r.option, r.reply_type), (6, ERR_UNKNOWN));
    let (infos, fin) = c.go("nope", &[3]);
    assert!(infos.is_empty(), "no NBD_REP_INFO before ERR_UNKNOWN");
    assert_eq!(fin.reply_type, ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&fin.data).contains("not found"));
    // INFO on the right name stays in haggling; GO then enters transmission.
    c.send_option(6, &RawClient::info_payload("disk", &[]));
    let info = c.read_opt_reply();
    assert_eq!((info.reply_type, be16(&info.data)), (3, 0));
    assert_eq!(c.read_opt_reply().reply_type, 1);
    let (_, fin) = c.go("disk", &[]);
    assert_eq!(fin.reply_type, 1);
    assert_still_serves(&mut c, 0x22);
}

#[test]
fn empty_name_selects_the_default_export() {
    let fx = Fixture::new("disk", SIZE, 0x23, false);
    let (mut c, size, _) = RawClient::open(&fx.socket, "");
    assert_eq!(size, SIZE as u64);
    assert_still_serves(&mut c, 0x23);
}

#[test]
fn unsupported_options_get_err_unsup_and_haggling_continues() {
    let fx = Fixture::new("disk", SIZE, 0x24, false);
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    // STARTTLS, STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT,
    // EXTENDED_HEADERS, PEEK_EXPORT, and made-up numbers.
    for (opt, data) in [
        (5u32, &b""[..]),
        (8, b""),
        (9, b"\0\0\0\x04disk\0\0\0\0"),
        (10, b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0fbase:allocation"),
        (11, b""),
        (4, b""),
        (12, b"xyz"),
        (0xdead_beef, b"junk"),
        (0, b""),
    ] {
        c.send_option(opt, data);
        let r = c.read_opt_reply();
        assert_eq!(r.option, opt, "reply names the option");
        assert_eq!(r.reply_type, ERR_UNSUP, "option {opt}");
    }
    let (_, fin) = c.go("disk", &[]);
    assert_eq!(fin.reply_type, 1);
    assert_still_serves(&mut c, 0x24);
}

#[test]
fn list_returns_the_export_and_rejects_data() {
    let fx = Fixture::new("vda", SIZE, 0, false);
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    c.send_option(3, b"");
    let s = c.read_opt_reply();
    assert_eq!(s.reply_type, 2, "NBD_REP_SERVER");
    assert_eq!(be32(&s.data) as usize, 3);
    assert_eq!(&s.data[4..], b"vda");
    assert_eq!(c.read_opt_reply().reply_type, 1, "then ACK");
    c.send_option(3, b"x");
    assert_eq!(c.read_opt_reply().reply_type, ERR_INVALID);
    let (_, fin) = c.go("vda", &[]);
    assert_eq!(fin.reply_type, 1);
}

#[test]
fn malformed_go_payloads_get_err_invalid() {
    let fx = Fixture::new("disk", SIZE, 0x25, false);
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    let mut trailing = RawClient::info_payload("disk", &[]);
    trailing.push(0);
    let nul = RawClient::info_payload("di\0k", &[]);
    for bad in [
        vec![],                                   // no name length
        vec![0, 0, 0],                            // short name length
        vec![0, 0, 0, 0],                         // no info count
        vec![0xff, 0xff, 0xff, 0xff, 0, 0],       // name length past the end
        vec![0, 0, 0, 4, b'd', b'i', b's', b'k'], // no info count
        vec![0, 0, 0, 0, 0, 2, 0, 3],             // 2 infos announced, 1 sent
        trailing,
        nul,
        vec![0, 0, 0, 2, 0xc3, 0x28, 0, 0], // invalid UTF-8 name
    ] {
        c.send_option(7, &bad);
        let r = c.read_opt_reply();
        assert_eq!(
            (r.option, r.reply_type),
            (7, ERR_INVALID),
            "payload {bad:?}"
        );
    }
    let (_, fin) = c.go("disk", &[]);
    assert_eq!(fin.reply_type, 1);
    assert_still_serves(&mut c, 0x25);
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let fx = Fixture::new("disk", SIZE, 0x26, false);
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    c.send_option(2, b"");
    let r = c.read_opt_reply();
    assert_eq!((r.option, r.reply_type), (2, 1));
    assert!(c.is_closed());
    assert_server_alive(&fx, 0x26);
}

#[test]
fn client_without_fixed_newstyle_or_with_unknown_flags_is_dropped() {
    let fx = Fixture::new("disk", SIZE, 0x27, false);
    for flags in [0u32, 0b10, 0b101, 0x8000_0001] {
        let mut c = RawClient::connect_with_flags(&fx.socket, flags);
        assert!(c.is_closed(), "client flags {flags:#x} end the session");
    }
    assert_server_alive(&fx, 0x27);
}

#[test]
fn absurd_option_length_is_refused_without_reading_it() {
    let fx = Fixture::new("disk", SIZE, 0x28, false);
    let started = Instant::now();
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    // Header only: announce 4 GiB - 1 of data and send none of it.
    let mut h = Vec::new();
    h.extend_from_slice(IHAVEOPT);
    h.extend_from_slice(&7u32.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&h);
    let r = c.read_opt_reply();
    assert_eq!((r.option, r.reply_type), (7, ERR_TOO_BIG));
    assert!(c.is_closed());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no attempt to read 4 GiB"
    );

    // Just over the limit, for EXPORT_NAME (no reply possible): just closed.
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    let mut h = Vec::new();
    h.extend_from_slice(IHAVEOPT);
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&(64 * 1024 + 1u32).to_be_bytes());
    c.send(&h);
    assert!(c.is_closed());
    assert_server_alive(&fx, 0x28);
}

#[test]
fn bad_option_magic_drops_only_that_connection() {
    let fx = Fixture::new("disk", SIZE, 0x29, false);
    let (mut other, _, _) = RawClient::open(&fx.socket, "disk");
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    c.send(b"NOTOPTION\0\0\0\0\0\0\0");
    assert!(c.is_closed());
    assert_still_serves(&mut other, 0x29);
}

#[test]
fn out_of_range_requests_get_the_spec_errors_and_the_connection_continues() {
    let fx = Fixture::new("disk", SIZE, 0x31, false);
    let (mut c, size, _) = RawClient::open(&fx.socket, "disk");
    let end = size;

    // Reads past the end or overflowing: EINVAL, no payload.
    assert_eq!(c.simple(0, CMD_READ, end - 100, 4096, &[]), EINVAL);
    assert_eq!(c.simple(0, CMD_READ, end, 1, &[]), EINVAL);
    assert_eq!(c.simple(0, CMD_READ, u64::MAX - 10, 4096, &[]), EINVAL);
    assert_still_serves(&mut c, 0x31);

    // Writes past the end: ENOSPC (spec), overflowing: EINVAL; payload consumed.
    let data = vec![0xee; 4096];
    assert_eq!(c.write(0, end - 100, &data), ENOSPC);
    assert_still_serves(&mut c, 0x31);
    assert_eq!(c.write(0, u64::MAX - 10, &data), EINVAL);
    assert_still_serves(&mut c, 0x31);

    // Trim past the end: EINVAL. Write zeroes past the end: ENOSPC.
    assert_eq!(c.simple(0, CMD_TRIM, end - 1, 2, &[]), EINVAL);
    assert_eq!(c.simple(0, CMD_TRIM, u64::MAX, 2, &[]), EINVAL);
    assert_eq!(c.simple(0, CMD_WRITE_ZEROES, end, 512, &[]), ENOSPC);
    assert_eq!(c.simple(0, CMD_WRITE_ZEROES, u64::MAX, 512, &[]), EINVAL);

    // The very last byte is fine.
    assert_eq!(c.write(0, end - 1, &[0x99]), 0);
    assert_eq!(c.read(end - 1, 1), vec![0x99]);
    assert_still_serves(&mut c, 0x31);
    let img = fx.image_bytes();
    assert_eq!(img.len(), SIZE, "nothing written past the end");
    assert!(
        img[..SIZE - 1].iter().all(|&b| b == 0x31),
        "rejected writes left no trace"
    );
    assert_eq!(fx.server().stats().errors, 9);
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let fx = Fixture::new("disk", SIZE, 0x32, false);
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    // CACHE (5), BLOCK_STATUS (7), RESIZE (8) and made-up types.
    for cmd in [5u16, 7, 8, 9, 42, 0xffff] {
        assert_eq!(c.simple(0, cmd, 0, 512, &[]), EINVAL, "command {cmd}");
    }
    // DF is not negotiated; NO_HOLE is only for WRITE_ZEROES; 0x8000 is unknown.
    assert_eq!(c.simple(FLAG_DF, CMD_READ, 0, 512, &[]), EINVAL);
    assert_eq!(c.simple(0x8000, CMD_FLUSH, 0, 0, &[]), EINVAL);
    assert_eq!(c.simple(FLAG_NO_HOLE, CMD_TRIM, 0, 512, &[]), EINVAL);
    // A WRITE with bad flags still has its payload consumed.
    assert_eq!(c.write(FLAG_NO_HOLE, 0, &[0xaa; 512]), EINVAL);
    assert_still_serves(&mut c, 0x32);
    // FUA is accepted on every command.
    assert_eq!(c.simple(FLAG_FUA, CMD_FLUSH, 0, 0, &[]), 0);
    assert_eq!(c.simple(FLAG_FUA, CMD_READ, 0, 16, &[]), 0);
    assert_eq!(c.read_n(16), vec![0x32; 16]);
    assert_eq!(
        c.simple(FLAG_FUA | FLAG_NO_HOLE, CMD_WRITE_ZEROES, 8192, 512, &[]),
        0
    );
    assert_eq!(c.read(8192, 512), vec![0; 512]);
    assert_still_serves(&mut c, 0x32);
}

#[test]
fn oversized_read_is_einval_and_the_connection_continues() {
    let fx = Fixture::new("disk", SIZE, 0x33, false);
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    assert_eq!(c.simple(0, CMD_READ, 0, 32 * 1024 * 1024 + 1, &[]), EINVAL);
    assert_eq!(c.simple(0, CMD_READ, 0, u32::MAX, &[]), EINVAL);
    assert_still_serves(&mut c, 0x33);
}

#[test]
fn oversized_write_is_refused_and_only_that_connection_closes() {
    let fx = Fixture::new("disk", SIZE, 0x34, false);
    let (mut other, _, _) = RawClient::open(&fx.socket, "disk");
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    let started = Instant::now();
    c.send_request(0, CMD_WRITE, 77, 0, u32::MAX);
    let (err, cookie) = c.read_reply();
    assert_eq!((err, cookie), (EINVAL, 77));
    assert!(c.is_closed(), "server hangs up instead of reading 4 GiB");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_still_serves(&mut other, 0x34);
    assert_server_alive(&fx, 0x34);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let fx = Fixture::new("disk", SIZE, 0x35, true);
    let (mut c, _, flags) = RawClient::open(&fx.socket, "disk");
    assert_eq!(flags & 2, 2, "READ_ONLY advertised");
    assert_eq!(flags & (32 | 64), 0, "no TRIM / WRITE_ZEROES advertised");
    assert_eq!(c.write(0, 0, &[0u8; 4096]), EPERM);
    assert_still_serves(&mut c, 0x35);
    assert_eq!(c.write(FLAG_FUA, 4096, &[1u8; 512]), EPERM);
    assert_eq!(c.simple(0, CMD_TRIM, 0, 4096, &[]), EPERM);
    assert_eq!(c.simple(0, CMD_WRITE_ZEROES, 0, 4096, &[]), EPERM);
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0, &[]), 0, "flush is harmless");
    assert_still_serves(&mut c, 0x35);
    assert!(
        fx.image_bytes().iter().all(|&b| b == 0x35),
        "image unchanged"
    );
    let s = fx.server().stats();
    assert_eq!((s.writes, s.trims, s.write_zeroes, s.errors), (0, 0, 0, 4));
}

#[test]
fn bad_request_magic_drops_only_that_connection() {
    let fx = Fixture::new("disk", SIZE, 0x36, false);
    let (mut other, _, _) = RawClient::open(&fx.socket, "disk");
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    c.send(&[0x55u8; 28]);
    assert!(c.is_closed());
    assert_still_serves(&mut other, 0x36);
}

#[test]
fn zero_length_requests_succeed() {
    let fx = Fixture::new("disk", SIZE, 0x37, false);
    let (mut c, size, _) = RawClient::open(&fx.socket, "disk");
    assert_eq!(c.simple(0, CMD_READ, 0, 0, &[]), 0);
    assert_eq!(
        c.simple(0, CMD_READ, size, 0, &[]),
        0,
        "empty read at the end"
    );
    assert_eq!(c.write(0, 100, &[]), 0);
    assert_eq!(c.simple(0, CMD_TRIM, 100, 0, &[]), 0);
    assert_eq!(c.simple(0, CMD_WRITE_ZEROES, 100, 0, &[]), 0);
    assert_still_serves(&mut c, 0x37);
    assert!(fx.image_bytes().iter().all(|&b| b == 0x37));
}

#[test]
fn writes_trims_and_zeroes_round_trip_and_stats_count_them() {
    let fx = Fixture::new("disk", SIZE, 0x38, false);
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(c.write(0, 4096, &pattern), 0);
    assert_eq!(c.write(FLAG_FUA, 200_000, &pattern[..1000]), 0);
    assert_eq!(c.read(4096, 65536), pattern);
    assert_eq!(c.simple(0, CMD_TRIM, 8192, 8192, &[]), 0);
    assert_eq!(c.read(8192, 8192), vec![0; 8192], "trim punches a hole");
    assert_eq!(
        c.simple(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 300_000, 5000, &[]),
        0
    );
    assert_eq!(c.simple(0, CMD_FLUSH, 0, 0, &[]), 0);
    c.disconnect();

    let img = fx.image_bytes();
    assert_eq!(&img[4096..8192], &pattern[..4096]);
    assert!(img[8192..16384].iter().all(|&b| b == 0));
    assert_eq!(&img[16384..4096 + 65536], &pattern[12288..]);
    assert_eq!(&img[200_000..201_000], &pattern[..1000]);
    assert!(img[300_000..305_000].iter().all(|&b| b == 0));
    assert!(img[305_000..].iter().all(|&b| b == 0x38));

    let s = fx.server().stats();
    assert_eq!(s.writes, 2);
    assert_eq!(s.bytes_written, 65536 + 1000);
    assert_eq!(s.reads, 2);
    assert_eq!(s.bytes_read, 65536 + 8192);
    assert_eq!((s.trims, s.write_zeroes, s.flushes, s.errors), (1, 1, 1, 0));
}

#[test]
fn disc_closes_without_a_reply() {
    let fx = Fixture::new("disk", SIZE, 0x39, false);
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    c.send_request(0, 2, 5, 0, 0);
    assert!(c.is_closed(), "no reply bytes, just EOF");
}

#[test]
fn shutdown_closes_open_connections_and_removes_the_socket() {
    let mut fx = Fixture::new("disk", SIZE, 0x3a, false);
    let (mut tx, _, _) = RawClient::open(&fx.socket, "disk");
    let mut haggling = RawClient::connect_with_flags(&fx.socket, 0b11);
    let idle = UnixStream::connect(&fx.socket).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_still_serves(&mut tx, 0x3a);

    let server = fx.server.take().unwrap();
    let started = Instant::now();
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown is prompt"
    );
    assert!(!fx.socket.exists(), "socket file removed");
    assert!(tx.is_closed(), "transmission connection closed");
    assert!(haggling.is_closed(), "handshake connection closed");
    assert!(
        UnixStream::connect(&fx.socket).is_err(),
        "no longer accepting"
    );
}

#[test]
fn dropping_the_handle_stops_the_server() {
    let mut fx = Fixture::new("disk", SIZE, 0, false);
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    drop(fx.server.take());
    assert!(!fx.socket.exists());
    assert!(c.is_closed());
}

#[test]
fn stale_socket_is_replaced_but_live_sockets_and_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "d.raw", SIZE, 0x3b);
    let backend = || std::sync::Arc::new(remus_nbd::FileBackend::open(&image, false).unwrap());

    // Stale: a socket file nobody listens on.
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server =
        remus_nbd::NbdServer::start(&sock, "disk", backend()).expect("stale socket replaced");
    let (mut c, _, _) = RawClient::open(&sock, "disk");
    assert_still_serves(&mut c, 0x3b);

    // Live: a second server on the same path is refused; the first keeps going.
    let err = remus_nbd::NbdServer::start(&sock, "disk", backend()).unwrap_err();
    assert!(
        matches!(err, remus_nbd::NbdError::SocketInUse { .. }),
        "{err}"
    );
    assert_still_serves(&mut c, 0x3b);
    drop(c);
    server.shutdown();

    // A regular file is never deleted.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let err = remus_nbd::NbdServer::start(&file, "disk", backend()).unwrap_err();
    assert!(
        matches!(err, remus_nbd::NbdError::SocketInUse { .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn invalid_export_names_are_rejected_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "d.raw", 4096, 0);
    let backend = std::sync::Arc::new(remus_nbd::FileBackend::open(&image, false).unwrap());
    let long = "x".repeat(4097);
    for name in ["a\0b", long.as_str()] {
        let err = remus_nbd::NbdServer::start(&dir.path().join("s.sock"), name, backend.clone())
            .unwrap_err();
        assert!(
            matches!(err, remus_nbd::NbdError::InvalidExportName { .. }),
            "{err}"
        );
    }
}

#[test]
fn client_vanishing_mid_request_does_not_hurt_the_server() {
    let fx = Fixture::new("disk", SIZE, 0x3c, false);
    // Half a write payload, then hang up.
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    c.send_request(0, CMD_WRITE, 1, 0, 65536);
    c.send(&[0xde; 1000]);
    drop(c);
    // Half a request header.
    let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
    c.sock.write_all(&[0x25, 0x60, 0x95]).unwrap();
    drop(c);
    // Half an option.
    let mut c = RawClient::connect_with_flags(&fx.socket, 0b11);
    c.send(b"IHAVE");
    drop(c);
    assert_server_alive(&fx, 0x3c);
    assert!(
        fx.image_bytes()[..1000].iter().all(|&b| b == 0x3c),
        "partial write not applied"
    );
}
