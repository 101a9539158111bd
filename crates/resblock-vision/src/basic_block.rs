//! The BasicBlock of ResNet-18/34 and the CIFAR ResNets (the article's CNN block).

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;
use resblock_core::{
    batch_norm, conv2d, Activation, BatchNorm, BatchNormConfig, Branch, Conv2d, Conv2dConfig,
    ConvBn, ConvInit, Norm, PreActivation, ProjectionConfig, Residual, ResidualScale, RngHandle,
    Shortcut, ShortcutPolicy,
};

use crate::error::{Error, Result};

/// Configuration of a [`BasicBlock`]. The default is torchvision's: stride 1, projection
/// shortcut (option B) when the shape changes, post-activation, no zero-init, no drop-path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BasicBlockConfig {
    /// Stride of the first 3x3 convolution (and of the shortcut).
    pub stride: usize,
    /// Dilation of both 3x3 convolutions (padding follows it).
    pub dilation: usize,
    /// Which shortcut the block gets.
    pub shortcut: ShortcutPolicy,
    /// Pre-activation ordering (BN-ReLU-conv, He et al. 2016b) instead of conv-BN-ReLU.
    pub pre_activation: bool,
    /// Residual scaling. `ZeroInit` zeroes `bn2`'s gamma (post-activation) or `conv2`'s
    /// weight (pre-activation), so the block starts as the identity
    /// (torchvision's `zero_init_residual`).
    pub scale: ResidualScale,
    /// Drop-path probability of the residual branch.
    pub drop_path: f64,
    /// Initialisation of the convolutions (torchvision: Kaiming normal, fan-out).
    pub conv_init: ConvInit,
    /// The batch norms' configuration.
    pub norm: BatchNormConfig,
}

impl Default for BasicBlockConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            dilation: 1,
            shortcut: ShortcutPolicy::Projection,
            pre_activation: false,
            scale: ResidualScale::None,
            drop_path: 0.,
            conv_init: ConvInit::KaimingNormalFanOut,
            norm: BatchNormConfig::default(),
        }
    }
}

/// The residual branch of a [`BasicBlock`]: `conv1 -> bn1 -> relu -> conv2 -> bn2`
/// (post-activation), or `conv1 -> bn2 -> relu -> conv2` after the block's `bn1 -> relu`
/// pre-activation stage. Each conv + BN pair is a [`ConvBn`], which runs as one op in
/// training where the kernels allow; the block's end (`conv2`, `bn2`, the shortcut sum and
/// the ReLU) is one op too ([`Branch::forward_end`]).
#[derive(Debug, Clone)]
pub struct BasicBranch {
    first: ConvBn,
    second: ConvBn,
}

impl BasicBranch {
    /// The first 3x3 convolution.
    pub fn conv1(&self) -> &Conv2d {
        self.first.conv()
    }
    /// The second 3x3 convolution.
    pub fn conv2(&self) -> &Conv2d {
        self.second.conv()
    }
    /// The norm between the convolutions (`bn1`, or `bn2` in pre-activation blocks); `None`
    /// once folded into `conv1`.
    pub fn mid_norm(&self) -> Option<&BatchNorm> {
        self.first.norm()
    }
    /// The norm after `conv2` (`bn2`), absent in pre-activation blocks.
    pub fn last_norm(&self) -> Option<&BatchNorm> {
        self.second.norm()
    }
    /// The two conv (+ BN) layers.
    pub fn layers(&self) -> [&ConvBn; 2] {
        [&self.first, &self.second]
    }

    /// The branch with every conv + BN pair folded (eval only). In pre-activation blocks the
    /// norm between the convolutions follows `conv1` and folds too.
    ///
    /// # Errors
    /// Mismatched channels.
    pub fn folded(&self) -> Result<Self> {
        Ok(Self {
            first: self.first.folded()?,
            second: self.second.folded()?,
        })
    }
}

impl ModuleT for BasicBranch {
    /// # Shapes
    /// - input: (N, C_in, H, W); output: (N, C_out, ceil(H/s), ceil(W/s))
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.first.forward_relu_t(x, train)?;
        self.second.forward_t(&y, train)
    }
}

impl Branch for BasicBranch {
    /// `relu(self(x) + s)`, with `conv2`, `bn2`, the sum and the ReLU as one op in training
    /// where our kernels allow; with an identity shortcut (`s` is `x`), the whole block.
    fn forward_end(&self, x: &Tensor, s: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if s.id() == x.id() {
            return self.first.identity_block_t(&self.second, x, train);
        }
        let y = self.first.forward_relu_t(x, train)?;
        self.second.forward_add_relu_t(&y, s, train)
    }

    /// In training, a block with the option-A shortcut is one op
    /// ([`ConvBn::zero_pad_block_t`]); other shortcuts go through [`Branch::forward_end`].
    fn forward_block(
        &self,
        x: &Tensor,
        shortcut: &Shortcut,
        train: bool,
    ) -> Option<candle_core::Result<Tensor>> {
        match shortcut {
            Shortcut::ZeroPad {
                stride,
                front,
                back,
            } if train => {
                Some(
                    self.first
                        .zero_pad_block_t(&self.second, x, (*stride, *front, *back), train),
                )
            }
            _ => None,
        }
    }
}

/// A ResNet basic block: two 3x3 convolutions and a shortcut.
pub type BasicBlock = Residual<BasicBranch>;

/// Creates a basic block from `in_c` to `out_c` channels under `vb`, with torchvision's
/// parameter names: `conv1`, `bn1`, `conv2`, `bn2`, `downsample.0` (1x1 conv) and
/// `downsample.1` (its BN; absent in pre-activation blocks), `alpha` with ReZero.
///
/// # Shapes
/// - input: (N, in_c, H, W); output: (N, out_c, ceil(H/stride), ceil(W/stride))
///
/// # Errors
/// An identity shortcut that cannot match the shape, zero channels or stride, a bad
/// drop-path probability, or variables of other shapes under `vb`.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::VarMap;
/// use resblock_core::{seeded_var_builder, RngHandle};
/// use resblock_vision::{basic_block, BasicBlockConfig};
///
/// let rng = RngHandle::seed_from_u64(0);
/// let varmap = VarMap::new();
/// let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
/// // The article's ResidualBlock(16, 32, stride=2): projection shortcut.
/// let cfg = BasicBlockConfig { stride: 2, ..Default::default() };
/// let block = basic_block(16, 32, cfg, &rng, vb)?;
/// let y = block.forward_t(&Tensor::zeros((2, 16, 32, 32), DType::F32, &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), [2, 32, 16, 16]);
/// # Ok::<(), resblock_vision::Error>(())
/// ```
pub fn basic_block(
    in_c: usize,
    out_c: usize,
    cfg: BasicBlockConfig,
    rng: &RngHandle,
    vb: VarBuilder<'_>,
) -> Result<BasicBlock> {
    let projection = ProjectionConfig {
        norm: !cfg.pre_activation,
        norm_config: cfg.norm,
        init: cfg.conv_init,
    };
    let shortcut = Shortcut::for_conv_block(
        cfg.shortcut,
        in_c,
        out_c,
        cfg.stride,
        projection,
        vb.pp("downsample"),
    )?;
    basic_block_with_shortcut(in_c, out_c, shortcut, cfg, rng, vb)
}

/// [`basic_block`] with a shortcut built by the caller (`cfg.shortcut` is ignored): the
/// ResNet builder uses this for avg-down shortcuts.
///
/// # Errors
/// As [`basic_block`].
pub fn basic_block_with_shortcut(
    in_c: usize,
    out_c: usize,
    shortcut: Shortcut,
    cfg: BasicBlockConfig,
    rng: &RngHandle,
    vb: VarBuilder<'_>,
) -> Result<BasicBlock> {
    if in_c == 0 || out_c == 0 || cfg.stride == 0 || cfg.dilation == 0 {
        return Err(Error::config(format!(
            "basic block {}: channels, stride and dilation must be positive ({in_c}->{out_c}, {cfg:?})",
            vb.prefix()
        )));
    }
    let zero_init = cfg.scale == ResidualScale::ZeroInit;
    let conv = |i, o, stride, zero: bool, name: &str| -> Result<Conv2d> {
        let init = if zero { ConvInit::Zeros } else { cfg.conv_init };
        Ok(conv2d(
            i,
            o,
            3,
            Conv2dConfig {
                padding: cfg.dilation,
                stride,
                dilation: cfg.dilation,
                bias: false,
                init,
                ..Default::default()
            },
            vb.pp(name),
        )?)
    };
    let bn = |c, gamma0: bool, name: &str| -> Result<BatchNorm> {
        let ncfg = BatchNormConfig {
            weight_init: if gamma0 { 0. } else { cfg.norm.weight_init },
            ..cfg.norm
        };
        Ok(batch_norm(c, ncfg, vb.pp(name))?)
    };
    let block = if cfg.pre_activation {
        let pre = PreActivation {
            norm: Norm::Batch(bn(in_c, false, "bn1")?),
            activation: Some(Activation::Relu),
        };
        let branch = BasicBranch {
            first: ConvBn::new(
                conv(in_c, out_c, cfg.stride, false, "conv1")?,
                Some(bn(out_c, false, "bn2")?),
            ),
            second: ConvBn::new(conv(out_c, out_c, 1, zero_init, "conv2")?, None),
        };
        let reads_pre = shortcut.has_parameters();
        Residual::new(branch, shortcut).with_pre(pre, reads_pre)
    } else {
        let branch = BasicBranch {
            first: ConvBn::new(
                conv(in_c, out_c, cfg.stride, false, "conv1")?,
                Some(bn(out_c, false, "bn1")?),
            ),
            second: ConvBn::new(
                conv(out_c, out_c, 1, false, "conv2")?,
                Some(bn(out_c, zero_init, "bn2")?),
            ),
        };
        Residual::new(branch, shortcut).with_post(Activation::Relu)
    };
    Ok(block
        .with_scale(cfg.scale, vb.clone())?
        .with_drop_path(cfg.drop_path, rng)?)
}
