//! Backpropagation from a tensor with a given output gradient: PyTorch's
//! `y.backward(gradient=dy)` / `torch.autograd.grad(y, inputs, dy)`, which Candle lacks
//! (its [`Tensor::backward`] always seeds the root with ones).
//!
//! The usual stand-in, `(y * dy).sum().backward()`, costs four extra passes over `y`'s size
//! in Candle's backward (the sum's broadcast, `grad * dy`, and a gradient for `dy` too, each
//! accumulated into a fresh `zeros_like`). Here the root is one op on `y` whose value is
//! `<y, dy>` and whose gradient is `dy` itself, handed over without a copy.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// The gradients of `<y, dy>` (the sum of `y * dy`) with respect to every variable `y`
/// depends on: the vector-Jacobian product `dy^T . J` of each, as PyTorch's
/// `y.backward(dy)` leaves them. `dy` is taken as a constant (it gets no gradient). As with
/// [`Tensor::backward`], the store keeps the variables' gradients.
///
/// # Errors
/// A `dy` whose shape, dtype or device differs from `y`'s (named in the error); Candle's
/// errors from the backward.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let y = x.as_tensor().sqr()?;
/// let dy = Tensor::new(&[1f32, 0.5, -1.], &Device::Cpu)?;
/// let grads = resblock_core::backward_from(&y, &dy)?;
/// // d<x^2, dy>/dx = 2 x dy
/// let dx = grads.get(x.as_tensor()).expect("dx").to_vec1::<f32>()?;
/// assert_eq!(dx, [2., 2., -6.]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn backward_from(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    if dy.dims() != y.dims() || dy.dtype() != y.dtype() || !dy.device().same_device(y.device()) {
        return Err(Error::Shape {
            op: "backward_from",
            expected: format!(
                "an output gradient of shape {:?} ({:?}) on the output's device",
                y.dims(),
                y.dtype()
            ),
            got: dy.dims().to_vec(),
        });
    }
    let dy = dy.detach();
    let root = if y.device().is_cpu() && matches!(y.dtype(), DType::F32 | DType::F64) {
        y.apply_op1(Seed { dy })?
    } else {
        // Other devices and dtypes: the plain product (the same gradients, a few more passes).
        (y * &dy)?.sum_all()?
    };
    Ok(root.backward()?)
}

/// The root op on `y`: backward hands `dy` (times the root's gradient, Candle's seed of one)
/// to `y`. The root never leaves [`backward_from`] and only its gradient is used, so its
/// value is not computed: it is a scalar zero.
struct Seed {
    dy: Tensor,
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "backward-from"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let zero = match s {
            CpuStorage::F32(_) => CpuStorage::F32(vec![0.]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![0.]),
            _ => candle_core::bail!("backward_from: the seed op takes f32 or f64"),
        };
        Ok((zero, Shape::from(())))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _root: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The root's gradient is Candle's seed, a scalar one: then `dy` goes as it is.
        let one = grad.to_dtype(DType::F64)?.to_scalar::<f64>()? == 1.;
        if one {
            Ok(Some(self.dy.clone()))
        } else {
            Ok(Some(self.dy.broadcast_mul(grad)?))
        }
    }
}
