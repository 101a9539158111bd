//! Reading and writing weights in PyTorch's formats, with torchvision's names.
//!
//! - [`read_state_dict`]: a `.safetensors` file or a PyTorch `.pth`/`.pt` file (a
//!   `torch.save`d state_dict, optionally under `state_dict`/`model`, optionally with
//!   DataParallel's `module.` prefix).
//! - [`load_into_varmap`]: strict loading into a model's `VarMap` (for training or
//!   fine-tuning); [`load_resnet`]: a ResNet with plain (non-variable) tensors for
//!   inference, so nothing records a backprop graph.
//! - [`save_varmap`]: a `.safetensors` file that `torchvision`'s `load_state_dict` takes
//!   strictly (including `num_batches_tracked` as int64), written atomically.
//!
//! Strictness follows `load_state_dict(strict=True)`: missing and unexpected keys are an
//! error listing them, a shape mismatch names the key and both shapes. The one exception is
//! `num_batches_tracked`, which older checkpoints (torchvision's own ImageNet weights) lack:
//! a missing counter is taken as 0.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resblock_core::params::shape_only_var_builder;
use resblock_core::RngHandle;

use crate::error::{Error, Result};
use crate::resnet::{resnet, ResNet, ResNetConfig};

fn format_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::WeightsFormat {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// Reads every tensor of a weight file, by key.
///
/// # Errors
/// A missing, unreadable, corrupt or truncated file, or an unknown extension.
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let entries: Vec<(String, Tensor)> = match ext {
        "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| format_err(path, e))?
            .into_iter()
            .collect(),
        "pth" | "pt" | "bin" => {
            crate::pickle_globals::check_pth_globals(path)?;
            let mut found = Vec::new();
            for key in [None, Some("state_dict"), Some("model")] {
                // The tensors' claimed sizes are checked against their storages before
                // Candle allocates them; the pickle is parsed once for both.
                let pth = match candle_core::pickle::PthTensors::new(path, key) {
                    Ok(pth) => pth,
                    Err(e) if key.is_none() => return Err(format_err(path, e)),
                    Err(_) => continue,
                };
                let infos: Vec<_> = pth.tensor_infos().values().cloned().collect();
                if infos.is_empty() {
                    continue;
                }
                crate::pth_bounds::storage_sizes(path, &infos)?;
                for name in pth.tensor_infos().keys() {
                    if let Some(t) = pth.get(name).map_err(|e| format_err(path, e))? {
                        found.push((name.clone(), t));
                    }
                }
                break;
            }
            found
        }
        _ => {
            return Err(format_err(
                path,
                "unknown extension: expected .safetensors, .pth or .pt",
            ))
        }
    };
    if entries.is_empty() {
        return Err(format_err(path, "no tensors found"));
    }
    let strip = entries.iter().all(|(k, _)| k.starts_with("module."));
    Ok(entries
        .into_iter()
        .map(|(k, t)| {
            let k = if strip {
                k["module.".len()..].to_string()
            } else {
                k
            };
            (k, t)
        })
        .collect())
}

/// Checks a state_dict against the expected keys and shapes, strictly (see the module docs).
///
/// # Errors
/// [`Error::KeyMismatch`] or [`Error::ShapeMismatch`], naming `path`.
pub fn check_state_dict(
    expected: &BTreeMap<String, Vec<usize>>,
    found: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let optional = |k: &str| k.ends_with("num_batches_tracked");
    let missing: Vec<String> = expected
        .keys()
        .filter(|k| !found.contains_key(*k) && !optional(k))
        .cloned()
        .collect();
    let unexpected: Vec<String> = found
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .cloned()
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(Error::KeyMismatch {
            path: path.display().to_string(),
            missing,
            unexpected,
        });
    }
    for (k, shape) in expected {
        if let Some(t) = found.get(k) {
            // PyTorch stores the scalar counter as shape []; accept [1] too.
            let ok = t.dims() == shape.as_slice() || (optional(k) && t.elem_count() == 1);
            if !ok {
                return Err(Error::ShapeMismatch {
                    path: path.display().to_string(),
                    key: k.clone(),
                    file: t.dims().to_vec(),
                    model: shape.clone(),
                });
            }
        }
    }
    Ok(())
}

fn varmap_shapes(varmap: &VarMap) -> BTreeMap<String, Vec<usize>> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

/// Loads a weight file into the variables of `varmap` (a model built on it), strictly.
/// Nothing is changed unless the whole file fits.
///
/// # Errors
/// As [`read_state_dict`] and [`check_state_dict`].
pub fn load_into_varmap(varmap: &VarMap, path: &Path) -> Result<()> {
    load_state_dict_into_varmap(varmap, &read_state_dict(path)?, path, |_| false)
}

/// Loads a state_dict read from `path` into `varmap`, strictly except for the keys where
/// `skip` is true (on either side: neither required nor loaded; e.g. a classifier being
/// replaced). Nothing is changed unless the rest fits.
///
/// # Errors
/// As [`check_state_dict`].
pub fn load_state_dict_into_varmap(
    varmap: &VarMap,
    found: &BTreeMap<String, Tensor>,
    path: &Path,
    skip: impl Fn(&str) -> bool,
) -> Result<()> {
    let mut expected = varmap_shapes(varmap);
    expected.retain(|k, _| !skip(k));
    let kept: BTreeMap<String, Tensor> = found
        .iter()
        .filter(|(k, _)| !skip(k))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    check_state_dict(&expected, &kept, path)?;
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    for (k, var) in data.iter() {
        if let Some(t) = kept.get(k) {
            let t = t
                .reshape(var.shape())?
                .to_dtype(var.dtype())?
                .to_device(var.device())?;
            var.set(&t)?;
        }
    }
    Ok(())
}

/// Builds `cfg`'s ResNet from a weight file for inference: plain tensors (no variables, so
/// no backprop graph is recorded), strict key and shape checks.
///
/// # Errors
/// As [`read_state_dict`] and [`check_state_dict`] (e.g. the file is for another
/// architecture), or a configuration error.
pub fn load_resnet(cfg: &ResNetConfig, path: &Path, device: &Device) -> Result<ResNet> {
    resnet_from_state_dict(cfg, &read_state_dict(path)?, path, device)
}

/// As [`load_resnet`] from a state_dict already read from `path` (named in errors).
///
/// # Errors
/// As [`check_state_dict`], or a configuration error.
pub fn resnet_from_state_dict(
    cfg: &ResNetConfig,
    found: &BTreeMap<String, Tensor>,
    path: &Path,
    device: &Device,
) -> Result<ResNet> {
    let (vb, rec) = shape_only_var_builder(DType::F32, device);
    resnet(cfg, &RngHandle::seed_from_u64(0), vb)?;
    let expected = rec.shapes();
    check_state_dict(&expected, found, path)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(expected.len());
    for (k, shape) in &expected {
        let t = match found.get(k) {
            Some(t) if k.ends_with("num_batches_tracked") => t.reshape(())?.to_dtype(DType::I64)?,
            Some(t) => t.to_dtype(DType::F32)?,
            None => Tensor::zeros(shape.as_slice(), DType::I64, &Device::Cpu)?,
        };
        tensors.insert(k.clone(), t.to_device(device)?);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    resnet(cfg, &RngHandle::seed_from_u64(0), vb)
}

/// Writes every variable of `varmap` to a `.safetensors` file under its name (torchvision's
/// state_dict names for our models; `num_batches_tracked` as int64). The file is written to
/// a temporary name, synced and renamed, so an existing file is never left half-written.
///
/// # Errors
/// An unwritable destination.
pub fn save_varmap(varmap: &VarMap, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    };
    save_tensors(&tensors, path)
}

/// Writes named tensors to `path` as safetensors, atomically (temp file, fsync, rename).
///
/// # Errors
/// An unwritable destination.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    save_tensors_with_metadata(tensors, None, path)
}

/// As [`save_tensors`], with safetensors `__metadata__` entries (string keys and values).
///
/// # Errors
/// An unwritable destination.
pub fn save_tensors_with_metadata(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let cpu: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(cpu.iter().map(|(k, t)| (*k, t)), metadata)
        .map_err(|e| format_err(path, e))?;
    resblock_io::write_atomic(path, &bytes).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })
}
