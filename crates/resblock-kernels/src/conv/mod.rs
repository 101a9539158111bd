//! 2-D convolution: our CPU kernel, or Candle's with a backward that is right for every
//! input shape.
//!
//! Candle 0.11's `conv2d` backward computes the input gradient with a transposed convolution
//! whose `output_padding` it derives from the height alone and applies to the width too.
//! When `(H + 2p - d(k-1) - 1) mod s` differs from the same expression for the width (e.g. an
//! 8x7 input with stride 2), the gradient comes out the wrong size and backward fails.
//! [`conv2d_candle`] detects that case and pads explicitly and crops to an exact fit, so both
//! residues are zero and Candle's backward is right; the numbers are unchanged. Other shapes
//! go straight to Candle.

use candle_core::Tensor;

pub(crate) mod batched;
pub(crate) mod direct;
pub(crate) mod epilogue;
pub(crate) mod fold_s2;
pub(crate) mod frozen;
pub(crate) mod gemm;
pub(crate) mod geom;
#[cfg(target_arch = "x86_64")]
pub(crate) mod lanes;
pub(crate) mod op;
pub(crate) mod pack;
pub(crate) mod path;
pub(crate) mod weight_sum;
pub(crate) mod winograd;

use epilogue::Affine;
use geom::ConvGeom;
use op::{NativeConv2d, NativeConv2dBias, NativeConv2dResidual, NativeConv2dScaleShift};

use crate::error::{Error, Result};

/// Convolution of an (N, C_in, H, W) input with a (C_out, C_in/groups, kh, kw) kernel, with
/// the same padding, stride and dilation in both dims (as PyTorch's `F.conv2d` with ints).
///
/// On the CPU in f32/f64 this runs our kernel ([`conv2d_native`]) unless
/// [`crate::dispatch`] chose Candle's; elsewhere it is [`conv2d_candle`].
///
/// # Shapes
/// - input: (N, C_in, H, W)
/// - kernel: (C_out, C_in / groups, kh, kw)
/// - output: (N, C_out, H_out, W_out), H_out = floor((H + 2p - d(kh-1) - 1) / s) + 1
///
/// # Errors
/// Mismatched channels or a kernel larger than the padded input.
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let geom = ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    };
    geom.check("conv2d", x.dims(), kernel.dims())?;
    match crate::dispatch::kernels() {
        crate::dispatch::Kernels::Native => {
            conv2d_native(x, kernel, padding, stride, dilation, groups)
        }
        crate::dispatch::Kernels::Candle => {
            conv2d_candle(x, kernel, padding, stride, dilation, groups)
        }
    }
}

/// [`conv2d`] on our CPU kernel (see `gemm.rs`, `direct/`, `op.rs`): forward, input gradient and weight
/// gradient all as GEMMs over one image's unfolded input at a time, images in parallel,
/// grouped convolutions in one pass, the weight gradient summed in f64. Other devices and
/// dtypes fall back to [`conv2d_candle`].
///
/// # Shapes
/// As [`conv2d`].
///
/// # Errors
/// As [`conv2d`].
pub fn conv2d_native(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let geom = ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    };
    geom.check("conv2d", x.dims(), kernel.dims())?;
    match try_native(x, kernel, None, false, geom)? {
        Some(y) => Ok(y),
        // Candle's path reports shape errors in our words.
        None => conv2d_candle(x, kernel, padding, stride, dilation, groups),
    }
}

/// `relu?(conv2d(x, kernel) + bias?)`: with our kernel the bias and the ReLU are applied to
/// each image's output while it is still in cache (one pass instead of three), with a
/// backward for all of them. Falls back to [`conv2d_candle`] and Candle ops where
/// [`conv2d`] would.
///
/// # Shapes
/// As [`conv2d`]; `bias`: (C_out).
///
/// # Errors
/// As [`conv2d`], or a bias of the wrong length.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_fused(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let geom = ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    };
    geom.check("conv2d", x.dims(), kernel.dims())?;
    if crate::dispatch::kernels() == crate::dispatch::Kernels::Native {
        if let Some(y) = try_native(x, kernel, bias, relu, geom)? {
            return Ok(y);
        }
    }
    let y = conv2d_candle(x, kernel, padding, stride, dilation, groups)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    Ok(if relu { y.relu()? } else { y })
}

/// `relu?(conv2d(x, kernel) * scale + shift)`, `scale` and `shift` per output channel: a
/// convolution followed by an eval-mode BatchNorm (and a ReLU). With our CPU kernel, when no
/// input needs a gradient (inference on plain tensors), the scale, shift and ReLU are applied
/// to each image's output while it is in cache, so an unfolded network runs like a folded
/// one; otherwise it is [`conv2d`] followed by broadcast Candle ops.
///
/// # Shapes
/// As [`conv2d`]; `scale`, `shift`: (C_out).
///
/// # Errors
/// As [`conv2d`], or a scale or shift of the wrong length.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_scale_shift(
    x: &Tensor,
    kernel: &Tensor,
    (scale, shift): (&Tensor, &Tensor),
    relu: bool,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let geom = ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    };
    geom.check("conv2d_scale_shift", x.dims(), kernel.dims())?;
    per_channel(
        "conv2d_scale_shift",
        "a scale and shift",
        kernel,
        &[scale, shift],
    )?;
    let untracked = [x, kernel, scale, shift].iter().all(|t| !t.track_op());
    let same = |t: &Tensor| t.device().is_cpu() && t.dtype() == x.dtype();
    if crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && untracked
        && same(scale)
        && same(shift)
        && native_fits(x, kernel, None, &geom)?
    {
        let ss = Tensor::cat(&[scale, shift], 0)?;
        let (x, k) = (x.contiguous()?, kernel.contiguous()?);
        let frozen = frozen::forms_of(kernel);
        let op = NativeConv2dScaleShift { geom, relu, frozen };
        return Ok(x.apply_op3_no_bwd(&k, &ss, &op)?);
    }
    let y = conv2d(x, kernel, padding, stride, dilation, groups)?
        .broadcast_mul(&scale.reshape((1, (), 1, 1))?)?
        .broadcast_add(&shift.reshape((1, (), 1, 1))?)?;
    Ok(if relu { y.relu()? } else { y })
}

/// What a convolution adds per output channel before [`conv2d_add_relu`]'s sum.
#[derive(Debug, Clone, Copy)]
pub enum ChannelAffine<'a> {
    /// Nothing.
    None,
    /// A bias, (C_out): a convolution with a bias, or one with its BatchNorm folded in.
    Bias(&'a Tensor),
    /// `* scale + shift`, each (C_out): an eval-mode BatchNorm.
    ScaleShift(&'a Tensor, &'a Tensor),
}

/// `relu(residual + conv2d(x, kernel) [* scale] [+ bias/shift])`: the last convolution of an
/// inference residual block, its BatchNorm (or folded bias), the shortcut's output
/// `residual` and the block's ReLU. With our CPU kernel, when no input needs a gradient, the
/// sum and the ReLU are applied in the convolution's output pass: the separate sum read two
/// activations and wrote a third, zero-filled first (9% of a ResNet-50 batch-8 inference
/// went to those). Otherwise it is [`conv2d_fused`] or [`conv2d_scale_shift`] followed by
/// [`crate::add_relu`]; both give the same values.
///
/// # Shapes
/// As [`conv2d`]; `residual` has the output's shape; the per-channel values are (C_out).
///
/// # Errors
/// As [`conv2d`], or a residual or per-channel value of the wrong shape.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_add_relu(
    x: &Tensor,
    kernel: &Tensor,
    affine: ChannelAffine<'_>,
    residual: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let geom = ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    };
    geom.check("conv2d_add_relu", x.dims(), kernel.dims())?;
    let values: Vec<&Tensor> = match affine {
        ChannelAffine::None => vec![],
        ChannelAffine::Bias(b) => vec![b],
        ChannelAffine::ScaleShift(s, t) => vec![s, t],
    };
    per_channel("conv2d_add_relu", "per-channel values", kernel, &values)?;
    let same = |t: &Tensor| t.device().is_cpu() && t.dtype() == x.dtype();
    let untracked = [x, kernel, residual]
        .iter()
        .chain(&values)
        .all(|t| !t.track_op());
    if crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && untracked
        && values.iter().all(|t| same(t))
        && same(residual)
        && native_fits(x, kernel, None, &geom)?
    {
        let d = geom::Dims::new(&geom, x.dims(), kernel.dims())?;
        let want = [d.n, d.cout, d.oh, d.ow];
        if residual.dims() != want {
            return Err(Error::Shape {
                op: "conv2d_add_relu",
                expected: format!("a residual of shape {want:?}"),
                got: residual.dims().to_vec(),
            });
        }
        let affine = match affine {
            ChannelAffine::None => None,
            ChannelAffine::Bias(b) => Some((b.contiguous()?, Affine::Bias)),
            ChannelAffine::ScaleShift(s, t) => Some((Tensor::cat(&[s, t], 0)?, Affine::ScaleShift)),
        };
        let (x, k, r) = (
            x.contiguous()?,
            kernel.contiguous()?,
            residual.contiguous()?,
        );
        let frozen = frozen::forms_of(kernel);
        let op = NativeConv2dResidual {
            geom,
            affine,
            frozen,
        };
        return Ok(x.apply_op3_no_bwd(&k, &r, &op)?);
    }
    let y = match affine {
        ChannelAffine::ScaleShift(s, t) => {
            conv2d_scale_shift(x, kernel, (s, t), false, padding, stride, dilation, groups)?
        }
        ChannelAffine::Bias(b) => {
            conv2d_fused(x, kernel, Some(b), false, padding, stride, dilation, groups)?
        }
        ChannelAffine::None => {
            conv2d_fused(x, kernel, None, false, padding, stride, dilation, groups)?
        }
    };
    crate::eltwise::add_relu(residual, &y)
}

/// Checks that each of `values` holds one value per output channel of `kernel`; the error
/// names `op` and `what` they are.
fn per_channel(op: &'static str, what: &str, kernel: &Tensor, values: &[&Tensor]) -> Result<()> {
    let c_out = kernel.dim(0)?;
    match values.iter().find(|t| t.dims() != [c_out]) {
        Some(t) => Err(Error::Shape {
            op,
            expected: format!("{what} of shape [{c_out}]"),
            got: t.dims().to_vec(),
        }),
        None => Ok(()),
    }
}

/// `relu?(conv(x, kernel) + bias?)` on our CPU kernel, or `None` where it does not apply.
fn try_native(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    geom: ConvGeom,
) -> Result<Option<Tensor>> {
    if !native_fits(x, kernel, bias, &geom)? {
        return Ok(None);
    }
    let frozen = frozen::forms_of(kernel);
    let (x, k) = (x.contiguous()?, kernel.contiguous()?);
    Ok(Some(match bias {
        None => x.apply_op2(&k, NativeConv2d { geom, relu, frozen })?,
        Some(b) => {
            let op = NativeConv2dBias { geom, relu, frozen };
            x.apply_op3(&k, &b.contiguous()?, op)?
        }
    }))
}

/// Whether our CPU kernel takes these tensors (otherwise Candle's path, which also reports
/// shape errors).
fn native_fits(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, g: &ConvGeom) -> Result<bool> {
    let same = |t: &Tensor| t.device().is_cpu() && t.dtype() == x.dtype();
    let cpu_float = x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && same(kernel)
        && bias.is_none_or(same);
    if !(cpu_float && x.rank() == 4 && kernel.rank() == 4) {
        return Ok(false);
    }
    if g.groups == 0 || g.stride == 0 || g.dilation == 0 {
        return Ok(false);
    }
    let (_, c_in, h, w) = x.dims4()?;
    let (c_out, c_k, kh, kw) = kernel.dims4()?;
    let fits = |size: usize, k: usize| size + 2 * g.padding > g.dilation * (k - 1);
    let bias_ok = bias.is_none_or(|b| b.dims() == [c_out]);
    Ok(c_in == c_k * g.groups && fits(h, kh) && fits(w, kw) && bias_ok)
}

/// Both gradients of [`conv2d`] for the upstream gradient `dy`: `(dL/dx, dL/dkernel)` where
/// `dy = dL/dy` (as PyTorch's `torch.autograd.grad(y, (x, w), dy)`, or
/// `torch.nn.grad.conv2d_input` and `conv2d_weight` together). On the CPU in f32/f64 it runs
/// our backward kernel directly, with no graph; elsewhere Candle's autograd through
/// [`conv2d`].
///
/// # Shapes
/// As [`conv2d`]; `dy` has the output's shape.
///
/// # Errors
/// As [`conv2d`], or a `dy` whose shape is not the output's.
pub fn conv2d_backward(
    x: &Tensor,
    kernel: &Tensor,
    dy: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<(Tensor, Tensor)> {
    let geom = ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    };
    geom.check("conv2d_backward", x.dims(), kernel.dims())?;
    let native = crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && native_fits(x, kernel, None, &geom)?
        && dy.device().is_cpu()
        && dy.dtype() == x.dtype();
    if native {
        let d = geom::Dims::new(&geom, x.dims(), kernel.dims())?;
        let want = [d.n, d.cout, d.oh, d.ow];
        if dy.dims() != want {
            return Err(Error::Shape {
                op: "conv2d_backward",
                expected: format!("an output gradient of shape {want:?}"),
                got: dy.dims().to_vec(),
            });
        }
        let (x, k, dy) = (x.contiguous()?, kernel.contiguous()?, dy.contiguous()?);
        let (dx, dk, _) = op::cpu_backward(&x, &k, &dy, &dy, (false, false), &geom)?;
        return Ok((dx, dk));
    }
    let (xv, kv) = (
        candle_core::Var::from_tensor(&x.detach())?,
        candle_core::Var::from_tensor(&kernel.detach())?,
    );
    let y = conv2d(
        xv.as_tensor(),
        kv.as_tensor(),
        padding,
        stride,
        dilation,
        groups,
    )?;
    if y.dims() != dy.dims() {
        return Err(Error::Shape {
            op: "conv2d_backward",
            expected: format!("an output gradient of shape {:?}", y.dims()),
            got: dy.dims().to_vec(),
        });
    }
    let grads = (y * dy.detach())?.sum_all()?.backward()?;
    let get = |v: &candle_core::Var| {
        grads
            .get(v)
            .cloned()
            .ok_or_else(|| Error::config("conv2d_backward: no gradient"))
    };
    Ok((get(&xv)?, get(&kv)?))
}

/// [`conv2d`] on Candle's own kernels (any device), with a backward that is right for every
/// input shape (see the module docs).
///
/// # Shapes
/// As [`conv2d`].
///
/// # Errors
/// As [`conv2d`].
pub fn conv2d_candle(
    x: &Tensor,
    kernel: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    }
    .check("conv2d", x.dims(), kernel.dims())?;
    let (_, c_in, h, w) = x.dims4().map_err(|_| Error::Shape {
        op: "conv2d",
        expected: "a 4-D (N, C, H, W) input".into(),
        got: x.dims().to_vec(),
    })?;
    let (_, c_k, kh, kw) = kernel.dims4()?;
    if groups == 0 || c_in != c_k * groups {
        return Err(Error::Shape {
            op: "conv2d",
            expected: format!(
                "{} input channels ({c_k} per group x {groups} groups)",
                c_k * groups
            ),
            got: x.dims().to_vec(),
        });
    }
    let span = |size: usize, k: usize| -> Result<usize> {
        let eff = dilation * (k - 1) + 1;
        (size + 2 * padding)
            .checked_sub(eff)
            .ok_or_else(|| Error::Shape {
                op: "conv2d",
                expected: format!("a padded input of at least {eff} in each spatial dim"),
                got: x.dims().to_vec(),
            })
    };
    let (rh, rw) = (span(h, kh)? % stride, span(w, kw)? % stride);
    if rh == rw {
        return Ok(x.conv2d(kernel, padding, stride, dilation, groups)?);
    }
    // Pad explicitly, drop the trailing rows/cols no window reaches, convolve unpadded.
    let xp = x
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?;
    let xp = xp
        .narrow(2, 0, h + 2 * padding - rh)?
        .narrow(3, 0, w + 2 * padding - rw)?;
    Ok(xp.conv2d(kernel, 0, stride, dilation, groups)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{conv2d_add_relu, conv2d_fused, conv2d_scale_shift, ChannelAffine};

    fn values(dims: &[usize], seed: usize, dtype: DType) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f64 / 1001.5 - 1.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("a test tensor")
    }

    /// The epilogue's sum and ReLU against the convolution followed by `add_relu`, on the
    /// direct kernels (3x3 at stride 1 and 2), the GEMM path (1x1, f64) and with an input
    /// that needs a gradient (composed ops), for every kind of per-channel values.
    #[test]
    fn the_residual_in_the_epilogue_is_conv_then_add_relu() {
        // (n, c, h, w, cout, k, padding, stride)
        let shapes = [
            (2, 16, 9, 9, 16, 3, 1, 1),
            (3, 8, 10, 7, 12, 3, 1, 2),
            (2, 24, 7, 7, 40, 1, 0, 1),
            (1, 5, 6, 6, 3, 3, 1, 1),
        ];
        for (i, &(n, c, h, w, cout, k, pad, stride)) in shapes.iter().enumerate() {
            for dtype in [DType::F32, DType::F64] {
                let x = values(&[n, c, h, w], i, dtype);
                let kernel = values(&[cout, c, k, k], 10 + i, dtype);
                let (scale, shift) = (
                    values(&[cout], 20 + i, dtype),
                    values(&[cout], 30 + i, dtype),
                );
                let oh = (h + 2 * pad - k) / stride + 1;
                let ow = (w + 2 * pad - k) / stride + 1;
                let res = values(&[n, cout, oh, ow], 40 + i, dtype);
                let cases = [
                    ChannelAffine::None,
                    ChannelAffine::Bias(&shift),
                    ChannelAffine::ScaleShift(&scale, &shift),
                ];
                for affine in cases {
                    let y = match affine {
                        ChannelAffine::None => {
                            conv2d_fused(&x, &kernel, None, false, pad, stride, 1, 1)
                        }
                        ChannelAffine::Bias(b) => {
                            conv2d_fused(&x, &kernel, Some(b), false, pad, stride, 1, 1)
                        }
                        ChannelAffine::ScaleShift(s, t) => {
                            conv2d_scale_shift(&x, &kernel, (s, t), false, pad, stride, 1, 1)
                        }
                    }
                    .expect("the convolution");
                    let want = crate::add_relu(&res, &y).expect("the sum");
                    let got = conv2d_add_relu(&x, &kernel, affine, &res, pad, stride, 1, 1)
                        .expect("the fused op");
                    let tracked = Var::from_tensor(&x).expect("a variable");
                    let composed = conv2d_add_relu(
                        tracked.as_tensor(),
                        &kernel,
                        affine,
                        &res,
                        pad,
                        stride,
                        1,
                        1,
                    )
                    .expect("the composed ops");
                    for (what, t) in [("fused", &got), ("composed", &composed)] {
                        let diff = (t - &want)
                            .and_then(|d| d.abs())
                            .and_then(|d| d.flatten_all())
                            .and_then(|d| d.max(0))
                            .and_then(|d| d.to_dtype(DType::F64))
                            .and_then(|d| d.to_scalar::<f64>())
                            .expect("a difference");
                        assert_eq!(
                            diff, 0.0,
                            "shape {i} {dtype:?} {affine:?}: {what} differs by {diff}"
                        );
                    }
                }
                // A residual of another shape is an error naming it.
                let bad = values(&[n, cout, oh + 1, ow], 50, dtype);
                let e = conv2d_add_relu(&x, &kernel, ChannelAffine::None, &bad, pad, stride, 1, 1)
                    .expect_err("a residual of the wrong shape");
                assert!(e.to_string().contains("residual"), "{e}");
            }
        }
    }
}
