//! The programs that show the article's three claims on real data, each one command
//! (`degradation`, `grow`, `gradient-flow`; see `docs/residual-learning.md`). They train
//! through [`crate::fit`], so their runs are `train`'s runs, and each writes
//! `results.json` and PNG figures drawn from exactly the numbers in it.
//!
//! This module holds what they share: building a preset for the data, a fixed batch to
//! measure on, the per-block `||g(x)|| / ||x||` log, and the JSON writer.

pub mod degradation;
pub mod gradient_flow;
pub mod grow;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use resblock_core::{probe, seeded_var_builder, RngHandle};
use resblock_train::plot::Heatmap;
use resblock_train::{Batch, BatchSource, DataLoader, Dataset, Transform};
use resblock_vision::{resnet, BlockType, ResNet, ResNetConfig};
use serde::{Deserialize, Serialize};

use crate::recipe_args::PreparedData;

/// A network with its variables and its random generator.
pub struct Net {
    /// The model.
    pub model: ResNet,
    /// Its variables.
    pub varmap: VarMap,
    /// Its generator (drop-path; checkpointed with the run).
    pub rng: RngHandle,
    /// Its configuration (channels and classes from the data).
    pub cfg: ResNetConfig,
}

/// Builds preset `arch` for `data` (its channels and classes), initialised from `seed`.
///
/// # Errors
/// An unknown preset.
pub fn build(arch: &str, data: &PreparedData, seed: u64, device: &Device) -> Result<Net> {
    let mut cfg = ResNetConfig::preset(arch).with_context(|| format!("architecture {arch:?}"))?;
    cfg.in_channels = data.shape.0;
    cfg.num_classes = data.num_classes();
    let rng = RngHandle::seed_from_u64(seed);
    let varmap = VarMap::new();
    let model = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, device),
    )?;
    Ok(Net {
        model,
        varmap,
        rng,
        cfg,
    })
}

/// The number of weighted layers along the main path: the stem's convolution, every
/// block's convolutions and the classifier (He et al.'s count: resnet20 is 20).
pub fn depth(cfg: &ResNetConfig) -> usize {
    let per_block = match cfg.block {
        BlockType::Basic => 2,
        BlockType::Bottleneck => 3,
    };
    per_block * cfg.layers.iter().sum::<usize>() + 2
}

/// The first `batch_size` samples of `ds` in order with `transforms` (no augmentation):
/// the fixed batch the programs measure on.
///
/// # Errors
/// An empty dataset or a sample that cannot be read.
pub fn first_batch(
    ds: Arc<dyn Dataset>,
    transforms: &[Transform],
    batch_size: usize,
    device: &Device,
) -> Result<Batch> {
    let mut loader = DataLoader::new(ds, batch_size)?
        .transforms(transforms.to_vec())
        .workers(1)
        .device(device.clone());
    let batch = loader.epoch_prefix(0, 1)?.next();
    match batch {
        Some(b) => Ok(b?),
        None => anyhow::bail!("the dataset is empty"),
    }
}

/// Every residual block's `||g(x)|| / ||x||` on a fixed batch, measured at initialisation
/// (epoch 0) and after every epoch: `ratios[block][epoch]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RatioLog {
    /// The blocks' parameter paths, input to output.
    pub blocks: Vec<String>,
    /// One row per block, one value per measurement (epoch 0, 1, ...).
    pub ratios: Vec<Vec<f64>>,
}

impl RatioLog {
    /// Measures `model` on `x` in eval mode and appends a column.
    ///
    /// # Errors
    /// The forward's error, or a model whose blocks changed.
    pub fn record(&mut self, model: &ResNet, x: &Tensor) -> Result<()> {
        let r = probe::measure(model, x, false)?;
        if self.blocks.is_empty() {
            self.blocks = r.iter().map(|(n, _)| n.clone()).collect();
            self.ratios = vec![Vec::new(); r.len()];
        }
        anyhow::ensure!(
            r.len() == self.blocks.len(),
            "the model has {} residual blocks, {} were logged",
            r.len(),
            self.blocks.len()
        );
        for (row, (_, v)) in self.ratios.iter_mut().zip(r) {
            row.push(v);
        }
        Ok(())
    }

    /// The log as a heat map panel (rows: blocks, marked `*` where `marked`; columns:
    /// epochs from 0).
    pub fn heatmap(&self, title: &str, marked: &[String]) -> Heatmap {
        let n = self.ratios.first().map_or(0, Vec::len);
        Heatmap {
            title: title.into(),
            rows: self
                .blocks
                .iter()
                .map(|b| {
                    if marked.contains(b) {
                        format!("{b} *")
                    } else {
                        b.clone()
                    }
                })
                .collect(),
            columns: (0..n).map(|e| e.to_string()).collect(),
            x_desc: "epoch".into(),
            values: self.ratios.clone(),
        }
    }
}

/// What a program found: serialised as `results.json`, drawn as its figures.
pub trait Findings: Serialize {
    /// Writes the figures into `dir`, drawn from these numbers only.
    ///
    /// # Errors
    /// An unwritable destination.
    fn draw(&self, dir: &Path) -> Result<()>;
}

/// Writes `dir/results.json` and the figures (creating `dir`).
///
/// # Errors
/// An unwritable destination, naming it.
pub fn save(dir: &Path, findings: &impl Findings) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_json(&dir.join("results.json"), findings)?;
    findings.draw(dir)
}

/// Writes `value` as pretty JSON to `path`, atomically.
///
/// # Errors
/// An unwritable destination, naming it.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    resblock_io::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a `results.json` back (tests and figure redraws).
///
/// # Errors
/// An unreadable or malformed file, naming it.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed results", path.display()))
}

/// Error rate in percent from an accuracy in [0, 1].
pub fn error_pct(acc: f64) -> f64 {
    100. * (1. - acc)
}
