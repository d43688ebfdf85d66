#![no_main]
//! See the documentation of `remus_fuzz::libvirt` (fuzz/src/libvirt.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remus_fuzz::libvirt::run(data);
});
