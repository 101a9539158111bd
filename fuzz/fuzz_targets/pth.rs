//! Fuzz target: `resblock_fuzz::pth` (see crates/resblock-fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = resblock_fuzz::pth(data);
});
