//! The fuzz targets' entry points: each takes arbitrary bytes, puts them where a user's file
//! would be and calls the reader `train`, `predict` and `evaluate` call on such a file. Each
//! returns `Ok` or the reader's error message; a panic, a hang or a huge allocation is the
//! bug the fuzzer looks for.
//!
//! The libFuzzer targets in `fuzz/fuzz_targets/` (run by `cargo xtask fuzz`) are one line
//! each over [`TARGETS`]; `tests/corpus.rs` replays the committed seed corpora
//! (`fuzz/corpus/<target>/`) and every input the fuzzer ever crashed on
//! (`fuzz/regressions/<target>/`) as ordinary tests, so CI needs no nightly toolchain.

mod data;
mod scratch;
mod state;
mod weights;

pub use data::{cifar10, idx_images, idx_labels, image};
pub use state::{checkpoint, linear_model, linear_trainer, run_meta};
pub use weights::{pth, safetensors};

/// What a target returns: `Ok`, or the reader's error as the user would see it.
pub type Outcome = Result<(), String>;

/// A target's entry point.
pub type Target = fn(&[u8]) -> Outcome;

/// Every fuzz target, by the name of its file in `fuzz/fuzz_targets/` and corpus folder.
pub const TARGETS: &[(&str, Target)] = &[
    ("idx_images", idx_images),
    ("idx_labels", idx_labels),
    ("cifar10", cifar10),
    ("image", image),
    ("safetensors", safetensors),
    ("pth", pth),
    ("checkpoint", checkpoint),
    ("run_meta", run_meta),
];

fn shown(e: impl std::fmt::Display) -> String {
    e.to_string()
}
