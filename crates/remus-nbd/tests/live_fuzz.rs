//! Random bytes thrown at a live server, in the handshake and in the
//! transmission phase: the server must neither panic nor stop serving
//! other clients.

mod common;

use std::io::Write;

use common::*;
use proptest::prelude::*;

const SIZE: usize = 256 * 1024;

fn server_still_serves(fx: &Fixture) {
    let (mut c, size, _) = RawClient::open(&fx.socket, "disk");
    assert_eq!(size, SIZE as u64);
    let _ = c.read(0, 4096);
    c.disconnect();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn garbage_during_handshake(flags in prop_oneof![Just(3u32), any::<u32>()],
                                junk in proptest::collection::vec(any::<u8>(), 0..512)) {
        let fx = Fixture::new("disk", SIZE, 0, false);
        let mut c = RawClient::connect(&fx.socket);
        let _ = c.sock.write_all(&flags.to_be_bytes());
        let _ = c.sock.write_all(&junk);
        drop(c);
        server_still_serves(&fx);
    }

    #[test]
    fn garbage_options_after_valid_headers(option in any::<u32>(),
                                           data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let fx = Fixture::new("disk", SIZE, 0, false);
        let mut c = RawClient::connect_with_flags(&fx.socket, 3);
        c.send_option(option, &data);
        drop(c);
        server_still_serves(&fx);
    }

    #[test]
    fn garbage_during_transmission(with_magic in any::<bool>(),
                                   junk in proptest::collection::vec(any::<u8>(), 0..512)) {
        let fx = Fixture::new("disk", SIZE, 0, false);
        let (mut other, _, _) = RawClient::open(&fx.socket, "disk");
        let (mut c, _, _) = RawClient::open(&fx.socket, "disk");
        if with_magic {
            let _ = c.sock.write_all(&0x2560_9513u32.to_be_bytes());
        }
        let _ = c.sock.write_all(&junk);
        drop(c);
        let _ = other.read(0, 512);
        server_still_serves(&fx);
    }
}
