//! Loss functions.

use candle_core::Tensor;

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
