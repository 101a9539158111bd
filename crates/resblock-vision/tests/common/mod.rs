//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixture_path(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("loading fixture {}", path.display()))
}

pub fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    f.get(key)
        .with_context(|| format!("fixture key {key} missing"))
}

/// Asserts `a` is within `tol` of `b`, relative to b's largest magnitude.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    anyhow::ensure!(
        a.dims() == b.dims(),
        "{what}: shape {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let d = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = b
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?
        .max(1e-12);
    anyhow::ensure!(
        d <= tol * scale,
        "{what}: max diff {d:e} > {tol:e} * {scale:e}"
    );
    Ok(())
}

/// splitmix64-based uniform values in [-1, 1), a function of the key and the index only
/// (mirrors `uniform` in tests/fixtures/make_resnet_fixtures.py).
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

/// The deterministic value of a state_dict entry (mirrors `hash_value` in the script).
pub fn hash_value(key: &str, shape: &[usize]) -> Option<Vec<f32>> {
    let n: usize = shape.iter().product();
    let u = hash_uniform(key, n);
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let f: Box<dyn Fn(f64) -> f64> = match leaf {
        "num_batches_tracked" => return None,
        "running_mean" => Box::new(|u| 0.1 * u),
        "running_var" => Box::new(|u| 1.0 + 0.25 * u),
        "weight" if shape.len() == 1 => Box::new(|u| 1.0 + 0.2 * u),
        "bias" => Box::new(|u| 0.05 * u),
        _ => {
            let fan_in = n / shape[0];
            let s = (6.0 / fan_in as f64).sqrt();
            Box::new(move |u| u * s)
        }
    };
    Some(u.into_iter().map(|v| f(v) as f32).collect())
}

/// A VarBuilder backend that creates every variable in a VarMap with [`hash_value`].
struct HashInit(candle_nn::VarMap);

impl candle_nn::var_builder::SimpleBackend for HashInit {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match hash_value(name, shape.dims()) {
            Some(v) => Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?,
            None => Tensor::zeros(shape, dtype, dev)?,
        };
        let var = candle_core::Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.0
            .data()
            .lock()
            .expect("lock")
            .insert(name.to_string(), var);
        Ok(out)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: get_unchecked unsupported")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.data().lock().expect("lock").contains_key(name)
    }
}

/// A VarBuilder whose variables (in `varmap`) all take their [`hash_value`].
pub fn hash_var_builder(varmap: &candle_nn::VarMap) -> candle_nn::VarBuilder<'static> {
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
        Box::new(HashInit(varmap.clone()));
    candle_nn::VarBuilder::from_backend(backend, DType::F32, Device::Cpu)
}
