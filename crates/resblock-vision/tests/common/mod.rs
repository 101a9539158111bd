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

#[allow(unused_imports)]
pub use resblock_testing::hash_var_builder;
