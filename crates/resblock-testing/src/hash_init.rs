//! Deterministic "random" weights for cross-framework parity tests.
//!
//! Parity tests of large models cannot commit their weights. Instead every parameter and
//! buffer is set by [`hash_value`], a function of its state_dict key and element index only
//! (splitmix64 of FNV-1a(key) + i, scaled per kind of tensor), which the fixture scripts
//! (`hash_init` in `crates/resblock-vision/tests/fixtures/make_resnet_fixtures.py`) compute
//! identically in NumPy. Change both together.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

/// n values in [-1, 1): splitmix64 of (FNV-1a(key) + i), top 53 bits.
fn hash_uniform(key: &str, n: usize) -> Vec<f64> {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    (0..n as u64)
        .map(|i| {
            let x = h.wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let z = z ^ (z >> 31);
            (z >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0
        })
        .collect()
}

/// The deterministic value of a state_dict entry: running means 0.1u, running variances
/// 1 + 0.25u, 1-D weights (norm scales) 1 + 0.2u, biases 0.05u, other weights u * sqrt(6 /
/// fan_in); `None` for `num_batches_tracked` (left at 0).
pub fn hash_value(key: &str, shape: &[usize]) -> Option<Vec<f32>> {
    let n: usize = shape.iter().product();
    let u = hash_uniform(key, n);
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let scale = |f: &dyn Fn(f64) -> f64| Some(u.iter().map(|&v| f(v) as f32).collect());
    match leaf {
        "num_batches_tracked" => None,
        "running_mean" => scale(&|u| 0.1 * u),
        "running_var" => scale(&|u| 1.0 + 0.25 * u),
        "weight" if shape.len() == 1 => scale(&|u| 1.0 + 0.2 * u),
        "bias" => scale(&|u| 0.05 * u),
        _ => {
            let fan_in = n / shape.first().copied().unwrap_or(1).max(1);
            let s = (6.0 / fan_in.max(1) as f64).sqrt();
            scale(&|u| u * s)
        }
    }
}

struct HashInit(VarMap);

impl SimpleBackend for HashInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match hash_value(name, shape.dims()) {
            Some(v) => Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?,
            None => Tensor::zeros(shape, dtype, dev)?,
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.0
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), var);
        Ok(out)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: the hash var builder only creates variables")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }
}

/// A f32 CPU `VarBuilder` whose variables (created in `varmap`) all take their
/// [`hash_value`].
pub fn hash_var_builder(varmap: &VarMap) -> VarBuilder<'static> {
    hash_var_builder_with_dtype(varmap, DType::F32)
}

/// [`hash_var_builder`] in another float dtype (the values are rounded to f32 first, as the
/// fixture scripts do).
pub fn hash_var_builder_with_dtype(varmap: &VarMap, dtype: DType) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(HashInit(varmap.clone()));
    VarBuilder::from_backend(backend, dtype, Device::Cpu)
}
