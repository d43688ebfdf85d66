#![no_main]
//! See the documentation of `remus_fuzz::message` (fuzz/src/message.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::message::run(data);
});
