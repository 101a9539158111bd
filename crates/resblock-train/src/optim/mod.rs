//! Optimizers with PyTorch's exact update rules and inspectable state.
//!
//! candle-nn's optimizers keep their state private (no checkpoints) and its SGD has no
//! momentum or weight decay; these are written against `torch.optim`'s update formulas so
//! that a run can be compared with PyTorch step by step.

mod adam;

pub use adam::{Adam, AdamConfig, AdamParamState};

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use crate::error::Result;

/// A first-order optimizer over a fixed set of variables.
pub trait Optimizer {
    /// Applies one update from the gradients in `grads` (variables without a gradient are
    /// left alone, as PyTorch skips parameters whose `.grad` is `None`).
    ///
    /// # Errors
    /// Tensor errors (e.g. a gradient on another device).
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// The current learning rate.
    fn learning_rate(&self) -> f64;

    /// Sets the learning rate (schedules call this before each step).
    fn set_learning_rate(&mut self, lr: f64);

    /// Backpropagates `loss` and applies one update.
    ///
    /// # Errors
    /// As [`Optimizer::step`], or a loss that cannot be backpropagated.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
}
