//! File plumbing shared by the resblock crates, on the bottom floor beside
//! `resblock-kernels` (no tensors here):
//!
//! - [`atomic`]: the one atomic writer: every file the project writes (weights, model
//!   files, checkpoints, metrics, reports) goes through [`write_atomic`];
//! - [`hash`]: SHA-256 of files and bytes, as lower-case hex;
//! - [`fetch`] (feature `http`, default): streaming a URL into a file while hashing it;
//! - [`cache`]: where downloaded things are kept.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod atomic;
pub mod cache;
#[cfg(feature = "http")]
pub mod fetch;
pub mod hash;

pub use atomic::write_atomic;
pub use cache::cache_root;
#[cfg(feature = "http")]
pub use fetch::fetch_to_file;
pub use hash::{sha256_bytes, sha256_file};
