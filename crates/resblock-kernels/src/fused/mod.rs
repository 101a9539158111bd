//! Convolution + training-mode BatchNorm (+ ReLU, + a residual block's sum) as one op where
//! it applies, two ops elsewhere; the fused kernel is in `conv_bn.rs`.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::norm::BatchStats;

mod conv_bn;

/// `batch_norm_train(conv2d(x, kernel, padding, stride, dilation, groups), weight, bias,
/// eps, relu)`: a convolution followed by a training-mode batch norm (and a ReLU).
///
/// For f32 convolutions with an odd square kernel and `2 * padding = k - 1` at stride 1
/// ("same") or 2 (a downsampling block's first) on the CPU with our kernels this is one op
/// (`fused/conv_bn.rs`): the statistics are taken
/// while each image's output is in cache, and the backward writes the norm's input gradient
/// straight into the convolution's padded buffers, which saves most passes over the
/// activation that two ops make. Elsewhere (and with `RESBLOCK_FUSED_CONV_BN=0`) it runs
/// [`crate::conv::conv2d`] and [`crate::norm::batch_norm_train`]. Both give the same values up to f32 rounding.
///
/// # Errors
/// As [`crate::conv::conv2d`] and [`crate::norm::batch_norm_train`].
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_train(
    x: &Tensor,
    kernel: &Tensor,
    geom: (usize, usize, usize, usize),
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    match fused_conv_bn(x, kernel, geom, (weight, bias), (eps, relu), None)? {
        Some(out) => Ok(out),
        None => {
            let (padding, stride, dilation, groups) = geom;
            let y = crate::conv::conv2d(x, kernel, padding, stride, dilation, groups)?;
            crate::norm::batch_norm_train(&y, weight, bias, eps, relu)
        }
    }
}

/// `relu(batch_norm_train(conv2d(x, kernel, ..), weight, bias, eps) + residual)`: the last
/// convolution and norm of a post-activation residual block with the shortcut's output
/// `residual` added and the block's ReLU, as one op where [`conv_batch_norm_train`] fuses
/// (which also saves the separate sum and its gradient bookkeeping); otherwise the
/// convolution and [`crate::norm::batch_norm_add_relu_train`].
///
/// # Errors
/// As [`conv_batch_norm_train`], or a residual of another shape.
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_add_relu_train(
    x: &Tensor,
    kernel: &Tensor,
    geom: (usize, usize, usize, usize),
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<(Tensor, BatchStats)> {
    match fused_conv_bn(x, kernel, geom, (weight, bias), (eps, true), Some(residual))? {
        Some(out) => Ok(out),
        None => {
            // The norm, sum and ReLU as one op, so the norm's output is not kept for the
            // backward (see `crate::norm::batch_norm_add_relu_train`).
            let (padding, stride, dilation, groups) = geom;
            let y = crate::conv::conv2d(x, kernel, padding, stride, dilation, groups)?;
            crate::norm::batch_norm_add_relu_train(&y, weight, bias, eps, residual)
        }
    }
}

/// The fused op's output, or `None` where it does not apply.
fn fused_conv_bn(
    x: &Tensor,
    kernel: &Tensor,
    (padding, stride, dilation, groups): (usize, usize, usize, usize),
    (weight, bias): (&Tensor, &Tensor),
    (eps, relu): (f64, bool),
    residual: Option<&Tensor>,
) -> Result<Option<(Tensor, BatchStats)>> {
    let all_f32 = [x, kernel, weight, bias]
        .into_iter()
        .chain(residual)
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu());
    if !(all_f32 && {
        let d = crate::dispatch::current();
        d.fused_conv_bn && d.kernels == crate::dispatch::Kernels::Native
    }) {
        return Ok(None);
    }
    let geom = crate::conv::geom::ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    };
    let stats = Arc::new(OnceLock::new());
    let Some(op) =
        conv_bn::ConvBnTrain::new(x.dims(), kernel.dims(), geom, eps, relu, stats.clone())
    else {
        return Ok(None);
    };
    let cout = kernel.dim(0)?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [cout] {
            return Err(Error::Shape {
                op: "batch_norm",
                expected: format!("a {name} of shape [{cout}]"),
                got: t.dims().to_vec(),
            });
        }
    }
    let params = Tensor::cat(&[&kernel.flatten_all()?, weight, bias], 0)?;
    let x = x.contiguous()?;
    let y = match residual {
        None => x.apply_op2(&params, op)?,
        Some(r) => {
            let want = op.out_shape();
            if r.dims() != want {
                return Err(Error::Shape {
                    op: "conv_batch_norm_add_relu",
                    expected: format!("a residual of shape {want:?}"),
                    got: r.dims().to_vec(),
                });
            }
            x.apply_op3(&params, &r.contiguous()?, op)?
        }
    };
    let (mean, var) = stats
        .get()
        .ok_or_else(|| Error::config("conv_bn: the kernel did not record its statistics"))?;
    let count = y.elem_count() / cout;
    Ok(Some((
        y,
        BatchStats {
            mean: mean.clone(),
            var: var.clone(),
            count,
        },
    )))
}
