//! A post-activation basic block with an identity shortcut,
//! `relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`, as one training op: the two fused conv-BN
//! ops of `conv_bn.rs` run inside it.
//!
//! Run as two ops, Candle's backward allocates a zero tensor and adds into it for the
//! gradient of every op input: for the block's middle activation, and twice for `x` (read by
//! the first convolution and by the sum). Those zero fills and adds run on the calling
//! thread, one at a time, while the kernels' threads wait: about a tenth of a ResNet-20
//! training step. Here the block's input gradient is the first convolution's plus the
//! residual's, added as the first layer writes its input gradient (where it runs on the
//! direct kernels; after, on all threads, elsewhere), and Candle sees one input of
//! activation size.
//!
//! A downsampling block with the option-A shortcut (`conv1` of stride 2, the block's sum
//! taking `zero_pad(x)` for `x`) is the same op with the shortcut computed inside: Candle's
//! bookkeeping for the middle activation, the shortcut's output and `x`'s second use goes
//! too.
//!
//! The op's inputs are `x` and the two layers' `[kernel; gamma; beta]`.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::conv_bn::ConvBnTrain;
use crate::buffer::{f32_slice, with_cpu_slice as with};
use crate::norm::simd::relu_grad;
use crate::shortcut::zero_pad::{self, ZeroPad};

/// The fused block; see the module docs.
pub(crate) struct BlockTrain {
    first: ConvBnTrain,
    second: ConvBnTrain,
    /// The first layer's output (the second's input), saved by the forward.
    mid: OnceLock<Vec<f32>>,
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
            dims,
            shortcut,
        })
    }

    /// `x`'s dims as a tuple.
    fn dims4(&self) -> (usize, usize, usize, usize) {
        let [n, c, h, w] = self.dims;
        (n, c, h, w)
    }

    /// The checked slices of `x` and the two parameter vectors.
    fn inputs<'a>(
        &self,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
        (s3, l3): (&'a CpuStorage, &Layout),
    ) -> candle_core::Result<(&'a [f32], &'a [f32], &'a [f32])> {
        let op = "basic_block";
        let (x, p1, p2) = (
            f32_slice(s1, l1, op)?,
            f32_slice(s2, l2, op)?,
            f32_slice(s3, l3, op)?,
        );
        if l1.dims() != self.dims
            || p1.len() != self.first.param_lens().1
            || p2.len() != self.second.param_lens().1
        {
            candle_core::bail!(
                "basic_block: input {:?} and {} + {} parameters do not match the block's shapes",
                l1.dims(),
                p1.len(),
                p2.len()
            )
        }
        Ok((x, p1, p2))
    }
}

/// `(x, [kernel1; gamma1; beta1], [kernel2; gamma2; beta2])`: the block's output.
impl CustomOp3 for BlockTrain {
    fn name(&self) -> &'static str {
        "resblock-basic-block-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, p1, p2) = self.inputs((s1, l1), (s2, l2), (s3, l3))?;
        let mid = self.first.forward_saving(x, p1, None)?;
        let y = match &self.shortcut {
            None => self.second.forward_saving(&mid, p2, Some(x))?,
            Some(z) => {
                let res = zero_pad::forward(x, self.dims4(), z);
                self.second.forward_saving(&mid, p2, Some(&res))?
            }
        };
        if self.mid.set(mid).is_err() {
            candle_core::bail!("basic_block: a kernel instance ran twice");
        }
        Ok((
            CpuStorage::F32(y),
            Shape::from(self.second.out_shape().to_vec()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(mid) = self.mid.get() else {
            candle_core::bail!("basic_block: backward before forward")
        };
        // The input of a network needs no gradient: skip the first input-gradient convolution.
        let need_dx = x.track_op();
        let (dx, dp1, dp2) = with(x, "basic_block", |xs: &[f32]| {
            with(p1, "basic_block", |p1s: &[f32]| {
                with(p2, "basic_block", |p2s: &[f32]| {
                    with(y, "basic_block", |ys: &[f32]| {
                        with(dy, "basic_block", |dys: &[f32]| {
                            self.grads((xs, p1s, p2s), (ys, dys), (mid, need_dx))
                        })
                    })
                })
            })
        })??????;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(dp1, p1.shape(), dev)?),
            Some(Tensor::from_vec(dp2, p2.shape(), dev)?),
        ))
    }
}

/// The gradients of `x` (when wanted) and of the two parameter vectors.
type BlockGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

impl BlockTrain {
    /// [`CustomOp3::bwd`] on the slices: `g`, the gradient through the block's ReLU, is the
    /// residual's and the second norm's output gradient; the first layer's input gradient
    /// plus `g` is the block's.
    fn grads(
        &self,
        (x, p1, p2): (&[f32], &[f32], &[f32]),
        (y, dy): (&[f32], &[f32]),
        (mid, need_dx): (&[f32], bool),
    ) -> candle_core::Result<BlockGrads> {
        let g = relu_grad(y, dy);
        let (dmid, dp2) = self
            .second
            .backward_saved((mid, p2), &g, (true, false), None)?;
        let Some(dmid) = dmid else {
            candle_core::bail!("basic_block: the second layer gave no input gradient")
        };
        // With the identity, the residual's gradient `g` is added to the first layer's input
        // gradient as that is written; the zero-pad shortcut's is scattered into it after.
        let add = self.shortcut.is_none().then_some(&g[..]);
        let (mut dx, dp1) = self
            .first
            .backward_saved((x, p1), &dmid, (need_dx, true), add)?;
        if let (Some(z), Some(dx)) = (&self.shortcut, &mut dx) {
            zero_pad::add_backward(dx, &g, self.dims4(), z);
        }
        Ok((dx, dp1, dp2))
    }
}
