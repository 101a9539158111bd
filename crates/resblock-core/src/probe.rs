//! Measuring how far each residual block is from the identity.
//!
//! A block computes `post(shortcut(x) + r(x))` where `r` is its (scaled) residual branch.
//! The ratio `||r(x)|| / ||x||` over a batch says how much the block changes its input: 0 is
//! the identity. Probing is off by default (it costs a device sync per block); when it is
//! on, each forward records the ratio without changing the result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{ModuleT, Tensor};

/// One measurement: the Frobenius norms over the whole batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeReading {
    /// ||r(x)||, the residual branch's contribution (after scaling, before drop-path).
    pub residual_norm: f64,
    /// ||x||, the block's input.
    pub input_norm: f64,
}

impl ProbeReading {
    /// ||r(x)|| / ||x|| (0 when the input is zero).
    pub fn ratio(&self) -> f64 {
        if self.input_norm == 0. {
            0.
        } else {
            self.residual_norm / self.input_norm
        }
    }
}

/// The recording slot of one residual block.
#[derive(Debug, Default)]
pub struct ResidualProbe {
    enabled: AtomicBool,
    last: Mutex<Option<ProbeReading>>,
}

impl ResidualProbe {
    /// Turns recording on or off (off clears the last reading).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
        if !on {
            *self.lock() = None;
        }
    }

    /// Whether forwards record.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The reading of the last forward since recording was turned on.
    pub fn last(&self) -> Option<ProbeReading> {
        *self.lock()
    }

    pub(crate) fn record(&self, reading: ProbeReading) {
        *self.lock() = Some(reading);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ProbeReading>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A model made of named residual blocks that can be probed.
pub trait Probed {
    /// Every residual block's probe with the block's parameter path (e.g. `blocks.3`).
    fn probes(&self) -> Vec<(String, &ResidualProbe)>;

    /// Turns probing on or off in every block.
    fn set_probing(&self, on: bool) {
        for (_, p) in self.probes() {
            p.set_enabled(on);
        }
    }

    /// Each block's ||r(x)|| / ||x|| from the last forward (None where none was recorded).
    fn residual_ratios(&self) -> Vec<(String, Option<f64>)> {
        self.probes()
            .into_iter()
            .map(|(name, p)| (name, p.last().map(|r| r.ratio())))
            .collect()
    }
}

/// Each block's `||r(x)|| / ||x||` on one forward of `x` (in eval mode unless `train`),
/// in the order of [`Probed::probes`]. Probing is turned on for this forward only and the
/// model's output is dropped. In training mode the forward updates batch-norm running
/// statistics, as any training-mode forward does.
///
/// # Errors
/// The forward's error, or a block that recorded nothing (one the forward did not reach).
pub fn measure<M: Probed + ModuleT>(
    model: &M,
    x: &Tensor,
    train: bool,
) -> crate::Result<Vec<(String, f64)>> {
    model.set_probing(true);
    let out = model.forward_t(x, train);
    let ratios = model.residual_ratios();
    model.set_probing(false);
    out?;
    ratios
        .into_iter()
        .map(|(name, r)| match r {
            Some(r) => Ok((name, r)),
            None => Err(crate::Error::Config(format!(
                "residual block {name} recorded no probe reading"
            ))),
        })
        .collect()
}
