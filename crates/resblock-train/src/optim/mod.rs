//! Optimizers with PyTorch's exact update rules, parameter groups, and state that can be
//! saved and restored.
//!
//! candle-nn's optimizers keep their state private (no checkpoints) and its SGD has no
//! momentum or weight decay; these follow `torch.optim`'s formulas so that a run can be
//! compared with PyTorch step by step.

mod adam;
mod lars;
mod sgd;

pub use adam::{Adam, AdamConfig, AdamParamState};
pub use lars::LarsConfig;
pub use sgd::{Sgd, SgdConfig};

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use resblock_core::params::is_buffer;

use crate::error::{Error, Result};

/// Parameters that share hyper-parameter overrides (PyTorch's `param_groups`).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// The parameters with their names (used as keys of the optimizer state).
    pub params: Vec<(String, Var)>,
    /// Weight decay of this group.
    pub weight_decay: f64,
}

/// The trainable parameters of `varmap` (buffers such as batch-norm running statistics
/// excluded), sorted by name, in one or two groups: with `no_decay_for_norms_and_biases`,
/// one-dimensional tensors (norm scales and shifts, biases, ReZero scalars) get no weight
/// decay (the usual ResNet recipe) and the rest get `weight_decay`.
pub fn param_groups(
    varmap: &VarMap,
    weight_decay: f64,
    no_decay_for_norms_and_biases: bool,
) -> Vec<ParamGroup> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut named: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, v)| !is_buffer(k) && v.dtype().is_float())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if !no_decay_for_norms_and_biases {
        return vec![ParamGroup {
            params: named,
            weight_decay,
        }];
    }
    let (decay, no_decay): (Vec<_>, Vec<_>) = named.into_iter().partition(|(_, v)| v.rank() > 1);
    vec![
        ParamGroup {
            params: decay,
            weight_decay,
        },
        ParamGroup {
            params: no_decay,
            weight_decay: 0.,
        },
    ]
}

/// An optimizer's state as named tensors (for checkpoints): keys such as
/// `layer1.0.conv1.weight.momentum_buffer` or `fc.bias.exp_avg`.
pub type OptimizerState = BTreeMap<String, Tensor>;

/// A first-order optimizer over a fixed set of parameters.
pub trait Optimizer {
    /// Applies one update from the gradients in `grads` (parameters without a gradient are
    /// left alone, as PyTorch skips parameters whose `.grad` is `None`).
    ///
    /// # Errors
    /// Tensor errors (e.g. a gradient on another device).
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// The current learning rate.
    fn learning_rate(&self) -> f64;

    /// Sets the learning rate (schedules call this before each step).
    fn set_learning_rate(&mut self, lr: f64);

    /// The optimized parameters.
    fn params(&self) -> Vec<&Var>;

    /// The state (momentum buffers, moments, step counts) as named tensors.
    fn state(&self) -> OptimizerState;

    /// Restores a state from [`Optimizer::state`], strictly: every key must be there with the
    /// right shape.
    ///
    /// # Errors
    /// A missing key or a shape mismatch, named in the message.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;

    /// A short name (`sgd`, `adam`, `adamw`).
    fn name(&self) -> &'static str;

    /// Backpropagates `loss` and applies one update.
    ///
    /// # Errors
    /// As [`Optimizer::step`], or a loss that cannot be backpropagated.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }
}

/// Takes `key` from a state map, checking its shape.
pub(crate) fn take_state(state: &OptimizerState, key: &str, shape: &[usize]) -> Result<Tensor> {
    let t = state
        .get(key)
        .ok_or_else(|| Error::config(format!("optimizer state has no entry {key}")))?;
    if t.dims() != shape {
        return Err(Error::ShapeMismatch {
            op: "optimizer state",
            a: t.dims().to_vec(),
            b: shape.to_vec(),
        });
    }
    Ok(t.clone())
}

/// Errors on state keys that are not `<param>.<field>` for a known parameter and field.
pub(crate) fn check_no_unexpected<'a>(
    state: &OptimizerState,
    names: impl Iterator<Item = &'a str>,
    fields: &[&str],
) -> Result<()> {
    let expected: std::collections::BTreeSet<String> = names
        .flat_map(|n| fields.iter().map(move |f| format!("{n}.{f}")))
        .collect();
    let unexpected: Vec<&String> = state.keys().filter(|k| !expected.contains(*k)).collect();
    if unexpected.is_empty() {
        Ok(())
    } else {
        Err(Error::config(format!(
            "optimizer state has entries for unknown parameters: {}",
            unexpected
                .iter()
                .take(8)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// Flattens groups into (name, var, weight_decay) with float variables only.
pub(crate) fn flatten_groups(groups: Vec<ParamGroup>) -> Vec<(String, Var, f64)> {
    groups
        .into_iter()
        .flat_map(|g| {
            let wd = g.weight_decay;
            g.params
                .into_iter()
                .filter(|(_, v)| v.dtype().is_float())
                .map(move |(n, v)| (n, v, wd))
        })
        .collect()
}
