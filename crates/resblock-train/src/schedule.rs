//! Learning-rate schedules, stepped per iteration (optimizer step).
//!
//! Each schedule is a closed-form function of the step, so resuming from a checkpoint only
//! needs the step count. Formulas follow PyTorch's `lr_scheduler` classes.

use std::f64::consts::PI;

use crate::error::{Error, Result};

/// `v >= 0` and not NaN.
pub(crate) fn is_non_negative(v: f64) -> bool {
    v >= 0.
}

/// `v > 0` and not NaN.
pub(crate) fn is_positive(v: f64) -> bool {
    v > 0.
}

/// The shape of a schedule after any warmup.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// The base learning rate throughout.
    Constant,
    /// `StepLR`: multiply by `gamma` every `step_size` steps.
    Step {
        /// Steps between decays.
        step_size: u64,
        /// Decay factor.
        gamma: f64,
    },
    /// `MultiStepLR`: multiply by `gamma` at each milestone (in steps).
    MultiStep {
        /// Steps at which the rate decays.
        milestones: Vec<u64>,
        /// Decay factor.
        gamma: f64,
    },
    /// `CosineAnnealingLR` (closed form): from the base rate to `min_lr` over `total_steps`.
    Cosine {
        /// Length of the decay.
        total_steps: u64,
        /// Final rate.
        min_lr: f64,
    },
    /// `OneCycleLR` with cosine annealing: from `base / div_factor` up to the base rate
    /// (the maximum) over `pct_start` of the steps, then down to
    /// `base / div_factor / final_div_factor`.
    OneCycle {
        /// Total steps of the cycle.
        total_steps: u64,
        /// Fraction of the steps spent increasing.
        pct_start: f64,
        /// Initial rate = max / div_factor.
        div_factor: f64,
        /// Final rate = initial / final_div_factor.
        final_div_factor: f64,
    },
}

/// Linear warmup before a schedule (`LinearLR` chained with `SequentialLR`): for the first
/// `steps` steps the rate grows linearly from `start_factor * base` towards the base; the
/// schedule then starts at its own step 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warmup {
    /// Warmup length in steps.
    pub steps: u64,
    /// Fraction of the base rate at step 0.
    pub start_factor: f64,
}

/// A base learning rate, a [`Schedule`] and an optional [`Warmup`].
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    /// The base (for one-cycle: maximum) learning rate.
    pub base_lr: f64,
    /// The schedule.
    pub schedule: Schedule,
    /// Optional warmup before it.
    pub warmup: Option<Warmup>,
}

impl LrSchedule {
    /// A schedule, validated.
    ///
    /// # Errors
    /// A non-positive or non-finite rate, a zero-length schedule, factors out of range.
    pub fn new(base_lr: f64, schedule: Schedule, warmup: Option<Warmup>) -> Result<Self> {
        let bad = |m: &str| Err(Error::config(format!("learning-rate schedule: {m}")));
        if !(base_lr.is_finite() && base_lr > 0.) {
            return bad("the learning rate must be finite and > 0");
        }
        match &schedule {
            Schedule::Step { step_size, gamma } if *step_size == 0 || !is_positive(*gamma) => {
                return bad("step needs step_size > 0 and gamma > 0")
            }
            Schedule::MultiStep { gamma, .. } if !is_positive(*gamma) => {
                return bad("gamma must be > 0")
            }
            Schedule::Cosine {
                total_steps,
                min_lr,
            } if *total_steps == 0 || !is_non_negative(*min_lr) => {
                return bad("cosine needs total_steps > 0 and min_lr >= 0")
            }
            Schedule::OneCycle {
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
            } if !(*total_steps >= 2
                && is_positive(*pct_start)
                && *pct_start < 1.
                && is_positive(*div_factor)
                && is_positive(*final_div_factor)) =>
            {
                return bad(
                    "one-cycle needs total_steps >= 2, pct_start in (0, 1) and positive factors",
                )
            }
            _ => {}
        }
        if let Some(w) = warmup {
            if !(is_positive(w.start_factor) && w.start_factor <= 1.) {
                return bad("warmup start_factor must be in (0, 1]");
            }
        }
        Ok(Self {
            base_lr,
            schedule,
            warmup,
        })
    }

    /// The learning rate for optimizer step `step` (0-based).
    ///
    /// ```
    /// use resblock_train::schedule::{LrSchedule, Schedule, Warmup};
    /// let s = LrSchedule::new(0.1, Schedule::MultiStep { milestones: vec![10, 20], gamma: 0.1 }, None)?;
    /// assert_eq!(s.lr_at(9), 0.1);
    /// assert!((s.lr_at(10) - 0.01).abs() < 1e-15);
    /// let w = LrSchedule::new(1.0, Schedule::Cosine { total_steps: 100, min_lr: 0. },
    ///                         Some(Warmup { steps: 10, start_factor: 0.1 }))?;
    /// assert!((w.lr_at(0) - 0.1).abs() < 1e-12 && w.lr_at(10) == 1.0);
    /// assert!(w.lr_at(110).abs() < 1e-12);
    /// # Ok::<(), resblock_train::Error>(())
    /// ```
    pub fn lr_at(&self, step: u64) -> f64 {
        let base = self.base_lr;
        let step = match self.warmup {
            Some(w) if step < w.steps => {
                let f = w.start_factor + (1. - w.start_factor) * step as f64 / w.steps as f64;
                return base * f;
            }
            Some(w) => step - w.steps,
            None => step,
        };
        match &self.schedule {
            Schedule::Constant => base,
            Schedule::Step { step_size, gamma } => base * gamma.powi((step / step_size) as i32),
            Schedule::MultiStep { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| step >= m).count() as i32)
            }
            Schedule::Cosine {
                total_steps,
                min_lr,
            } => {
                let t = step.min(*total_steps) as f64 / *total_steps as f64;
                min_lr + (base - min_lr) * (1. + (PI * t).cos()) / 2.
            }
            Schedule::OneCycle {
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = base / div_factor;
                let min = initial / final_div_factor;
                let up_end = pct_start * *total_steps as f64 - 1.;
                let down_end = *total_steps as f64 - 1.;
                let s = step as f64;
                let cos = |start: f64, end: f64, pct: f64| {
                    end + (start - end) / 2. * (1. + (PI * pct).cos())
                };
                if s <= up_end {
                    cos(initial, base, s / up_end)
                } else {
                    cos(base, min, ((s - up_end) / (down_end - up_end)).min(1.))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of `torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)`
    /// (pct_start 0.3, div_factor 25, final_div_factor 1e4), read with `get_last_lr()` after
    /// 0, 29, 30, 64 and 99 `step()` calls.
    #[test]
    fn one_cycle_matches_pytorch() {
        let s = LrSchedule::new(
            0.1,
            Schedule::OneCycle {
                total_steps: 100,
                pct_start: 0.3,
                div_factor: 25.,
                final_div_factor: 1e4,
            },
            None,
        )
        .expect("valid");
        for (step, want) in [
            (0, 0.0040000000000000036),
            (29, 0.1),
            (30, 0.09994965352845243),
            (64, 0.0500002),
            (99, 4e-07),
        ] {
            assert!(
                (s.lr_at(step) - want).abs() < 1e-12,
                "step {step}: {} vs {want}",
                s.lr_at(step)
            );
        }
    }

    #[test]
    fn step_schedule_and_validation() {
        let s = LrSchedule::new(
            1.,
            Schedule::Step {
                step_size: 3,
                gamma: 0.5,
            },
            None,
        )
        .expect("valid");
        assert_eq!(
            [s.lr_at(0), s.lr_at(2), s.lr_at(3), s.lr_at(7)],
            [1., 1., 0.5, 0.25]
        );
        assert!(LrSchedule::new(0., Schedule::Constant, None).is_err());
        assert!(LrSchedule::new(f64::NAN, Schedule::Constant, None).is_err());
        assert!(LrSchedule::new(
            1.,
            Schedule::Cosine {
                total_steps: 0,
                min_lr: 0.
            },
            None
        )
        .is_err());
    }
}
