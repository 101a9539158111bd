//! A seedable, shareable random number generator.
//!
//! Candle's CPU backend draws random tensors from an unseeded thread-local generator
//! (`Device::set_seed` is an error on CPU), so nothing built on it can be reproduced. Every
//! random draw in resblock (parameter initialisation, drop-path masks, data shuffling) goes
//! through an [`RngHandle`] instead: a ChaCha8 stream that is cheap to clone (clones share the
//! stream) and whose full state is three numbers, so a checkpoint can store and restore it.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The complete state of an [`RngHandle`]: enough to resume the stream exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngState {
    /// The 32-byte ChaCha key the stream was seeded with.
    pub seed: [u8; 32],
    /// The ChaCha stream number.
    pub stream: u64,
    /// The position in the stream, in 32-bit words.
    pub word_pos: u128,
}

/// A shared, seedable random generator (ChaCha8). Clones draw from the same stream.
#[derive(Debug, Clone)]
pub struct RngHandle(Arc<Mutex<ChaCha8Rng>>);

impl RngHandle {
    /// A generator seeded from a 64-bit seed.
    pub fn seed_from_u64(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    /// A new, independent generator seeded from this one (for giving a component its own
    /// stream without disturbing the order of this one's draws afterwards).
    pub fn fork(&self) -> Self {
        let seed: u64 = self.lock().random();
        Self::seed_from_u64(seed)
    }

    fn lock(&self) -> MutexGuard<'_, ChaCha8Rng> {
        // A poisoned lock only means another thread panicked mid-draw; the generator state is
        // still a valid ChaCha state, so keep using it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state, for checkpoints.
    pub fn state(&self) -> RngState {
        let rng = self.lock();
        RngState {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    /// Puts the generator back into a state returned by [`RngHandle::state`]; every clone
    /// of this handle sees the change.
    pub fn set_state(&self, state: &RngState) {
        let mut rng = ChaCha8Rng::from_seed(state.seed);
        rng.set_stream(state.stream);
        rng.set_word_pos(state.word_pos);
        *self.lock() = rng;
    }

    /// A uniform draw from `[0, 1)`.
    pub fn uniform(&self) -> f64 {
        self.lock().random::<f64>()
    }

    /// A uniform draw from `0..n`.
    pub fn below(&self, n: usize) -> usize {
        self.lock().random_range(0..n.max(1))
    }

    /// `n` values uniform in `[lo, hi)`.
    pub fn uniform_vec(&self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        let mut rng = self.lock();
        (0..n)
            .map(|_| lo + (hi - lo) * rng.random::<f64>())
            .collect()
    }

    /// A draw from Beta(`a`, `b`) (mixup's and cutmix's mixing weight); `None` when a
    /// parameter is not a positive finite number.
    pub fn beta(&self, a: f64, b: f64) -> Option<f64> {
        let d = rand_distr::Beta::new(a, b).ok()?;
        Some(d.sample(&mut *self.lock()))
    }

    /// `n` values from a normal distribution.
    pub fn normal_vec(&self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        let mut rng = self.lock();
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut *rng);
                mean + std * z
            })
            .collect()
    }

    /// Shuffles a slice in place (Fisher-Yates).
    pub fn shuffle<T>(&self, items: &mut [T]) {
        use rand::seq::SliceRandom;
        items.shuffle(&mut *self.lock());
    }

    /// A tensor of uniform values in `[lo, hi)`.
    pub fn uniform_tensor<S: Into<Shape>>(
        &self,
        shape: S,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let v = self.uniform_vec(shape.elem_count(), lo, hi);
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// A tensor of normal values.
    pub fn normal_tensor<S: Into<Shape>>(
        &self,
        shape: S,
        mean: f64,
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let v = self.normal_vec(shape.elem_count(), mean, std);
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_state_round_trips() {
        let a = RngHandle::seed_from_u64(7);
        let b = RngHandle::seed_from_u64(7);
        assert_eq!(a.uniform_vec(5, 0., 1.), b.uniform_vec(5, 0., 1.));
        let saved = a.state();
        let next = a.normal_vec(4, 0., 1.);
        a.set_state(&saved);
        assert_eq!(a.normal_vec(4, 0., 1.), next);
        let c = RngHandle::seed_from_u64(8);
        assert_ne!(c.uniform_vec(5, 0., 1.), b.uniform_vec(5, 0., 1.));
    }

    #[test]
    fn clones_share_the_stream() {
        let a = RngHandle::seed_from_u64(1);
        let b = a.clone();
        let x = a.uniform();
        let y = b.uniform();
        let fresh = RngHandle::seed_from_u64(1);
        assert_eq!(fresh.uniform(), x);
        assert_eq!(fresh.uniform(), y);
    }
}
