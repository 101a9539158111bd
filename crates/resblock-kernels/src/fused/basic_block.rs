//! A post-activation basic block with an identity shortcut,
//! `relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`, on the slices of one training op
//! (`block_chain.rs`): the two fused conv-BN layers of `conv_bn.rs`, the sum and the ReLU.
//!
//! Run as two ops, Candle's backward allocates a zero tensor and adds into it for the
//! gradient of every op input: for the block's middle activation, and twice for `x` (read by
//! the first convolution and by the sum). Those zero fills and adds run on the calling
//! thread, one at a time, while the kernels' threads wait: about a tenth of a ResNet-20
//! training step. Here the block's input gradient is the first convolution's plus the
//! residual's, added as the first layer writes its input gradient (where it runs on the
//! direct kernels; after, on all threads, elsewhere).
//!
//! The activations a convolution reads go straight into its padded layout
//! (`conv::direct::Plan::write_padded_plane`) where it runs on the stride-1 direct kernels:
//! the middle one only there, the block's output also there for the next block of a chain.
//! Otherwise each was written plainly, then copied into the layout by the forward and again
//! by the backward: about 1% of a ResNet-20 training step.
//!
//! A downsampling block with the option-A shortcut (`conv1` of stride 2, the block's sum
//! taking `zero_pad(x)` for `x`) is the same block with the shortcut computed inside: the
//! bookkeeping for the middle activation, the shortcut's output and `x`'s second use goes
//! too.

use std::sync::OnceLock;

use super::conv_bn::{ConvBnTrain, Input, Written};
use crate::norm::simd::relu_grad;
use crate::shortcut::zero_pad::{self, ZeroPad};

/// One fused block; see the module docs.
pub(crate) struct BlockTrain {
    first: ConvBnTrain,
    second: ConvBnTrain,
    /// The first layer's output (the second's input), saved by the forward.
    mid: OnceLock<Mid>,
    /// The input in the first layer's padded layout, when the block before wrote it so
    /// (kept for the weight gradient).
    x_padded: OnceLock<Option<Vec<f32>>>,
    /// `(n, c, h, w)`: the input's dims.
    dims: [usize; 4],
    /// The option-A shortcut; `None` for the identity.
    shortcut: Option<ZeroPad>,
}

impl BlockTrain {
    /// The block of `first` (with its ReLU) and `second` (with the sum and the ReLU) on
    /// input dims `x`, with the option-A shortcut `shortcut` when given, else the identity;
    /// `None` unless the first's output is the second's input and the second's output has
    /// the shortcut's output shape (`x`'s for the identity: stride 1, as many channels out
    /// as in).
    pub(crate) fn with_shortcut(
        x: &[usize],
        first: ConvBnTrain,
        second: ConvBnTrain,
        shortcut: Option<ZeroPad>,
    ) -> Option<BlockTrain> {
        let dims: [usize; 4] = x.try_into().ok()?;
        let out = match &shortcut {
            None => dims,
            Some(z) => {
                let (n, c, h, w) = z.out_dims((dims[0], dims[1], dims[2], dims[3]));
                [n, c, h, w]
            }
        };
        let ok = first.out_shape() == second.in_shape() && second.out_shape() == out;
        ok.then(|| BlockTrain {
            first,
            second,
            mid: OnceLock::new(),
            x_padded: OnceLock::new(),
            dims,
            shortcut,
        })
    }

    /// `x`'s dims as a tuple.
    fn dims4(&self) -> (usize, usize, usize, usize) {
        let [n, c, h, w] = self.dims;
        (n, c, h, w)
    }

    /// The input's dims.
    pub(crate) fn in_dims(&self) -> [usize; 4] {
        self.dims
    }

    /// The first layer (conv1 + bn1 + ReLU).
    pub(crate) fn first(&self) -> &ConvBnTrain {
        &self.first
    }

    /// The output's dims.
    pub(crate) fn out_dims(&self) -> [usize; 4] {
        self.second.out_shape()
    }

    /// The lengths of the two layers' `[kernel; gamma; beta]`.
    pub(crate) fn param_lens(&self) -> [usize; 2] {
        [self.first.param_lens().1, self.second.param_lens().1]
    }

    /// The block's output on `x` with the layers' parameters `p1` and `p2`, keeping the
    /// middle activation for [`BlockTrain::grads`]. The output is written plainly and, where
    /// `next`'s first layer takes a padded input ([`ConvBnTrain::padded_input`]), also in
    /// that layout, for `next.forward`'s `x_padded`. `x_padded` is `x` in this block's first
    /// layer's layout, written so by the block before; it is kept for the weight gradient
    /// (one padded activation more held until the backward, against two copies of `x` into
    /// that layout saved).
    pub(crate) fn forward(
        &self,
        (x, x_padded): (&[f32], Option<Vec<f32>>),
        p1: &[f32],
        p2: &[f32],
        next: Option<&BlockTrain>,
    ) -> candle_core::Result<Written> {
        let input = Input::of(x, x_padded.as_deref());
        // The middle activation is read by the second convolution only: where that takes
        // a padded input it is written there alone, not written plainly to be copied into
        // that layout in the forward and again in the backward.
        let mid =
            match self
                .first
                .forward_saving_for(input, p1, None, (Some(&self.second), false))?
            {
                (_, Some(padded)) => Mid::Padded(padded),
                (Some(plain), None) => Mid::Plain(plain),
                (None, None) => candle_core::bail!("basic_block: the first layer wrote no output"),
            };
        let next = (next.map(|b| &b.first), true);
        let y = match &self.shortcut {
            None => self
                .second
                .forward_saving_for(mid.input(), p2, Some(x), next)?,
            Some(z) => {
                let res = zero_pad::forward(x, self.dims4(), z);
                self.second
                    .forward_saving_for(mid.input(), p2, Some(&res), next)?
            }
        };
        if self.mid.set(mid).is_err() || self.x_padded.set(x_padded).is_err() {
            candle_core::bail!("basic_block: a kernel instance ran twice");
        }
        Ok(y)
    }
}

/// The gradients of `x` (when wanted) and of the two parameter vectors.
pub(crate) type BlockGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

impl BlockTrain {
    /// The gradients of the block with input `x`, parameters `p1` and `p2` and output `y`
    /// for the output gradient `dy` (of `x` only when `need_dx`), after
    /// [`BlockTrain::forward`]. `g`, the gradient through the block's ReLU, is the
    /// residual's and the second norm's output gradient; the first layer's input gradient
    /// plus `g` is the block's.
    pub(crate) fn grads(
        &self,
        (x, p1, p2): (&[f32], &[f32], &[f32]),
        (y, dy): (&[f32], &[f32]),
        need_dx: bool,
    ) -> candle_core::Result<BlockGrads> {
        let (Some(mid), Some(x_padded)) = (self.mid.get(), self.x_padded.get()) else {
            candle_core::bail!("basic_block: backward before forward")
        };
        let g = relu_grad(y, dy);
        let (dmid, dp2) = self
            .second
            .backward_saved((mid.input(), p2), &g, (true, false), None)?;
        let Some(dmid) = dmid else {
            candle_core::bail!("basic_block: the second layer gave no input gradient")
        };
        // With the identity, the residual's gradient `g` is added to the first layer's input
        // gradient as that is written; the zero-pad shortcut's is scattered into it after.
        let add = self.shortcut.is_none().then_some(&g[..]);
        let input = Input::of(x, x_padded.as_deref());
        let (mut dx, dp1) = self
            .first
            .backward_saved((input, p1), &dmid, (need_dx, true), add)?;
        if let (Some(z), Some(dx)) = (&self.shortcut, &mut dx) {
            zero_pad::add_backward(dx, &g, self.dims4(), z);
        }
        Ok((dx, dp1, dp2))
    }
}

/// The middle activation, as the second layer takes it.
enum Mid {
    Plain(Vec<f32>),
    Padded(Vec<f32>),
}

impl Mid {
    fn input(&self) -> Input<'_> {
        match self {
            Mid::Plain(v) => Input::Plain(v),
            Mid::Padded(v) => Input::Padded(v),
        }
    }
}
