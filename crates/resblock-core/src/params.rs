//! Counting and classifying the variables of a `VarMap`.

use candle_nn::VarMap;

/// Whether a variable name is a buffer rather than a trainable parameter (batch-norm running
/// statistics and batch counter, as PyTorch's `register_buffer`).
pub fn is_buffer(name: &str) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    matches!(leaf, "running_mean" | "running_var" | "num_batches_tracked")
}

/// The number of trainable scalars in `varmap` whose name starts with `prefix` (all when
/// `prefix` is empty), as `sum(p.numel() for p in model.parameters())` counts them.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// resblock_core::linear(10, 10, vb.pp("linear"))?;
/// resblock_core::batch_norm(4, Default::default(), vb.pp("bn"))?;
/// assert_eq!(resblock_core::params::count_parameters(&varmap, ""), 110 + 8);
/// assert_eq!(resblock_core::params::count_parameters(&varmap, "linear"), 110);
/// # Ok::<(), resblock_core::Error>(())
/// ```
pub fn count_parameters(varmap: &VarMap, prefix: &str) -> usize {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .filter(|(name, _)| !is_buffer(name))
        .filter(|(name, _)| {
            prefix.is_empty()
                || name.as_str() == prefix
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
        .map(|(_, v)| v.elem_count())
        .sum()
}
