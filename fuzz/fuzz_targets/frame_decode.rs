#![no_main]
//! See the documentation of `remus_fuzz::frame` (fuzz/src/frame.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::frame::run(data);
});
