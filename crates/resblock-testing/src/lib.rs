//! Helpers for the workspace's tests, shared instead of copied into each test file. A
//! dev-dependency only (`publish = false`); it depends on no resblock crate, so every crate
//! can use it.
//!
//! - [`hash_init`]: deterministic weights that the PyTorch fixture scripts reproduce;
//! - [`scratch_dir!`]: an empty folder under Cargo's per-crate test scratch space;
//! - [`images`]: tiny image folders for the programs that train;
//! - [`http`]: a real HTTP server on loopback serving files (downloads are tested against
//!   it, never against the internet);
//! - [`relative_l2`]: how far a tensor is from a reference, as the parity tests measure it.
#![forbid(unsafe_code)]

pub mod hash_init;
pub mod http;
pub mod images;

pub use hash_init::{hash_value, hash_var_builder, hash_var_builder_with_dtype};
pub use http::serve_files;
pub use images::two_class_folder;

/// `||ours - theirs|| / ||theirs||` over whole tensors, in f64 (a reference of norm 0
/// counts as 1e-12): the parity tests' measure against PyTorch.
///
/// # Errors
/// Shapes that do not match.
pub fn relative_l2(
    ours: &candle_core::Tensor,
    theirs: &candle_core::Tensor,
) -> candle_core::Result<f64> {
    let ours = ours.to_dtype(candle_core::DType::F64)?;
    let theirs = theirs.to_dtype(candle_core::DType::F64)?;
    let d = (&ours - &theirs)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()?;
    let m = theirs.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    Ok(d / m.max(1e-12))
}

/// An empty folder `$CARGO_TARGET_TMPDIR/<group>/<name>` (removed first if it exists),
/// for an integration test's files. `CARGO_TARGET_TMPDIR` is the calling test crate's.
///
/// ```ignore
/// let dir = resblock_testing::scratch_dir!("data-tests", "folder");
/// ```
#[macro_export]
macro_rules! scratch_dir {
    ($group:expr, $name:expr) => {
        $crate::fresh_dir(
            &::std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join($group)
                .join($name),
        )
    };
}

/// Removes `dir` if it exists and creates it empty; returns it.
///
/// # Panics
/// When the folder cannot be created (a test cannot go on without it).
pub fn fresh_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    #[allow(clippy::expect_used)]
    std::fs::create_dir_all(dir).expect("cannot create the test's scratch folder");
    dir.to_path_buf()
}
