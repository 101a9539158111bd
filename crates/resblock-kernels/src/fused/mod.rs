//! Convolution + training-mode BatchNorm (+ ReLU, + a residual block's sum) as one op where
//! it applies, two ops elsewhere; the fused kernel is in `conv_bn.rs`. A whole basic block
//! with an identity or an option-A (zero-pad) shortcut, two of those, is one op
//! (`basic_block.rs`), and so is a run of such blocks (`block_chain.rs`).

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::norm::BatchStats;

mod basic_block;
mod block_chain;
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

/// `relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`: a post-activation basic block with an
/// identity shortcut in training, each layer given as `(kernel, (padding, stride, dilation,
/// groups), weight, bias, eps)`. The two norms' batch statistics come back with the output.
///
/// Where both layers fuse ([`conv_batch_norm_train`]), the second keeps `x`'s shape, and
/// `RESBLOCK_FUSED_CONV_BN` is not `0`, this is one op (`fused/basic_block.rs`), which saves
/// Candle's gradient bookkeeping for the middle activation and for `x`'s second use; else
/// [`conv_batch_norm_train`] then [`conv_batch_norm_add_relu_train`]. Both give the same
/// values up to f32 rounding.
///
/// # Errors
/// As [`conv_batch_norm_add_relu_train`], or a block whose output has another shape than
/// its input.
pub fn basic_block_train(
    x: &Tensor,
    first: Layer<'_>,
    second: Layer<'_>,
) -> Result<(Tensor, [BatchStats; 2])> {
    if let Some(out) = fused_block(x, first, second, None)? {
        return Ok(out);
    }
    let (k1, g1, w1, b1, eps1) = first;
    let (k2, g2, w2, b2, eps2) = second;
    let (mid, s1) = conv_batch_norm_train(x, k1, g1, w1, b1, eps1, true)?;
    let (y, s2) = conv_batch_norm_add_relu_train(&mid, k2, g2, w2, b2, eps2, x)?;
    Ok((y, [s1, s2]))
}

/// One conv + BatchNorm layer of [`basic_block_train`]: `(kernel, (padding, stride,
/// dilation, groups), weight, bias, eps)`.
pub type Layer<'a> = (
    &'a Tensor,
    (usize, usize, usize, usize),
    &'a Tensor,
    &'a Tensor,
    f64,
);

/// `relu(bn2(conv2(relu(bn1(conv1(x))))) + zero_pad_shortcut(x, stride, front, back))`:
/// a post-activation basic block with the option-A shortcut in training (a CIFAR ResNet's
/// downsampling block: `conv1` of stride `stride`, `front + C + back` output channels), the
/// layers as in [`basic_block_train`].
///
/// Where both layers fuse and the shapes agree this is one op (`fused/basic_block.rs`),
/// which saves Candle's gradient bookkeeping for the middle activation, the shortcut's
/// output and `x`'s second use; else [`conv_batch_norm_train`],
/// [`crate::zero_pad_shortcut`] and [`conv_batch_norm_add_relu_train`]. Both give the
/// same values up to f32 rounding.
///
/// # Errors
/// As those three ops.
pub fn zero_pad_block_train(
    x: &Tensor,
    first: Layer<'_>,
    second: Layer<'_>,
    (stride, front, back): (usize, usize, usize),
) -> Result<(Tensor, [BatchStats; 2])> {
    let shortcut = crate::shortcut::zero_pad::ZeroPad {
        stride,
        front,
        back,
    };
    // A stride of 0 does not fuse (`fused_chain`) and errors in the separate ops below.
    if let Some(out) = fused_block(x, first, second, Some(shortcut))? {
        return Ok(out);
    }
    let (k1, g1, w1, b1, eps1) = first;
    let (k2, g2, w2, b2, eps2) = second;
    let (mid, s1) = conv_batch_norm_train(x, k1, g1, w1, b1, eps1, true)?;
    let res = crate::zero_pad_shortcut(x, stride, front, back)?;
    let (y, s2) = conv_batch_norm_add_relu_train(&mid, k2, g2, w2, b2, eps2, &res)?;
    Ok((y, [s1, s2]))
}

/// One block of [`basic_block_chain_train`]: its two layers and its shortcut, the option-A
/// one `(stride, front, back)` ([`crate::zero_pad_shortcut`]) or `None` for the identity.
#[derive(Clone, Copy)]
pub struct ChainBlock<'a> {
    /// `conv1` and `bn1` (with the ReLU).
    pub first: Layer<'a>,
    /// `conv2` and `bn2` (with the sum and the ReLU).
    pub second: Layer<'a>,
    /// The option-A shortcut, or `None` for the identity.
    pub zero_pad: Option<(usize, usize, usize)>,
}

/// A run of post-activation basic blocks in training, each block's output the next one's
/// input: [`basic_block_train`] or [`zero_pad_block_train`] for each block in turn. The
/// blocks' batch statistics come back with the output, in block order.
///
/// Where every block fuses and the shapes link up this is one op (`fused/block_chain.rs`),
/// which saves Candle's gradient bookkeeping for each block's output but the last (a zero
/// fill and an add of activation size each, on one thread); else one op per block. Both
/// give the same values up to f32 rounding.
///
/// # Errors
/// As [`basic_block_train`] and [`zero_pad_block_train`].
pub fn basic_block_chain_train(
    x: &Tensor,
    blocks: &[ChainBlock<'_>],
) -> Result<(Tensor, Vec<[BatchStats; 2]>)> {
    if let Some((y, _, stats)) = fused_chain(x, None, blocks)? {
        return Ok((y, stats));
    }
    let mut h = x.clone();
    let mut stats = Vec::with_capacity(blocks.len());
    for b in blocks {
        let (y, s) = match b.zero_pad {
            None => basic_block_train(&h, b.first, b.second)?,
            Some(z) => zero_pad_block_train(&h, b.first, b.second, z)?,
        };
        h = y;
        stats.push(s);
    }
    Ok((h, stats))
}

/// `relu(bn(conv(x)))` by `lead` ([`conv_batch_norm_train`] with the ReLU), then
/// [`basic_block_chain_train`] on its output: a CIFAR ResNet's stem and body. The lead
/// layer's batch statistics come back after the output, then the blocks'.
///
/// Where the lead layer and every block fuse this is one op (`fused/block_chain.rs`), which
/// also saves Candle's gradient bookkeeping for the lead layer's output; else the two calls.
/// Both give the same values up to f32 rounding.
///
/// # Errors
/// As [`conv_batch_norm_train`] and [`basic_block_chain_train`].
pub fn conv_bn_relu_chain_train(
    x: &Tensor,
    lead: Layer<'_>,
    blocks: &[ChainBlock<'_>],
) -> Result<(Tensor, BatchStats, Vec<[BatchStats; 2]>)> {
    if let Some((y, Some(s), stats)) = fused_chain(x, Some(lead), blocks)? {
        return Ok((y, s, stats));
    }
    let (k, g, w, b, eps) = lead;
    let (h, s) = conv_batch_norm_train(x, k, g, w, b, eps, true)?;
    let (y, stats) = basic_block_chain_train(&h, blocks)?;
    Ok((y, s, stats))
}

/// The fused block's output (with the option-A `shortcut` when given, else the identity),
/// or `None` where it does not apply.
fn fused_block(
    x: &Tensor,
    first: Layer<'_>,
    second: Layer<'_>,
    shortcut: Option<crate::shortcut::zero_pad::ZeroPad>,
) -> Result<Option<(Tensor, [BatchStats; 2])>> {
    let block = ChainBlock {
        first,
        second,
        zero_pad: shortcut.map(|z| (z.stride, z.front, z.back)),
    };
    Ok(fused_chain(x, None, &[block])?.and_then(|(y, _, mut s)| Some((y, s.pop()?))))
}

/// The output of the blocks after the lead layer (conv + norm + ReLU) if any, and the
/// statistics of the lead layer and of the blocks.
type ChainOut = (Tensor, Option<BatchStats>, Vec<[BatchStats; 2]>);

/// The fused chain's output, or `None` where it does not apply.
fn fused_chain(
    x: &Tensor,
    lead: Option<Layer<'_>>,
    blocks: &[ChainBlock<'_>],
) -> Result<Option<ChainOut>> {
    let mut tensors = vec![x];
    if let Some((k, _, w, b, _)) = lead {
        tensors.extend([k, w, b]);
    }
    for b in blocks {
        let (k1, _, w1, b1, _) = b.first;
        let (k2, _, w2, b2, _) = b.second;
        tensors.extend([k1, w1, b1, k2, w2, b2]);
    }
    if blocks.is_empty() || !fusable(&tensors) {
        return Ok(None);
    }
    let mut ops = Vec::with_capacity(blocks.len());
    let mut stats = Vec::with_capacity(blocks.len());
    let mut pieces = Vec::with_capacity(6 * blocks.len() + 3);
    let mut dims = x.dims().to_vec();
    let layer = |in_dims: &[usize], (k, g, _, _, eps): Layer<'_>, s: &Arc<OnceLock<_>>| {
        conv_bn::ConvBnTrain::new(in_dims, k.dims(), geom(g), eps, true, s.clone())
    };
    let lead_stats = Arc::new(OnceLock::new());
    let lead_op = match lead {
        None => None,
        Some(l) => {
            let Some(op) = layer(&dims, l, &lead_stats) else {
                return Ok(None);
            };
            let (k, _, w, bias, _) = l;
            pieces.extend(param_pieces(k, w, bias)?);
            dims = op.out_shape().to_vec();
            Some(op)
        }
    };
    // Values per channel in a layer's statistics.
    let count = |[n, _, h, w]: [usize; 4]| n * h * w;
    let lead_count = lead_op.as_ref().map(|op| count(op.out_shape()));
    for b in blocks {
        let s = [Arc::new(OnceLock::new()), Arc::new(OnceLock::new())];
        let Some(op1) = layer(&dims, b.first, &s[0]) else {
            return Ok(None);
        };
        let Some(op2) = layer(&op1.out_shape(), b.second, &s[1]) else {
            return Ok(None);
        };
        let counts = [count(op1.out_shape()), count(op2.out_shape())];
        let shortcut = match b.zero_pad {
            Some((0, _, _)) => return Ok(None),
            Some((stride, front, back)) => Some(crate::shortcut::zero_pad::ZeroPad {
                stride,
                front,
                back,
            }),
            None => None,
        };
        let Some(op) = basic_block::BlockTrain::with_shortcut(&dims, op1, op2, shortcut) else {
            return Ok(None);
        };
        dims = op.out_dims().to_vec();
        for (k, _, w, bias, _) in [b.first, b.second] {
            pieces.extend(param_pieces(k, w, bias)?);
        }
        ops.push(op);
        stats.push((s, counts));
    }
    let Some(op) = block_chain::BlockChain::new(lead_op, ops) else {
        return Ok(None);
    };
    let params = Tensor::cat(&pieces, 0)?;
    let y = x.contiguous()?.apply_op2(&params, op)?;
    let lead_out = lead_count
        .map(|c| batch_stats(&lead_stats, c))
        .transpose()?;
    let out = stats
        .iter()
        .map(|([s1, s2], [c1, c2])| Ok([batch_stats(s1, *c1)?, batch_stats(s2, *c2)?]))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((y, lead_out, out)))
}

/// Whether the fused ops may run on these tensors: all f32 on the CPU, and the dispatch
/// allows them.
fn fusable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
        && {
            let d = crate::dispatch::current();
            d.fused_conv_bn && d.kernels == crate::dispatch::Kernels::Native
        }
}

fn geom(
    (padding, stride, dilation, groups): (usize, usize, usize, usize),
) -> crate::conv::geom::ConvGeom {
    crate::conv::geom::ConvGeom {
        padding,
        stride,
        dilation,
        groups,
    }
}

/// `[kernel; weight; bias]` flattened, the layout of a fused op's parameters, after checking
/// that the norm's parameters have one value per output channel.
fn packed_params(kernel: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&param_pieces(kernel, weight, bias)?, 0)?)
}

/// The three parts of [`packed_params`], flattened and checked.
fn param_pieces(kernel: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<[Tensor; 3]> {
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
    Ok([kernel.flatten_all()?, weight.clone(), bias.clone()])
}

/// The statistics a fused op recorded, over `count` values per channel.
fn batch_stats(stats: &OnceLock<conv_bn::Stats>, count: usize) -> Result<BatchStats> {
    let (mean, var) = stats
        .get()
        .ok_or_else(|| Error::config("conv_bn: the kernel did not record its statistics"))?;
    Ok(BatchStats {
        mean: mean.clone(),
        var: var.clone(),
        count,
    })
}

/// The fused op's output, or `None` where it does not apply.
fn fused_conv_bn(
    x: &Tensor,
    kernel: &Tensor,
    g: (usize, usize, usize, usize),
    (weight, bias): (&Tensor, &Tensor),
    (eps, relu): (f64, bool),
    residual: Option<&Tensor>,
) -> Result<Option<(Tensor, BatchStats)>> {
    let tensors: Vec<&Tensor> = [x, kernel, weight, bias]
        .into_iter()
        .chain(residual)
        .collect();
    if !fusable(&tensors) {
        return Ok(None);
    }
    let stats = Arc::new(OnceLock::new());
    let Some(op) =
        conv_bn::ConvBnTrain::new(x.dims(), kernel.dims(), geom(g), eps, relu, stats.clone())
    else {
        return Ok(None);
    };
    let params = packed_params(kernel, weight, bias)?;
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
    let count = y.elem_count() / kernel.dim(0)?;
    Ok(Some((y, batch_stats(&stats, count)?)))
}

#[cfg(test)]
mod tests;
