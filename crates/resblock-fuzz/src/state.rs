//! A run's own state: a training checkpoint resumed into a trainer, and the JSON a run
//! stores (`run_flags` in checkpoints, `resblock.model` in model files).

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use resblock_examples::run_flags::differing_flags;
use resblock_train::checkpoint::Checkpoint;
use resblock_train::optim::{param_groups, Sgd, SgdConfig};
use resblock_train::schedule::{LrSchedule, Schedule};
use resblock_train::{Trainer, TrainerConfig};
use resblock_vision::model_file::ModelMeta;

use crate::{scratch, shown, Outcome};

/// The 4 -> 3 linear model (`fc.weight`, `fc.bias`) that checkpoints are resumed into.
///
/// # Errors
/// Tensor errors.
pub fn linear_model() -> Result<(candle_nn::Linear, VarMap), String> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(4, 3, vb.pp("fc")).map_err(shown)?;
    Ok((fc, varmap))
}

/// A trainer of `fc` (from [`linear_model`]) with SGD, momentum 0.9, lr 0.1: the state a
/// checkpoint of the `checkpoint` target holds.
///
/// # Errors
/// Invalid settings (never, for these).
pub fn linear_trainer<'m>(
    fc: &'m candle_nn::Linear,
    varmap: &VarMap,
) -> Result<Trainer<'m, candle_nn::Linear>, String> {
    let sgd = Sgd::new(
        param_groups(varmap, 0.0, true),
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        },
    )
    .map_err(shown)?;
    let schedule = LrSchedule::new(0.1, Schedule::Constant, None).map_err(shown)?;
    Ok(Trainer::new(
        fc,
        varmap,
        Box::new(sgd),
        schedule,
        TrainerConfig::default(),
    ))
}

/// A checkpoint file, read and then resumed into [`linear_trainer`].
pub fn checkpoint(bytes: &[u8]) -> Outcome {
    let p = scratch::put("checkpoint.safetensors", bytes);
    let ck = Checkpoint::load(&p).map_err(shown)?;
    ck.rng(&p).map_err(shown)?;
    let (fc, varmap) = linear_model()?;
    let mut trainer = linear_trainer(&fc, &varmap)?;
    trainer.resume(&p).map_err(shown)
}

/// JSON a run stores: the first line is compared as `run_flags` against a fixed run's
/// flags, the rest read as a model file's `resblock.model` metadata and validated.
pub fn run_meta(bytes: &[u8]) -> Outcome {
    let text = std::str::from_utf8(bytes).map_err(shown)?;
    let (flags, meta) = text.split_once('\n').unwrap_or((text, ""));
    let now = serde_json::json!({"arch": "resnet20", "epochs": 3, "lr": 0.1, "threads": 2});
    let saved: serde_json::Value = serde_json::from_str(flags).map_err(shown)?;
    differing_flags(&saved, &now);
    let meta: ModelMeta = serde_json::from_str(meta).map_err(shown)?;
    meta.validate(&scratch::dir().join("model.safetensors"))
        .map_err(shown)
}
