//! Residual MLP blocks: the article's Linear residual block and stacks of them.

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::layers::{layer_norm, linear, linear_act, linear_zeros, Activation};
use crate::probe::{Probed, ResidualProbe};
use crate::residual::{Norm, PreActivation, Residual, ResidualScale};
use crate::rng::RngHandle;
use crate::shortcut::Shortcut;

/// Configuration of an MLP residual block. The default is the article's block:
/// `g = Linear(d, d)`, output `g(x) + x`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MlpBlockConfig {
    /// `None`: the branch is one linear layer (`linear`) followed by `activation`.
    /// `Some(h)`: two layers, `fc1` (to h), `activation`, `fc2` (back).
    pub hidden: Option<usize>,
    /// The activation inside the branch ([`Activation::Identity`] for the article's block).
    pub activation: Activation,
    /// Pre-norm: a LayerNorm (`norm`) on the branch input (the shortcut reads the raw input).
    pub layer_norm: bool,
    /// Activation after the sum, if any.
    pub post: Option<Activation>,
    /// How the branch is scaled; `ZeroInit` zeroes the branch's last linear layer.
    pub scale: ResidualScale,
    /// Drop-path probability.
    pub drop_path: f64,
}

impl MlpBlockConfig {
    /// The article's block: one `Linear(d, d)`, no activation, norm or scaling.
    pub fn article() -> Self {
        Self {
            activation: Activation::Identity,
            ..Self::default()
        }
    }
}

/// The residual branch of an MLP block.
#[derive(Debug, Clone)]
pub struct MlpBranch {
    fc1: candle_nn::Linear,
    activation: Activation,
    fc2: Option<candle_nn::Linear>,
}

impl MlpBranch {
    /// The first (or only) linear layer.
    pub fn fc1(&self) -> &candle_nn::Linear {
        &self.fc1
    }
    /// The second linear layer of a two-layer branch.
    pub fn fc2(&self) -> Option<&candle_nn::Linear> {
        self.fc2.as_ref()
    }
}

impl crate::residual::Branch for MlpBranch {}

impl ModuleT for MlpBranch {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let y = linear_act(&self.fc1, x, self.activation)?;
        match &self.fc2 {
            Some(fc2) => linear_act(fc2, &y, Activation::Identity),
            None => Ok(y),
        }
    }
}

/// An MLP residual block.
pub type MlpBlock = Residual<MlpBranch>;

/// Creates an MLP residual block from `in_dim` to `out_dim` features under `vb`.
///
/// Parameters: `linear` (one-layer branch) or `fc1`/`fc2`, `norm` with `layer_norm`,
/// `shortcut` (a linear projection, only when `in_dim != out_dim`), `alpha` with ReZero.
///
/// # Shapes
/// - input: (..., in_dim); output: (..., out_dim)
///
/// # Errors
/// Zero widths, a bad drop-path probability, or variables of other shapes under `vb`.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::VarMap;
/// use resblock_core::{mlp_block, seeded_var_builder, MlpBlockConfig, ResidualScale, RngHandle};
///
/// let rng = RngHandle::seed_from_u64(0);
/// let varmap = VarMap::new();
/// let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
/// let cfg = MlpBlockConfig { scale: ResidualScale::ReZero, ..MlpBlockConfig::article() };
/// let block = mlp_block(10, 10, cfg, &rng, vb)?;
/// let x = Tensor::randn(0f32, 1., (3, 10), &Device::Cpu)?;
/// // ReZero starts with alpha = 0: the block is the identity.
/// let y = block.forward_t(&x, true)?;
/// assert_eq!(y.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
/// # Ok::<(), resblock_core::Error>(())
/// ```
pub fn mlp_block(
    in_dim: usize,
    out_dim: usize,
    cfg: MlpBlockConfig,
    rng: &RngHandle,
    vb: VarBuilder<'_>,
) -> Result<MlpBlock> {
    if in_dim == 0 || out_dim == 0 || cfg.hidden == Some(0) {
        return Err(Error::config(format!(
            "mlp block {}: widths must be positive (in {in_dim}, out {out_dim}, hidden {:?})",
            vb.prefix(),
            cfg.hidden
        )));
    }
    let zero_last = cfg.scale == ResidualScale::ZeroInit;
    let make = |i, o, name: &str, last: bool| {
        if last && zero_last {
            linear_zeros(i, o, vb.pp(name))
        } else {
            linear(i, o, vb.pp(name))
        }
    };
    let branch = match cfg.hidden {
        None => MlpBranch {
            fc1: make(in_dim, out_dim, "linear", true)?,
            activation: cfg.activation,
            fc2: None,
        },
        Some(h) => MlpBranch {
            fc1: make(in_dim, h, "fc1", false)?,
            activation: cfg.activation,
            fc2: Some(make(h, out_dim, "fc2", true)?),
        },
    };
    let shortcut = if in_dim == out_dim {
        Shortcut::Identity
    } else {
        Shortcut::linear(in_dim, out_dim, vb.pp("shortcut"))?
    };
    let mut block = Residual::new(branch, shortcut)
        .with_scale(cfg.scale, vb.clone())?
        .with_drop_path(cfg.drop_path, rng)?;
    if cfg.layer_norm {
        let pre = PreActivation {
            norm: Norm::Layer(layer_norm(in_dim, vb.pp("norm"))?),
            activation: None,
        };
        block = block.with_pre(pre, false);
    }
    if let Some(a) = cfg.post {
        block = block.with_post(a);
    }
    Ok(block)
}

/// Configuration of a [`ResidualMlp`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResidualMlpConfig {
    /// Input features.
    pub in_dim: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Number of residual blocks.
    pub depth: usize,
    /// Output features; `None` ends with the residual stream (no head).
    pub out_dim: Option<usize>,
    /// Every block's configuration.
    pub block: MlpBlockConfig,
    /// Drop-path rate of the last block; block i gets `drop_path * i / (depth - 1)` (linear
    /// in depth, as timm). Overrides `block.drop_path`.
    pub drop_path: f64,
}

/// A stack of MLP residual blocks: `stem` (Linear in_dim->width, only when they differ),
/// `blocks.{i}`, `head` (Linear width->out_dim, when set).
#[derive(Debug, Clone)]
pub struct ResidualMlp {
    stem: Option<candle_nn::Linear>,
    blocks: Vec<MlpBlock>,
    head: Option<candle_nn::Linear>,
}

/// Creates a residual MLP.
///
/// # Errors
/// Zero widths or depth 0, or variables of other shapes under `vb`.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::VarMap;
/// use resblock_core::{residual_mlp, seeded_var_builder, Activation, MlpBlockConfig,
///     ResidualMlpConfig, RngHandle};
///
/// let rng = RngHandle::seed_from_u64(0);
/// let varmap = VarMap::new();
/// let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
/// let cfg = ResidualMlpConfig {
///     in_dim: 20, width: 64, depth: 4, out_dim: Some(3), drop_path: 0.1,
///     block: MlpBlockConfig { hidden: Some(128), activation: Activation::Gelu,
///                             layer_norm: true, ..Default::default() },
/// };
/// let mlp = residual_mlp(cfg, &rng, vb)?;
/// let y = mlp.forward_t(&Tensor::zeros((5, 20), DType::F32, &Device::Cpu)?, false)?;
/// assert_eq!(y.dims(), [5, 3]);
/// # Ok::<(), resblock_core::Error>(())
/// ```
pub fn residual_mlp(
    cfg: ResidualMlpConfig,
    rng: &RngHandle,
    vb: VarBuilder<'_>,
) -> Result<ResidualMlp> {
    if cfg.in_dim == 0 || cfg.width == 0 || cfg.depth == 0 || cfg.out_dim == Some(0) {
        return Err(Error::config(format!(
            "residual mlp: dims and depth must be positive, got {cfg:?}"
        )));
    }
    let stem = if cfg.in_dim != cfg.width {
        Some(linear(cfg.in_dim, cfg.width, vb.pp("stem"))?)
    } else {
        None
    };
    let blocks = (0..cfg.depth)
        .map(|i| {
            let dp = if cfg.depth > 1 {
                cfg.drop_path * i as f64 / (cfg.depth - 1) as f64
            } else {
                cfg.drop_path
            };
            let bcfg = MlpBlockConfig {
                drop_path: dp,
                ..cfg.block
            };
            mlp_block(
                cfg.width,
                cfg.width,
                bcfg,
                rng,
                vb.pp(format!("blocks.{i}")),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let head = match cfg.out_dim {
        Some(o) => Some(linear(cfg.width, o, vb.pp("head"))?),
        None => None,
    };
    Ok(ResidualMlp { stem, blocks, head })
}

impl ResidualMlp {
    /// The residual blocks.
    pub fn blocks(&self) -> &[MlpBlock] {
        &self.blocks
    }
}

impl ModuleT for ResidualMlp {
    /// # Shapes
    /// - input: (N, in_dim); output: (N, out_dim or width)
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = match &self.stem {
            Some(s) => linear_act(s, x, Activation::Identity)?,
            None => x.clone(),
        };
        for b in &self.blocks {
            h = b.forward_t(&h, train)?;
        }
        match &self.head {
            Some(head) => linear_act(head, &h, Activation::Identity),
            None => Ok(h),
        }
    }
}

impl Probed for ResidualMlp {
    fn probes(&self) -> Vec<(String, &ResidualProbe)> {
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("blocks.{i}"), b.probe()))
            .collect()
    }
}
