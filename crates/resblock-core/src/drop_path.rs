//! Drop-path (stochastic depth, Huang et al. 2016).

use candle_core::{ModuleT, Tensor};

use crate::error::{Error, Result};
use crate::rng::RngHandle;

/// Drops a whole residual branch per sample.
///
/// In training each sample's branch output is zeroed with probability `p` and the kept ones
/// are scaled by 1/(1-p), so the expectation is unchanged (timm's `drop_path`). In eval it is
/// the identity. Masks come from an [`RngHandle`], so a seeded run repeats.
#[derive(Debug, Clone)]
pub struct DropPath {
    p: f64,
    rng: RngHandle,
}

impl DropPath {
    /// A drop-path with drop probability `p` in [0, 1].
    ///
    /// # Errors
    /// `p` outside [0, 1] or not finite.
    pub fn new(p: f64, rng: RngHandle) -> Result<Self> {
        if !(0. ..=1.).contains(&p) {
            return Err(Error::config(format!(
                "drop-path probability must be in [0, 1], got {p}"
            )));
        }
        Ok(Self { p, rng })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl ModuleT for DropPath {
    /// # Shapes
    /// - input: (N, ...); output: same
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p == 0. {
            return Ok(x.clone());
        }
        let n = x.dim(0)?;
        let keep = 1. - self.p;
        let mask: Vec<f32> = self
            .rng
            .uniform_vec(n, 0., 1.)
            .into_iter()
            .map(|u| if u < keep { (1. / keep) as f32 } else { 0. })
            .collect();
        let mut shape = vec![1; x.rank()];
        shape[0] = n;
        let mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
        x.broadcast_mul(&mask)
    }
}
