//! Layers with PyTorch's default initialisation and parameter names.
//!
//! Each layer follows candle-nn's pattern: a `Copy` config with PyTorch's defaults, a struct,
//! and a free constructor taking a `VarBuilder`. Parameter names are PyTorch's (`weight`,
//! `bias`, `running_mean`, `running_var`, `num_batches_tracked`), so a `state_dict` maps
//! one to one.

use candle_core::{DType, Module, ModuleT, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};

/// PyTorch's default init for `nn.Linear`/`nn.Conv2d` weights and biases:
/// `kaiming_uniform_(a=sqrt(5))`, which is uniform in +-1/sqrt(fan_in).
fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1. / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Refuses a layer with no inputs or outputs (PyTorch builds some, with NaN init bounds;
/// here it is an error naming the layer).
fn check_widths(layer: &str, in_dim: usize, out_dim: usize, vb: &VarBuilder<'_>) -> Result<()> {
    if in_dim == 0 || out_dim == 0 {
        return Err(Error::config(format!(
            "{layer} {}: widths must be positive, got {in_dim} -> {out_dim}",
            vb.prefix()
        )));
    }
    Ok(())
}

/// `nn.Linear(in_dim, out_dim)` with PyTorch's initialisation: weight and bias uniform in
/// +-1/sqrt(in_dim). (candle-nn's `linear` draws the weight from a Kaiming normal instead.)
///
/// # Shapes
/// - input: (..., in_dim); output: (..., out_dim)
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let fc = resblock_core::linear(10, 3, vb.pp("fc"))?;
/// let y = fc.forward(&Tensor::zeros((2, 10), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), [2, 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// A variable of another shape already under that name.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder<'_>) -> Result<candle_nn::Linear> {
    check_widths("linear", in_dim, out_dim, &vb)?;
    let init = torch_default_init(in_dim);
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(candle_nn::Linear::new(w, Some(b)))
}

/// [`linear`] whose weight and bias start at zero (a residual branch that starts as nothing).
///
/// # Errors
/// As [`linear`].
pub fn linear_zeros(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder<'_>,
) -> Result<candle_nn::Linear> {
    check_widths("linear", in_dim, out_dim, &vb)?;
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.))?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.))?;
    Ok(candle_nn::Linear::new(w, Some(b)))
}

/// `act(layer(x))` with the activation fused into the layer's op where our kernels run
/// ([`crate::ops::dense::linear`]: one GEMM and one pass forward, GEMMs backward); SiLU and
/// tanh run as Candle ops after it.
///
/// # Errors
/// Shapes that do not fit the layer.
pub fn linear_act(
    layer: &candle_nn::Linear,
    x: &Tensor,
    act: Activation,
) -> candle_core::Result<Tensor> {
    use resblock_kernels::dense::{linear, DenseActivation};
    let fused = match act {
        Activation::Identity => Some(DenseActivation::Identity),
        Activation::Relu => Some(DenseActivation::Relu),
        Activation::Gelu => Some(DenseActivation::Gelu),
        Activation::Silu | Activation::Tanh => None,
    };
    let y = linear(
        x,
        layer.weight(),
        layer.bias(),
        fused.unwrap_or(DenseActivation::Identity),
    )?;
    match fused {
        Some(_) => Ok(y),
        None => act.forward(&y),
    }
}

/// An element-wise activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// max(x, 0).
    #[default]
    Relu,
    /// GELU with the exact erf form (PyTorch's default).
    Gelu,
    /// x * sigmoid(x).
    Silu,
    /// tanh(x).
    Tanh,
    /// The identity.
    Identity,
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
            Self::Silu => x.silu(),
            Self::Tanh => x.tanh(),
            Self::Identity => Ok(x.clone()),
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            "silu" | "swish" => Ok(Self::Silu),
            "tanh" => Ok(Self::Tanh),
            "identity" | "none" => Ok(Self::Identity),
            _ => Err(Error::config(format!(
                "unknown activation {s:?}: expected relu, gelu, silu, tanh or identity"
            ))),
        }
    }
}

/// How a convolution's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ConvInit {
    /// PyTorch's `nn.Conv2d` default: uniform in +-1/sqrt(fan_in).
    #[default]
    TorchDefault,
    /// torchvision's ResNet init: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
    KaimingNormalFanOut,
    /// All zeros (the last layer of a residual branch that must start as nothing).
    Zeros,
}

/// Configuration of a [`Conv2d`]: PyTorch's `nn.Conv2d` arguments besides the channels and
/// kernel size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conv2dConfig {
    /// Zero padding on each side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups (input and output channels must both be divisible by it).
    pub groups: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Weight initialisation.
    pub init: ConvInit,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
            bias: true,
            init: ConvInit::TorchDefault,
        }
    }
}

/// A 2-D convolution (PyTorch's `nn.Conv2d`) whose backward is right for any input shape
/// (see [`crate::ops::conv2d`]).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
    /// Set by [`Conv2d::fold_batch_norm`]: `weight` is this frozen kernel, whose derived
    /// forms our forward keeps (see [`crate::ops::FrozenKernel`]).
    frozen: Option<crate::ops::FrozenKernel>,
}

impl Conv2d {
    /// A convolution from existing tensors: weight (C_out, C_in/groups, k, k), bias (C_out).
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            cfg,
            frozen: None,
        }
    }
    /// The kernel, (C_out, C_in/groups, kh, kw).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The configuration.
    pub fn config(&self) -> &Conv2dConfig {
        &self.cfg
    }
    /// Whether the kernel is frozen for inference, as [`Conv2d::fold_batch_norm`] leaves it:
    /// what our forward derives from it is made once and kept.
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }
}

impl Conv2d {
    /// This convolution followed by `bn` in eval mode, as one convolution with a bias:
    /// `W' = W * gamma / sigma`, `b' = (b - mean) * gamma / sigma + beta`. The result holds
    /// plain tensors (no variables), for inference, its kernel frozen
    /// ([`crate::ops::FrozenKernel`]).
    ///
    /// # Errors
    /// A norm whose channels differ from the convolution's outputs.
    pub fn fold_batch_norm(&self, bn: &BatchNorm) -> Result<Conv2d> {
        let (scale, shift) = bn.eval_scale_shift()?;
        let c_out = self.weight.dim(0)?;
        if scale.dim(0)? != c_out {
            return Err(Error::config(format!(
                "cannot fold a {}-channel batch norm into a {c_out}-channel convolution",
                scale.dim(0)?
            )));
        }
        let w = self
            .weight
            .detach()
            .broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?;
        let b = match &self.bias {
            Some(b) => ((b.detach() * &scale)? + &shift)?,
            None => shift,
        };
        // A folded convolution is for inference: its kernel is frozen, so the transforms
        // our forward derives from it are made once, not on every call.
        let frozen = crate::ops::FrozenKernel::new(&w)?;
        Ok(Conv2d {
            weight: frozen.kernel().clone(),
            bias: Some(b),
            cfg: Conv2dConfig {
                bias: true,
                ..self.cfg
            },
            frozen: Some(frozen),
        })
    }
}

impl Module for Conv2d {
    /// # Shapes
    /// - input: (N, C_in, H, W); output: (N, C_out, H_out, W_out)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, false)
    }
}

impl Conv2d {
    /// `relu(self.forward(x))`, with the bias and the ReLU fused into the convolution's
    /// output pass on our CPU kernel (see [`crate::ops::conv2d_fused`]).
    ///
    /// # Shapes
    /// - input: (N, C_in, H, W); output: (N, C_out, H_out, W_out)
    ///
    /// # Errors
    /// As [`Module::forward`].
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        crate::ops::conv2d_fused(
            x,
            &self.weight,
            self.bias.as_ref(),
            relu,
            c.padding,
            c.stride,
            c.dilation,
            c.groups,
        )
        .map_err(candle_core::Error::wrap)
    }
}

/// Creates `nn.Conv2d(in_c, out_c, kernel, ...)` with `weight` (and `bias`) under `vb`.
///
/// # Errors
/// Channels not divisible by the groups, a zero kernel or stride.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use resblock_core::{conv2d, Conv2dConfig};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let cfg = Conv2dConfig { padding: 1, stride: 2, bias: false, ..Default::default() };
/// let conv = conv2d(3, 8, 3, cfg, vb.pp("conv1"))?;
/// let y = conv.forward(&Tensor::zeros((1, 3, 9, 8), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), [1, 8, 5, 4]);
/// # Ok::<(), resblock_core::Error>(())
/// ```
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder<'_>,
) -> Result<Conv2d> {
    check_widths("conv2d", in_c, out_c, &vb)?;
    if cfg.groups == 0 || !in_c.is_multiple_of(cfg.groups) || !out_c.is_multiple_of(cfg.groups) {
        return Err(Error::config(format!(
            "conv2d {}: channels {in_c}->{out_c} are not divisible by groups {}",
            vb.prefix(),
            cfg.groups
        )));
    }
    if kernel == 0 || cfg.stride == 0 || cfg.dilation == 0 {
        return Err(Error::config(format!(
            "conv2d {}: kernel, stride and dilation must be positive",
            vb.prefix()
        )));
    }
    let fan_in = in_c / cfg.groups * kernel * kernel;
    let w_init = match cfg.init {
        ConvInit::TorchDefault => torch_default_init(fan_in),
        ConvInit::KaimingNormalFanOut => Init::Kaiming {
            dist: candle_nn::init::NormalOrUniform::Normal,
            fan: candle_nn::init::FanInOut::FanOut,
            non_linearity: candle_nn::init::NonLinearity::ReLU,
        },
        ConvInit::Zeros => Init::Const(0.),
    };
    let weight = vb.get_with_hints((out_c, in_c / cfg.groups, kernel, kernel), "weight", w_init)?;
    let bias = if cfg.bias {
        Some(vb.get_with_hints(out_c, "bias", torch_default_init(fan_in))?)
    } else {
        None
    };
    Ok(Conv2d::new(weight, bias, cfg))
}

/// Configuration of a [`BatchNorm`], PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance.
    pub eps: f64,
    /// Weight of the new batch in the running statistics.
    pub momentum: f64,
    /// Initial value of the scale `weight` (gamma): 1, or 0 to make a residual branch that
    /// ends in this norm start as zero ("zero-init residual").
    pub weight_init: f64,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
            weight_init: 1.,
        }
    }
}

/// Batch normalisation over dim 1 of an (N, C, ...) input (PyTorch's `BatchNorm1d/2d`).
///
/// Training mode normalises with the batch mean and biased variance and updates the running
/// statistics with `momentum` and the unbiased variance, and counts `num_batches_tracked`, as
/// PyTorch does. Eval mode uses the running statistics. The running statistics are not
/// trainable: they are updated out of the autograd graph.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    cfg: BatchNormConfig,
}

/// Creates a batch norm over `channels` with `weight`, `bias`, `running_mean`,
/// `running_var` and `num_batches_tracked` (i64) under `vb`.
///
/// # Errors
/// A negative eps, a momentum outside [0, 1], or existing variables of other shapes.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let bn = resblock_core::batch_norm(4, Default::default(), vb.pp("bn1"))?;
/// let x = Tensor::randn(0f32, 1., (8, 4, 3, 3), &Device::Cpu)?;
/// let y = bn.forward_t(&x, true)?;
/// assert_eq!(y.dims(), x.dims());
/// assert_eq!(bn.num_batches_tracked()?, 1);
/// # Ok::<(), resblock_core::Error>(())
/// ```
pub fn batch_norm(channels: usize, cfg: BatchNormConfig, vb: VarBuilder<'_>) -> Result<BatchNorm> {
    check_widths("batch_norm", channels, channels, &vb)?;
    if cfg.eps < 0. || !(0. ..=1.).contains(&cfg.momentum) {
        return Err(Error::config(format!(
            "batch_norm {}: eps must be >= 0 and momentum in [0, 1], got {cfg:?}",
            vb.prefix()
        )));
    }
    let weight = vb.get_with_hints(channels, "weight", Init::Const(cfg.weight_init))?;
    let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
    let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.))?;
    let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.))?;
    let nbt = vb.get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.), DType::I64)?;
    Ok(BatchNorm {
        weight,
        bias,
        running_mean: Var::from_tensor(&running_mean)?,
        running_var: Var::from_tensor(&running_var)?,
        num_batches_tracked: Var::from_tensor(&nbt)?,
        cfg,
    })
}

impl BatchNorm {
    /// The scale (gamma).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The shift (beta).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
    /// The running mean.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }
    /// The running (unbiased) variance.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }
    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.cfg
    }
    /// How many training batches have updated the running statistics.
    ///
    /// # Errors
    /// Only if the counter tensor cannot be read.
    pub fn num_batches_tracked(&self) -> Result<i64> {
        Ok(self
            .num_batches_tracked
            .as_tensor()
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()?)
    }

    /// Per-channel scale and shift that eval mode applies: y = x * scale + shift (used to
    /// fold the norm into a preceding convolution).
    ///
    /// # Errors
    /// Only on tensor errors.
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        // The running statistics are not trainable: detached, so only gamma and beta (when
        // they are variables) make the result record a graph.
        let inv_std = (self.running_var.as_tensor().detach() + self.cfg.eps)?
            .sqrt()?
            .recip()?;
        let scale = (&self.weight * inv_std)?;
        let shift = (&self.bias - (self.running_mean.as_tensor().detach() * &scale)?)?;
        Ok((scale, shift))
    }

    fn check(&self, x: &Tensor) -> candle_core::Result<Vec<usize>> {
        let c = self.weight.dim(0)?;
        if x.rank() < 2 || x.dim(1)? != c {
            candle_core::bail!(
                "batch_norm: expected an (N, {c}, ...) input, got shape {:?}",
                x.dims()
            );
        }
        let mut bshape = vec![1; x.rank()];
        bshape[1] = c;
        Ok(bshape)
    }
}

impl ModuleT for BatchNorm {
    /// # Shapes
    /// - input: (N, C, ...); output: same
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, false)
    }
}

impl BatchNorm {
    /// `relu(self.forward_t(x, train))`, fused into one kernel in training (see
    /// [`crate::ops::batch_norm_train`]).
    ///
    /// # Shapes
    /// - input: (N, C, ...); output: same
    ///
    /// # Errors
    /// As [`ModuleT::forward_t`].
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, true)
    }

    pub(crate) fn run(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        let bshape = self.check(x)?;
        if !train {
            // Eval mode is inference: the parameters are constants here (detached, sharing
            // their storage), so a model built on a VarMap records no backprop graph and
            // frees each activation as soon as the next layer has read it. Gradients with
            // respect to the input still flow.
            let w = self.weight.detach().reshape(bshape.as_slice())?;
            let b = self.bias.detach().reshape(bshape.as_slice())?;
            let mean = self
                .running_mean
                .as_tensor()
                .detach()
                .reshape(bshape.as_slice())?;
            let var = self
                .running_var
                .as_tensor()
                .detach()
                .reshape(bshape.as_slice())?;
            let inv = (var + self.cfg.eps)?.sqrt()?.recip()?;
            let scale = (w * inv)?;
            let y = x
                .broadcast_sub(&mean)?
                .broadcast_mul(&scale)?
                .broadcast_add(&b)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let (y, stats) =
            crate::ops::batch_norm_train(x, &self.weight, &self.bias, self.cfg.eps, relu)
                .map_err(candle_core::Error::wrap)?;
        self.track(&stats)?;
        Ok(y)
    }

    /// Updates the running statistics and the batch count from one training batch's
    /// statistics, outside the autograd graph, as PyTorch does.
    pub(crate) fn track(&self, stats: &crate::ops::BatchStats) -> candle_core::Result<()> {
        let count = stats.count;
        let dev = self.running_mean.device();
        let mean64 = Tensor::new(stats.mean.as_slice(), dev)?;
        let var64 = Tensor::new(stats.var.as_slice(), dev)?;
        // Running statistics, outside the autograd graph.
        let m = self.cfg.momentum;
        let batch_mean = mean64;
        let unbiased = (var64 * (count as f64 / (count as f64 - 1.)))?;
        let old_mean = self
            .running_mean
            .as_tensor()
            .detach()
            .to_dtype(DType::F64)?;
        let old_var = self.running_var.as_tensor().detach().to_dtype(DType::F64)?;
        let rm = ((old_mean * (1. - m))? + (batch_mean * m)?)?;
        let rv = ((old_var * (1. - m))? + (unbiased * m)?)?;
        self.running_mean
            .set(&rm.to_dtype(self.running_mean.dtype())?)?;
        self.running_var
            .set(&rv.to_dtype(self.running_var.dtype())?)?;
        let nbt = self.num_batches_tracked.as_tensor();
        self.num_batches_tracked
            .set(&(nbt.to_dtype(DType::F64)? + 1.)?.to_dtype(nbt.dtype())?)?;
        Ok(())
    }
}

/// Layer normalisation over the last dim (PyTorch's `nn.LayerNorm(dim)`: weight 1, bias 0,
/// eps 1e-5).
///
/// Runs [`crate::ops::norm::layer_norm`]: our one-op kernel with its backward on the CPU,
/// differentiable Candle ops elsewhere (candle-nn's `LayerNorm` dispatches contiguous inputs
/// to a fused op that has no backward, so it cannot be trained through).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// The scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for LayerNorm {
    /// # Shapes
    /// - input: (..., dim); output: same
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(resblock_kernels::norm::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Creates a [`LayerNorm`] over `dim` features (`weight`, `bias` under `vb`).
///
/// # Errors
/// Existing variables of another shape.
pub fn layer_norm(dim: usize, vb: VarBuilder<'_>) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(dim, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(dim, "bias", Init::Const(0.))?,
        eps: 1e-5,
    })
}

/// Squared L2 norm of a tensor, as f64 (for probes and gradient clipping).
///
/// # Errors
/// Only on tensor errors.
pub fn sum_sq(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}
