//! SGD with momentum, dampening, Nesterov and coupled weight decay (`torch.optim.SGD`).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::LarsConfig;
use super::{
    check_no_unexpected, flatten_groups, take_state, Optimizer, OptimizerState, ParamGroup,
};
use crate::error::{Error, Result};

/// Hyper-parameters of [`Sgd`]; the default is `torch.optim.SGD(lr=0.1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor.
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0, as PyTorch).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.,
            dampening: 0.,
            nesterov: false,
        }
    }
}

#[derive(Debug)]
struct SgdParam {
    name: String,
    var: Var,
    weight_decay: f64,
    momentum_buffer: Option<Tensor>,
}

/// `torch.optim.SGD`:
///
/// ```text
/// g = grad + wd * p
/// b = g                                  (first step)
/// b = momentum * b + (1 - dampening) * g (later steps)
/// g = g + momentum * b (Nesterov)  or  g = b
/// p -= lr * g
/// ```
#[derive(Debug)]
pub struct Sgd {
    params: Vec<SgdParam>,
    cfg: SgdConfig,
    lars: Option<LarsConfig>,
}

impl Sgd {
    /// SGD over parameter groups (see [`super::param_groups`]).
    ///
    /// # Errors
    /// Hyper-parameters out of range.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use resblock_train::optim::{Optimizer, ParamGroup, Sgd, SgdConfig};
    /// let w = Var::new(&[1f64], &Device::Cpu)?;
    /// let groups = vec![ParamGroup { params: vec![("w".into(), w.clone())], weight_decay: 0. }];
    /// let mut opt = Sgd::new(groups, SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
    /// opt.backward_step(&w.as_tensor().sum_all()?)?; // grad 1: buffer 1, p = 1 - 0.1
    /// opt.backward_step(&w.as_tensor().sum_all()?)?; // buffer 1.9, p = 0.9 - 0.19
    /// assert!((w.as_tensor().to_vec1::<f64>()?[0] - 0.71).abs() < 1e-12);
    /// # Ok::<(), resblock_train::Error>(())
    /// ```
    pub fn new(groups: Vec<ParamGroup>, cfg: SgdConfig) -> Result<Self> {
        let ok = cfg.lr.is_finite()
            && cfg.lr >= 0.
            && cfg.momentum >= 0.
            && cfg.dampening.is_finite()
            && (!cfg.nesterov || (cfg.momentum > 0. && cfg.dampening == 0.));
        if !ok {
            return Err(Error::config(format!(
                "SGD needs lr >= 0, momentum >= 0, and Nesterov only with momentum > 0 and dampening 0; got {cfg:?}"
            )));
        }
        if groups
            .iter()
            .any(|g| !crate::schedule::is_non_negative(g.weight_decay))
        {
            return Err(Error::config("SGD weight decay must be >= 0"));
        }
        let params = flatten_groups(groups)
            .into_iter()
            .map(|(name, var, weight_decay)| SgdParam {
                name,
                var,
                weight_decay,
                momentum_buffer: None,
            })
            .collect();
        Ok(Self {
            params,
            cfg,
            lars: None,
        })
    }

    /// LARS: SGD whose gradients are first scaled by each parameter's trust ratio (see
    /// [`LarsConfig`]); timm's `Lars`.
    ///
    /// # Errors
    /// Hyper-parameters out of range.
    pub fn lars(groups: Vec<ParamGroup>, cfg: SgdConfig, lars: LarsConfig) -> Result<Self> {
        lars.validate()?;
        let mut s = Self::new(groups, cfg)?;
        s.lars = Some(lars);
        Ok(s)
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let SgdConfig {
            lr,
            momentum,
            dampening,
            nesterov,
        } = self.cfg;
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let w = p.var.as_tensor().detach();
            let mut d = grad.detach();
            let adapted = match &self.lars {
                Some(l) => l.adapt(&w, &d, p.weight_decay, lr)?,
                None => None,
            };
            if let Some(a) = adapted {
                d = a;
            } else if p.weight_decay != 0. {
                d = (d + (&w * p.weight_decay)?)?;
            }
            if momentum != 0. {
                let buf = match &p.momentum_buffer {
                    None => d.copy()?,
                    Some(b) => ((b * momentum)? + (&d * (1. - dampening))?)?,
                };
                d = if nesterov {
                    (d + (&buf * momentum)?)?
                } else {
                    buf.clone()
                };
                p.momentum_buffer = Some(buf);
            }
            p.var.set(&(w - (d * lr)?)?)?;
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
        self.params
            .iter()
            .filter_map(|p| {
                p.momentum_buffer
                    .as_ref()
                    .map(|b| (format!("{}.momentum_buffer", p.name), b.clone()))
            })
            .collect()
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        check_no_unexpected(
            state,
            self.params.iter().map(|p| p.name.as_str()),
            &["momentum_buffer"],
        )?;
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let key = format!("{}.momentum_buffer", p.name);
            // Parameters that never had a gradient have no state (as in PyTorch).
            restored.push(match state.contains_key(&key) {
                true => Some(take_state(state, &key, p.var.dims())?),
                false => None,
            });
        }
        for (p, b) in self.params.iter_mut().zip(restored) {
            p.momentum_buffer = b;
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        if self.lars.is_some() {
            "lars"
        } else {
            "sgd"
        }
    }
}
