//! One builder for the whole ResNet family: torchvision's ImageNet ResNets, ResNeXt and Wide
//! ResNets, the CIFAR ResNets of He et al. 2016 (options A/B/C), pre-activation ResNets,
//! WRN-28-10, ResNet-D (deep stem, avg-down) and the plain (shortcut-free) twins.
//!
//! Every variant is configuration ([`ResNetConfig`]); presets are plain functions
//! ([`ResNetConfig::preset`]). Parameter names are torchvision's `state_dict` names:
//! `conv1`, `bn1`, `layer{1..}.{i}.conv{k}` / `.bn{k}` / `.downsample.{0,1}`, `fc`.

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::VarBuilder;
use resblock_core::ops::{max_pool2d, Pool2dConfig};
use resblock_core::{
    batch_norm, conv2d, linear, BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, ConvBn, ConvInit,
    Probed, ProjectionConfig, ResidualProbe, ResidualScale, RngHandle, Shortcut, ShortcutPolicy,
};

use crate::basic_block::{basic_block_with_shortcut, BasicBlock, BasicBlockConfig};
use crate::bottleneck::{bottleneck, Bottleneck, BottleneckConfig, BOTTLENECK_EXPANSION};
use crate::error::{Error, Result};

/// The residual block a network is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockType {
    /// Two 3x3 convolutions (ResNet-18/34, CIFAR ResNets, WRN).
    Basic,
    /// 1x1 - 3x3 - 1x1 with expansion 4 (ResNet-50+, ResNeXt, Wide ResNet-50/101).
    Bottleneck,
}

impl BlockType {
    /// Output channels per plane.
    pub fn expansion(self) -> usize {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => BOTTLENECK_EXPANSION,
        }
    }
}

/// The stem: what runs before the first stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StemType {
    /// 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool (ImageNet; torchvision).
    ImageNet,
    /// 3x3 stride-1 conv, BN, ReLU (CIFAR; He et al. 2016). Pre-activation nets keep only
    /// the conv (their first block normalises).
    Cifar,
    /// ResNet-D's deep stem (timm's `deep`): three 3x3 convs (stride 2 on the first) with BN
    /// and ReLU between (`conv1.0`, `conv1.1`, `conv1.3`, `conv1.4`, `conv1.6`), then `bn1`,
    /// ReLU and the 3x3 stride-2 max-pool.
    Deep,
}

/// Everything that defines a ResNet. Serialised with serde as the `config` of a model
/// file's metadata (see [`crate::model_file`]), field names as here.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// The block type.
    pub block: BlockType,
    /// Blocks per stage.
    pub layers: Vec<usize>,
    /// Planes per stage (a stage outputs `planes * expansion` channels).
    pub planes: Vec<usize>,
    /// The stem.
    pub stem: StemType,
    /// Output channels of the stem (64 ImageNet, 16 CIFAR); the deep stem's inner convs use
    /// half of it.
    pub stem_width: usize,
    /// Image channels.
    pub in_channels: usize,
    /// Classes of the classifier `fc`; 0 builds no classifier (a backbone).
    pub num_classes: usize,
    /// Groups of the bottleneck 3x3 convs (ResNeXt cardinality).
    pub groups: usize,
    /// Width per group (64 ResNet, 4 ResNeXt-32x4d, 128 Wide ResNet-50-2).
    pub width_per_group: usize,
    /// Per stage after the first: replace its stride with dilation (torchvision's
    /// `replace_stride_with_dilation`).
    pub replace_stride_with_dilation: Vec<bool>,
    /// Which shortcut blocks get (A/B/C, or none for the plain twins).
    pub shortcut: ShortcutPolicy,
    /// ResNet-D: downsampling shortcuts average-pool then 1x1-conv (stride 1).
    pub avg_down: bool,
    /// Pre-activation blocks (He et al. 2016b) with a final BN-ReLU (`bn_final`) before the
    /// pooling.
    pub pre_activation: bool,
    /// Zero-init the last BN gamma of every block (torchvision's `zero_init_residual`).
    pub zero_init_residual: bool,
    /// Drop-path rate of the last block; block i of n gets `rate * i / (n - 1)` (timm).
    pub drop_path_rate: f64,
}

impl ResNetConfig {
    fn imagenet(block: BlockType, layers: [usize; 4]) -> Self {
        Self {
            block,
            layers: layers.to_vec(),
            planes: vec![64, 128, 256, 512],
            stem: StemType::ImageNet,
            stem_width: 64,
            in_channels: 3,
            num_classes: 1000,
            groups: 1,
            width_per_group: 64,
            replace_stride_with_dilation: vec![false; 3],
            shortcut: ShortcutPolicy::Projection,
            avg_down: false,
            pre_activation: false,
            zero_init_residual: false,
            drop_path_rate: 0.,
        }
    }

    /// He et al. 2016's CIFAR ResNet with `depth = 6n + 2` layers (20, 32, 44, 56, 110,
    /// 1202): three stages of n basic blocks, 16/32/64 filters, option-A shortcuts, 10 classes.
    ///
    /// # Errors
    /// A depth that is not 6n + 2.
    pub fn cifar(depth: usize) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(Error::config(format!(
                "CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, 1202), got {depth}"
            )));
        }
        let n = (depth - 2) / 6;
        Ok(Self {
            block: BlockType::Basic,
            layers: vec![n; 3],
            planes: vec![16, 32, 64],
            stem: StemType::Cifar,
            stem_width: 16,
            in_channels: 3,
            num_classes: 10,
            groups: 1,
            width_per_group: 64,
            replace_stride_with_dilation: vec![false; 2],
            shortcut: ShortcutPolicy::ZeroPad,
            avg_down: false,
            pre_activation: false,
            zero_init_residual: false,
            drop_path_rate: 0.,
        })
    }

    /// He et al. 2016b's pre-activation CIFAR ResNet: 110 (basic blocks, 18 per stage) or
    /// 164 (bottlenecks, 18 per stage, 16/32/64 planes x 4), projection shortcuts.
    ///
    /// # Errors
    /// A depth other than 110 or 164.
    pub fn cifar_preact(depth: usize) -> Result<Self> {
        let block = match depth {
            110 => BlockType::Basic,
            164 => BlockType::Bottleneck,
            _ => {
                return Err(Error::config(format!(
                    "pre-activation CIFAR ResNet depth must be 110 or 164, got {depth}"
                )))
            }
        };
        Ok(Self {
            block,
            layers: vec![18; 3],
            shortcut: ShortcutPolicy::Projection,
            pre_activation: true,
            ..Self::cifar(20)?
        })
    }

    /// Zagoruyko & Komodakis' Wide ResNet WRN-`depth`-`k` for CIFAR (depth = 6n + 4):
    /// pre-activation basic blocks, 16k/32k/64k filters, projection shortcuts.
    ///
    /// # Errors
    /// A depth that is not 6n + 4, or k = 0.
    pub fn wrn(depth: usize, k: usize) -> Result<Self> {
        if depth < 10 || !(depth - 4).is_multiple_of(6) || k == 0 {
            return Err(Error::config(format!(
                "WRN depth must be 6n + 4 and k > 0, got WRN-{depth}-{k}"
            )));
        }
        let n = (depth - 4) / 6;
        Ok(Self {
            layers: vec![n; 3],
            planes: vec![16 * k, 32 * k, 64 * k],
            shortcut: ShortcutPolicy::Projection,
            pre_activation: true,
            ..Self::cifar(20)?
        })
    }

    /// The names [`ResNetConfig::preset`] knows.
    pub const PRESETS: &'static [&'static str] = &[
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "wide_resnet50_2",
        "wide_resnet101_2",
        "resnet50d",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet1202",
        "preact_resnet110",
        "preact_resnet164",
        "wrn28_10",
        "plain18",
        "plain34",
        "plain20",
        "plain32",
        "plain44",
        "plain56",
        "plain110",
    ];

    /// A named preset with its default classes (1000 ImageNet, 10 CIFAR). `plainN` is the
    /// shortcut-free twin of `resnetN`; `resnetN` for any other N = 6n + 2 is a CIFAR ResNet.
    ///
    /// # Errors
    /// An unknown name (the message lists the known ones).
    pub fn preset(name: &str) -> Result<Self> {
        use BlockType::{Basic, Bottleneck as Bn};
        let c = match name {
            "resnet18" => Self::imagenet(Basic, [2, 2, 2, 2]),
            "resnet34" => Self::imagenet(Basic, [3, 4, 6, 3]),
            "resnet50" => Self::imagenet(Bn, [3, 4, 6, 3]),
            "resnet101" => Self::imagenet(Bn, [3, 4, 23, 3]),
            "resnet152" => Self::imagenet(Bn, [3, 8, 36, 3]),
            "resnext50_32x4d" => Self {
                groups: 32,
                width_per_group: 4,
                ..Self::imagenet(Bn, [3, 4, 6, 3])
            },
            "resnext101_32x8d" => Self {
                groups: 32,
                width_per_group: 8,
                ..Self::imagenet(Bn, [3, 4, 23, 3])
            },
            "resnext101_64x4d" => Self {
                groups: 64,
                width_per_group: 4,
                ..Self::imagenet(Bn, [3, 4, 23, 3])
            },
            "wide_resnet50_2" => Self {
                width_per_group: 128,
                ..Self::imagenet(Bn, [3, 4, 6, 3])
            },
            "wide_resnet101_2" => Self {
                width_per_group: 128,
                ..Self::imagenet(Bn, [3, 4, 23, 3])
            },
            "resnet50d" => Self {
                stem: StemType::Deep,
                avg_down: true,
                ..Self::imagenet(Bn, [3, 4, 6, 3])
            },
            "preact_resnet110" => Self::cifar_preact(110)?,
            "preact_resnet164" => Self::cifar_preact(164)?,
            "wrn28_10" => Self::wrn(28, 10)?,
            _ => {
                if let Some(d) = name.strip_prefix("plain") {
                    let base =
                        Self::preset(&format!("resnet{d}")).map_err(|_| unknown_preset(name))?;
                    return Ok(Self {
                        shortcut: ShortcutPolicy::Removed,
                        ..base
                    });
                }
                // Any other depth 6n + 2 is a CIFAR ResNet (resnet8, resnet14, ...).
                match name
                    .strip_prefix("resnet")
                    .and_then(|d| d.parse::<usize>().ok())
                {
                    Some(d) if d >= 8 && (d - 2) % 6 == 0 => Self::cifar(d)?,
                    _ => return Err(unknown_preset(name)),
                }
            }
        };
        Ok(c)
    }

    /// Output channels of the last stage (the classifier's input).
    pub fn feature_channels(&self) -> usize {
        self.planes.last().copied().unwrap_or(0) * self.block.expansion()
    }

    fn validate(&self) -> Result<()> {
        let stages = self.layers.len();
        let bad = |m: String| Err(Error::config(m));
        if stages == 0 || self.planes.len() != stages {
            return bad(format!(
                "layers ({:?}) and planes ({:?}) must be non-empty and of equal length",
                self.layers, self.planes
            ));
        }
        if self.replace_stride_with_dilation.len() != stages - 1 {
            return bad(format!(
                "replace_stride_with_dilation needs {} entries (one per stage after the first), got {:?}",
                stages - 1,
                self.replace_stride_with_dilation
            ));
        }
        if self.layers.contains(&0)
            || self.planes.contains(&0)
            || self.in_channels == 0
            || self.stem_width == 0
        {
            return bad(format!(
                "layers, planes, in_channels and stem_width must be positive: {self:?}"
            ));
        }
        if self.groups == 0 || self.width_per_group == 0 {
            return bad("groups and width_per_group must be positive".into());
        }
        if self.block == BlockType::Basic && (self.groups != 1 || self.width_per_group != 64) {
            return bad(
                "basic blocks only support groups = 1 and width_per_group = 64 (as torchvision)"
                    .into(),
            );
        }
        if !(0. ..=1.).contains(&self.drop_path_rate) {
            return bad(format!(
                "drop_path_rate must be in [0, 1], got {}",
                self.drop_path_rate
            ));
        }
        Ok(())
    }
}

fn unknown_preset(name: &str) -> Error {
    Error::config(format!(
        "unknown architecture {name:?}; known: {}",
        ResNetConfig::PRESETS.join(", ")
    ))
}

/// One residual block of a ResNet.
#[derive(Debug, Clone)]
pub enum Block {
    /// A basic block.
    Basic(BasicBlock),
    /// A bottleneck block.
    Bottleneck(Bottleneck),
}

impl Block {
    /// The block's probe.
    pub fn probe(&self) -> &ResidualProbe {
        match self {
            Self::Basic(b) => b.probe(),
            Self::Bottleneck(b) => b.probe(),
        }
    }
    /// The block's shortcut.
    pub fn shortcut(&self) -> &Shortcut {
        match self {
            Self::Basic(b) => b.shortcut(),
            Self::Bottleneck(b) => b.shortcut(),
        }
    }
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Self::Basic(b) => b.forward_t(x, train),
            Self::Bottleneck(b) => b.forward_t(x, train),
        }
    }
}

/// A stem layer (see [`StemType`]), in execution order in [`ResNet::stem_layers`].
#[derive(Debug, Clone)]
pub enum StemLayer {
    /// A convolution.
    Conv(Conv2d),
    /// A batch norm.
    Norm(BatchNorm),
    /// ReLU.
    Relu,
    /// 3x3 max-pool, stride 2, padding 1.
    MaxPool,
}

/// A ResNet.
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    stem: Vec<StemLayer>,
    stages: Vec<Vec<Block>>,
    final_norm: Option<BatchNorm>,
    fc: Option<candle_nn::Linear>,
}

/// Builds a ResNet under `vb` (pass the root builder: names start at `conv1`).
///
/// # Errors
/// An inconsistent configuration, or variables of other shapes under `vb`.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::VarMap;
/// use resblock_core::{params::count_parameters, seeded_var_builder, RngHandle};
/// use resblock_vision::{resnet, ResNetConfig};
///
/// let rng = RngHandle::seed_from_u64(0);
/// let varmap = VarMap::new();
/// let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
/// let net = resnet(&ResNetConfig::preset("resnet20")?, &rng, vb)?;
/// assert_eq!(count_parameters(&varmap, ""), 269_722);
/// let logits = net.forward_t(&Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu)?, false)?;
/// assert_eq!(logits.dims(), [2, 10]);
/// # Ok::<(), resblock_vision::Error>(())
/// ```
pub fn resnet(cfg: &ResNetConfig, rng: &RngHandle, vb: VarBuilder<'_>) -> Result<ResNet> {
    cfg.validate()?;
    let init = ConvInit::KaimingNormalFanOut;
    let norm = BatchNormConfig::default();
    let conv = |i, o, k, stride, name: &str| -> Result<Conv2d> {
        let c = Conv2dConfig {
            padding: k / 2,
            stride,
            bias: false,
            init,
            ..Default::default()
        };
        Ok(conv2d(i, o, k, c, vb.pp(name))?)
    };
    let bn = |c, name: &str| -> Result<BatchNorm> { Ok(batch_norm(c, norm, vb.pp(name))?) };

    let sw = cfg.stem_width;
    let mut stem = Vec::new();
    match cfg.stem {
        StemType::ImageNet => {
            stem.push(StemLayer::Conv(conv(cfg.in_channels, sw, 7, 2, "conv1")?));
            stem.push(StemLayer::Norm(bn(sw, "bn1")?));
            stem.push(StemLayer::Relu);
            stem.push(StemLayer::MaxPool);
        }
        StemType::Cifar => {
            stem.push(StemLayer::Conv(conv(cfg.in_channels, sw, 3, 1, "conv1")?));
            if !cfg.pre_activation {
                stem.push(StemLayer::Norm(bn(sw, "bn1")?));
                stem.push(StemLayer::Relu);
            }
        }
        StemType::Deep => {
            let half = (sw / 2).max(1);
            stem.push(StemLayer::Conv(conv(
                cfg.in_channels,
                half,
                3,
                2,
                "conv1.0",
            )?));
            stem.push(StemLayer::Norm(bn(half, "conv1.1")?));
            stem.push(StemLayer::Relu);
            stem.push(StemLayer::Conv(conv(half, half, 3, 1, "conv1.3")?));
            stem.push(StemLayer::Norm(bn(half, "conv1.4")?));
            stem.push(StemLayer::Relu);
            stem.push(StemLayer::Conv(conv(half, sw, 3, 1, "conv1.6")?));
            stem.push(StemLayer::Norm(bn(sw, "bn1")?));
            stem.push(StemLayer::Relu);
            stem.push(StemLayer::MaxPool);
        }
    }

    let total_blocks: usize = cfg.layers.iter().sum();
    let mut block_idx = 0;
    let mut in_c = sw;
    let mut dilation = 1;
    let scale = if cfg.zero_init_residual {
        ResidualScale::ZeroInit
    } else {
        ResidualScale::None
    };
    let projection = ProjectionConfig {
        norm: !cfg.pre_activation,
        norm_config: norm,
        init,
    };
    let mut stages = Vec::with_capacity(cfg.layers.len());
    for (s, (&n, &planes)) in cfg.layers.iter().zip(&cfg.planes).enumerate() {
        let mut stride = if s == 0 { 1 } else { 2 };
        let prev_dilation = dilation;
        if s > 0 && cfg.replace_stride_with_dilation[s - 1] {
            dilation *= stride;
            stride = 1;
        }
        let out_c = planes * cfg.block.expansion();
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let svb = vb.pp(format!("layer{}.{i}", s + 1));
            let (b_stride, b_dilation) = if i == 0 {
                (stride, prev_dilation)
            } else {
                (1, dilation)
            };
            let drop_path = if total_blocks > 1 {
                cfg.drop_path_rate * block_idx as f64 / (total_blocks - 1) as f64
            } else {
                cfg.drop_path_rate
            };
            block_idx += 1;
            let shortcut =
                make_shortcut(cfg, in_c, out_c, b_stride, projection, svb.pp("downsample"))?;
            let block = match cfg.block {
                BlockType::Basic => {
                    let bc = BasicBlockConfig {
                        stride: b_stride,
                        dilation: b_dilation,
                        shortcut: cfg.shortcut,
                        pre_activation: cfg.pre_activation,
                        scale,
                        drop_path,
                        conv_init: init,
                        norm,
                    };
                    Block::Basic(basic_block_with_shortcut(
                        in_c, out_c, shortcut, bc, rng, svb,
                    )?)
                }
                BlockType::Bottleneck => {
                    let bc = BottleneckConfig {
                        stride: b_stride,
                        dilation: b_dilation,
                        groups: cfg.groups,
                        width_per_group: cfg.width_per_group,
                        pre_activation: cfg.pre_activation,
                        scale,
                        drop_path,
                        conv_init: init,
                        norm,
                    };
                    Block::Bottleneck(bottleneck(in_c, planes, shortcut, bc, rng, svb)?)
                }
            };
            blocks.push(block);
            in_c = out_c;
        }
        stages.push(blocks);
    }
    let final_norm = if cfg.pre_activation {
        Some(bn(in_c, "bn_final")?)
    } else {
        None
    };
    let fc = if cfg.num_classes > 0 {
        Some(linear(in_c, cfg.num_classes, vb.pp("fc"))?)
    } else {
        None
    };
    Ok(ResNet {
        cfg: cfg.clone(),
        stem,
        stages,
        final_norm,
        fc,
    })
}

/// The shortcut of one block under the network's policy (with ResNet-D's avg-down).
fn make_shortcut(
    cfg: &ResNetConfig,
    in_c: usize,
    out_c: usize,
    stride: usize,
    projection: ProjectionConfig,
    vb: VarBuilder<'_>,
) -> Result<Shortcut> {
    let changes = in_c != out_c || stride != 1;
    let wants_conv = match cfg.shortcut {
        ShortcutPolicy::Projection => changes,
        ShortcutPolicy::AlwaysProjection => true,
        ShortcutPolicy::ZeroPad | ShortcutPolicy::Removed => false,
    };
    if cfg.avg_down && wants_conv {
        return Ok(Shortcut::avg_down(in_c, out_c, stride, projection, vb)?);
    }
    Ok(Shortcut::for_conv_block(
        cfg.shortcut,
        in_c,
        out_c,
        stride,
        projection,
        vb,
    )?)
}

impl ResNet {
    /// The configuration it was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// An inference copy with every convolution + batch norm pair folded into one
    /// convolution (stem, blocks, projection shortcuts). Its eval-mode outputs equal this
    /// network's; it must not be trained (the folded weights are plain tensors). Norms that
    /// precede a convolution (pre-activation) stay as they are.
    ///
    /// # Errors
    /// Only on tensor errors.
    pub fn folded(&self) -> Result<ResNet> {
        let mut stem = Vec::with_capacity(self.stem.len());
        let mut i = 0;
        while i < self.stem.len() {
            match (&self.stem[i], self.stem.get(i + 1)) {
                (StemLayer::Conv(c), Some(StemLayer::Norm(bn))) => {
                    stem.push(StemLayer::Conv(c.fold_batch_norm(bn)?));
                    i += 2;
                }
                (layer, _) => {
                    stem.push(layer.clone());
                    i += 1;
                }
            }
        }
        let stages = self
            .stages
            .iter()
            .map(|st| {
                st.iter()
                    .map(|b| {
                        Ok(match b {
                            Block::Basic(b) => Block::Basic(
                                b.clone()
                                    .replace_parts(b.branch().folded()?, b.shortcut().folded()?),
                            ),
                            Block::Bottleneck(b) => Block::Bottleneck(
                                b.clone()
                                    .replace_parts(b.branch().folded()?, b.shortcut().folded()?),
                            ),
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ResNet {
            cfg: self.cfg.clone(),
            stem,
            stages,
            final_norm: self.final_norm.clone(),
            fc: self.fc.clone(),
        })
    }

    /// The stem's layers in execution order.
    pub fn stem_layers(&self) -> &[StemLayer] {
        &self.stem
    }

    /// Pre-activation nets' final norm (`bn_final`, followed by ReLU), if any.
    pub fn final_norm(&self) -> Option<&BatchNorm> {
        self.final_norm.as_ref()
    }

    /// The classifier, if any.
    pub fn fc(&self) -> Option<&candle_nn::Linear> {
        self.fc.as_ref()
    }

    /// The stages' blocks.
    pub fn stages(&self) -> &[Vec<Block>] {
        &self.stages
    }

    /// In training, a stem of exactly conv + norm + ReLU (the CIFAR one) as the lead layer of
    /// the blocks' first run, with `x` for its input (see `block_run.rs`); else the stem's
    /// output and no lead layer.
    fn stem_or_lead(
        &self,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<(Tensor, Option<ConvBn>)> {
        match self.stem.as_slice() {
            [StemLayer::Conv(c), StemLayer::Norm(n), StemLayer::Relu] if train => {
                Ok((x.clone(), Some(ConvBn::new(c.clone(), Some(n.clone())))))
            }
            _ => Ok((self.run_stem(x, train)?, None)),
        }
    }

    pub(crate) fn run_stem(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        let stem = &self.stem;
        let relu_at = |i: usize| matches!(stem.get(i), Some(StemLayer::Relu));
        let mut i = 0;
        while i < stem.len() {
            let (next, out) = match (&stem[i], stem.get(i + 1)) {
                // A conv + norm (+ ReLU) is a `ConvBn`: one op in training where our kernels
                // allow, the norm in the conv's epilogue at inference. The stem keeps its
                // layers apart (it mirrors torchvision's and timm's module lists, which the
                // ONNX export and the summary name by index); the pair is put together here,
                // which clones two handles.
                (StemLayer::Conv(c), Some(StemLayer::Norm(n))) => {
                    let relu = relu_at(i + 2);
                    let pair = ConvBn::new(c.clone(), Some(n.clone()));
                    let y = if relu {
                        pair.forward_relu_t(&h, train)?
                    } else {
                        pair.forward_t(&h, train)?
                    };
                    (i + 2 + usize::from(relu), y)
                }
                // A conv (folded: no norm) or a norm followed by a ReLU runs fused.
                (StemLayer::Conv(c), _) if relu_at(i + 1) => (i + 2, c.forward_relu(&h)?),
                (StemLayer::Conv(c), _) => (i + 1, c.forward(&h)?),
                (StemLayer::Norm(n), _) if relu_at(i + 1) => (i + 2, n.forward_relu_t(&h, train)?),
                (StemLayer::Norm(n), _) => (i + 1, n.forward_t(&h, train)?),
                (StemLayer::Relu, _) => (i + 1, h.relu()?),
                (StemLayer::MaxPool, _) => (i + 1, max_pool2d(&h, Pool2dConfig::new(3, 2, 1))?),
            };
            h = out;
            i = next;
        }
        Ok(h)
    }

    /// Each stage's output, for use as a backbone (`layer1` ... `layerN`).
    ///
    /// # Shapes
    /// - input: (N, in_channels, H, W); outputs: (N, planes_s * expansion, H_s, W_s)
    ///
    /// # Errors
    /// An input of the wrong shape.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.check_input(x)?;
        let (mut h, mut lead) = self.stem_or_lead(x, train)?;
        let mut out = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            h = crate::block_run::run_blocks(h, lead.take().as_ref(), stage, train)?;
            out.push(h.clone());
        }
        Ok(out)
    }

    /// The pooled features before the classifier: (N, feature_channels).
    ///
    /// # Errors
    /// An input of the wrong shape.
    pub fn embed(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_input(x)?;
        if self.stages.is_empty() {
            return Err(Error::config("a ResNet needs at least one stage"));
        }
        // Only the last stage's output is wanted: runs of blocks may cross stages.
        let (h, lead) = self.stem_or_lead(x, train)?;
        let blocks = self.stages.iter().flatten();
        let last = crate::block_run::run_blocks(h, lead.as_ref(), blocks, train)?;
        let h = match &self.final_norm {
            Some(n) => n.forward_relu_t(&last, train)?,
            None => last,
        };
        Ok(h.mean((2, 3))?)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        match x.dims() {
            [_, c, h, w] if *c == self.cfg.in_channels && *h > 0 && *w > 0 => Ok(()),
            dims => Err(resblock_core::Error::Shape {
                op: "resnet",
                expected: format!("an (N, {}, H, W) input", self.cfg.in_channels),
                got: dims.to_vec(),
            }
            .into()),
        }
    }
}

impl ModuleT for ResNet {
    /// # Shapes
    /// - input: (N, in_channels, H, W); output: (N, num_classes), or (N, feature_channels)
    ///   without a classifier
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.embed(x, train).map_err(|e| match e {
            Error::Candle(c) => c,
            other => candle_core::Error::Msg(other.to_string()),
        })?;
        match &self.fc {
            Some(fc) => resblock_core::linear_act(fc, &h, resblock_core::Activation::Identity),
            None => Ok(h),
        }
    }
}

impl Probed for ResNet {
    fn probes(&self) -> Vec<(String, &ResidualProbe)> {
        self.stages
            .iter()
            .enumerate()
            .flat_map(|(s, st)| {
                st.iter()
                    .enumerate()
                    .map(move |(i, b)| (format!("layer{}.{i}", s + 1), b.probe()))
            })
            .collect()
    }
}
