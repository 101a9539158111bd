//! The training loop: steps, epochs, evaluation, checkpoints, resuming and reporting.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{ModuleT, Tensor};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use resblock_core::RngHandle;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_atomic, Checkpoint};
use crate::clip::{clip_grad_norm, grad_norm};
use crate::data::{Batch, BatchSource};
use crate::error::{Error, Result};
use crate::loss::{cross_entropy, mse};
use crate::metrics::{topk_hits, MeanLoss, Metric, TopK};
use crate::optim::Optimizer;
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
    /// Show progress (a bar on a terminal, one line per epoch otherwise).
    pub progress: bool,
    /// Stop once this many epochs are complete, as if interrupted (the schedule still spans
    /// `epochs`); a later run resumes from the checkpoint.
    pub stop_after: Option<usize>,
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
            progress: false,
            stop_after: None,
        }
    }
}

/// One epoch's numbers, as written to `metrics.jsonl` (one JSON object per line) and to a
/// checkpoint's `history`. Non-finite numbers are written as `null` and read back as NaN,
/// as are missing fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    #[serde(default)]
    pub epoch: usize,
    /// Learning rate at the epoch's last step.
    #[serde(with = "nan_as_null", default = "nan")]
    pub lr: f64,
    /// Mean training loss.
    #[serde(with = "nan_as_null", default = "nan")]
    pub train_loss: f64,
    /// Training top-1 accuracy (NaN for regression).
    #[serde(with = "nan_as_null", default = "nan")]
    pub train_acc: f64,
    /// Mean test loss (NaN without test data).
    #[serde(with = "nan_as_null", default = "nan")]
    pub test_loss: f64,
    /// Test top-1 accuracy (NaN without test data or for regression).
    #[serde(with = "nan_as_null", default = "nan")]
    pub test_acc: f64,
    /// Wall time of the epoch (training and evaluation).
    #[serde(with = "nan_as_null", default = "nan")]
    pub seconds: f64,
    /// Training throughput (samples per second over the training part of the epoch).
    #[serde(with = "nan_as_null", default = "nan")]
    pub images_per_sec: f64,
}

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
        }
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
        let lr = self.schedule.lr_at(self.step);
        self.optimizer.set_learning_rate(lr);
        let outputs = self.model.forward_t(&batch.inputs, true)?;
        let loss = self.cfg.loss.compute(&outputs, &batch.targets)?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::NonFinite {
                what: "loss".into(),
                step: self.step,
                value,
            });
        }
        let mut grads = loss.backward()?;
        let params = self.optimizer.params();
        let norm = match self.cfg.grad_clip {
            Some(max) => clip_grad_norm(&mut grads, &params, max)?,
            None => grad_norm(&grads, &params)?,
        };
        if !norm.is_finite() {
            return Err(Error::NonFinite {
                what: "gradient norm".into(),
                step: self.step,
                value: norm,
            });
        }
        self.optimizer.step(&grads)?;
        self.step += 1;
        self.step_losses.push(value);
        Ok((value, outputs.detach()))
    }

    fn is_classification(&self) -> bool {
        matches!(self.cfg.loss, LossKind::CrossEntropy { .. })
    }

    /// Trains one epoch; returns (mean loss, top-1 accuracy or NaN).
    ///
    /// # Errors
    /// As [`Trainer::train_step`] and the data source.
    pub fn train_epoch(&mut self, data: &mut dyn BatchSource) -> Result<(f64, f64)> {
        let n = data.num_batches();
        let bar = self.progress_bar(n);
        let (mut loss_sum, mut hits, mut count) = (0f64, 0usize, 0usize);
        let start = Instant::now();
        let epoch = self.epoch;
        let batches: Vec<Result<Batch>> = data.epoch(epoch)?.collect();
        for batch in batches {
            let batch = batch?;
            let (loss, outputs) = self.train_step(&batch)?;
            let bs = batch.inputs.dim(0)?;
            loss_sum += loss * bs as f64;
            count += bs;
            if self.is_classification() {
                hits += topk_hits(&outputs, &batch.targets, 1)?;
            }
            if let Some(b) = &bar {
                b.inc(1);
                let ips = count as f64 / start.elapsed().as_secs_f64().max(1e-9);
                let acc = if self.is_classification() {
                    format!(" acc {:.2}%", 100. * hits as f64 / count as f64)
                } else {
                    String::new()
                };
                b.set_message(format!(
                    "loss {:.4}{acc} {ips:.0} img/s",
                    loss_sum / count as f64
                ));
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        self.last_epoch_samples = count;
        let acc = if self.is_classification() && count > 0 {
            hits as f64 / count as f64
        } else {
            f64::NAN
        };
        Ok((loss_sum / count.max(1) as f64, acc))
    }

    fn progress_bar(&self, n: usize) -> Option<ProgressBar> {
        if !self.cfg.progress || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::new(n as u64);
        let style = ProgressStyle::with_template(&format!(
            "epoch {}/{} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}",
            self.epoch + 1,
            self.cfg.epochs
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Some(bar)
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

    /// Runs the model in eval mode over `data`, updating every metric with each batch.
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
        mut test: Option<&mut dyn BatchSource>,
    ) -> Result<&[EpochRecord]> {
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
        while self.epoch < last {
            let start = Instant::now();
            let (train_loss, train_acc) = self.train_epoch(train)?;
            let train_secs = start.elapsed().as_secs_f64();
            let samples = self.last_epoch_samples;
            let (test_loss, test_acc) = match test.as_deref_mut() {
                Some(t) => self.evaluate(t)?,
                None => (f64::NAN, f64::NAN),
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
            };
            if self.cfg.progress {
                println!("{}", format_record(&rec, self.cfg.epochs));
            }
            self.history.push(rec);
            if let Some(dir) = self.cfg.out_dir.clone() {
                self.save_checkpoint(&dir.join("checkpoint.safetensors"))?;
                self.write_metrics(&dir.join("metrics.jsonl"))?;
                crate::plot::write_curves(&self.history, &dir)?;
            }
        }
        Ok(&self.history)
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
            meta: BTreeMap::new(),
        };
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
        let epoch: usize = ck.meta_value("epoch", path)?;
        let step: u64 = ck.meta_value("step", path)?;
        let history: Vec<EpochRecord> = match ck.meta.get("history") {
            Some(h) => serde_json::from_str(h)
                .map_err(|e| fail(format!("metadata key \"history\" is invalid: {e}")))?,
            None => Vec::new(),
        };
        let rng = ck.rng(path)?;
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
        self.epoch = epoch;
        self.step = step;
        self.history = history;
        Ok(())
    }
}

fn nan() -> f64 {
    f64::NAN
}

/// JSON has no NaN or infinity: write them as `null`, read `null` as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// One human-readable line per epoch.
pub fn format_record(r: &EpochRecord, epochs: usize) -> String {
    let mut s = format!(
        "epoch {}/{epochs}: lr {:.3e} train loss {:.4}",
        r.epoch, r.lr, r.train_loss
    );
    if r.train_acc.is_finite() {
        s.push_str(&format!(" acc {:.2}%", 100. * r.train_acc));
    }
    if r.test_loss.is_finite() {
        s.push_str(&format!(" | test loss {:.4}", r.test_loss));
    }
    if r.test_acc.is_finite() {
        s.push_str(&format!(" acc {:.2}%", 100. * r.test_acc));
    }
    s.push_str(&format!(
        " | {:.0} img/s | {:.1}s",
        r.images_per_sec, r.seconds
    ));
    s
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn records_round_trip_with_nan_as_null() -> std::result::Result<(), serde_json::Error> {
        let r = EpochRecord {
            epoch: 3,
            lr: 0.1,
            train_loss: 0.5,
            train_acc: 0.9,
            test_loss: f64::NAN,
            test_acc: f64::INFINITY,
            seconds: 1.5,
            images_per_sec: 100.,
        };
        let json = serde_json::to_string(&r)?;
        assert!(
            json.contains("\"test_loss\":null") && json.contains("\"test_acc\":null"),
            "{json}"
        );
        let back: EpochRecord = serde_json::from_str(&json)?;
        assert_eq!((back.epoch, back.lr, back.seconds), (3, 0.1, 1.5));
        assert!(back.test_loss.is_nan() && back.test_acc.is_nan());
        // Older or partial records: missing numbers are NaN.
        let old: EpochRecord = serde_json::from_str("{\"epoch\": 2, \"lr\": 0.01}")?;
        assert_eq!(old.epoch, 2);
        assert!(old.train_loss.is_nan());
        Ok(())
    }
}
