#![no_main]
//! See the documentation of `remus_fuzz::delta` (fuzz/src/delta.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::delta::run(data);
});
