//! The training loop: steps, epochs, evaluation, checkpoints, resuming and reporting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use candle_core::{ModuleT, Tensor};
use candle_nn::VarMap;
use resblock_core::RngHandle;

use crate::best::KeepBest;
use crate::checkpoint::{write_atomic, Checkpoint};
use crate::clip::{clip_grad_norm, grad_norm};
use crate::data::{Batch, BatchSource};
use crate::distributed::sync::{all_reduce_gradients, broadcast_tensors, broadcast_vars};
use crate::distributed::{Communicator, SingleProcess};
use crate::ema::Ema;
use crate::error::{Error, Result};
use crate::loss::{cross_entropy, mse};
use crate::metrics::{topk_hits, MeanLoss, Metric, TopK};
use crate::optim::Optimizer;
use crate::record::{EpochRecord, Progress};
use crate::schedule::LrSchedule;

/// The loss a [`Trainer`] minimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    /// Cross-entropy of class scores against class indices, with label smoothing.
    CrossEntropy {
        /// Label smoothing in [0, 1].
        label_smoothing: f64,
    },
    /// Mean squared error against targets of the outputs' shape.
    Mse,
}

impl LossKind {
    /// The loss of `outputs` against `targets`.
    ///
    /// # Errors
    /// Shape mismatches, out-of-range targets.
    pub fn compute(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match *self {
            Self::CrossEntropy { label_smoothing } => {
                cross_entropy(outputs, targets, label_smoothing)
            }
            Self::Mse => mse(outputs, targets),
        }
    }
}

/// Options of a [`Trainer`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerConfig {
    /// Epochs to train in total (a resumed run continues up to this).
    pub epochs: usize,
    /// The loss.
    pub loss: LossKind,
    /// Clip gradients to this global L2 norm.
    pub grad_clip: Option<f64>,
    /// Where to write `checkpoint.safetensors` (after every epoch), `metrics.jsonl` and the
    /// PNG curves; nothing is written without it.
    pub out_dir: Option<PathBuf>,
    /// Stop once this many epochs are complete, as if interrupted (the schedule still spans
    /// `epochs`); a later run resumes from the checkpoint.
    pub stop_after: Option<usize>,
    /// Stop after this many optimizer steps in all (short runs: smoke tests, profiling,
    /// memory checks). The epoch in progress ends there and is evaluated, recorded and
    /// checkpointed as a whole one; the schedule still spans `epochs`.
    pub max_steps: Option<u64>,
    /// Batches per optimizer step (gradient accumulation, `train --accumulate K`): each
    /// batch's loss is weighted by its share of the group's samples, so that a step sees
    /// the gradient of the group's mean loss, as one batch of all of them would (batch
    /// norm still normalises each batch with its own statistics). 1 is a step per batch.
    pub accumulate: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            loss: LossKind::CrossEntropy {
                label_smoothing: 0.,
            },
            grad_clip: None,
            out_dir: None,
            stop_after: None,
            max_steps: None,
            accumulate: 1,
        }
    }
}

/// A progress callback (see [`Trainer::on_progress`]).
pub type ProgressFn<'m> = Box<dyn FnMut(&Progress<'_>) + 'm>;

/// Trains a model whose variables live in a `VarMap`.
///
/// Determinism: with a seeded model (see `resblock_core::seeded_var_builder`), a
/// [`BatchSource`] whose epoch order depends only on its seed and the epoch, and the
/// model's [`RngHandle`] registered with [`Trainer::with_rng`], the same seed gives the same
/// run, and resuming from the checkpoint after epoch k gives bit-identical weights to an
/// uninterrupted run (on the CPU).
pub struct Trainer<'m, M: ModuleT> {
    model: &'m M,
    varmap: VarMap,
    optimizer: Box<dyn Optimizer + 'm>,
    schedule: LrSchedule,
    cfg: TrainerConfig,
    rng: Option<RngHandle>,
    epoch: usize,
    step: u64,
    history: Vec<EpochRecord>,
    step_losses: Vec<f64>,
    last_epoch_samples: usize,
    on_progress: Option<ProgressFn<'m>>,
    checkpoint_meta: BTreeMap<String, String>,
    /// The batch-norm running statistics by name, sorted (found once: checked every step).
    stats: std::cell::OnceCell<Vec<(String, candle_core::Var)>>,
    /// The weights' moving average, updated after every step.
    ema: Option<Ema>,
    /// Keep-best and early stopping on the validation set.
    keep_best: Option<KeepBest>,
    /// The epoch after which early stopping ended the run.
    stopped_early: Option<usize>,
    /// The other ranks of a data-parallel run ([`SingleProcess`] when alone).
    comm: Rc<dyn Communicator>,
    /// The optimized variables in name order: the gradient buckets' layout, the same on
    /// every rank (found once).
    sync_params: std::cell::OnceCell<Vec<candle_core::Var>>,
}

impl<'m, M: ModuleT> Trainer<'m, M> {
    /// A trainer for `model`, whose variables are in `varmap` and optimized by `optimizer`.
    pub fn new(
        model: &'m M,
        varmap: &VarMap,
        optimizer: Box<dyn Optimizer + 'm>,
        schedule: LrSchedule,
        cfg: TrainerConfig,
    ) -> Self {
        Self {
            model,
            varmap: varmap.clone(),
            optimizer,
            schedule,
            cfg,
            rng: None,
            epoch: 0,
            step: 0,
            history: Vec::new(),
            step_losses: Vec::new(),
            last_epoch_samples: 0,
            on_progress: None,
            checkpoint_meta: BTreeMap::new(),
            stats: std::cell::OnceCell::new(),
            ema: None,
            keep_best: None,
            stopped_early: None,
            comm: Rc::new(SingleProcess),
            sync_params: std::cell::OnceCell::new(),
        }
    }

    /// Trains data-parallel with the other ranks of `comm` (PyTorch DDP's semantics, see
    /// [`crate::distributed`]): checks that every rank holds the same variables, gives
    /// every rank rank 0's values of them, and from then on averages gradients over the
    /// ranks before each step, reduces the training and evaluation metrics (each rank
    /// evaluates its part of the data), broadcasts rank 0's batch-norm statistics (and
    /// moving average) after each epoch, records the rank count in checkpoints (a resume
    /// needs the same), and writes files on rank 0 only. Call it before
    /// [`Trainer::with_ema`] and [`Trainer::resume`]. Each rank's data must be its own
    /// share ([`crate::data::DataLoader::shard`]).
    ///
    /// # Errors
    /// Ranks whose models differ, or a failed transfer.
    pub fn with_communicator(mut self, comm: Rc<dyn Communicator>) -> Result<Self> {
        let (vars, elems) = {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            (
                data.len(),
                data.values().map(|v| v.elem_count()).sum::<usize>(),
            )
        };
        let mut check = [vars as f64, elems as f64, (vars * vars) as f64, 0.];
        check[3] = (elems as f64) * (elems as f64);
        comm.all_reduce_sum_f64(&mut check)?;
        let w = comm.size() as f64;
        // Equal on all ranks exactly when the sums of values and squares agree with W copies.
        if check[0] != w * vars as f64
            || check[1] != w * elems as f64
            || check[2] != w * (vars * vars) as f64
            || check[3] != w * (elems as f64) * (elems as f64)
        {
            return Err(Error::config(format!(
                "the ranks' models differ (rank {} has {vars} variables, {elems} values): every rank must build the same model",
                comm.rank()
            )));
        }
        broadcast_vars(comm.as_ref(), &self.varmap, |_| true)?;
        if comm.rank() != 0 {
            self.cfg.out_dir = None;
        }
        self.comm = comm;
        Ok(self)
    }

    /// The ranks this trainer trains with.
    pub fn communicator(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// Tracks the best epoch on the validation set given to [`Trainer::fit_validated`]:
    /// with `save`, its weights go to `best.safetensors` in the run directory (tensors by
    /// name; metadata `epoch` and `val_score`); with a patience, training stops after that
    /// many epochs without a better validation score. The state is kept in checkpoints.
    pub fn with_keep_best(mut self, keep: KeepBest) -> Self {
        self.keep_best = Some(keep);
        self
    }

    /// The best epoch so far and its validation score, when keep-best is on.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.keep_best.as_ref().and_then(|k| k.best)
    }

    /// The epoch after which early stopping ended training, if it did.
    pub fn stopped_early(&self) -> Option<usize> {
        self.stopped_early
    }

    /// Keeps a moving average of the weights ([`Ema`]), updated after every step,
    /// evaluated on the test data after every epoch (`ema_test_acc`) and saved in the
    /// checkpoint (tensors `ema/<name>`).
    pub fn with_ema(mut self, ema: Ema) -> Self {
        self.ema = Some(ema);
        self
    }

    /// The weights' moving average, if kept.
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// Runs `f` with the averaged weights in the model's variables, then puts the trained
    /// ones back (also when `f` fails).
    ///
    /// # Errors
    /// No average is kept, `f`'s error, or a variable that cannot be set.
    pub fn with_ema_weights<T>(&mut self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let mut ema = self
            .ema
            .take()
            .ok_or_else(|| Error::config("no moving average is kept (--ema)"))?;
        ema.swap(&self.varmap)?;
        let out = f(self);
        let back = ema.swap(&self.varmap);
        self.ema = Some(ema);
        back?;
        out
    }

    /// Records `value` under `key` in every checkpoint's metadata (e.g. the run's flags, so
    /// that a resume can check them; see [`Checkpoint::load`]). The trainer's own keys
    /// (`epoch`, `step`, `optimizer`, `history`, `rng_*`) cannot be replaced.
    pub fn with_checkpoint_meta(mut self, key: &str, value: String) -> Self {
        self.checkpoint_meta.insert(key.to_string(), value);
        self
    }

    /// Reports progress to `f`: after every step and every epoch (see [`Progress`]).
    pub fn on_progress(mut self, f: impl FnMut(&Progress<'_>) + 'm) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }

    fn report(&mut self, p: &Progress<'_>) {
        if let Some(f) = &mut self.on_progress {
            f(p);
        }
    }

    fn steps_left(&self) -> bool {
        self.cfg.max_steps.is_none_or(|m| self.step < m)
    }

    /// Registers the model's random generator (drop-path masks) so checkpoints save and
    /// restore its state.
    pub fn with_rng(mut self, rng: RngHandle) -> Self {
        self.rng = Some(rng);
        self
    }

    /// Epochs completed.
    pub fn epoch(&self) -> usize {
        self.epoch
    }
    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }
    /// Per-epoch records so far.
    pub fn history(&self) -> &[EpochRecord] {
        &self.history
    }
    /// The loss of every step taken by this trainer object (not restored on resume).
    pub fn step_losses(&self) -> &[f64] {
        &self.step_losses
    }
    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// One optimizer step on `batch`; returns the loss and the outputs (computed before the
    /// update).
    ///
    /// # Errors
    /// [`Error::NonFinite`] when the loss or the gradient norm is not finite (the weights
    /// are left as they were), or tensor errors.
    pub fn train_step(&mut self, batch: &Batch) -> Result<(f64, Tensor)> {
        let (loss, mut outputs) = self.train_step_accumulated(std::slice::from_ref(batch))?;
        Ok((loss, outputs.remove(0)))
    }

    /// One optimizer step on the gradient of the mean loss over all of `batches`' samples
    /// (gradient accumulation); returns that mean loss and each batch's outputs (computed
    /// before the update).
    ///
    /// # Errors
    /// No batches; otherwise as [`Trainer::train_step`].
    pub fn train_step_accumulated(&mut self, batches: &[Batch]) -> Result<(f64, Vec<Tensor>)> {
        let lr = self.schedule.lr_at(self.step);
        self.optimizer.set_learning_rate(lr);
        let sizes: Vec<usize> = batches
            .iter()
            .map(|b| b.inputs.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let total: usize = sizes.iter().sum();
        if batches.is_empty() || total == 0 {
            return Err(Error::config("an optimizer step needs at least one sample"));
        }
        let params = self.optimizer.params();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut all_outputs = Vec::with_capacity(batches.len());
        let mut value = 0f64;
        for (batch, &n) in batches.iter().zip(&sizes) {
            let outputs = self.model.forward_t(&batch.inputs, true)?;
            let loss = self.cfg.loss.compute(&outputs, &batch.targets)?;
            let v = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !v.is_finite() && self.comm.size() == 1 {
                return Err(self.non_finite("loss".into(), v));
            }
            // With other ranks, a non-finite loss is reported after the reduction below,
            // on every rank alike (one rank stopping alone would leave the others waiting).
            value += v * n as f64 / total as f64;
            // A single batch keeps its loss as it is (bit for bit what it always was).
            let weighted = if batches.len() == 1 {
                loss
            } else {
                (loss * (n as f64 / total as f64))?
            };
            let g = weighted.backward()?;
            match &mut grads {
                None => grads = Some(g),
                Some(sum) => {
                    for p in &params {
                        if let Some(gp) = g.get(p.as_tensor()) {
                            let next = match sum.get(p.as_tensor()) {
                                Some(prev) => (prev + gp)?,
                                None => gp.clone(),
                            };
                            sum.insert(p.as_tensor(), next);
                        }
                    }
                }
            }
            all_outputs.push(outputs.detach());
        }
        let mut grads = grads.ok_or_else(|| Error::config("no gradients"))?;
        if self.comm.size() > 1 {
            let sync = self.sync_params.get_or_init(|| {
                let ids: std::collections::HashSet<_> =
                    params.iter().map(|p| p.as_tensor().id()).collect();
                let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
                let mut named: Vec<(&String, &candle_core::Var)> = data
                    .iter()
                    .filter(|(_, v)| ids.contains(&v.as_tensor().id()))
                    .collect();
                named.sort_by(|a, b| a.0.cmp(b.0));
                named.into_iter().map(|(_, v)| v.clone()).collect()
            });
            all_reduce_gradients(self.comm.as_ref(), sync, &mut grads)?;
            let mut mean = [value];
            self.comm.all_reduce_sum_f64(&mut mean)?;
            value = mean[0] / self.comm.size() as f64;
            if !value.is_finite() {
                return Err(self.non_finite("loss (mean over ranks)".into(), value));
            }
        }
        let norm = match self.cfg.grad_clip {
            Some(max) => clip_grad_norm(&mut grads, &params, max)?,
            None => grad_norm(&grads, &params)?,
        };
        if !norm.is_finite() {
            let names = self.var_names(|_| true);
            return Err(
                match self.first_non_finite(&names, |v| grads.get(v.as_tensor()).cloned())? {
                    Some((name, v)) => self.non_finite(format!("gradient of {name}"), v),
                    None => self.non_finite("gradient norm".into(), norm),
                },
            );
        }
        self.optimizer.step(&grads)?;
        // Batch-norm statistics move in the forward; a non-finite one poisons every later
        // evaluation, so it stops the run here too.
        if let Some((name, v)) = self.bad_statistic()? {
            return Err(self.non_finite(format!("batch-norm statistic {name}"), v));
        }
        if let Some(ema) = &mut self.ema {
            ema.update(&self.varmap)?;
        }
        self.step += 1;
        self.step_losses.push(value);
        Ok((value, all_outputs))
    }

    fn non_finite(&self, what: String, value: f64) -> Error {
        Error::NonFinite {
            what,
            epoch: self.epoch + 1,
            step: self.step,
            value,
        }
    }

    /// The first of `names` (in order) whose `tensor_of` holds a non-finite element, with
    /// that element.
    fn first_non_finite(
        &self,
        names: &[String],
        tensor_of: impl Fn(&candle_core::Var) -> Option<Tensor>,
    ) -> Result<Option<(String, f64)>> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for k in names {
            let Some(t) = data.get(k).and_then(&tensor_of) else {
                continue;
            };
            let v = t
                .to_dtype(candle_core::DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            if let Some(bad) = v.into_iter().find(|x| !x.is_finite()) {
                return Ok(Some((k.clone(), bad)));
            }
        }
        Ok(None)
    }

    /// The variable names, sorted, that satisfy `keep`.
    fn var_names(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = data.keys().filter(|k| keep(k)).cloned().collect();
        names.sort();
        names
    }

    /// The first non-finite batch-norm running statistic, if any: one reduction over all of
    /// them, names looked at only when it is not finite.
    fn bad_statistic(&self) -> Result<Option<(String, f64)>> {
        let stats = self.stats.get_or_init(|| {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = data
                .iter()
                .filter(|(k, _)| k.contains("running_"))
                .map(|(k, var)| (k.clone(), var.clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        });
        if stats.is_empty() {
            return Ok(None);
        }
        let sums = stats
            .iter()
            .map(|(_, v)| v.as_tensor().sum_all()?.to_dtype(candle_core::DType::F64))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if Tensor::stack(&sums, 0)?
            .sum_all()?
            .to_scalar::<f64>()?
            .is_finite()
        {
            return Ok(None);
        }
        let names: Vec<String> = stats.iter().map(|(k, _)| k.clone()).collect();
        self.first_non_finite(&names, |v| Some(v.as_tensor().clone()))
    }

    fn is_classification(&self) -> bool {
        matches!(self.cfg.loss, LossKind::CrossEntropy { .. })
    }

    /// Trains one epoch (or up to `max_steps`); returns (mean loss, top-1 accuracy or NaN).
    /// Batches are taken from `data` one at a time as they are needed, so a streaming
    /// source prepares the next ones while this one trains.
    ///
    /// # Errors
    /// As [`Trainer::train_step`] and the data source.
    pub fn train_epoch(&mut self, data: &mut dyn BatchSource) -> Result<(f64, f64)> {
        let k = self.cfg.accumulate.max(1);
        let steps = data.num_batches().div_ceil(k);
        let (mut loss_sum, mut hits, mut count) = (0f64, 0usize, 0usize);
        let start = Instant::now();
        let epoch = self.epoch;
        let left = self
            .cfg
            .max_steps
            .map_or(usize::MAX, |m| m.saturating_sub(self.step) as usize);
        let mut batches = data.epoch_prefix(epoch, left.saturating_mul(k))?;
        let mut i = 0;
        loop {
            let group: Vec<Batch> = batches.by_ref().take(k).collect::<Result<_>>()?;
            if group.is_empty() {
                break;
            }
            let (loss, outputs) = self.train_step_accumulated(&group)?;
            i += 1;
            let bs: usize = group
                .iter()
                .map(|b| b.inputs.dim(0))
                .collect::<candle_core::Result<Vec<_>>>()?
                .iter()
                .sum();
            loss_sum += loss * bs as f64;
            count += bs;
            if self.is_classification() {
                for (out, b) in outputs.iter().zip(&group) {
                    hits += topk_hits(out, &b.targets, 1)?;
                }
            }
            let acc = if self.is_classification() {
                hits as f64 / count as f64
            } else {
                f64::NAN
            };
            // Every rank's batches have this rank's sizes, so images/s counts them all.
            let seen = count * self.comm.size();
            let p = Progress::Step {
                epoch: epoch + 1,
                epochs: self.cfg.epochs,
                step: i,
                steps,
                loss: loss_sum / count as f64,
                acc,
                images_per_sec: seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
            };
            self.report(&p);
        }
        if self.comm.size() > 1 {
            drop(batches);
            let mut sums = [loss_sum, hits as f64, count as f64];
            self.comm.all_reduce_sum_f64(&mut sums)?;
            (loss_sum, hits, count) = (sums[0], sums[1] as usize, sums[2] as usize);
            self.sync_buffers()?;
        }
        self.last_epoch_samples = count;
        let acc = if self.is_classification() && count > 0 {
            hits as f64 / count as f64
        } else {
            f64::NAN
        };
        Ok((loss_sum / count.max(1) as f64, acc))
    }

    /// Gives every rank rank 0's batch-norm statistics and moving average (each rank's
    /// moved with its own batches during the epoch), so that all evaluate the model rank 0
    /// saves, and a resumed run continues from the same state on every rank.
    fn sync_buffers(&mut self) -> Result<()> {
        broadcast_vars(
            self.comm.as_ref(),
            &self.varmap,
            resblock_core::params::is_buffer,
        )?;
        if let Some(ema) = &mut self.ema {
            let names: Vec<String> = ema.tensors().keys().cloned().collect();
            let mut tensors: Vec<Tensor> = ema.tensors().values().cloned().collect();
            broadcast_tensors(self.comm.as_ref(), &mut tensors)?;
            let updates = ema.updates();
            ema.restore(&names.into_iter().zip(tensors).collect(), updates)?;
        }
        Ok(())
    }

    /// Mean loss and top-1 accuracy (NaN for regression) in eval mode.
    ///
    /// # Errors
    /// Tensor errors and the data source.
    pub fn evaluate(&self, data: &mut dyn BatchSource) -> Result<(f64, f64)> {
        let mut loss = MeanLoss::default();
        let mut acc = TopK::new(1);
        let mut metrics: Vec<&mut dyn Metric> = vec![&mut loss];
        if self.is_classification() {
            metrics.push(&mut acc);
        }
        self.evaluate_with(data, &mut metrics)?;
        let a = if self.is_classification() {
            acc.value()
        } else {
            f64::NAN
        };
        Ok((loss.value(), a))
    }

    /// Runs the model in eval mode over `data`, updating every metric with each batch. In
    /// a data-parallel run each rank passes its part of the data, and the metrics are then
    /// combined over the ranks ([`Metric::all_reduce`]).
    ///
    /// # Errors
    /// Tensor errors and the data source.
    pub fn evaluate_with(
        &self,
        data: &mut dyn BatchSource,
        metrics: &mut [&mut dyn Metric],
    ) -> Result<()> {
        for m in metrics.iter_mut() {
            m.reset();
        }
        for batch in data.epoch(0)? {
            let batch = batch?;
            let out = self.model.forward_t(&batch.inputs, false)?.detach();
            let loss = self
                .cfg
                .loss
                .compute(&out, &batch.targets)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            for m in metrics.iter_mut() {
                m.update(&out, &batch.targets, loss)?;
            }
        }
        if self.comm.size() > 1 {
            for m in metrics.iter_mut() {
                m.all_reduce(self.comm.as_ref())?;
            }
        }
        Ok(())
    }

    /// Trains from the current epoch up to `cfg.epochs`, evaluating on `test` after each
    /// epoch, and (with an `out_dir`) writing the checkpoint, `metrics.jsonl` and the curves
    /// after each.
    ///
    /// # Errors
    /// As [`Trainer::train_epoch`]; a non-finite loss stops training with the last
    /// checkpoint left intact.
    pub fn fit(
        &mut self,
        train: &mut dyn BatchSource,
        test: Option<&mut dyn BatchSource>,
    ) -> Result<&[EpochRecord]> {
        self.fit_validated(train, None, test)
    }

    /// [`Trainer::fit`] with a validation set, evaluated after every epoch (`val_acc`,
    /// `val_loss`) and the only data keep-best and early stopping look at.
    ///
    /// # Errors
    /// As [`Trainer::fit`]; keep-best without a validation set.
    pub fn fit_validated(
        &mut self,
        train: &mut dyn BatchSource,
        mut val: Option<&mut dyn BatchSource>,
        mut test: Option<&mut dyn BatchSource>,
    ) -> Result<&[EpochRecord]> {
        if self.keep_best.is_some() && val.is_none() {
            return Err(Error::config(
                "keep-best and early stopping need a validation set (--val-split): the test set is never used to select",
            ));
        }
        if let Some(dir) = &self.cfg.out_dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::Checkpoint {
                path: dir.display().to_string(),
                msg: e.to_string(),
            })?;
        }
        let last = self
            .cfg
            .stop_after
            .map_or(self.cfg.epochs, |s| s.min(self.cfg.epochs));
        while self.epoch < last && self.steps_left() && self.stopped_early.is_none() {
            let start = Instant::now();
            let (train_loss, train_acc) = self.train_epoch(train)?;
            let train_secs = start.elapsed().as_secs_f64();
            let samples = self.last_epoch_samples;
            let (test_loss, test_acc) = match test.as_deref_mut() {
                Some(t) => self.evaluate(t)?,
                None => (f64::NAN, f64::NAN),
            };
            let (val_loss, val_acc) = match val.as_deref_mut() {
                Some(v) => self.evaluate(v)?,
                None => (f64::NAN, f64::NAN),
            };
            let (ema_test_loss, ema_test_acc) = match test.as_deref_mut() {
                Some(t) if self.ema.is_some() => self.with_ema_weights(|me| me.evaluate(t))?,
                _ => (f64::NAN, f64::NAN),
            };
            self.epoch += 1;
            let rec = EpochRecord {
                epoch: self.epoch,
                lr: self.optimizer.learning_rate(),
                train_loss,
                train_acc,
                test_loss,
                test_acc,
                seconds: start.elapsed().as_secs_f64(),
                images_per_sec: samples as f64 / train_secs.max(1e-9),
                val_loss,
                val_acc,
                ema_test_loss,
                ema_test_acc,
            };
            self.history.push(rec.clone());
            let score = if val_acc.is_finite() {
                val_acc
            } else {
                -val_loss
            };
            let epoch = self.epoch;
            let verdict = self.keep_best.as_mut().map(|k| k.observe(epoch, score));
            if let (Some(v), Some(dir)) = (verdict, self.cfg.out_dir.clone()) {
                if v.improved && self.keep_best.as_ref().is_some_and(|k| k.save) {
                    self.save_weights(&dir.join("best.safetensors"), score)?;
                }
            }
            if verdict.is_some_and(|v| v.stop) {
                self.stopped_early = Some(epoch);
            }
            if let Some(dir) = self.cfg.out_dir.clone() {
                self.save_checkpoint(&dir.join("checkpoint.safetensors"))?;
                self.write_metrics(&dir.join("metrics.jsonl"))?;
                crate::plot::write_curves(&self.history, &dir)?;
            }
            let epochs = self.cfg.epochs;
            self.report(&Progress::Epoch {
                record: &rec,
                epochs,
            });
        }
        Ok(&self.history)
    }

    /// Writes the model's variables (tensors by name, metadata `epoch` and `val_score`)
    /// atomically.
    fn save_weights(&self, path: &Path, score: f64) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        v.as_tensor()
                            .detach()
                            .to_device(&candle_core::Device::Cpu)?,
                    ))
                })
                .collect::<Result<_>>()?
        };
        let meta: std::collections::HashMap<String, String> = [
            ("epoch".to_string(), self.epoch.to_string()),
            ("val_score".to_string(), score.to_string()),
        ]
        .into();
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
                .map_err(|e| Error::Checkpoint {
                    path: path.display().to_string(),
                    msg: e.to_string(),
                })?;
        write_atomic(path, &bytes)
    }

    fn write_metrics(&self, path: &Path) -> Result<()> {
        let mut text = String::new();
        for r in &self.history {
            text.push_str(&serde_json::to_string(r).map_err(|e| Error::config(e.to_string()))?);
            text.push('\n');
        }
        write_atomic(path, text.as_bytes())
    }

    /// Writes a checkpoint of the model, optimizer, progress and RNG state (atomically).
    ///
    /// # Errors
    /// An unwritable destination.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let model = {
            let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            data.iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect()
        };
        let mut ck = Checkpoint {
            model,
            optim: self.optimizer.state(),
            ema: self
                .ema
                .as_ref()
                .map(|e| e.tensors().clone())
                .unwrap_or_default(),
            meta: self.checkpoint_meta.clone(),
        };
        if let Some(e) = &self.ema {
            ck.meta
                .insert("ema_updates".into(), e.updates().to_string());
        }
        if let Some(k) = &self.keep_best {
            ck.meta.insert(
                "keep_best".into(),
                serde_json::to_string(k).map_err(|e| Error::config(e.to_string()))?,
            );
        }
        ck.meta
            .insert("world_size".into(), self.comm.size().to_string());
        ck.meta.insert("epoch".into(), self.epoch.to_string());
        ck.meta.insert("step".into(), self.step.to_string());
        ck.meta
            .insert("optimizer".into(), self.optimizer.name().into());
        let history =
            serde_json::to_string(&self.history).map_err(|e| Error::config(e.to_string()))?;
        ck.meta.insert("history".into(), history);
        if let Some(rng) = &self.rng {
            ck.set_rng(&rng.state());
        }
        ck.save(path)
    }

    /// Restores model, optimizer, progress and RNG state from a checkpoint, strictly: every
    /// model variable must be there with its shape, the optimizer must be of the same kind.
    /// Nothing is changed unless the whole checkpoint fits.
    ///
    /// # Errors
    /// A corrupt file, or a mismatch naming the file and the key.
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let ck = Checkpoint::load(path)?;
        let fail = |msg: String| Error::Checkpoint {
            path: path.display().to_string(),
            msg,
        };
        let kind: String = ck.meta_value("optimizer", path)?;
        if kind != self.optimizer.name() {
            return Err(fail(format!(
                "the checkpoint's optimizer is {kind}, this run uses {}",
                self.optimizer.name()
            )));
        }
        let world: usize = match ck.meta.get("world_size") {
            Some(_) => ck.meta_value("world_size", path)?,
            None => 1,
        };
        if world != self.comm.size() {
            return Err(fail(format!(
                "the checkpoint was written by a run of {world} process(es), this run has {}: resume with the same count (mpirun -np {world})",
                self.comm.size()
            )));
        }
        let epoch: usize = ck.meta_value("epoch", path)?;
        let step: u64 = ck.meta_value("step", path)?;
        let history: Vec<EpochRecord> = match ck.meta.get("history") {
            Some(h) => serde_json::from_str(h)
                .map_err(|e| fail(format!("metadata key \"history\" is invalid: {e}")))?,
            None => Vec::new(),
        };
        let rng = ck.rng(path)?;
        let saved_best: Option<KeepBest> = match ck.meta.get("keep_best") {
            Some(text) => Some(
                serde_json::from_str(text)
                    .map_err(|e| fail(format!("metadata key \"keep_best\" is invalid: {e}")))?,
            ),
            None => None,
        };
        // Check everything before changing anything.
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, var) in data.iter() {
            let t = ck
                .model
                .get(k)
                .ok_or_else(|| fail(format!("model variable {k} is missing")))?;
            if t.dims() != var.dims() {
                return Err(fail(format!(
                    "model variable {k} has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        if let Some(extra) = ck.model.keys().find(|k| !data.contains_key(*k)) {
            return Err(fail(format!("model variable {extra} is not in this model")));
        }
        if let Some(ema) = &self.ema {
            if ck.ema.is_empty() {
                return Err(fail(
                    "the checkpoint has no moving average (--ema) to resume".into(),
                ));
            }
            // Checked on a copy: nothing changes unless the whole checkpoint fits.
            let updates: u64 = ck.meta_value("ema_updates", path)?;
            ema.clone()
                .restore(&ck.ema, updates)
                .map_err(|e| fail(e.to_string()))?;
        }
        let previous = self.optimizer.state();
        self.optimizer
            .load_state(&ck.optim)
            .map_err(|e| fail(format!("optimizer state does not fit: {e}")))?;
        for (k, var) in data.iter() {
            let t = ck.model[k].to_dtype(var.dtype())?.to_device(var.device())?;
            if let Err(e) = var.set(&t) {
                let _ = self.optimizer.load_state(&previous);
                return Err(e.into());
            }
        }
        drop(data);
        if let (Some(r), Some(s)) = (&self.rng, rng) {
            r.set_state(&s);
        }
        if let Some(ema) = &mut self.ema {
            let updates: u64 = ck.meta_value("ema_updates", path)?;
            ema.restore(&ck.ema, updates)?;
        }
        if let (Some(k), Some(saved)) = (&mut self.keep_best, saved_best) {
            k.best = saved.best;
            k.since_best = saved.since_best;
        }
        self.epoch = epoch;
        self.step = step;
        self.history = history;
        Ok(())
    }
}
