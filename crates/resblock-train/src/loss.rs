//! Loss functions.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// Mean squared error, `mean((prediction - target)^2)` over all elements (PyTorch's
/// `F.mse_loss` with `reduction="mean"`).
///
/// # Shapes
/// - prediction, target: the same shape; output: a scalar
///
/// # Errors
/// Shapes that differ (no broadcasting, unlike a silent PyTorch warning).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let p = Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let t = Tensor::new(&[1f32, 0., 3.], &Device::Cpu)?;
/// let l = resblock_train::loss::mse(&p, &t)?.to_scalar::<f32>()?;
/// assert!((l - 4. / 3.).abs() < 1e-6);
/// # Ok::<(), resblock_train::Error>(())
/// ```
pub fn mse(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    if prediction.dims() != target.dims() {
        return Err(Error::ShapeMismatch {
            op: "mse",
            a: prediction.dims().to_vec(),
            b: target.dims().to_vec(),
        });
    }
    Ok((prediction - target)?.sqr()?.mean_all()?)
}

/// Cross-entropy of logits against integer class targets, averaged over the batch, with
/// label smoothing as PyTorch's `F.cross_entropy(logits, targets, label_smoothing=eps)`:
/// `(1 - eps) * nll + eps * mean over classes of -log p`.
///
/// # Shapes
/// - logits: (N, C); targets: (N) of u32/i64 class indices; output: a scalar
/// - or targets (N, C) of class probabilities (mixup/cutmix, their smoothing included):
///   [`soft_cross_entropy`], and `label_smoothing` is not applied again
///
/// # Errors
/// Mismatched batch sizes, a smoothing outside [0, 1], or a target out of range.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[2f32, 0., 0.], [0., 0., 0.]], &Device::Cpu)?;
/// let targets = Tensor::new(&[0u32, 2], &Device::Cpu)?;
/// let l = resblock_train::loss::cross_entropy(&logits, &targets, 0.)?.to_scalar::<f32>()?;
/// let p0 = (2f32.exp() / (2f32.exp() + 2.)).ln();
/// assert!((l - (-(p0) + 3f32.ln()) / 2.).abs() < 1e-6);
/// # Ok::<(), resblock_train::Error>(())
/// ```
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    if targets.rank() == 2 {
        return soft_cross_entropy(logits, targets);
    }
    if targets.dims() != [n] {
        return Err(Error::ShapeMismatch {
            op: "cross_entropy (logits vs targets)",
            a: logits.dims().to_vec(),
            b: targets.dims().to_vec(),
        });
    }
    if !(0. ..=1.).contains(&label_smoothing) {
        return Err(Error::config(format!(
            "label smoothing must be in [0, 1], got {label_smoothing}"
        )));
    }
    let t = targets.to_dtype(DType::U32)?;
    let max_t = t.max(0)?.to_scalar::<u32>()? as usize;
    if max_t >= c {
        return Err(Error::config(format!(
            "target class {max_t} is out of range for {c} classes"
        )));
    }
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = log_p
        .gather(&t.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?
        .mean_all()?;
    if label_smoothing == 0. {
        return Ok(nll);
    }
    let smooth = log_p.mean(D::Minus1)?.neg()?.mean_all()?;
    Ok(((nll * (1. - label_smoothing))? + (smooth * label_smoothing)?)?)
}

/// Cross-entropy against class probabilities (PyTorch's `cross_entropy` with probability
/// targets, timm's `SoftTargetCrossEntropy`): `mean_i(-sum_c targets[i, c] * log_softmax(logits)[i, c])`.
///
/// # Errors
/// Targets of another shape than the logits.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if targets.dims() != logits.dims() {
        return Err(Error::ShapeMismatch {
            op: "soft cross_entropy (logits vs target probabilities)",
            a: logits.dims().to_vec(),
            b: targets.dims().to_vec(),
        });
    }
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let t = targets.to_dtype(log_p.dtype())?;
    Ok((log_p * t)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn soft_targets_agree_with_index_targets_and_smoothing() -> Result<()> {
        let logits = Tensor::new(&[[2f32, 0.5, -1.], [0., 1., 3.]], &Device::Cpu)?;
        let idx = Tensor::new(&[0u32, 2], &Device::Cpu)?;
        // One-hot probabilities give the plain loss; (1 - e) one-hot + e / C the smoothed one.
        for eps in [0f32, 0.3] {
            let off = eps / 3.;
            let on = 1. - eps + off;
            let probs = Tensor::new(&[[on, off, off], [off, off, on]], &Device::Cpu)?;
            let soft = cross_entropy(&logits, &probs, 0.9)?.to_scalar::<f32>()?;
            let hard = cross_entropy(&logits, &idx, f64::from(eps))?.to_scalar::<f32>()?;
            assert!((soft - hard).abs() < 1e-6, "eps {eps}: {soft} vs {hard}");
        }
        let wrong = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu)?;
        assert!(soft_cross_entropy(&logits, &wrong).is_err());
        Ok(())
    }
}
