//! LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), as timm's
//! `Lars` computes it: before SGD's momentum, each parameter's gradient (plus weight decay)
//! is scaled by its trust ratio
//!
//! ```text
//! trust = trust_coeff * ||p|| / (||g|| + wd * ||p|| + eps)   (1 when ||p|| or ||g|| is 0)
//! trust = min(trust / lr, 1)                                  (with trust_clip: LARC)
//! g = (g + wd * p) * trust
//! ```
//!
//! only for parameters with weight decay (unless `always_adapt`), so norms and biases in
//! the no-decay group keep plain SGD, as in timm. It runs inside [`super::Sgd`]
//! ([`super::Sgd::lars`]), whose momentum, Nesterov and state it shares.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// LARS settings; the default is timm's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LarsConfig {
    /// The trust coefficient (timm: 0.001).
    pub trust_coeff: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Clip the ratio at 1 after dividing by the learning rate (LARC).
    pub trust_clip: bool,
    /// Adapt parameters without weight decay too.
    pub always_adapt: bool,
}

impl Default for LarsConfig {
    fn default() -> Self {
        Self {
            trust_coeff: 1e-3,
            eps: 1e-8,
            trust_clip: false,
            always_adapt: false,
        }
    }
}

impl LarsConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.trust_coeff.is_finite() && self.trust_coeff > 0. && self.eps >= 0. {
            Ok(())
        } else {
            Err(Error::config(format!(
                "LARS needs a positive trust coefficient and eps >= 0, got {self:?}"
            )))
        }
    }

    /// The gradient LARS hands to SGD's momentum for parameter `w` with gradient `g` and
    /// weight decay `wd`, or `None` when this parameter is not adapted (SGD then adds the
    /// weight decay itself).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn adapt(&self, w: &Tensor, g: &Tensor, wd: f64, lr: f64) -> Result<Option<Tensor>> {
        if wd == 0. && !self.always_adapt {
            return Ok(None);
        }
        let norm = |t: &Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f64>()?)
        };
        let (wn, gn) = (norm(w)?, norm(g)?);
        let mut trust = if wn > 0. && gn > 0. {
            self.trust_coeff * wn / (gn + wn * wd + self.eps)
        } else {
            1.
        };
        if self.trust_clip {
            trust = (trust / lr).min(1.);
        }
        Ok(Some(((g + (w * wd)?)? * trust)?))
    }
}
