//! The numbers a training run records: one [`EpochRecord`] per epoch (`metrics.jsonl`, a
//! checkpoint's `history`), and the [`Progress`] events a [`crate::Trainer`] reports while it
//! runs.

use serde::{Deserialize, Serialize};

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
    /// Validation loss (absent without a validation set).
    #[serde(with = "nan_as_null", default = "nan", skip_serializing_if = "is_nan")]
    pub val_loss: f64,
    /// Validation top-1 accuracy (absent without a validation set).
    #[serde(with = "nan_as_null", default = "nan", skip_serializing_if = "is_nan")]
    pub val_acc: f64,
    /// Test loss of the weights' moving average (absent without `--ema`).
    #[serde(with = "nan_as_null", default = "nan", skip_serializing_if = "is_nan")]
    pub ema_test_loss: f64,
    /// Test top-1 accuracy of the weights' moving average (absent without `--ema`).
    #[serde(with = "nan_as_null", default = "nan", skip_serializing_if = "is_nan")]
    pub ema_test_acc: f64,
}

fn is_nan(v: &f64) -> bool {
    v.is_nan()
}

/// What a [`crate::Trainer`] reports while it runs, to the callback given to
/// [`crate::Trainer::on_progress`] (a program renders it: a bar, log lines, a dashboard).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress<'a> {
    /// An optimizer step finished.
    Step {
        /// 1-based epoch.
        epoch: usize,
        /// Epochs the run spans.
        epochs: usize,
        /// Steps done in this epoch.
        step: usize,
        /// Steps in this epoch.
        steps: usize,
        /// Mean training loss of the epoch so far.
        loss: f64,
        /// Training top-1 accuracy of the epoch so far (NaN for regression).
        acc: f64,
        /// Training throughput of the epoch so far (samples per second).
        images_per_sec: f64,
    },
    /// An epoch finished: trained, evaluated, and (with an output folder) checkpointed.
    Epoch {
        /// Its numbers.
        record: &'a EpochRecord,
        /// Epochs the run spans.
        epochs: usize,
    },
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
    if r.val_acc.is_finite() {
        s.push_str(&format!(" | val acc {:.2}%", 100. * r.val_acc));
    }
    if r.test_loss.is_finite() {
        s.push_str(&format!(" | test loss {:.4}", r.test_loss));
    }
    if r.test_acc.is_finite() {
        s.push_str(&format!(" acc {:.2}%", 100. * r.test_acc));
    }
    if r.ema_test_acc.is_finite() {
        s.push_str(&format!(" (EMA {:.2}%)", 100. * r.ema_test_acc));
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
            val_loss: f64::NAN,
            val_acc: f64::NAN,
            ema_test_loss: f64::NAN,
            ema_test_acc: 0.5,
        };
        let json = serde_json::to_string(&r)?;
        // Without a moving average the EMA fields are left out, with one they are there.
        assert!(!json.contains("ema_test_loss") && json.contains("\"ema_test_acc\":0.5"));
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
