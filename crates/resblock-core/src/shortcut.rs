//! The shortcut path of a residual block.

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::conv_bn::ConvBn;
use crate::error::{Error, Result};
use crate::layers::{batch_norm, conv2d, BatchNormConfig, Conv2dConfig, ConvInit};

/// The shortcut of a residual block: what is added to the residual branch.
#[derive(Debug, Clone)]
pub enum Shortcut {
    /// `x` itself (input and output shapes must agree).
    Identity,
    /// 1x1 convolution with stride (`downsample.0`), optionally followed by batch norm
    /// (`downsample.1`; absent in pre-activation blocks): the article's projection.
    Projection(ConvBn),
    /// He et al.'s "option A": keep every `stride`-th pixel and pad the extra channels with
    /// zeros, `F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, front, back))`. No parameters.
    ZeroPad {
        /// Spatial subsampling step.
        stride: usize,
        /// Zero channels before the input's.
        front: usize,
        /// Zero channels after the input's.
        back: usize,
    },
    /// ResNet-D's "avg-down" shortcut: average pooling with `stride` (ceil mode, padding not
    /// counted), then a 1x1 convolution and batch norm (timm's `downsample.1`/`.2`).
    AvgDown {
        /// Pooling window and step (1: no pooling).
        stride: usize,
        /// The 1x1 convolution (`downsample.1`) and its batch norm (`downsample.2`).
        layer: ConvBn,
    },
    /// A linear map, for residual MLP blocks that change width.
    Linear(candle_nn::Linear),
    /// No shortcut at all: the block is a plain (non-residual) stack. Used for the "plain"
    /// twins in the degradation study.
    Removed,
}

/// Which shortcut a convolutional block uses when its shape changes, as in He et al. 2016.
/// Serialised (model-file metadata) as `"zero_pad"`, `"projection"`, `"always_projection"`
/// or `"removed"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShortcutPolicy {
    /// Option A: zero-padding shortcut where the shape changes, identity elsewhere.
    ZeroPad,
    /// Option B: projection (1x1 conv + BN) where the shape changes, identity elsewhere
    /// (torchvision's choice).
    #[default]
    Projection,
    /// Option C: projection in every block.
    AlwaysProjection,
    /// No shortcut (plain network).
    Removed,
}

impl std::str::FromStr for ShortcutPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "a" | "zero-pad" | "zeropad" => Ok(Self::ZeroPad),
            "b" | "projection" => Ok(Self::Projection),
            "c" | "always-projection" => Ok(Self::AlwaysProjection),
            "none" | "removed" | "plain" => Ok(Self::Removed),
            _ => Err(Error::config(format!(
                "unknown shortcut {s:?}: expected A (zero-pad), B (projection), C (always projection) or none"
            ))),
        }
    }
}

/// Options of a projection shortcut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProjectionConfig {
    /// Follow the convolution with batch norm (`downsample.1`).
    pub norm: bool,
    /// The batch norm's configuration.
    pub norm_config: BatchNormConfig,
    /// The convolution's initialisation.
    pub init: ConvInit,
}

impl Default for ProjectionConfig {
    fn default() -> Self {
        Self {
            norm: true,
            norm_config: BatchNormConfig::default(),
            init: ConvInit::KaimingNormalFanOut,
        }
    }
}

impl Shortcut {
    /// A projection shortcut: 1x1 conv (no bias) with `stride` as `vb/0`, then batch norm as
    /// `vb/1` when `cfg.norm`. Pass `vb.pp("downsample")` for torchvision's names.
    ///
    /// # Errors
    /// Zero channels or stride, or variables of other shapes under `vb`.
    pub fn projection(
        in_c: usize,
        out_c: usize,
        stride: usize,
        cfg: ProjectionConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if in_c == 0 || out_c == 0 {
            return Err(Error::config(
                "projection shortcut: channels must be positive",
            ));
        }
        let conv_cfg = Conv2dConfig {
            stride,
            bias: false,
            init: cfg.init,
            ..Default::default()
        };
        let conv = conv2d(in_c, out_c, 1, conv_cfg, vb.pp("0"))?;
        let norm = if cfg.norm {
            Some(batch_norm(out_c, cfg.norm_config, vb.pp("1"))?)
        } else {
            None
        };
        Ok(Self::Projection(ConvBn::new(conv, norm)))
    }

    /// ResNet-D's avg-down shortcut: `AvgPool(stride)` (`downsample.0`, no parameters),
    /// 1x1 conv (`downsample.1`), batch norm (`downsample.2`) when `cfg.norm`.
    ///
    /// # Errors
    /// Zero channels or stride, or variables of other shapes under `vb`.
    pub fn avg_down(
        in_c: usize,
        out_c: usize,
        stride: usize,
        cfg: ProjectionConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if in_c == 0 || out_c == 0 || stride == 0 {
            return Err(Error::config(
                "avg-down shortcut: channels and stride must be positive",
            ));
        }
        let conv_cfg = Conv2dConfig {
            bias: false,
            init: cfg.init,
            ..Default::default()
        };
        let conv = conv2d(in_c, out_c, 1, conv_cfg, vb.pp("1"))?;
        let norm = if cfg.norm {
            Some(batch_norm(out_c, cfg.norm_config, vb.pp("2"))?)
        } else {
            None
        };
        Ok(Self::AvgDown {
            stride,
            layer: ConvBn::new(conv, norm),
        })
    }

    /// The option-A shortcut from `in_c` to `out_c >= in_c` channels; the extra channels are
    /// split as PyTorch's `F.pad(..., (0, 0, 0, 0, p, p))` with `p = (out_c - in_c) / 2`
    /// (an odd remainder goes after).
    ///
    /// # Errors
    /// `out_c < in_c` or a zero stride.
    pub fn zero_pad(in_c: usize, out_c: usize, stride: usize) -> Result<Self> {
        if out_c < in_c || stride == 0 {
            return Err(Error::config(format!(
                "zero-pad shortcut needs out_channels >= in_channels and stride > 0, got {in_c}->{out_c} stride {stride}"
            )));
        }
        let extra = out_c - in_c;
        Ok(Self::ZeroPad {
            stride,
            front: extra / 2,
            back: extra - extra / 2,
        })
    }

    /// The shortcut a convolutional block from `in_c` to `out_c` channels at `stride` gets
    /// under `policy`. A projection is created under `vb` (pass `vb.pp("downsample")`).
    ///
    /// # Errors
    /// As the constructors it calls.
    pub fn for_conv_block(
        policy: ShortcutPolicy,
        in_c: usize,
        out_c: usize,
        stride: usize,
        projection: ProjectionConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let same = in_c == out_c && stride == 1;
        match policy {
            ShortcutPolicy::Removed => Ok(Self::Removed),
            ShortcutPolicy::ZeroPad if same => Ok(Self::Identity),
            ShortcutPolicy::ZeroPad => Self::zero_pad(in_c, out_c, stride),
            ShortcutPolicy::Projection if same => Ok(Self::Identity),
            ShortcutPolicy::Projection | ShortcutPolicy::AlwaysProjection => {
                Self::projection(in_c, out_c, stride, projection, vb)
            }
        }
    }

    /// A linear shortcut `vb` (`weight`, `bias`) from `in_dim` to `out_dim` features.
    ///
    /// # Errors
    /// Variables of other shapes under `vb`.
    pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self::Linear(crate::layers::linear(in_dim, out_dim, vb)?))
    }

    /// A short human-readable name of the kind of shortcut.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Projection(l) if l.norm().is_some() => "projection (1x1 conv + BN)",
            Self::Projection(_) => "projection (1x1 conv)",
            Self::ZeroPad { .. } => "zero-pad (option A)",
            Self::AvgDown { .. } => "avg-down (avg pool + 1x1 conv + BN)",
            Self::Linear(_) => "linear",
            Self::Removed => "none",
        }
    }

    /// The shortcut with each conv + batch-norm pair folded into one convolution (eval mode
    /// only; see [`crate::Conv2d::fold_batch_norm`]).
    ///
    /// # Errors
    /// Mismatched channels.
    pub fn folded(&self) -> Result<Self> {
        Ok(match self {
            Self::Projection(l) => Self::Projection(l.folded()?),
            Self::AvgDown { stride, layer } => Self::AvgDown {
                stride: *stride,
                layer: layer.folded()?,
            },
            other => other.clone(),
        })
    }

    /// Whether the shortcut has trainable parameters.
    pub fn has_parameters(&self) -> bool {
        matches!(
            self,
            Self::Projection(_) | Self::AvgDown { .. } | Self::Linear(_)
        )
    }

    /// The shortcut's output, or `None` for [`Shortcut::Removed`].
    ///
    /// # Shapes
    /// - `Identity`: any; `Linear`: (..., in) -> (..., out)
    /// - `Projection`, `ZeroPad`: (N, C_in, H, W) -> (N, C_out, ceil(H/s), ceil(W/s))
    ///
    /// # Errors
    /// An input of the wrong shape.
    pub fn apply(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        Ok(Some(match self {
            Self::Identity => x.clone(),
            Self::Projection(l) => l.forward_t(x, train)?,
            Self::ZeroPad {
                stride,
                front,
                back,
            } => crate::ops::zero_pad_shortcut(x, *stride, *front, *back)?,
            Self::AvgDown { stride, layer } => {
                layer.forward_t(&avg_pool_ceil(x, *stride)?, train)?
            }
            Self::Linear(l) => {
                crate::layers::linear_act(l, x, crate::layers::Activation::Identity)?
            }
            Self::Removed => return Ok(None),
        }))
    }
}

/// `F.avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False)`: windows that overhang
/// the edge average only the pixels inside.
fn avg_pool_ceil(x: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    let (ph, pw) = ((s - h % s) % s, (s - w % s) % s);
    if ph == 0 && pw == 0 {
        return Ok(x.avg_pool2d(s)?);
    }
    let xp = x.pad_with_zeros(2, 0, ph)?.pad_with_zeros(3, 0, pw)?;
    let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?
        .pad_with_zeros(2, 0, ph)?
        .pad_with_zeros(3, 0, pw)?;
    let counts = ones.avg_pool2d(s)?;
    Ok(xp.avg_pool2d(s)?.broadcast_div(&counts)?)
}
