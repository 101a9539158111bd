//! Global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use crate::error::Result;

/// The L2 norm of all gradients of `params` together; if it exceeds `max_norm`, scales every
/// gradient by `max_norm / (norm + 1e-6)`. Returns the norm before clipping (which may be
/// non-finite: callers should check).
///
/// # Errors
/// Tensor errors.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[&Var], max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0f64;
    for v in params {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sum_sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1. && norm.is_finite() {
        for v in params {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// The global L2 norm of the gradients of `params` (for non-finite checks).
///
/// # Errors
/// Tensor errors.
pub fn grad_norm(grads: &GradStore, params: &[&Var]) -> Result<f64> {
    let mut sum_sq = 0f64;
    for v in params {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sum_sq.sqrt())
}
