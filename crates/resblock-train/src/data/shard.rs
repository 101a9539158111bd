//! One rank's share of an epoch in data-parallel training, as PyTorch's
//! `DistributedSampler` (with its default `drop_last=False`) takes it: the epoch's order is
//! padded by wrapping around to a multiple of the rank count, and rank `r` takes positions
//! `r, r + W, r + 2W, ...`, so every rank gets `ceil(N / W)` samples and the same number of
//! batches.

use crate::error::{Error, Result};

/// Rank `rank` of `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// The number of ranks.
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::whole()
    }
}

impl Shard {
    /// All of the data (one process).
    pub fn whole() -> Self {
        Self { rank: 0, world: 1 }
    }

    /// Rank `rank` of `world`.
    ///
    /// # Errors
    /// `world` 0 or `rank >= world`.
    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::config(format!(
                "rank {rank} of {world} ranks does not exist"
            )));
        }
        Ok(Self { rank, world })
    }

    /// Samples per rank in an epoch of `n`: `ceil(n / world)`.
    pub fn len(&self, n: usize) -> usize {
        n.div_ceil(self.world)
    }

    /// Whether an epoch of `n` gives this rank nothing (only when `n` is 0).
    pub fn is_empty(&self, n: usize) -> bool {
        self.len(n) == 0
    }

    /// This rank's positions of the epoch order `order`: padded by repeating the order from
    /// its start (as often as needed) to a multiple of `world`, then every `world`-th from
    /// `rank`.
    pub fn take(&self, order: &[usize]) -> Vec<usize> {
        if self.world == 1 || order.is_empty() {
            return order.to_vec();
        }
        let total = self.len(order.len()) * self.world;
        (self.rank..total)
            .step_by(self.world)
            .map(|p| order[p % order.len()])
            .collect()
    }

    /// This rank's part of an evaluation set of `n` samples, without padding (so every
    /// sample is counted once): `rank, rank + W, ...` (ranks may differ by one sample).
    pub fn eval_indices(&self, n: usize) -> Vec<usize> {
        (self.rank..n).step_by(self.world).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_by_wrapping_and_strides_like_distributed_sampler() -> Result<()> {
        // torch.utils.data.DistributedSampler(range(10), num_replicas=4, shuffle=False):
        // indices 0..10 + [0, 1], rank r takes [r::4].
        let order: Vec<usize> = (0..10).collect();
        let got: Vec<Vec<usize>> = (0..4)
            .map(|r| Ok(Shard::new(r, 4)?.take(&order)))
            .collect::<Result<_>>()?;
        assert_eq!(
            got,
            vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6, 0], vec![3, 7, 1]]
        );
        // Padding longer than the order repeats it (3 samples over 8 ranks).
        let small = [7, 3, 5];
        let all: Vec<usize> = (0..8)
            .flat_map(|r| Shard { rank: r, world: 8 }.take(&small))
            .collect();
        assert_eq!(all, vec![7, 3, 5, 7, 3, 5, 7, 3]);
        assert_eq!(Shard::whole().take(&order), order);
        Ok(())
    }

    #[test]
    fn evaluation_parts_cover_each_sample_once() -> Result<()> {
        let mut all: Vec<usize> = (0..3)
            .flat_map(|r| Shard { rank: r, world: 3 }.eval_indices(10))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(Shard::new(2, 2).is_err() && Shard::new(0, 0).is_err());
        Ok(())
    }
}
