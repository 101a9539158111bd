//! One training run of a ResNet with the recipe's flags: the loaders, optimizer, schedule,
//! trainer, progress display and checkpoints. `train` and the programs that show the
//! article's claims all train through here, so a run means the same thing everywhere.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use resblock_core::RngHandle;
use resblock_train::best::KeepBest;
use resblock_train::checkpoint::Checkpoint;
use resblock_train::data::Shard;
use resblock_train::ema::Ema;
use resblock_train::freeze::Freeze;
use resblock_train::optim::param_groups;
use resblock_train::{
    BatchSource, Communicator, EpochRecord, Progress, SingleProcess, Trainer, TrainerConfig,
};
use resblock_vision::ResNet;

use crate::recipe_args::{PreparedData, RecipeArgs};
use crate::run_flags::{differing_flags, RUN_FLAGS_KEY};

/// What one run does besides the recipe.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The ranks of a data-parallel run (`train --distributed`); one process without.
    pub comm: Option<Rc<dyn Communicator>>,
    /// Epochs the run (and its schedule) spans.
    pub epochs: u64,
    /// Where the checkpoint, `metrics.jsonl` and curves go (nothing is written without it).
    pub out: Option<PathBuf>,
    /// Resume from this run directory's checkpoint.
    pub resume: Option<PathBuf>,
    /// Stop after this many epochs, as if interrupted.
    pub stop_after: Option<u64>,
    /// Stop after this many optimizer steps in all.
    pub max_steps: Option<u64>,
    /// What stays fixed.
    pub freeze: Freeze,
    /// The run's name in progress lines (`resnet20`, `plain56`, ...).
    pub label: String,
    /// The program's flags: stored in every checkpoint, and a resume whose flags differ is
    /// refused (see [`crate::run_flags`]).
    pub flags: Option<serde_json::Value>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Fitted {
    /// One record per epoch (restored ones first when resumed).
    pub history: Vec<EpochRecord>,
    /// Optimizer steps taken in all.
    pub steps: u64,
    /// Wall time of the training in this process.
    pub seconds: f64,
    /// The best epoch and its validation accuracy (`--keep-best` / `--early-stop`).
    pub best: Option<(usize, f64)>,
    /// The epoch after which early stopping ended the run.
    pub stopped_early: Option<usize>,
    /// The weights' moving average at the end (`--ema`), by variable name.
    pub ema: Option<std::collections::BTreeMap<String, candle_core::Tensor>>,
}

impl Fitted {
    /// The last epoch's record.
    ///
    /// # Errors
    /// When no epoch was trained.
    pub fn last(&self) -> Result<&EpochRecord> {
        match self.history.last() {
            Some(r) => Ok(r),
            None => bail!("no epoch was trained"),
        }
    }
}

/// Trains `model` (its variables in `varmap`, its drop-path generator `rng`) on `data`
/// with the `recipe` and the `plan`: a progress bar and a line per epoch on the terminal,
/// `on_epoch` called after each epoch's record (after its checkpoint is written).
///
/// # Errors
/// As the trainer: data errors, a non-finite loss or gradient, an unwritable output or a
/// checkpoint that does not fit, naming what is at fault.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    model: &ResNet,
    varmap: &VarMap,
    rng: &RngHandle,
    recipe: &RecipeArgs,
    data: &PreparedData,
    device: &Device,
    plan: &Plan,
    mut on_epoch: impl FnMut(&EpochRecord),
) -> Result<Fitted> {
    let comm = plan
        .comm
        .clone()
        .unwrap_or_else(|| Rc::new(SingleProcess) as Rc<dyn Communicator>);
    let shard = Shard::new(comm.rank(), comm.size())?;
    let (mut train, mut test) = recipe.loaders(data, device, shard)?;
    let mut val = recipe.val_loader(data, device, shard)?;
    let steps_per_epoch = train.num_batches().div_ceil(recipe.accumulate as usize) as u64;
    let schedule = recipe.schedule(steps_per_epoch, plan.epochs)?;
    let freeze = plan.freeze;
    let groups = || freeze.apply(param_groups(varmap, recipe.weight_decay, true));
    let total = resblock_core::params::count_parameters(varmap, "");
    if freeze != Freeze::Nothing {
        let n: usize = groups()
            .iter()
            .flat_map(|g| &g.params)
            .map(|(_, v)| v.elem_count())
            .sum();
        crate::say!("frozen ({freeze:?}): training {n} of {total} parameters");
    }
    let optimizer = recipe.optimizer(groups())?;
    let cfg = TrainerConfig {
        epochs: plan.epochs as usize,
        loss: recipe.loss(),
        grad_clip: None,
        out_dir: plan.out.clone(),
        stop_after: plan.stop_after.map(|e| e as usize),
        max_steps: plan.max_steps,
        accumulate: recipe.accumulate as usize,
    };
    let mut show = crate::progress::labelled(&plan.label);
    let mut trainer = Trainer::new(model, varmap, optimizer, schedule, cfg)
        .with_communicator(comm.clone())?
        .with_rng(rng.clone())
        .on_progress(move |p| {
            show(p);
            if let Progress::Epoch { record, .. } = p {
                on_epoch(record);
            }
        });
    if recipe.keep_best || recipe.early_stop.is_some() {
        trainer = trainer.with_keep_best(KeepBest::new(
            recipe.keep_best,
            recipe.early_stop.map(|p| p as usize),
        )?);
    }
    if let Some(decay) = recipe.ema {
        trainer = trainer.with_ema(Ema::new(varmap, decay, recipe.ema_warmup)?);
    }
    if let Some(flags) = &plan.flags {
        trainer = trainer.with_checkpoint_meta(RUN_FLAGS_KEY, flags.to_string());
    }
    if let Some(dir) = &plan.resume {
        let ck = dir.join("checkpoint.safetensors");
        if let Some(now) = &plan.flags {
            let meta = Checkpoint::load(&ck)?.meta;
            if let Some(text) = meta.get(RUN_FLAGS_KEY) {
                let saved: serde_json::Value = serde_json::from_str(text).with_context(|| {
                    format!(
                        "{}: metadata key {RUN_FLAGS_KEY:?} is not JSON",
                        ck.display()
                    )
                })?;
                let bad = differing_flags(&saved, now);
                if !bad.is_empty() {
                    bail!(
                        "--resume {}: this run's flags differ from the checkpoint's: {}. Resume with the same flags (only --threads, --workers, --out, --stop-after, --max-steps may change, and --epochs may grow)",
                        dir.display(),
                        bad.join("; ")
                    );
                }
            }
        }
        trainer.resume(&ck)?;
        crate::say!("resumed {} at epoch {}", ck.display(), trainer.epoch());
    }
    let to = plan
        .out
        .as_ref()
        .map_or_else(String::new, |d| format!("; writing to {}", d.display()));
    let ranks = if comm.size() > 1 {
        format!(
            " on {} ranks ({} images per step)",
            comm.size(),
            comm.size() as u64 * recipe.batch_size
        )
    } else {
        String::new()
    };
    crate::say!(
        "training {} ({total} parameters) for {} epochs{ranks}, {steps_per_epoch} steps per epoch{to}",
        plan.label, plan.epochs,
    );
    let start = Instant::now();
    let history = trainer
        .fit_validated(
            &mut train,
            val.as_mut().map(|v| v as &mut dyn BatchSource),
            Some(&mut test),
        )?
        .to_vec();
    if let Some(e) = trainer.stopped_early() {
        crate::say!(
            "early stop after epoch {e}: no better validation accuracy for {} epochs",
            recipe.early_stop.unwrap_or(0)
        );
    }
    Ok(Fitted {
        history,
        steps: trainer.step(),
        seconds: start.elapsed().as_secs_f64(),
        best: trainer.best(),
        stopped_early: trainer.stopped_early(),
        ema: trainer.ema().map(|e| e.tensors().clone()),
    })
}
