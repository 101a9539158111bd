//! SGD with momentum, dampening, Nesterov and coupled weight decay (`torch.optim.SGD`).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rayon::prelude::*;

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

impl SgdParam {
    /// The update of [`Sgd`]'s docs with Candle ops, for any dtype and device.
    fn update(&mut self, grad: &Tensor, cfg: SgdConfig, lars: Option<&LarsConfig>) -> Result<()> {
        let SgdConfig {
            lr,
            momentum,
            dampening,
            nesterov,
        } = cfg;
        let w = self.var.as_tensor().detach();
        let mut d = grad.detach();
        let adapted = match lars {
            Some(l) => l.adapt(&w, &d, self.weight_decay, lr)?,
            None => None,
        };
        if let Some(a) = adapted {
            d = a;
        } else if self.weight_decay != 0. {
            d = (d + (&w * self.weight_decay)?)?;
        }
        if momentum != 0. {
            let buf = match &self.momentum_buffer {
                None => d.copy()?,
                Some(b) => ((b * momentum)? + (&d * (1. - dampening))?)?,
            };
            d = if nesterov {
                (d + (&buf * momentum)?)?
            } else {
                buf.clone()
            };
            self.momentum_buffer = Some(buf);
        }
        self.var.set(&(w - (d * lr)?)?)?;
        Ok(())
    }

    /// [`SgdParam::update`] as one loop over the values where the parameter, its gradient
    /// and its momentum buffer are f32 on the CPU (`false` elsewhere: nothing done). Each
    /// value goes through the same f32 operations in the same order as the Candle ops
    /// (`x * s` is Candle's `affine(s, 0)`: `x * (s as f32) + 0`), so the results are the
    /// same bits.
    fn update_f32(&mut self, grad: &Tensor, cfg: SgdConfig) -> Result<bool> {
        use candle_core::DType;
        let w = self.var.as_tensor();
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        let buf_ok = self.momentum_buffer.as_ref().is_none_or(f32_cpu);
        if !(f32_cpu(w) && f32_cpu(grad) && buf_ok) || grad.dims() != w.dims() {
            return Ok(false);
        }
        let mut wv = w.flatten_all()?.to_vec1::<f32>()?;
        let gv = grad.flatten_all()?.to_vec1::<f32>()?;
        let scale = |s: f64| {
            let s = s as f32;
            move |x: f32| x * s + 0.0
        };
        let (wd, mom, damp, lr) = (
            scale(self.weight_decay),
            scale(cfg.momentum),
            scale(1. - cfg.dampening),
            scale(cfg.lr),
        );
        let decay = self.weight_decay != 0.;
        let mut buf = match (&self.momentum_buffer, cfg.momentum != 0.) {
            (Some(b), true) => Some(b.flatten_all()?.to_vec1::<f32>()?),
            _ => None,
        };
        let first = buf.is_none();
        if cfg.momentum != 0. && first {
            buf = Some(vec![0.0; wv.len()]);
        }
        for (i, (w, g)) in wv.iter_mut().zip(&gv).enumerate() {
            let mut d = if decay { *g + wd(*w) } else { *g };
            if let Some(buf) = buf.as_mut() {
                let b = if first { d } else { mom(buf[i]) + damp(d) };
                buf[i] = b;
                d = if cfg.nesterov { d + mom(b) } else { b };
            }
            *w -= lr(d);
        }
        self.var
            .set(&Tensor::from_vec(wv, w.shape(), w.device())?)?;
        if let Some(b) = buf {
            self.momentum_buffer = Some(Tensor::from_vec(b, w.shape(), w.device())?);
        }
        Ok(true)
    }
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
        let cfg = self.cfg;
        let lars = self.lars.as_ref();
        // Parameters are independent: updated on all threads. Each update is a handful of
        // passes over a small tensor, and run one after the other on the calling thread
        // (as Candle ops, about 10 per parameter) they were 3% of a ResNet-20 `train` step
        // while the kernels' threads waited.
        self.params.par_iter_mut().try_for_each(|p| {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                return Ok(());
            };
            if lars.is_none() && p.update_f32(grad, cfg)? {
                return Ok(());
            }
            p.update(grad, cfg, lars)
        })
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{SgdConfig, SgdParam};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0) * 0.3)
            .collect()
    }

    /// The one-loop f32 update gives the same bits as the Candle ops, over three steps (the
    /// first makes the momentum buffer), with and without momentum, dampening, Nesterov and
    /// weight decay; and leaves other dtypes to the Candle ops.
    #[test]
    fn the_f32_loop_matches_the_candle_ops_bit_for_bit() -> crate::Result<()> {
        let configs = [
            (0.0, 0.0, false, 0.0),
            (0.9, 0.0, true, 5e-4),
            (0.9, 0.1, false, 1e-2),
            (0.5, 0.0, false, 0.0),
        ];
        for (momentum, dampening, nesterov, wd) in configs {
            let cfg = SgdConfig {
                lr: 0.037,
                momentum,
                dampening,
                nesterov,
            };
            let param = |w: &[f32]| -> crate::Result<SgdParam> {
                Ok(SgdParam {
                    name: "w".into(),
                    var: Var::from_tensor(&Tensor::from_slice(w, (3, 17), &Device::Cpu)?)?,
                    weight_decay: wd,
                    momentum_buffer: None,
                })
            };
            let start = values(51, 1);
            let (mut fast, mut slow) = (param(&start)?, param(&start)?);
            for step in 0..3 {
                let g = Tensor::from_vec(values(51, 2 + step), (3, 17), &Device::Cpu)?;
                assert!(fast.update_f32(&g, cfg)?);
                slow.update(&g, cfg, None)?;
                let bits = |t: &Tensor| -> crate::Result<Vec<u32>> {
                    let v = t.flatten_all()?.to_vec1::<f32>()?;
                    Ok(v.into_iter().map(f32::to_bits).collect())
                };
                let what = format!("{cfg:?} wd {wd}, step {step}");
                assert_eq!(
                    bits(fast.var.as_tensor())?,
                    bits(slow.var.as_tensor())?,
                    "{what}"
                );
                match (&fast.momentum_buffer, &slow.momentum_buffer) {
                    (Some(a), Some(b)) => assert_eq!(bits(a)?, bits(b)?, "{what}: buffer"),
                    (None, None) => assert_eq!(momentum, 0.0),
                    _ => panic!("{what}: one path kept a momentum buffer, the other not"),
                }
            }
        }
        let mut f64_param = SgdParam {
            name: "w".into(),
            var: Var::zeros(4, DType::F64, &Device::Cpu)?,
            weight_decay: 0.,
            momentum_buffer: None,
        };
        let g = Tensor::ones(4, DType::F64, &Device::Cpu)?;
        assert!(!f64_param.update_f32(&g, SgdConfig::default())?);
        Ok(())
    }
}
