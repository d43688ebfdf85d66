#![no_main]
//! See the documentation of `remus_fuzz::nbd` (fuzz/src/nbd.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::nbd::run(data);
});
