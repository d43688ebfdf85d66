#![no_main]
//! See the documentation of `remus_fuzz::handshake` (fuzz/src/handshake.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::handshake::run(data);
});
