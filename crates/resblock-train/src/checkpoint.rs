//! Training checkpoints: model variables, optimizer state, progress and RNG state in one
//! `.safetensors` file, written atomically.
//!
//! Layout: tensors `model/<name>` (every variable of the model's `VarMap`, buffers
//! included), `optim/<key>` ([`crate::optim::Optimizer::state`]) and, with a moving
//! average, `ema/<name>` ([`crate::ema::Ema`], `ema_updates` in the metadata); the safetensors
//! metadata holds `format`, `epoch`, `step`, `optimizer`, the RNG state and the epoch
//! history as JSON.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use resblock_core::RngState;

use crate::error::{Error, Result};

/// The format tag written into every checkpoint.
pub const FORMAT: &str = "resblock-checkpoint/1";

/// The contents of a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// Model variables by name.
    pub model: BTreeMap<String, Tensor>,
    /// Optimizer state by key.
    pub optim: BTreeMap<String, Tensor>,
    /// The weights' moving average by variable name (empty without one).
    pub ema: BTreeMap<String, Tensor>,
    /// Plain metadata (`epoch`, `step`, `optimizer`, `history`, RNG fields, ...).
    pub meta: BTreeMap<String, String>,
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

impl Checkpoint {
    /// A metadata value, parsed.
    ///
    /// # Errors
    /// A missing or unparsable key, naming the file and key.
    pub fn meta_value<T: std::str::FromStr>(&self, key: &str, path: &Path) -> Result<T> {
        let v = self
            .meta
            .get(key)
            .ok_or_else(|| err(path, format!("metadata key {key:?} is missing")))?;
        v.parse().map_err(|_| {
            err(
                path,
                format!("metadata key {key:?} has an invalid value {v:?}"),
            )
        })
    }

    /// Stores an RNG state in the metadata.
    pub fn set_rng(&mut self, s: &RngState) {
        let hex: String = s.seed.iter().map(|b| format!("{b:02x}")).collect();
        self.meta.insert("rng_seed".into(), hex);
        self.meta.insert("rng_stream".into(), s.stream.to_string());
        self.meta
            .insert("rng_word_pos".into(), s.word_pos.to_string());
    }

    /// The RNG state from the metadata, if one was stored.
    ///
    /// # Errors
    /// A malformed stored state.
    pub fn rng(&self, path: &Path) -> Result<Option<RngState>> {
        let Some(hex) = self.meta.get("rng_seed") else {
            return Ok(None);
        };
        let bad = || err(path, "metadata key \"rng_seed\" is not 64 hex digits");
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (b, pair) in seed.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *b = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Some(RngState {
            seed,
            stream: self.meta_value("rng_stream", path)?,
            word_pos: self.meta_value("rng_word_pos", path)?,
        }))
    }

    /// Writes the checkpoint to `path` atomically: a temporary file in the same directory,
    /// fsync, rename. An existing checkpoint is replaced only by a complete new one.
    ///
    /// # Errors
    /// An unwritable destination.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in &self.model {
            tensors.insert(format!("model/{k}"), t.to_device(&Device::Cpu)?);
        }
        for (k, t) in &self.optim {
            tensors.insert(format!("optim/{k}"), t.to_device(&Device::Cpu)?);
        }
        for (k, t) in &self.ema {
            tensors.insert(format!("ema/{k}"), t.to_device(&Device::Cpu)?);
        }
        let mut meta: HashMap<String, String> = self.meta.clone().into_iter().collect();
        meta.insert("format".into(), FORMAT.into());
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
                .map_err(|e| err(path, e.to_string()))?;
        write_atomic(path, &bytes)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`].
    ///
    /// # Errors
    /// A missing, truncated or corrupt file, or one that is not a resblock checkpoint.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(path, format!("not a readable checkpoint ({e})")))?;
        let meta: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            other => {
                return Err(err(
                    path,
                    format!("not a resblock checkpoint (format {other:?}, expected {FORMAT:?})"),
                ))
            }
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| err(path, format!("not a readable checkpoint ({e})")))?;
        let mut ck = Checkpoint {
            meta,
            ..Default::default()
        };
        for (k, t) in tensors {
            if let Some(name) = k.strip_prefix("model/") {
                ck.model.insert(name.to_string(), t);
            } else if let Some(key) = k.strip_prefix("optim/") {
                ck.optim.insert(key.to_string(), t);
            } else if let Some(name) = k.strip_prefix("ema/") {
                ck.ema.insert(name.to_string(), t);
            } else {
                return Err(err(path, format!("unexpected tensor {k:?}")));
            }
        }
        Ok(ck)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory (fsync, rename,
/// fsync of the directory), so `path` is either the old or the complete new content: the
/// project's one atomic writer, [`resblock_io::write_atomic`], with this crate's
/// error.
///
/// # Errors
/// An unwritable destination.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    resblock_io::write_atomic(path, bytes).map_err(|e| {
        err(
            path,
            format!(
                "cannot write: {e} (nothing was replaced: the previous file, if any, is intact)"
            ),
        )
    })
}
