#![no_main]
//! See the documentation of `remus_fuzz::channel` (fuzz/src/channel.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::channel::run(data);
});
