//! How gradients reach each layer: the L2 norm of the loss gradient with respect to every
//! convolution weight, from the input side to the output side, for one batch.
//!
//! A network whose early layers get gradients many orders of magnitude smaller than its late
//! ones learns slowly at the bottom (vanishing gradients); shortcuts add a path on which the
//! gradient reaches every layer undiminished.

use std::cmp::Ordering;

use candle_core::{DType, ModuleT, Tensor};
use candle_nn::VarMap;

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::trainer::LossKind;

/// Orders parameter paths as the layers run: segment by segment, numbers by value
/// (`layer1.2` before `layer1.10`), names by text. For torchvision's names this is forward
/// order: `conv1`, then `layer1.0.conv1`, `layer1.0.conv2`, `layer1.0.downsample.0`,
/// `layer1.1...`, ..., `fc`.
pub fn forward_order(a: &str, b: &str) -> Ordering {
    let mut sa = a.split('.');
    let mut sb = b.split('.');
    loop {
        match (sa.next(), sb.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(p), Ok(q)) => p.cmp(&q),
                    _ => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

/// The convolution weights of a model (its 4-D `*.weight` variables) in forward order.
pub fn conv_weight_names(varmap: &VarMap) -> Vec<String> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<String> = data
        .iter()
        .filter(|(k, v)| k.ends_with(".weight") && v.rank() == 4)
        .map(|(k, _)| k.clone())
        .collect();
    names.sort_by(|a, b| forward_order(a, b));
    names
}

/// The L2 norm of the gradient of `loss` on `batch` with respect to every convolution
/// weight, in forward order ([`conv_weight_names`]). The forward runs in training mode (batch
/// statistics, as during training); the model is left exactly as it was: its batch-norm
/// running statistics are restored and no weight changes.
///
/// # Errors
/// Tensor errors, a model without convolutions, or a weight the loss does not depend on.
pub fn conv_grad_norms<M: ModuleT>(
    model: &M,
    varmap: &VarMap,
    batch: &Batch,
    loss: LossKind,
) -> Result<Vec<(String, f64)>> {
    let names = conv_weight_names(varmap);
    if names.is_empty() {
        return Err(Error::config("the model has no convolution weights"));
    }
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    // A training-mode forward moves the running statistics: keep them to put them back.
    let saved: Vec<(String, Tensor)> = data
        .iter()
        .filter(|(k, _)| {
            k.ends_with("running_mean")
                || k.ends_with("running_var")
                || k.ends_with("num_batches_tracked")
        })
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    let weights: Vec<_> = names.iter().map(|n| data[n].clone()).collect();
    drop(data);
    let out = model.forward_t(&batch.inputs, true)?;
    let grads = loss.compute(&out, &batch.targets)?.backward()?;
    {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, t) in &saved {
            data[k].set(t)?;
        }
    }
    names
        .into_iter()
        .zip(weights)
        .map(|(name, w)| {
            let g = grads.get(w.as_tensor()).ok_or_else(|| {
                Error::config(format!("the loss does not depend on {name}: no gradient"))
            })?;
            let n = g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            Ok((name, n.sqrt()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_order_compares_numbers_by_value() {
        let mut v = vec![
            "layer1.10.conv1.weight",
            "fc.weight",
            "layer1.2.conv2.weight",
            "layer2.0.downsample.0.weight",
            "conv1.weight",
            "layer1.2.conv1.weight",
            "layer2.0.conv2.weight",
        ];
        v.sort_by(|a, b| forward_order(a, b));
        assert_eq!(
            v,
            [
                "conv1.weight",
                "fc.weight",
                "layer1.2.conv1.weight",
                "layer1.2.conv2.weight",
                "layer1.10.conv1.weight",
                "layer2.0.conv2.weight",
                "layer2.0.downsample.0.weight",
            ]
        );
    }
}
