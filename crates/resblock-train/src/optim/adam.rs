//! Adam and AdamW (`torch.optim.Adam` / `torch.optim.AdamW`).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::Optimizer;
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
    /// Weight decay (L2 coupled into the gradient for Adam, decoupled for AdamW).
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

/// The per-parameter state of [`Adam`], as PyTorch keeps it (`step`, `exp_avg`,
/// `exp_avg_sq`).
#[derive(Debug, Clone)]
pub struct AdamParamState {
    /// Updates applied to this parameter so far.
    pub step: u64,
    /// First moment (running average of the gradient).
    pub exp_avg: Tensor,
    /// Second moment (running average of the squared gradient).
    pub exp_avg_sq: Tensor,
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
    vars: Vec<Var>,
    state: Vec<AdamParamState>,
    cfg: AdamConfig,
}

impl Adam {
    /// An optimizer over the float variables in `vars` (integer buffers such as
    /// `num_batches_tracked` are skipped).
    ///
    /// # Errors
    /// Hyper-parameters out of range.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
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
        cfg.validate()?;
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let state = vars
            .iter()
            .map(|v| {
                Ok(AdamParamState {
                    step: 0,
                    exp_avg: v.as_tensor().zeros_like()?,
                    exp_avg_sq: v.as_tensor().zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { vars, state, cfg })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// The optimized variables, in the order of [`Adam::state`].
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The per-parameter state, in the order of [`Adam::vars`].
    pub fn state(&self) -> &[AdamParamState] {
        &self.state
    }

    /// Replaces the state (restoring a checkpoint).
    ///
    /// # Errors
    /// A state of the wrong length or whose tensors do not match the variables' shapes.
    pub fn set_state(&mut self, state: Vec<AdamParamState>) -> Result<()> {
        if state.len() != self.vars.len() {
            return Err(Error::config(format!(
                "Adam state has {} entries for {} parameters",
                state.len(),
                self.vars.len()
            )));
        }
        for (v, s) in self.vars.iter().zip(&state) {
            for t in [&s.exp_avg, &s.exp_avg_sq] {
                if t.dims() != v.dims() {
                    return Err(Error::ShapeMismatch {
                        op: "Adam::set_state",
                        a: v.dims().to_vec(),
                        b: t.dims().to_vec(),
                    });
                }
            }
        }
        self.state = state;
        Ok(())
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamConfig {
            lr,
            betas: (b1, b2),
            eps,
            weight_decay: wd,
            decoupled,
        } = self.cfg;
        for (var, st) in self.vars.iter().zip(self.state.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_tensor().detach();
            let grad = grad.detach();
            st.step += 1;
            let t = st.step as i32;
            let (p, grad) = if wd == 0. {
                (p, grad)
            } else if decoupled {
                ((p * (1. - lr * wd))?, grad)
            } else {
                let g = (&grad + (&p * wd)?)?;
                (p, g)
            };
            st.exp_avg = ((&st.exp_avg * b1)? + (&grad * (1. - b1))?)?;
            st.exp_avg_sq = ((&st.exp_avg_sq * b2)? + (grad.sqr()? * (1. - b2))?)?;
            let bc1 = 1. - b1.powi(t);
            let bc2_sqrt = (1. - b2.powi(t)).sqrt();
            let denom = ((st.exp_avg_sq.sqrt()? / bc2_sqrt)? + eps)?;
            let update = ((&st.exp_avg / denom)? * (lr / bc1))?;
            var.set(&(p - update)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}
