#![no_main]
//! See the documentation of `remus_fuzz::config` (fuzz/src/config.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::config::run(data);
});
