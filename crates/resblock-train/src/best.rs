//! Keep-best and early stopping on a validation set (`train --keep-best`,
//! `--early-stop PATIENCE`): the epoch with the highest validation accuracy (lowest loss
//! for regression) so far, and how many epochs have passed without beating it.
//!
//! Selection never looks at the test set: the trainer feeds this only validation scores.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The best epoch so far and the patience left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeepBest {
    /// Write the best weights (`best.safetensors` in the run directory).
    pub save: bool,
    /// Stop after this many epochs in a row without a better score.
    pub patience: Option<usize>,
    /// The best epoch (1-based) and its score, once an epoch was scored.
    pub best: Option<(usize, f64)>,
    /// Epochs since the best.
    pub since_best: usize,
}

/// What one epoch's score means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// It beat every earlier epoch (the first scored epoch always does).
    pub improved: bool,
    /// The patience ran out: training should stop after this epoch.
    pub stop: bool,
}

impl KeepBest {
    /// Tracking that saves the best weights when `save` and stops after `patience`
    /// epochs without improvement.
    ///
    /// # Errors
    /// A patience of 0.
    pub fn new(save: bool, patience: Option<usize>) -> Result<Self> {
        if patience == Some(0) {
            return Err(Error::config(
                "the early-stopping patience must be at least 1",
            ));
        }
        Ok(Self {
            save,
            patience,
            best: None,
            since_best: 0,
        })
    }

    /// Records `epoch`'s validation `score` (higher is better; a NaN never improves).
    pub fn observe(&mut self, epoch: usize, score: f64) -> Verdict {
        let improved = score.is_finite() && self.best.is_none_or(|(_, b)| score > b);
        if improved {
            self.best = Some((epoch, score));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        Verdict {
            improved,
            stop: self.patience.is_some_and(|p| self.since_best >= p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_epoch_and_patience() -> Result<()> {
        let mut k = KeepBest::new(true, Some(2))?;
        let v: Vec<Verdict> = [0.5, 0.7, 0.7, 0.6, 0.9, f64::NAN, 0.8]
            .iter()
            .enumerate()
            .map(|(i, &s)| k.observe(i + 1, s))
            .collect();
        let improved: Vec<bool> = v.iter().map(|v| v.improved).collect();
        let stop: Vec<bool> = v.iter().map(|v| v.stop).collect();
        assert_eq!(improved, [true, true, false, false, true, false, false]);
        // A tie does not improve; two epochs without improvement stop the run.
        assert_eq!(stop, [false, false, false, true, false, false, true]);
        assert_eq!(k.best, Some((5, 0.9)));
        assert!(KeepBest::new(false, Some(0)).is_err());
        let mut never = KeepBest::new(false, None)?;
        assert!(!(0..100).any(|e| never.observe(e, 0.1).stop));
        Ok(())
    }
}
