//! Dense (fully connected) layers as one op: `act(x . w^T + b)` with its backward.
//!
//! Candle runs `candle_nn::Linear` as a matmul against a transposed view, a broadcast add
//! and the activation, each a pass with its own output and, in training, its own gradient
//! tensors; its matmul is the `gemm` crate's AVX2 kernel even on AVX-512 CPUs. Here, on the
//! CPU in f32/f64 (unless [`crate::dispatch`] chose Candle's ops):
//!
//! - forward: one GEMM (`matmul.rs::gemm_into`: our own GEMM for f32 where it runs,
//!   AVX-512 or AVX2), then one pass that adds the bias and applies the activation, keeping the
//!   activation's derivative at the pre-activation only where the backward needs it (GELU's,
//!   computed with the value from the same `erf`);
//! - backward: one pass for the activation's gradient (a multiply, for GELU), then `dx = dz . W` and
//!   `dW = dz^T . x` as GEMMs (no transposed copies: the GEMM reads either layout) and the
//!   bias gradient as column sums in f64; `dx` is skipped when `x` needs no gradient.
//!
//! Layout: `op.rs` the custom op and its kernels, `gelu.rs` the GELU loops.

mod gelu;
mod op;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The activation [`linear`] applies to `x . w^T + b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenseActivation {
    /// None.
    #[default]
    Identity,
    /// `max(z, 0)`.
    Relu,
    /// GELU in its exact erf form (PyTorch's default).
    Gelu,
}

/// `act(x . w^T + b)`: a `Linear` layer and its activation as one op with its backward
/// (see the module docs). Our kernels on the CPU in f32/f64, Candle ops elsewhere (same
/// values; the GELU there is Candle's `gelu_erf`).
///
/// # Shapes
/// - `x`: (..., in), `w`: (out, in), `b`: (out)
/// - output: (..., out)
///
/// # Errors
/// Shapes that do not fit together, mixed dtypes or devices.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use resblock_kernels::dense::{linear, DenseActivation};
/// let x = Tensor::new(&[[1f32, -2.]], &Device::Cpu)?;
/// let w = Tensor::new(&[[1f32, 1.], [0., 1.]], &Device::Cpu)?;
/// let b = Tensor::new(&[0.5f32, 0.], &Device::Cpu)?;
/// let y = linear(&x, &w, Some(&b), DenseActivation::Relu)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[0., 0.]]);
/// # Ok::<(), resblock_kernels::Error>(())
/// ```
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: DenseActivation) -> Result<Tensor> {
    let shape_err = |expected: String, got: &Tensor| Error::Shape {
        op: "linear",
        expected,
        got: got.dims().to_vec(),
    };
    let &[out, inp] = w.dims() else {
        return Err(shape_err("a weight of shape (out, in)".into(), w));
    };
    let Some((&last, lead)) = x.dims().split_last() else {
        return Err(shape_err(format!("an input of shape (..., {inp})"), x));
    };
    if last != inp {
        return Err(shape_err(format!("an input of shape (..., {inp})"), x));
    }
    if let Some(b) = b {
        if b.dims() != [out] {
            return Err(shape_err(format!("a bias of shape ({out})"), b));
        }
    }
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    let native = crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && out > 0
        && inp > 0
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && same(w)
        && b.is_none_or(same);
    if !native {
        return candle_linear(x, w, b, act);
    }
    let m: usize = lead.iter().product();
    let x2 = x.contiguous()?.reshape((m, inp))?;
    let w = w.contiguous()?;
    // GELU's derivative is kept for the backward only when there will be one.
    let training = x.track_op() || w.track_op() || b.is_some_and(Tensor::track_op);
    let op = op::Dense::new((m, inp, out), act, training);
    let y = match b {
        Some(b) => x2.apply_op3(&w, &b.contiguous()?, op)?,
        None => x2.apply_op2(&w, op)?,
    };
    let mut dims = lead.to_vec();
    dims.push(out);
    Ok(y.reshape(dims)?)
}

/// [`linear`] as Candle ops.
fn candle_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: DenseActivation,
) -> Result<Tensor> {
    let z = x.broadcast_matmul(&w.t()?)?;
    let z = match b {
        Some(b) => z.broadcast_add(b)?,
        None => z,
    };
    Ok(match act {
        DenseActivation::Identity => z,
        DenseActivation::Relu => z.relu()?,
        DenseActivation::Gelu => z.gelu_erf()?,
    })
}

#[cfg(test)]
mod tests;
