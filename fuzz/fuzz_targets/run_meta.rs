//! Fuzz target: `resblock_fuzz::run_meta` (see crates/resblock-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = resblock_fuzz::run_meta(data);
});
