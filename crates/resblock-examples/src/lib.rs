//! Shared helpers of the demo binaries (argument parsing and printing).

use candle_core::Tensor;

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
