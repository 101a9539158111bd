//! The residual combinator: `post(shortcut(x) + scale * g(x))`.

use std::sync::Arc;

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::drop_path::DropPath;
use crate::error::{Error, Result};
use crate::layers::{sum_sq, Activation, BatchNorm};
use crate::probe::{ProbeReading, ResidualProbe};
use crate::rng::RngHandle;
use crate::shortcut::Shortcut;

/// How the residual branch is scaled so that a block can start as (or near) the identity.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ResidualScale {
    /// No scaling.
    #[default]
    None,
    /// The branch's last affine layer starts at zero (the last norm's gamma in convolutional
    /// blocks, the last linear layer in MLP blocks): the block is exactly the identity at
    /// init (Goyal et al. 2017, torchvision's `zero_init_residual`). Applied by the block
    /// constructor; no scaling at run time.
    ZeroInit,
    /// A learnable scalar `alpha`, initialised to 0, multiplies the branch (ReZero,
    /// Bachlechner et al. 2020).
    ReZero,
    /// A fixed factor multiplies the branch.
    Fixed(f64),
}

/// The normalisation of a pre-activation stage.
#[derive(Debug, Clone)]
pub enum Norm {
    /// Batch norm over channels.
    Batch(BatchNorm),
    /// Layer norm over the last dim.
    Layer(crate::layers::LayerNorm),
}

/// A stage applied to the input before the residual branch: norm then activation
/// (pre-activation blocks, He et al. 2016b; pre-norm MLP blocks).
#[derive(Debug, Clone)]
pub struct PreActivation {
    /// The normalisation.
    pub norm: Norm,
    /// The activation after it, if any.
    pub activation: Option<Activation>,
}

impl ModuleT for PreActivation {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = match &self.norm {
            Norm::Batch(bn) => bn.forward_t(x, train)?,
            Norm::Layer(ln) => ln.forward(x)?,
        };
        match self.activation {
            Some(a) => a.forward(&y),
            None => Ok(y),
        }
    }
}

/// A residual block around any branch `G`:
///
/// ```text
/// a = pre(x)                      (or x when there is no pre-activation stage)
/// r = drop_path(scale * g(a))
/// y = post(shortcut(s) + r)       s = a if the shortcut reads the pre-activated input, else x
/// ```
///
/// With [`Shortcut::Removed`] the block is plain: `y = post(r)`.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use resblock_core::{linear, Residual, Shortcut};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// // The article's block: out = Linear(x) + x.
/// let block = Residual::new(linear(10, 10, vb.pp("linear"))?, Shortcut::Identity);
/// let x = Tensor::ones((4, 10), DType::F32, &Device::Cpu)?;
/// assert_eq!(block.forward_t(&x, false)?.dims(), [4, 10]);
/// # Ok::<(), resblock_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Residual<G> {
    pre: Option<PreActivation>,
    shortcut_reads_pre: bool,
    branch: G,
    shortcut: Shortcut,
    alpha: Option<Tensor>,
    fixed_scale: Option<f64>,
    drop_path: Option<DropPath>,
    post: Option<Activation>,
    probe: Arc<ResidualProbe>,
}

/// What a [`Residual`] block needs of its branch `g`: a module, and optionally a better way
/// to compute the post-activation block's end `relu(shortcut + g(x))` than `g` followed by
/// an add + ReLU. A branch ending in a conv + BN pair overrides [`Branch::forward_end`] to
/// run the last convolution, the norm, the sum and the ReLU as one op in training
/// (`resblock_vision::BasicBranch` does, through [`crate::ConvBn::forward_add_relu_t`]).
///
/// Any `ModuleT` becomes a branch with an empty impl: `impl Branch for MyBranch {}`.
pub trait Branch: ModuleT {
    /// `relu(shortcut + self.forward_t(x, train))`. The default is exactly that, with the
    /// sum and the ReLU as one op ([`crate::ops::add_relu`]).
    ///
    /// # Errors
    /// As `forward_t`, or a shortcut of another shape.
    fn forward_end(
        &self,
        x: &Tensor,
        shortcut: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let r = self.forward_t(x, train)?;
        if shortcut.dims() != r.dims() {
            candle_core::bail!(
                "residual block: shortcut gives shape {:?} but the branch gives {:?}",
                shortcut.dims(),
                r.dims()
            );
        }
        crate::ops::add_relu(shortcut, &r).map_err(candle_core::Error::wrap)
    }

    /// The whole post-activation block `relu(shortcut.apply(x) + self.forward_t(x, train))`
    /// where the branch has a better way with this shortcut (one op for the block), else
    /// `None`: then the block applies the shortcut and calls [`Branch::forward_end`]. The
    /// default is `None` (`resblock_vision::BasicBranch` fuses the option-A shortcut).
    ///
    /// # Errors
    /// As [`Branch::forward_end`].
    fn forward_block(
        &self,
        _x: &Tensor,
        _shortcut: &Shortcut,
        _train: bool,
    ) -> Option<candle_core::Result<Tensor>> {
        None
    }
}

impl Branch for candle_nn::Linear {}
impl Branch for crate::layers::Conv2d {}
impl Branch for crate::conv_bn::ConvBn {}
impl Branch for candle_nn::Sequential {}

impl<G> Residual<G> {
    /// `shortcut(x) + g(x)`, no pre-activation, scaling, drop-path or post-activation.
    pub fn new(branch: G, shortcut: Shortcut) -> Self {
        Self {
            pre: None,
            shortcut_reads_pre: false,
            branch,
            shortcut,
            alpha: None,
            fixed_scale: None,
            drop_path: None,
            post: None,
            probe: Arc::default(),
        }
    }

    /// Applies `activation` after the sum (the article's CNN block uses ReLU).
    pub fn with_post(mut self, activation: Activation) -> Self {
        self.post = Some(activation);
        self
    }

    /// Puts a pre-activation stage before the branch. When `shortcut_reads_pre` the shortcut
    /// is applied to the pre-activated input (as pre-activation ResNets do for projection
    /// shortcuts), otherwise to the raw input.
    pub fn with_pre(mut self, pre: PreActivation, shortcut_reads_pre: bool) -> Self {
        self.pre = Some(pre);
        self.shortcut_reads_pre = shortcut_reads_pre;
        self
    }

    /// Adds drop-path with probability `p` (no-op for `p == 0`).
    ///
    /// # Errors
    /// `p` outside [0, 1].
    pub fn with_drop_path(mut self, p: f64, rng: &RngHandle) -> Result<Self> {
        self.drop_path = if p > 0. {
            Some(DropPath::new(p, rng.clone())?)
        } else if p == 0. {
            None
        } else {
            return Err(Error::config(format!(
                "drop-path probability must be in [0, 1], got {p}"
            )));
        };
        Ok(self)
    }

    /// Applies the run-time part of `scale`: ReZero creates the scalar `alpha` (shape (1,),
    /// zero) under `vb`; `Fixed` multiplies by a constant; `None` and `ZeroInit` (which the
    /// block constructor applies to its weights) do nothing here.
    ///
    /// # Errors
    /// A variable of another shape under `vb`.
    pub fn with_scale(mut self, scale: ResidualScale, vb: VarBuilder<'_>) -> Result<Self> {
        match scale {
            ResidualScale::None | ResidualScale::ZeroInit => {}
            ResidualScale::ReZero => {
                self.alpha = Some(vb.get_with_hints(1, "alpha", Init::Const(0.))?);
            }
            ResidualScale::Fixed(s) => self.fixed_scale = Some(s),
        }
        Ok(self)
    }

    /// The same block with another branch and shortcut, keeping the pre-activation, scaling,
    /// drop-path, post-activation and probe settings (used to swap in folded layers).
    pub fn replace_parts<H>(self, branch: H, shortcut: Shortcut) -> Residual<H> {
        Residual {
            pre: self.pre,
            shortcut_reads_pre: self.shortcut_reads_pre,
            branch,
            shortcut,
            alpha: self.alpha,
            fixed_scale: self.fixed_scale,
            drop_path: self.drop_path,
            post: self.post,
            probe: Arc::default(),
        }
    }

    /// The residual branch.
    pub fn branch(&self) -> &G {
        &self.branch
    }
    /// The shortcut.
    pub fn shortcut(&self) -> &Shortcut {
        &self.shortcut
    }
    /// The pre-activation stage, if any.
    pub fn pre(&self) -> Option<&PreActivation> {
        self.pre.as_ref()
    }
    /// The post-activation, if any.
    pub fn post(&self) -> Option<Activation> {
        self.post
    }
    /// The drop-path, if any.
    pub fn drop_path(&self) -> Option<&DropPath> {
        self.drop_path.as_ref()
    }
    /// The ReZero scalar, if any.
    pub fn alpha(&self) -> Option<&Tensor> {
        self.alpha.as_ref()
    }
    /// The fixed branch scale, if any.
    pub fn fixed_scale(&self) -> Option<f64> {
        self.fixed_scale
    }
    /// Whether the shortcut reads the pre-activated input (`a`) rather than `x`.
    pub fn shortcut_reads_pre(&self) -> bool {
        self.shortcut_reads_pre
    }
    /// This block's probe (see [`crate::probe`]).
    pub fn probe(&self) -> &ResidualProbe {
        &self.probe
    }

    /// Whether this block computes exactly `relu(shortcut(x) + g(x))` in this mode: a ReLU
    /// after the sum and a shortcut, but no ReZero, fixed scale, enabled probe or (in
    /// training) drop-path. Such a block's end is the branch's business
    /// ([`Branch::forward_end`]); with no pre-activation either, so is the whole block
    /// ([`Branch::forward_block`]), and a network may run a run of such blocks as one op
    /// (`resblock_vision::ResNet` does, through [`crate::conv_bn::basic_block_chain_t`]).
    pub fn is_plain_post_relu(&self, train: bool) -> bool {
        self.post == Some(Activation::Relu)
            && !matches!(self.shortcut, Shortcut::Removed)
            && self.alpha.is_none()
            && self.fixed_scale.is_none()
            && (self.drop_path.is_none() || !train)
            && !self.probe.is_enabled()
    }
}

impl<G: Branch> Residual<G> {
    /// The scaled branch output `scale * g(pre(x))` and the shortcut's input.
    fn residual(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
        let a = match &self.pre {
            Some(p) => p.forward_t(x, train)?,
            None => x.clone(),
        };
        let mut r = self.branch.forward_t(&a, train)?;
        if let Some(alpha) = &self.alpha {
            r = r.broadcast_mul(alpha)?;
        }
        if let Some(s) = self.fixed_scale {
            r = (r * s)?;
        }
        let s_in = if self.shortcut_reads_pre {
            a
        } else {
            x.clone()
        };
        Ok((r, s_in))
    }
}

impl<G: Branch> ModuleT for Residual<G> {
    /// # Shapes
    /// Whatever the branch maps; the shortcut must produce the same shape.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        // The usual post-activation block: its end is the branch's business (one fused op
        // where the branch has one).
        if self.is_plain_post_relu(train) {
            if self.pre.is_none() {
                if let Some(y) = self.branch.forward_block(x, &self.shortcut, train) {
                    return y;
                }
            }
            let a = match &self.pre {
                Some(p) => p.forward_t(x, train)?,
                None => x.clone(),
            };
            let s_in = if self.shortcut_reads_pre { &a } else { x };
            if let Some(s) = self.shortcut.apply(s_in, train)? {
                return self.branch.forward_end(&a, &s, train);
            }
        }
        let (r, s_in) = self.residual(x, train)?;
        if self.probe.is_enabled() {
            self.probe.record(ProbeReading {
                residual_norm: sum_sq(&r)?.sqrt(),
                input_norm: sum_sq(x)?.sqrt(),
            });
        }
        let r = match &self.drop_path {
            Some(d) => d.forward_t(&r, train)?,
            None => r,
        };
        let y = match self.shortcut.apply(&s_in, train)? {
            Some(s) => {
                if s.dims() != r.dims() {
                    candle_core::bail!(
                        "residual block: shortcut gives shape {:?} but the branch gives {:?}",
                        s.dims(),
                        r.dims()
                    );
                }
                if self.post == Some(Activation::Relu) {
                    // The usual post-activation block end, as one fused op.
                    return crate::ops::add_relu(&s, &r).map_err(candle_core::Error::wrap);
                }
                (s + r)?
            }
            None => r,
        };
        match self.post {
            Some(a) => a.forward(&y),
            None => Ok(y),
        }
    }
}
