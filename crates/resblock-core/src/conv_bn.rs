//! [`ConvBn`]: a convolution and the BatchNorm after it as one layer that decides itself how
//! to run: as one fused op in training where the kernels have one
//! ([`crate::ops::conv_batch_norm_train`]), with the norm in the convolution's epilogue at
//! inference ([`crate::ops::conv2d_scale_shift`]), as two ops elsewhere.

use candle_core::{Module, ModuleT, Tensor};

use crate::error::Result;
use crate::layers::{BatchNorm, Conv2d};

/// A convolution followed by an optional BatchNorm (absent once folded, or in blocks that
/// normalise elsewhere). The parameter names stay the two layers' own (`conv1.weight`,
/// `bn1.weight`, ...): a `ConvBn` is built from the two.
#[derive(Debug, Clone)]
pub struct ConvBn {
    conv: Conv2d,
    norm: Option<BatchNorm>,
}

impl ConvBn {
    /// `conv` followed by `norm`.
    pub fn new(conv: Conv2d, norm: Option<BatchNorm>) -> Self {
        Self { conv, norm }
    }
    /// The convolution.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }
    /// The norm, if any.
    pub fn norm(&self) -> Option<&BatchNorm> {
        self.norm.as_ref()
    }

    /// The layer with its norm folded into the convolution (eval only; plain tensors).
    ///
    /// # Errors
    /// A norm whose channels differ from the convolution's outputs.
    pub fn folded(&self) -> Result<Self> {
        Ok(match &self.norm {
            Some(bn) => Self::new(self.conv.fold_batch_norm(bn)?, None),
            None => self.clone(),
        })
    }

    /// `relu(self.forward_t(x, train))`.
    ///
    /// # Shapes
    /// - input: (N, C_in, H, W); output: (N, C_out, H_out, W_out)
    ///
    /// # Errors
    /// As [`ModuleT::forward_t`].
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, true)
    }

    /// `relu(self.forward_t(x, train) + residual)`: the end of a post-activation residual
    /// block. In training on our CPU kernels the convolution, the norm, the sum and the ReLU
    /// run as one op ([`crate::ops::conv_batch_norm_add_relu_train`]); in eval mode, when
    /// neither input needs a gradient, the norm (or folded bias), the sum and the ReLU are
    /// the convolution's epilogue ([`crate::ops::conv2d_add_relu`]).
    ///
    /// # Shapes
    /// - input: (N, C_in, H, W); residual and output: (N, C_out, H_out, W_out)
    ///
    /// # Errors
    /// As [`ModuleT::forward_t`], or a residual of another shape.
    pub fn forward_add_relu_t(
        &self,
        x: &Tensor,
        residual: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let c = self.conv.config();
        match &self.norm {
            Some(bn) if train && self.conv.bias().is_none() => {
                let (y, stats) = crate::ops::conv_batch_norm_add_relu_train(
                    x,
                    self.conv.weight(),
                    (c.padding, c.stride, c.dilation, c.groups),
                    bn.weight(),
                    bn.bias(),
                    bn.config().eps,
                    residual,
                )
                .map_err(candle_core::Error::wrap)?;
                bn.track(&stats)?;
                Ok(y)
            }
            _ if !train && !x.track_op() && !residual.track_op() => self.eval_add_relu(x, residual),
            _ => {
                let y = self.run(x, train, false)?;
                crate::ops::add_relu(residual, &y).map_err(candle_core::Error::wrap)
            }
        }
    }

    /// Inference `relu(self(x) + residual)` with the norm (or the folded bias), the sum and
    /// the ReLU in the convolution's output pass ([`crate::ops::conv2d_add_relu`]); the
    /// parameters are constants here, as in eval mode's [`ConvBn::forward_t`].
    fn eval_add_relu(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let conv = &self.conv;
        let c = conv.config();
        let bias = conv.bias().map(Tensor::detach);
        let scale_shift = match &self.norm {
            Some(bn) => Some(self.eval_scale_shift(bn)?),
            None => None,
        };
        let affine = match (&scale_shift, &bias) {
            (Some((scale, shift)), _) => crate::ops::ChannelAffine::ScaleShift(scale, shift),
            (None, Some(b)) => crate::ops::ChannelAffine::Bias(b),
            (None, None) => crate::ops::ChannelAffine::None,
        };
        crate::ops::conv2d_add_relu(
            x,
            &conv.weight().detach(),
            affine,
            residual,
            c.padding,
            c.stride,
            c.dilation,
            c.groups,
        )
        .map_err(candle_core::Error::wrap)
    }

    /// `relu(second.forward_t(relu(self.forward_t(x)), train) + x)`: a post-activation basic
    /// block's branch (`self`, then `second`) and its identity shortcut. In training on our
    /// CPU kernels the whole block is one op ([`crate::ops::basic_block_train`]).
    ///
    /// # Shapes
    /// - input and output: (N, C, H, W)
    ///
    /// # Errors
    /// As [`ConvBn::forward_add_relu_t`].
    pub fn identity_block_t(
        &self,
        second: &ConvBn,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let layers = (self.fused_train_layer(), second.fused_train_layer());
        if let (true, (Some((l1, bn1)), Some((l2, bn2)))) = (train, layers) {
            let (y, [s1, s2]) =
                crate::ops::basic_block_train(x, l1, l2).map_err(candle_core::Error::wrap)?;
            bn1.track(&s1)?;
            bn2.track(&s2)?;
            return Ok(y);
        }
        let y = self.forward_relu_t(x, train)?;
        second.forward_add_relu_t(&y, x, train)
    }

    /// `relu(second.forward_t(relu(self.forward_t(x)), train) + zero_pad(x))`: a
    /// post-activation basic block's branch with the option-A shortcut
    /// ([`crate::ops::zero_pad_shortcut`] with `(stride, front, back)`), a CIFAR ResNet's
    /// downsampling block. In training on our CPU kernels the whole block is one op
    /// ([`crate::ops::zero_pad_block_train`]).
    ///
    /// # Shapes
    /// - input: (N, C, H, W); output: (N, front + C + back, ceil(H/s), ceil(W/s))
    ///
    /// # Errors
    /// As [`ConvBn::forward_add_relu_t`].
    pub fn zero_pad_block_t(
        &self,
        second: &ConvBn,
        x: &Tensor,
        (stride, front, back): (usize, usize, usize),
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let layers = (self.fused_train_layer(), second.fused_train_layer());
        if let (true, (Some((l1, bn1)), Some((l2, bn2)))) = (train, layers) {
            let (y, [s1, s2]) = crate::ops::zero_pad_block_train(x, l1, l2, (stride, front, back))
                .map_err(candle_core::Error::wrap)?;
            bn1.track(&s1)?;
            bn2.track(&s2)?;
            return Ok(y);
        }
        let y = self.forward_relu_t(x, train)?;
        let s = crate::ops::zero_pad_shortcut(x, stride, front, back)
            .map_err(candle_core::Error::wrap)?;
        second.forward_add_relu_t(&y, &s, train)
    }

    /// The fused ops' view of this layer, or `None` where it has a convolution bias or no
    /// norm.
    fn fused_train_layer(&self) -> Option<(crate::ops::fused::Layer<'_>, &BatchNorm)> {
        let bn = self.norm.as_ref()?;
        self.conv
            .bias()
            .is_none()
            .then(|| (self.fused_layer(bn), bn))
    }

    /// The eval-mode `(scale, shift)` per output channel of this convolution's bias (if any)
    /// followed by its norm `bn`, detached (constants, as eval mode takes them).
    fn eval_scale_shift(&self, bn: &BatchNorm) -> candle_core::Result<(Tensor, Tensor)> {
        let (scale, shift) = bn.eval_scale_shift().map_err(candle_core::Error::wrap)?;
        let (scale, shift) = (scale.detach(), shift.detach());
        let shift = match self.conv.bias() {
            Some(b) => ((b.detach() * &scale)? + shift)?,
            None => shift,
        };
        Ok((scale, shift))
    }

    /// This layer as the fused ops take it, with its norm `bn`.
    fn fused_layer<'a>(&'a self, bn: &'a BatchNorm) -> crate::ops::fused::Layer<'a> {
        let c = self.conv.config();
        let geom = (c.padding, c.stride, c.dilation, c.groups);
        (
            self.conv.weight(),
            geom,
            bn.weight(),
            bn.bias(),
            bn.config().eps,
        )
    }

    fn run(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        let conv = &self.conv;
        let c = conv.config();
        let Some(bn) = &self.norm else {
            return if relu {
                conv.forward_relu(x)
            } else {
                conv.forward(x)
            };
        };
        if !train {
            // Eval mode is inference: parameters are constants (see `BatchNorm`'s eval mode).
            if x.track_op() {
                // A gradient with respect to the input is wanted: composed ops.
                let conv = Conv2d::new(conv.weight().detach(), conv.bias().map(Tensor::detach), *c);
                return bn.run(&conv.forward(x)?, train, relu);
            }
            // The norm in the convolution's epilogue.
            let (scale, shift) = self.eval_scale_shift(bn)?;
            return crate::ops::conv2d_scale_shift(
                x,
                &conv.weight().detach(),
                (&scale, &shift),
                relu,
                c.padding,
                c.stride,
                c.dilation,
                c.groups,
            )
            .map_err(candle_core::Error::wrap);
        }
        if conv.bias().is_some() {
            return bn.run(&conv.forward(x)?, train, relu);
        }
        let (y, stats) = crate::ops::conv_batch_norm_train(
            x,
            conv.weight(),
            (c.padding, c.stride, c.dilation, c.groups),
            bn.weight(),
            bn.bias(),
            bn.config().eps,
            relu,
        )
        .map_err(candle_core::Error::wrap)?;
        bn.track(&stats)?;
        Ok(y)
    }
}

impl ModuleT for ConvBn {
    /// `norm(conv(x))`: one op in training where the kernels have one.
    ///
    /// # Shapes
    /// - input: (N, C_in, H, W); output: (N, C_out, H_out, W_out)
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, false)
    }
}

/// One basic block of [`basic_block_chain_t`]: its two layers (`conv1` + `bn1`, `conv2` +
/// `bn2`) and its shortcut, the option-A one `(stride, front, back)` or `None` for the
/// identity.
pub type ChainedBlock<'a> = (&'a ConvBn, &'a ConvBn, Option<(usize, usize, usize)>);

/// A run of post-activation basic blocks in training, each block's output the next one's
/// input: the blocks' [`ConvBn::identity_block_t`] or [`ConvBn::zero_pad_block_t`] in turn,
/// as one op on our CPU kernels ([`crate::ops::basic_block_chain_train`]), which saves
/// Candle's gradient bookkeeping for every block output but the last. The norms' running
/// statistics are updated as those calls would.
///
/// `None` where a layer has a convolution bias or no norm: then run the blocks one by one.
///
/// # Shapes
/// - input: the first block's (N, C, H, W); output: the last block's
///
/// # Errors
/// As [`ConvBn::identity_block_t`] and [`ConvBn::zero_pad_block_t`].
pub fn basic_block_chain_t(
    x: &Tensor,
    blocks: &[ChainedBlock<'_>],
) -> candle_core::Result<Option<Tensor>> {
    chain_t(x, None, blocks)
}

/// `lead.forward_relu_t(x, true)` (a CIFAR ResNet's stem), then [`basic_block_chain_t`] on
/// its output, as one op on our CPU kernels ([`crate::ops::conv_bn_relu_chain_train`]),
/// which also saves Candle's gradient bookkeeping for the stem's output (a zero fill and an
/// add of its size, on one thread while the kernels' threads wait).
///
/// `None` where a layer (the lead's too) has a convolution bias or no norm: then run the
/// lead and the blocks apart.
///
/// # Shapes
/// - input: the lead's (N, C_in, H, W); output: the last block's
///
/// # Errors
/// As [`ConvBn::forward_relu_t`] and [`basic_block_chain_t`].
pub fn conv_bn_relu_chain_t(
    x: &Tensor,
    lead: &ConvBn,
    blocks: &[ChainedBlock<'_>],
) -> candle_core::Result<Option<Tensor>> {
    chain_t(x, Some(lead), blocks)
}

/// [`basic_block_chain_t`] after the layer `lead` with its ReLU, if given.
fn chain_t(
    x: &Tensor,
    lead: Option<&ConvBn>,
    blocks: &[ChainedBlock<'_>],
) -> candle_core::Result<Option<Tensor>> {
    let mut chain = Vec::with_capacity(blocks.len());
    let mut norms = Vec::with_capacity(blocks.len());
    for &(first, second, zero_pad) in blocks {
        let (Some((l1, bn1)), Some((l2, bn2))) =
            (first.fused_train_layer(), second.fused_train_layer())
        else {
            return Ok(None);
        };
        chain.push(crate::ops::ChainBlock {
            first: l1,
            second: l2,
            zero_pad,
        });
        norms.push([bn1, bn2]);
    }
    let (y, stats) = match lead {
        None => crate::ops::basic_block_chain_train(x, &chain).map_err(candle_core::Error::wrap)?,
        Some(lead) => {
            let Some((l, bn)) = lead.fused_train_layer() else {
                return Ok(None);
            };
            let (y, s, stats) = crate::ops::conv_bn_relu_chain_train(x, l, &chain)
                .map_err(candle_core::Error::wrap)?;
            bn.track(&s)?;
            (y, stats)
        }
    };
    for (bns, ss) in norms.iter().zip(&stats) {
        for (bn, s) in bns.iter().zip(ss) {
            bn.track(s)?;
        }
    }
    Ok(Some(y))
}
