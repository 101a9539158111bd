//! The Bottleneck block of ResNet-50/101/152, ResNeXt and Wide ResNet (torchvision's "V1.5":
//! the stride sits on the 3x3 convolution).

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;
use resblock_core::{
    batch_norm, conv2d, Activation, BatchNorm, BatchNormConfig, Branch, Conv2d, Conv2dConfig,
    ConvBn, ConvInit, Norm, PreActivation, Residual, ResidualScale, RngHandle, Shortcut,
};

use crate::error::{Error, Result};

/// Configuration of a [`Bottleneck`] beyond its channels. The default is torchvision's
/// plain ResNet-50 block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BottleneckConfig {
    /// Stride of the 3x3 convolution (and of the shortcut).
    pub stride: usize,
    /// Dilation of the 3x3 convolution.
    pub dilation: usize,
    /// Groups of the 3x3 convolution (ResNeXt's cardinality).
    pub groups: usize,
    /// Width per group: the inner width is `planes * width_per_group / 64 * groups`
    /// (64 for ResNet, 4 for ResNeXt 32x4d, 128 for Wide ResNet-50-2).
    pub width_per_group: usize,
    /// Pre-activation ordering (BN-ReLU-conv).
    pub pre_activation: bool,
    /// Residual scaling; `ZeroInit` zeroes `bn3`'s gamma (or `conv3` in pre-activation).
    pub scale: ResidualScale,
    /// Drop-path probability.
    pub drop_path: f64,
    /// Convolution init.
    pub conv_init: ConvInit,
    /// Batch-norm configuration.
    pub norm: BatchNormConfig,
}

impl Default for BottleneckConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            dilation: 1,
            groups: 1,
            width_per_group: 64,
            pre_activation: false,
            scale: ResidualScale::None,
            drop_path: 0.,
            conv_init: ConvInit::KaimingNormalFanOut,
            norm: BatchNormConfig::default(),
        }
    }
}

/// The output channels of a bottleneck with `planes` (torchvision's expansion of 4).
pub const BOTTLENECK_EXPANSION: usize = 4;

/// The branch of a [`Bottleneck`]: 1x1 reduce, 3x3 (strided, grouped, dilated), 1x1 expand,
/// each followed by BN (post-activation) or preceded by it (pre-activation). Each conv + BN
/// pair is a [`ConvBn`]; the block's end runs through the last one
/// ([`Branch::forward_end`]).
#[derive(Debug, Clone)]
pub struct BottleneckBranch {
    layers: [ConvBn; 3],
}

impl BottleneckBranch {
    /// The three convolutions.
    pub fn convs(&self) -> [&Conv2d; 3] {
        self.layers.each_ref().map(ConvBn::conv)
    }
    /// The norms after conv1, conv2 and conv3 (`None` where absent or folded).
    pub fn norms_by_conv(&self) -> [Option<&BatchNorm>; 3] {
        self.layers.each_ref().map(ConvBn::norm)
    }
    /// The three conv (+ BN) layers.
    pub fn layers(&self) -> &[ConvBn; 3] {
        &self.layers
    }

    /// The batch norms in order of application inside the branch (none once folded).
    pub fn norms(&self) -> Vec<&BatchNorm> {
        self.layers.iter().filter_map(ConvBn::norm).collect()
    }

    /// The branch with every conv + BN pair folded (eval only).
    ///
    /// # Errors
    /// Mismatched channels.
    pub fn folded(&self) -> Result<Self> {
        let [a, b, c] = &self.layers;
        Ok(Self {
            layers: [a.folded()?, b.folded()?, c.folded()?],
        })
    }

    fn front(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.layers[0].forward_relu_t(x, train)?;
        self.layers[1].forward_relu_t(&y, train)
    }
}

impl ModuleT for BottleneckBranch {
    /// # Shapes
    /// - input: (N, C_in, H, W); output: (N, 4 * planes, ceil(H/s), ceil(W/s))
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.layers[2].forward_t(&self.front(x, train)?, train)
    }
}

impl Branch for BottleneckBranch {
    /// `relu(self(x) + s)` with conv3, bn3, the sum and the ReLU through
    /// [`ConvBn::forward_add_relu_t`].
    fn forward_end(&self, x: &Tensor, s: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.layers[2].forward_add_relu_t(&self.front(x, train)?, s, train)
    }
}

/// A ResNet bottleneck block.
pub type Bottleneck = Residual<BottleneckBranch>;

/// Creates a bottleneck block from `in_c` channels with `planes` (output `4 * planes`),
/// with torchvision's names: `conv1..3`, `bn1..3`, and the given `shortcut` (built by the
/// caller, usually under `downsample`).
///
/// # Errors
/// Zero sizes, a width not divisible by the groups, or variables of other shapes.
pub fn bottleneck(
    in_c: usize,
    planes: usize,
    shortcut: Shortcut,
    cfg: BottleneckConfig,
    rng: &RngHandle,
    vb: VarBuilder<'_>,
) -> Result<Bottleneck> {
    if in_c == 0 || planes == 0 || cfg.stride == 0 || cfg.groups == 0 || cfg.width_per_group == 0 {
        return Err(Error::config(format!(
            "bottleneck {}: sizes must be positive ({in_c} in, {planes} planes, {cfg:?})",
            vb.prefix()
        )));
    }
    let width = planes * cfg.width_per_group / 64 * cfg.groups;
    let out_c = planes * BOTTLENECK_EXPANSION;
    let zero = cfg.scale == ResidualScale::ZeroInit;
    let conv = |i, o, k, stride, groups, dilation, zero: bool, name: &str| -> Result<Conv2d> {
        let cc = Conv2dConfig {
            padding: if k == 3 { dilation } else { 0 },
            stride,
            dilation,
            groups,
            bias: false,
            init: if zero { ConvInit::Zeros } else { cfg.conv_init },
        };
        Ok(conv2d(i, o, k, cc, vb.pp(name))?)
    };
    let bn = |c, gamma0: bool, name: &str| -> Result<BatchNorm> {
        let n = BatchNormConfig {
            weight_init: if gamma0 { 0. } else { cfg.norm.weight_init },
            ..cfg.norm
        };
        Ok(batch_norm(c, n, vb.pp(name))?)
    };
    let conv1 = conv(in_c, width, 1, 1, 1, 1, false, "conv1")?;
    let conv2 = conv(
        width,
        width,
        3,
        cfg.stride,
        cfg.groups,
        cfg.dilation,
        false,
        "conv2",
    )?;
    let block = if cfg.pre_activation {
        let pre = PreActivation {
            norm: Norm::Batch(bn(in_c, false, "bn1")?),
            activation: Some(Activation::Relu),
        };
        let branch = BottleneckBranch {
            layers: [
                ConvBn::new(conv1, Some(bn(width, false, "bn2")?)),
                ConvBn::new(conv2, Some(bn(width, false, "bn3")?)),
                ConvBn::new(conv(width, out_c, 1, 1, 1, 1, zero, "conv3")?, None),
            ],
        };
        let reads_pre = shortcut.has_parameters();
        Residual::new(branch, shortcut).with_pre(pre, reads_pre)
    } else {
        let branch = BottleneckBranch {
            layers: [
                ConvBn::new(conv1, Some(bn(width, false, "bn1")?)),
                ConvBn::new(conv2, Some(bn(width, false, "bn2")?)),
                ConvBn::new(
                    conv(width, out_c, 1, 1, 1, 1, false, "conv3")?,
                    Some(bn(out_c, zero, "bn3")?),
                ),
            ],
        };
        Residual::new(branch, shortcut).with_post(Activation::Relu)
    };
    Ok(block
        .with_scale(cfg.scale, vb.clone())?
        .with_drop_path(cfg.drop_path, rng)?)
}
