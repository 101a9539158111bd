//! Metrics accumulated over the batches of an epoch.

use candle_core::{DType, Tensor, D};

use crate::distributed::Communicator;
use crate::error::Result;

/// A metric accumulated batch by batch. Implement it for your own metrics and pass them to
/// [`crate::trainer::Trainer::evaluate_with`].
pub trait Metric {
    /// The metric's name (a key in `metrics.jsonl`).
    fn name(&self) -> &str;
    /// Adds one batch: the model's outputs, the targets and the batch's mean loss.
    ///
    /// # Errors
    /// Tensor errors.
    fn update(&mut self, outputs: &Tensor, targets: &Tensor, loss: f64) -> Result<()>;
    /// The value over everything added since the last reset.
    fn value(&self) -> f64;
    /// Starts over.
    fn reset(&mut self);
    /// Combines what every rank of a data-parallel run added (each evaluated its part of
    /// the data), so that [`Metric::value`] is the whole data's on every rank. Metrics that
    /// keep the default stay per rank.
    ///
    /// # Errors
    /// A failed transfer.
    fn all_reduce(&mut self, comm: &dyn Communicator) -> Result<()> {
        let _ = comm;
        Ok(())
    }
}

/// The mean loss, weighted by batch size.
#[derive(Debug, Default, Clone)]
pub struct MeanLoss {
    sum: f64,
    count: usize,
}

impl Metric for MeanLoss {
    fn name(&self) -> &str {
        "loss"
    }
    fn update(&mut self, outputs: &Tensor, _targets: &Tensor, loss: f64) -> Result<()> {
        let n = outputs.dim(0)?;
        self.sum += loss * n as f64;
        self.count += n;
        Ok(())
    }
    fn value(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn all_reduce(&mut self, comm: &dyn Communicator) -> Result<()> {
        let mut v = [self.sum, self.count as f64];
        comm.all_reduce_sum_f64(&mut v)?;
        (self.sum, self.count) = (v[0], v[1] as usize);
        Ok(())
    }
}

/// Top-k accuracy of class scores against integer targets (fraction in [0, 1]).
#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    name: String,
    hits: usize,
    count: usize,
}

impl TopK {
    /// Top-`k` accuracy (`k` >= 1), named `top{k}`; top-1 is named `acc`.
    pub fn new(k: usize) -> Self {
        let k = k.max(1);
        let name = if k == 1 {
            "acc".to_string()
        } else {
            format!("top{k}")
        };
        Self {
            k,
            name,
            hits: 0,
            count: 0,
        }
    }
}

/// For each row, whether the target is among the `k` highest scores.
///
/// # Errors
/// Non-matching shapes.
pub fn topk_hits(outputs: &Tensor, targets: &Tensor, k: usize) -> Result<usize> {
    let scores = outputs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    // Class probabilities (mixup/cutmix) count their most likely class.
    let t = if targets.rank() == 2 {
        targets.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?
    } else {
        targets.to_dtype(DType::U32)?.to_vec1::<u32>()?
    };
    Ok(scores
        .iter()
        .zip(&t)
        .filter(|(row, &y)| {
            let Some(&target_score) = row.get(y as usize) else {
                return false;
            };
            // Rank = how many classes score strictly higher (ties favour the target).
            row.iter().filter(|&&s| s > target_score).count() < k
        })
        .count())
}

impl Metric for TopK {
    fn name(&self) -> &str {
        &self.name
    }
    fn update(&mut self, outputs: &Tensor, targets: &Tensor, _loss: f64) -> Result<()> {
        if outputs.rank() != 2 {
            return Ok(());
        }
        self.hits += topk_hits(outputs, targets, self.k)?;
        self.count += outputs.dim(0)?;
        Ok(())
    }
    fn value(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.hits as f64 / self.count as f64
        }
    }
    fn reset(&mut self) {
        self.hits = 0;
        self.count = 0;
    }
    fn all_reduce(&mut self, comm: &dyn Communicator) -> Result<()> {
        let mut v = [self.hits as f64, self.count as f64];
        comm.all_reduce_sum_f64(&mut v)?;
        (self.hits, self.count) = (v[0] as usize, v[1] as usize);
        Ok(())
    }
}

/// Index of the largest score per row.
///
/// # Errors
/// Tensor errors.
pub fn argmax(outputs: &Tensor) -> Result<Vec<u32>> {
    Ok(outputs.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn topk_and_mean_loss() -> Result<()> {
        let out = Tensor::new(
            &[[0.1f32, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]],
            &Device::Cpu,
        )?;
        let y = Tensor::new(&[2u32, 0, 0], &Device::Cpu)?;
        let mut top1 = TopK::new(1);
        let mut top2 = TopK::new(2);
        let mut loss = MeanLoss::default();
        for m in [&mut top1 as &mut dyn Metric, &mut top2, &mut loss] {
            m.update(&out, &y, 2.0)?;
        }
        assert!((top1.value() - 1. / 3.).abs() < 1e-12);
        assert!((top2.value() - 2. / 3.).abs() < 1e-12);
        assert_eq!(loss.value(), 2.0);
        assert_eq!(top1.name(), "acc");
        assert_eq!(top2.name(), "top2");
        Ok(())
    }
}
