#![no_main]
//! See the documentation of `remus_fuzz::assembler` (fuzz/src/assembler.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::assembler::run(data);
});
