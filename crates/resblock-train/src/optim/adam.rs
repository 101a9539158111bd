//! Adam and AdamW (`torch.optim.Adam` / `torch.optim.AdamW`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{
    check_no_unexpected, flatten_groups, take_state, Optimizer, OptimizerState, ParamGroup,
};
use crate::error::{Error, Result};

/// Hyper-parameters of [`Adam`]; the default is `torch.optim.Adam`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// Coefficients of the running averages of the gradient and its square.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay for [`Adam::new`] (groups carry their own).
    pub weight_decay: f64,
    /// Decoupled weight decay (AdamW, Loshchilov & Hutter): `p *= 1 - lr * wd` before the
    /// update, instead of adding `wd * p` to the gradient.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.,
            decoupled: false,
        }
    }
}

impl AdamConfig {
    /// `torch.optim.AdamW`'s defaults (weight decay 0.01, decoupled).
    pub fn adamw() -> Self {
        Self {
            weight_decay: 1e-2,
            decoupled: true,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        let ok = self.lr.is_finite()
            && self.lr >= 0.
            && (0. ..1.).contains(&b1)
            && (0. ..1.).contains(&b2)
            && self.eps >= 0.
            && self.weight_decay >= 0.;
        if ok {
            Ok(())
        } else {
            Err(Error::config(format!(
                "Adam needs lr >= 0, betas in [0, 1), eps >= 0 and weight_decay >= 0, got {self:?}"
            )))
        }
    }
}

/// The per-parameter state of [`Adam`], as PyTorch keeps it.
#[derive(Debug, Clone)]
pub struct AdamParamState {
    /// Updates applied to this parameter so far.
    pub step: u64,
    /// First moment (running average of the gradient).
    pub exp_avg: Tensor,
    /// Second moment (running average of the squared gradient).
    pub exp_avg_sq: Tensor,
}

#[derive(Debug)]
struct AdamParam {
    name: String,
    var: Var,
    weight_decay: f64,
    state: AdamParamState,
}

/// Adam / AdamW with PyTorch's update:
///
/// ```text
/// g = grad (+ wd * p for Adam);     p *= 1 - lr * wd for AdamW
/// m = b1 m + (1 - b1) g;            v = b2 v + (1 - b2) g^2
/// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// ```
#[derive(Debug)]
pub struct Adam {
    params: Vec<AdamParam>,
    cfg: AdamConfig,
}

impl Adam {
    /// An optimizer over the float variables in `vars`, all with `cfg.weight_decay`
    /// (integer buffers such as `num_batches_tracked` are skipped).
    ///
    /// # Errors
    /// Hyper-parameters out of range.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use resblock_train::optim::{Adam, AdamConfig, Optimizer};
    /// let w = Var::new(&[1f32, -2.], &Device::Cpu)?;
    /// let mut opt = Adam::new(vec![w.clone()], AdamConfig { lr: 0.1, ..Default::default() })?;
    /// for _ in 0..100 {
    ///     opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
    /// }
    /// assert!(w.as_tensor().abs()?.max(0)?.to_scalar::<f32>()? < 0.1);
    /// # Ok::<(), resblock_train::Error>(())
    /// ```
    pub fn new(vars: Vec<Var>, cfg: AdamConfig) -> Result<Self> {
        let group = ParamGroup {
            params: vars
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("param{i}"), v))
                .collect(),
            weight_decay: cfg.weight_decay,
        };
        Self::with_groups(vec![group], cfg)
    }

    /// An optimizer over parameter groups (each with its own weight decay; see
    /// [`super::param_groups`]).
    ///
    /// # Errors
    /// Hyper-parameters out of range.
    pub fn with_groups(groups: Vec<ParamGroup>, cfg: AdamConfig) -> Result<Self> {
        cfg.validate()?;
        if groups
            .iter()
            .any(|g| !crate::schedule::is_non_negative(g.weight_decay))
        {
            return Err(Error::config("Adam weight decay must be >= 0"));
        }
        let params = flatten_groups(groups)
            .into_iter()
            .map(|(name, var, weight_decay)| {
                Ok(AdamParam {
                    state: AdamParamState {
                        step: 0,
                        exp_avg: var.as_tensor().zeros_like()?,
                        exp_avg_sq: var.as_tensor().zeros_like()?,
                    },
                    name,
                    var,
                    weight_decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, cfg })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// Each parameter's name and state.
    pub fn param_states(&self) -> Vec<(&str, &AdamParamState)> {
        self.params
            .iter()
            .map(|p| (p.name.as_str(), &p.state))
            .collect()
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamConfig {
            lr,
            betas: (b1, b2),
            eps,
            decoupled,
            ..
        } = self.cfg;
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let wd = p.weight_decay;
            let st = &mut p.state;
            let w = p.var.as_tensor().detach();
            let grad = grad.detach();
            st.step += 1;
            let t = st.step as i32;
            let (w, grad) = if wd == 0. {
                (w, grad)
            } else if decoupled {
                ((w * (1. - lr * wd))?, grad)
            } else {
                let g = (&grad + (&w * wd)?)?;
                (w, g)
            };
            st.exp_avg = ((&st.exp_avg * b1)? + (&grad * (1. - b1))?)?;
            st.exp_avg_sq = ((&st.exp_avg_sq * b2)? + (grad.sqr()? * (1. - b2))?)?;
            let bc1 = 1. - b1.powi(t);
            let bc2_sqrt = (1. - b2.powi(t)).sqrt();
            let denom = ((st.exp_avg_sq.sqrt()? / bc2_sqrt)? + eps)?;
            let update = ((&st.exp_avg / denom)? * (lr / bc1))?;
            p.var.set(&(w - update)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn params(&self) -> Vec<&Var> {
        self.params.iter().map(|p| &p.var).collect()
    }

    fn state(&self) -> OptimizerState {
        let mut s = OptimizerState::new();
        for p in self.params.iter().filter(|p| p.state.step > 0) {
            s.insert(format!("{}.exp_avg", p.name), p.state.exp_avg.clone());
            s.insert(format!("{}.exp_avg_sq", p.name), p.state.exp_avg_sq.clone());
            // Exact for any realistic count (< 2^53).
            if let Ok(t) = Tensor::new(p.state.step as f64, p.state.exp_avg.device()) {
                s.insert(format!("{}.step", p.name), t);
            }
        }
        s
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        check_no_unexpected(
            state,
            self.params.iter().map(|p| p.name.as_str()),
            &["exp_avg", "exp_avg_sq", "step"],
        )?;
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let key = |f: &str| format!("{}.{f}", p.name);
            restored.push(if state.contains_key(&key("step")) {
                let step = take_state(state, &key("step"), &[])?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                Some(AdamParamState {
                    step: step as u64,
                    exp_avg: take_state(state, &key("exp_avg"), p.var.dims())?,
                    exp_avg_sq: take_state(state, &key("exp_avg_sq"), p.var.dims())?,
                })
            } else {
                None
            });
        }
        for (p, r) in self.params.iter_mut().zip(restored) {
            p.state = match r {
                Some(s) => s,
                None => AdamParamState {
                    step: 0,
                    exp_avg: p.var.as_tensor().zeros_like()?,
                    exp_avg_sq: p.var.as_tensor().zeros_like()?,
                },
            };
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        if self.cfg.decoupled {
            "adamw"
        } else {
            "adam"
        }
    }
}
