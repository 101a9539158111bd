//! Counting and classifying the variables of a model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

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

/// The variables a model asks for, by name: shape and dtype, without their values.
#[derive(Debug, Clone, Default)]
pub struct ShapeRecorder(Arc<Mutex<BTreeMap<String, VarInfo>>>);

/// Shape and dtype of a recorded variable.
type VarInfo = (Vec<usize>, DType);

impl ShapeRecorder {
    /// Every recorded variable: name -> shape.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, (s, _))| (k.clone(), s.clone())).collect()
    }

    /// Trainable scalars (buffers excluded, see [`is_buffer`]).
    pub fn count_parameters(&self) -> usize {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|(k, _)| !is_buffer(k))
            .map(|(_, (s, _))| s.iter().product::<usize>())
            .sum()
    }
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), (shape.dims().to_vec(), dtype));
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape-only var builder: {name} has no value")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}

/// A `VarBuilder` that only records the names and shapes asked for, allocating nothing
/// (each tensor is a broadcast zero): for counting the parameters of large models or
/// listing their `state_dict` keys. The built model is not meant to run.
///
/// ```
/// use candle_core::{DType, Device};
/// let (vb, rec) = resblock_core::params::shape_only_var_builder(DType::F32, &Device::Cpu);
/// resblock_core::linear(1000, 1000, vb.pp("fc"))?;
/// assert_eq!(rec.count_parameters(), 1_001_000);
/// assert_eq!(rec.shapes()["fc.weight"], [1000, 1000]);
/// # Ok::<(), resblock_core::Error>(())
/// ```
pub fn shape_only_var_builder(
    dtype: DType,
    device: &Device,
) -> (VarBuilder<'static>, ShapeRecorder) {
    let rec = ShapeRecorder::default();
    let backend: Box<dyn SimpleBackend> = Box::new(rec.clone());
    (
        VarBuilder::from_backend(backend, dtype, device.clone()),
        rec,
    )
}
