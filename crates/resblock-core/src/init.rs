//! Seeded parameter creation through Candle's `VarBuilder`.
//!
//! `candle_nn::VarMap` creates missing variables with Candle's unseeded generator, so two runs
//! never start from the same weights. [`seeded_var_builder`] returns a `VarBuilder` over a
//! `VarMap` that draws every missing variable from an [`RngHandle`] instead, honouring the
//! same [`Init`] hints; variables already in the map are returned as they are. The variables
//! end up in the caller's `VarMap`, so optimizers and `VarMap::save` work as usual.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::rng::RngHandle;

/// A `VarBuilder` backend: a `VarMap` whose missing variables come from a seeded generator.
struct SeededVarMap {
    varmap: VarMap,
    rng: RngHandle,
}

/// Draws a tensor for an initialisation hint from `rng`.
///
/// # Errors
/// Fails if the shape has no fan for a Kaiming hint or the tensor cannot be created.
pub fn init_tensor(
    init: Init,
    shape: &Shape,
    dtype: DType,
    device: &Device,
    rng: &RngHandle,
) -> candle_core::Result<Tensor> {
    match init {
        Init::Const(v) => Tensor::full(v, shape, device)?.to_dtype(dtype),
        Init::Uniform { lo, up } => rng.uniform_tensor(shape.clone(), lo, up, dtype, device),
        Init::Randn { mean, stdev } => rng.normal_tensor(shape.clone(), mean, stdev, dtype, device),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    rng.uniform_tensor(shape.clone(), -bound, bound, dtype, device)
                }
                NormalOrUniform::Normal => rng.normal_tensor(shape.clone(), 0., std, dtype, device),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(var) = data.get(name) {
            let t = var.as_tensor();
            if t.shape() != &shape {
                candle_core::bail!(
                    "variable {name}: shape {:?} already in the var map, {:?} requested",
                    t.dims(),
                    shape.dims()
                );
            }
            return t.to_dtype(dtype);
        }
        let var = Var::from_tensor(&init_tensor(init, &shape, dtype, dev, &self.rng)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("variable {name} is not in the var map"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.contains_key(name)
    }
}

/// A `VarBuilder` that creates trainable variables in `varmap`, drawing initial values from
/// `rng` (so the same seed gives the same weights), and reuses variables already there.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarMap;
/// use resblock_core::{seeded_var_builder, RngHandle};
///
/// let make = |seed| -> candle_core::Result<Vec<f32>> {
///     let varmap = VarMap::new();
///     let vb = seeded_var_builder(&varmap, &RngHandle::seed_from_u64(seed), DType::F32, &Device::Cpu);
///     let lin = resblock_core::linear(4, 3, vb.pp("fc"))?;
///     lin.weight().flatten_all()?.to_vec1()
/// };
/// assert_eq!(make(1)?, make(1)?);
/// assert_ne!(make(1)?, make(2)?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn seeded_var_builder(
    varmap: &VarMap,
    rng: &RngHandle,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(SeededVarMap {
        varmap: varmap.clone(),
        rng: rng.clone(),
    });
    VarBuilder::from_backend(backend, dtype, device.clone())
}
