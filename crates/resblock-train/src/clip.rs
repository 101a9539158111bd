//! Global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::Result;

/// The L2 norm of all gradients of `params` together; if it exceeds `max_norm`, scales every
/// gradient by `max_norm / (norm + 1e-6)`. Returns the norm before clipping (which may be
/// non-finite: callers should check).
///
/// # Errors
/// Tensor errors.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[&Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, params)?;
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
            sum_sq += sum_of_squares(g)?;
        }
    }
    Ok(sum_sq.sqrt())
}

/// The sum of the squares of `t`'s values in f64, summed on the host from one copy of the
/// values: it runs after every step, and as Candle ops (a conversion, a square and a sum
/// per parameter, each allocating) it was some 250 small ops per ResNet-20 step.
fn sum_of_squares(t: &Tensor) -> Result<f64> {
    let flat = t.flatten_all()?;
    Ok(match flat.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum(),
        DType::F64 => flat.to_vec1::<f64>()?.iter().map(|v| v * v).sum(),
        _ => flat
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .map(|v| v * v)
            .sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clips_to_the_global_norm_like_pytorch() -> Result<()> {
        let a = Var::new(&[3f64, 0.], &Device::Cpu)?;
        let b = Var::new(&[4f64], &Device::Cpu)?;
        // Gradients (3, 0) and (4): global norm 5.
        let loss = ((a.as_tensor() * Tensor::new(&[1f64, 0.], &Device::Cpu)?)?.sum_all()? * 3.)?
            .add(&(b.as_tensor().sum_all()? * 4.)?)?;
        let mut grads = loss.backward()?;
        let norm = clip_grad_norm(&mut grads, &[&a, &b], 1.0)?;
        assert!((norm - 5.).abs() < 1e-12);
        let ga = grads.get(a.as_tensor()).expect("ga").to_vec1::<f64>()?;
        let gb = grads.get(b.as_tensor()).expect("gb").to_vec1::<f64>()?;
        let coef = 1. / (5. + 1e-6);
        assert!(
            (ga[0] - 3. * coef).abs() < 1e-12 && ga[1] == 0. && (gb[0] - 4. * coef).abs() < 1e-12
        );
        // Below the limit nothing changes.
        let mut grads = loss.backward()?;
        assert!((clip_grad_norm(&mut grads, &[&a, &b], 10.)? - 5.).abs() < 1e-12);
        assert_eq!(
            grads.get(b.as_tensor()).expect("gb").to_vec1::<f64>()?,
            [4.]
        );
        Ok(())
    }
}
