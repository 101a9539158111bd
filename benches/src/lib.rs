//! Shared helpers of the criterion benches: what each benchmark's iteration does, recorded
//! for `cargo xtask bench` (images/s, GFLOP/s and the share of the measured GEMM peak).

use std::io::Write;
use std::path::PathBuf;

/// Where benches record their metadata: `<target>/bench-meta.jsonl`, one JSON object per line
/// (`id`, `images`, `flop`), the last line for an id winning.
pub fn meta_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench-meta.jsonl")
}

/// Records that one iteration of benchmark `id` processes `images` images (or samples) and
/// `flop` floating-point operations (multiply-adds count two); either may be unknown.
pub fn record(id: &str, images: Option<f64>, flop: Option<f64>) {
    let line = serde_json::json!({ "id": id, "images": images, "flop": flop });
    let path = meta_path();
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("warning: cannot record {id} in {}: {e}", path.display());
    }
}

/// Floating-point operations of a 3x3 convolution forward pass (padding 1).
pub fn conv3x3_flop(n: usize, c_in: usize, c_out: usize, size: usize, stride: usize) -> f64 {
    let out = (size - 1) / stride + 1;
    2. * (n * c_out * out * out * c_in * 9) as f64
}
