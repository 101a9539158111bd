//! A run of post-activation basic blocks (`basic_block.rs`), each block's output the next
//! one's input, as one training op.
//!
//! Candle's backward allocates a zero tensor and adds into it for the gradient of every op
//! input, on the calling thread while the kernels' threads wait. With one op per block that
//! is one activation-sized zero fill and add per block output: about 3.5% of a ResNet-20
//! training step's samples, in the twelfth session's profile. Inside the chain each block's
//! input gradient goes straight to the block before it, and Candle sees only the chain's
//! input.
//!
//! A chain may start with a lead layer, conv + BatchNorm + ReLU (a CIFAR ResNet's stem):
//! then Candle sees neither the stem's output nor its gradient, whose zero fill and add
//! (activation-sized, on the calling thread while the kernels' threads wait) were the
//! largest of that bookkeeping left, and the stem writes its output straight into the first
//! block's padded layout.
//!
//! The op's inputs are `x` and every layer's `[kernel; gamma; beta]`, concatenated in order
//! (the lead layer, then each block's first layer and second).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::basic_block::BlockTrain;
use super::conv_bn::{ConvBnTrain, Input};
use crate::buffer::{f32_slice, with_cpu_slice as with};

/// The fused chain; see the module docs.
pub(crate) struct BlockChain {
    /// The conv + BatchNorm + ReLU before the blocks, if any.
    lead: Option<ConvBnTrain>,
    blocks: Vec<BlockTrain>,
    /// Each block's input but the op's `x` (the lead's output, then each block's output but
    /// the last), saved by the forward.
    inputs: OnceLock<Vec<Vec<f32>>>,
}

impl BlockChain {
    /// The chain of `blocks` after the layer `lead` (with its ReLU) if given, or `None`
    /// unless each output has the next one's input dims (and there is a block).
    pub(crate) fn new(lead: Option<ConvBnTrain>, blocks: Vec<BlockTrain>) -> Option<BlockChain> {
        let linked = blocks.windows(2).all(|w| w[0].out_dims() == w[1].in_dims());
        let led = match (&lead, blocks.first()) {
            (Some(l), Some(b)) => l.out_shape() == b.in_dims(),
            _ => true,
        };
        (linked && led && !blocks.is_empty()).then(|| BlockChain {
            lead,
            blocks,
            inputs: OnceLock::new(),
        })
    }

    /// The chain's input dims.
    fn in_dims(&self) -> [usize; 4] {
        match &self.lead {
            Some(l) => l.in_shape(),
            None => self.blocks[0].in_dims(),
        }
    }

    /// The chain's output dims.
    pub(crate) fn out_dims(&self) -> [usize; 4] {
        self.blocks.last().map_or([0; 4], BlockTrain::out_dims)
    }

    /// The length of the lead layer's parameters (0 without one); they come first.
    fn lead_len(&self) -> usize {
        self.lead.as_ref().map_or(0, |l| l.param_lens().1)
    }

    /// Where each block's two parameter vectors start in the op's parameter input, and the
    /// total length.
    fn param_offsets(&self) -> (Vec<[usize; 3]>, usize) {
        let mut at = self.lead_len();
        let offsets = self
            .blocks
            .iter()
            .map(|b| {
                let [l1, l2] = b.param_lens();
                let o = [at, at + l1, at + l1 + l2];
                at += l1 + l2;
                o
            })
            .collect();
        (offsets, at)
    }

    /// Checks the input's dims and the parameters' length.
    fn check(&self, x: &Layout, params: usize) -> candle_core::Result<Vec<[usize; 3]>> {
        let (offsets, total) = self.param_offsets();
        if x.dims() != self.in_dims() || params != total {
            candle_core::bail!(
                "basic_block: input {:?} and {params} parameters do not match the chain's \
                 {:?} and {total}",
                x.dims(),
                self.in_dims()
            )
        }
        Ok(offsets)
    }
}

/// `(x, parameters)`: the last block's output.
impl CustomOp2 for BlockChain {
    fn name(&self) -> &'static str {
        "resblock-basic-block-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "basic_block";
        let (x, p) = (f32_slice(s1, l1, op)?, f32_slice(s2, l2, op)?);
        let offsets = self.check(l1, p.len())?;
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut y: Option<Vec<f32>> = None;
        // Each block's output also in the next block's first padded layout, where it takes
        // one: written with the output, not copied from it by the next block's forward and
        // again by its backward.
        let mut padded: Option<Vec<f32>> = None;
        if let Some(lead) = &self.lead {
            let next = (Some(self.blocks[0].first()), true);
            let p_lead = &p[..self.lead_len()];
            let (out, out_padded) = lead.forward_saving_for(Input::Plain(x), p_lead, None, next)?;
            y = out;
            padded = out_padded;
        }
        for (k, (b, [a, m, e])) in self.blocks.iter().zip(offsets).enumerate() {
            let input = (y.as_deref().unwrap_or(x), padded.take());
            let next = self.blocks.get(k + 1);
            let (out, out_padded) = b.forward(input, &p[a..m], &p[m..e], next)?;
            let Some(out) = out else {
                candle_core::bail!("basic_block: a block wrote no output")
            };
            if let Some(prev) = y.replace(out) {
                inputs.push(prev);
            }
            padded = out_padded;
        }
        if self.inputs.set(inputs).is_err() {
            candle_core::bail!("basic_block: a kernel instance ran twice");
        }
        let y = y.unwrap_or_default();
        Ok((CpuStorage::F32(y), Shape::from(self.out_dims().to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The input of a network needs no gradient: skip the first input-gradient convolution.
        let need_dx = x.track_op();
        let (dx, dp) = with(x, "basic_block", |xs: &[f32]| {
            with(p, "basic_block", |ps: &[f32]| {
                with(y, "basic_block", |ys: &[f32]| {
                    with(dy, "basic_block", |dys: &[f32]| {
                        self.grads(xs, ps, (ys, dys), need_dx)
                    })
                })
            })
        })?????;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(dp, p.shape(), dev)?),
        ))
    }
}

impl BlockChain {
    /// [`CustomOp2::bwd`] on the slices: the blocks in reverse, each block's input gradient
    /// the output gradient of the one before (or of the lead layer); the chain's input's
    /// only when `need_dx`.
    fn grads(
        &self,
        x: &[f32],
        p: &[f32],
        (y, dy): (&[f32], &[f32]),
        need_dx: bool,
    ) -> candle_core::Result<(Option<Vec<f32>>, Vec<f32>)> {
        let Some(inputs) = self.inputs.get() else {
            candle_core::bail!("basic_block: backward before forward")
        };
        // Block `k`'s input is `inputs[k - skip]`, or `x` (block 0 without a lead); block
        // `k + 1`'s input is block `k`'s output, and the last block's is `y`.
        let skip = usize::from(self.lead.is_none());
        let input = |k: usize| {
            k.checked_sub(skip)
                .and_then(|i| inputs.get(i))
                .map(Vec::as_slice)
        };
        let (offsets, total) = self.param_offsets();
        let mut dp = vec![0f32; total];
        let mut grad: Option<Vec<f32>> = None;
        for (k, (b, [a, m, e])) in self.blocks.iter().zip(offsets).enumerate().rev() {
            let output = input(k + 1).unwrap_or(y);
            let g = grad.as_deref().unwrap_or(dy);
            let want_dx = k > 0 || self.lead.is_some() || need_dx;
            let x_k = input(k).unwrap_or(x);
            let (dx, dp1, dp2) = b.grads((x_k, &p[a..m], &p[m..e]), (output, g), want_dx)?;
            dp[a..m].copy_from_slice(&dp1);
            dp[m..e].copy_from_slice(&dp2);
            if !want_dx {
                return Ok((None, dp));
            }
            let Some(dx) = dx else {
                candle_core::bail!("basic_block: a block gave no input gradient")
            };
            grad = Some(dx);
        }
        let Some(g) = grad else {
            candle_core::bail!("basic_block: a chain without blocks")
        };
        match &self.lead {
            Some(lead) => {
                let n = self.lead_len();
                let (dx, dp_lead) =
                    lead.backward_saved((Input::Plain(x), &p[..n]), &g, (need_dx, true), None)?;
                dp[..n].copy_from_slice(&dp_lead);
                Ok((dx, dp))
            }
            None => Ok((Some(g), dp)),
        }
    }
}
