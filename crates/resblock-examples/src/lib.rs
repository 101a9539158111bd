//! Shared helpers of the binaries: the recipe's flags and one training path ([`fit`]),
//! model selection, progress display, and the programs that show the article's claims.
#![forbid(unsafe_code)]

pub mod claims;
pub mod config_file;
pub mod distributed;
pub mod fit;
pub mod model_args;
pub mod progress;
pub mod recipe_args;
pub mod run_flags;

pub use model_args::{ModelArgs, RuntimeArgs};
pub use recipe_args::{PreparedData, RecipeArgs};

use candle_core::Tensor;

/// The binaries' thread set-up, first thing in `main` (before any other thread starts):
/// pins Candle's matmul to the count ([`resblock_core::pin_candle_threads`], which sets
/// `RAYON_NUM_THREADS` only while the process has one thread), then sizes rayon's pool for
/// our kernels with `main` as one of its threads ([`resblock_core::configure_threads_here`]:
/// the ops' parallel loops run on it instead of being handed to the pool while it sleeps).
/// `threads`: `--threads`, else `RAYON_NUM_THREADS`, else all cores.
pub fn start_threads(threads: Option<u64>) -> usize {
    let n = resblock_core::thread_count(threads.map(|n| n as usize));
    resblock_core::pin_candle_threads(n);
    resblock_core::configure_threads_here(Some(n))
}

/// Parses a finite, strictly positive float (for learning rates and the like).
///
/// # Errors
/// A message for clap when the text is not a number, not finite or not positive.
pub fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0. {
        Ok(v)
    } else {
        Err(format!("must be a finite number > 0, got {s}"))
    }
}

/// Formats a 2-D tensor as `[[a, b, ...], ...]` with 4 decimals.
///
/// # Errors
/// A tensor that is not 2-D.
pub fn format_matrix(t: &Tensor) -> candle_core::Result<String> {
    let rows = t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().map(|v| format!("{v:.4}")).collect();
            format!("[{}]", cells.join(", "))
        })
        .collect();
    Ok(format!("[{}]", rows.join(", ")))
}

/// The image files (`.png`, `.jpg`, `.jpeg`) named by `paths`: files as given, folders
/// searched recursively, each folder's entries sorted.
///
/// # Errors
/// A path that does not exist, or an unreadable folder.
pub fn collect_images(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if resblock_train::data::is_image_file(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            anyhow::bail!("{}: no such file or folder", p.display());
        }
    }
    Ok(out)
}
