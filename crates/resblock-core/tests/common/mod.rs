//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};

pub fn fixture(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("loading fixture {}", path.display()))
}

pub fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    f.get(key)
        .with_context(|| format!("fixture key {key} missing"))
}

/// Max |a - b| over all elements, with a shape check.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    anyhow::ensure!(
        a.dims() == b.dims(),
        "shape {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

pub fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Asserts `a` is within `tol` of `b`, relative to b's largest magnitude.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let d = max_abs_diff(a, b)?;
    let scale = max_abs(b)?.max(1e-12);
    anyhow::ensure!(
        d <= tol * scale,
        "{what}: max diff {d:e} > {tol:e} * {scale:e}"
    );
    Ok(())
}

/// Central finite differences of a scalar function of one f64 tensor.
pub fn numeric_grad(f: &dyn Fn(&Tensor) -> Result<f64>, x: &Tensor, eps: f64) -> Result<Tensor> {
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let mut g = vec![0f64; base.len()];
    for i in 0..base.len() {
        let mut v = base.clone();
        v[i] = base[i] + eps;
        let fp = f(&Tensor::from_vec(v.clone(), x.shape(), &Device::Cpu)?)?;
        v[i] = base[i] - eps;
        let fm = f(&Tensor::from_vec(v, x.shape(), &Device::Cpu)?)?;
        g[i] = (fp - fm) / (2. * eps);
    }
    Ok(Tensor::from_vec(g, x.shape(), &Device::Cpu)?)
}

/// Analytic gradient of a scalar function of one tensor through Candle's backprop.
pub fn autograd(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> Result<Tensor> {
    let v = Var::from_tensor(x)?;
    let loss = f(v.as_tensor())?;
    let grads = loss.backward()?;
    grads
        .get(v.as_tensor())
        .cloned()
        .context("no gradient reached the input")
}
