//! Fuzz target: `resblock_fuzz::cifar10` (see crates/resblock-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = resblock_fuzz::cifar10(data);
});
