//! The training recipe: which optimizer and schedule a configuration means, how training
//! images are augmented, and the dataset statistics inputs are normalised with. `train`
//! uses it; a program of your own gets the same run from the same settings.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Transform};
use crate::error::{Error, Result};
use crate::optim::{Adam, AdamConfig, LarsConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
use crate::schedule::{LrSchedule, Schedule, Warmup};

/// Implements `FromStr`/`Display` over the lowercase names of a fieldless enum.
macro_rules! named {
    ($ty:ident, $what:literal, $($v:ident = $s:literal),+) => {
        impl $ty {
            /// Every accepted name, in order.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
        }
        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s.to_ascii_lowercase().as_str() {
                    $($s => Ok(Self::$v),)+
                    _ => Err(Error::config(format!(
                        "unknown {} {s:?}: expected one of {}", $what, Self::NAMES.join(", ")
                    ))),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$v => $s,)+ })
            }
        }
    };
}

/// The optimizers a recipe names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with (Nesterov) momentum and coupled weight decay.
    Sgd,
    /// Adam with coupled (L2) weight decay.
    Adam,
    /// AdamW (decoupled weight decay).
    Adamw,
    /// LARS: SGD (momentum, Nesterov) with layer-wise trust ratios for large batches
    /// (timm's `Lars`, trust coefficient 0.001).
    Lars,
}
named!(
    OptimizerKind,
    "optimizer",
    Sgd = "sgd",
    Adam = "adam",
    Adamw = "adamw",
    Lars = "lars"
);

/// The learning-rate schedules a recipe names (stepped per iteration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The base rate throughout.
    Constant,
    /// x0.1 at each third of the run.
    Step,
    /// x0.1 at 1/2 and 3/4 of the run.
    Multistep,
    /// Cosine to zero.
    Cosine,
    /// One-cycle (30 % up, then cosine down; PyTorch's `OneCycleLR` defaults).
    Onecycle,
}
named!(
    ScheduleKind,
    "schedule",
    Constant = "constant",
    Step = "step",
    Multistep = "multistep",
    Cosine = "cosine",
    Onecycle = "onecycle"
);

/// An optimizer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Learning rate (the schedule's base).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum (SGD, when `momentum > 0`).
    pub nesterov: bool,
    /// Weight decay (the parameter groups say which tensors get it).
    pub weight_decay: f64,
}

impl OptimizerConfig {
    /// The optimizer over `groups`.
    ///
    /// # Errors
    /// Invalid hyper-parameters.
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        for (name, v) in [
            ("momentum", self.momentum),
            ("weight decay", self.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.) {
                return Err(Error::config(format!(
                    "{name} must be a finite number >= 0, got {v}"
                )));
            }
        }
        let sgd = SgdConfig {
            lr: self.lr,
            momentum: self.momentum,
            dampening: 0.,
            nesterov: self.nesterov && self.momentum > 0.,
        };
        Ok(match self.kind {
            OptimizerKind::Sgd => Box::new(Sgd::new(groups, sgd)?),
            OptimizerKind::Lars => Box::new(Sgd::lars(groups, sgd, LarsConfig::default())?),
            OptimizerKind::Adam | OptimizerKind::Adamw => Box::new(Adam::with_groups(
                groups,
                AdamConfig {
                    lr: self.lr,
                    weight_decay: self.weight_decay,
                    decoupled: self.kind == OptimizerKind::Adamw,
                    ..Default::default()
                },
            )?),
        })
    }
}

/// A learning-rate schedule's settings, in epochs (turned into steps by [`Self::build`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// Which schedule.
    pub kind: ScheduleKind,
    /// The base (for one-cycle: the maximum) learning rate.
    pub lr: f64,
    /// Linear warmup from a tenth of the rate, in epochs, before the schedule.
    pub warmup_epochs: f64,
}

impl ScheduleConfig {
    /// The schedule of a run of `epochs` epochs of `steps_per_epoch` steps.
    ///
    /// # Errors
    /// A negative or non-finite warmup, or an invalid rate.
    pub fn build(&self, steps_per_epoch: u64, epochs: u64) -> Result<LrSchedule> {
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.) {
            return Err(Error::config(format!(
                "warmup epochs must be a finite number >= 0, got {}",
                self.warmup_epochs
            )));
        }
        let total = steps_per_epoch * epochs;
        let warmup_steps = (self.warmup_epochs * steps_per_epoch as f64).round() as u64;
        let after = total.saturating_sub(warmup_steps).max(2);
        let schedule = match self.kind {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::Step => Schedule::Step {
                step_size: (after / 3).max(1),
                gamma: 0.1,
            },
            ScheduleKind::Multistep => Schedule::MultiStep {
                milestones: vec![after / 2, after * 3 / 4],
                gamma: 0.1,
            },
            ScheduleKind::Cosine => Schedule::Cosine {
                total_steps: after,
                min_lr: 0.,
            },
            ScheduleKind::Onecycle => Schedule::OneCycle {
                total_steps: after,
                pct_start: 0.3,
                div_factor: 25.,
                final_div_factor: 1e4,
            },
        };
        let warmup = (warmup_steps > 0).then_some(Warmup {
            steps: warmup_steps,
            start_factor: 0.1,
        });
        LrSchedule::new(self.lr, schedule, warmup)
    }
}

/// How training images are augmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AugmentPolicy {
    /// None.
    None,
    /// Digits: random shifts of up to 2 pixels (zero-padded crop), no flips.
    Digits,
    /// Natural images (CIFAR, folders): random shifts of up to an eighth of the side and
    /// left-right flips (the ResNet paper's CIFAR recipe).
    Natural,
}

impl AugmentPolicy {
    /// The per-sample transforms of a training sample of size `h` x `w`, in order:
    /// `resize` first (given by the caller), then the augmentation, then `normalize`.
    ///
    /// # Errors
    /// Augmenting non-square images (the crop is square).
    pub fn train_transforms(
        self,
        (h, w): (usize, usize),
        resize: &[Transform],
        normalize: &Transform,
    ) -> Result<Vec<Transform>> {
        let mut t = resize.to_vec();
        if self != Self::None && h != w {
            return Err(Error::config(format!(
                "augmentation crops squares: {h}x{w} images need --image-size or --no-augment"
            )));
        }
        match self {
            Self::None => {}
            Self::Digits => t.push(Transform::RandomCrop {
                size: h,
                padding: 2,
            }),
            Self::Natural => {
                t.push(Transform::RandomCrop {
                    size: h,
                    padding: (h / 8).max(1),
                });
                t.push(Transform::RandomHorizontalFlip { p: 0.5 });
            }
        }
        t.push(normalize.clone());
        Ok(t)
    }
}

/// Augmentations added on top of an [`AugmentPolicy`] (`train --rrc`, `--random-erasing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AugmentExtras {
    /// torchvision's `RandomResizedCrop` with this area range (ratio 3/4..4/3) in place of
    /// the policy's shifts.
    pub rrc_scale: Option<(f64, f64)>,
    /// torchvision's `RandomErasing` with this probability (area 0.02..1/3, ratio
    /// 0.3..3.3, value 0 = the mean), after normalisation.
    pub random_erasing: Option<f64>,
    /// RandAugment (N operations at magnitude M of 30), after the crop and flips.
    pub randaugment: Option<(usize, usize)>,
    /// TrivialAugment Wide, after the crop and flips.
    pub trivial_augment: bool,
}

impl AugmentExtras {
    /// A policy's transforms (`resize`, augmentation, `Normalize` last) with the extras:
    /// the random resized crop to `size` x `size` replaces the shift crop (or comes just
    /// before `Normalize`), erasing comes after `Normalize`.
    ///
    /// # Errors
    /// An area range outside (0, 1] or a probability outside [0, 1].
    pub fn apply(&self, mut t: Vec<Transform>, size: usize) -> Result<Vec<Transform>> {
        if let Some((lo, hi)) = self.rrc_scale {
            if !(lo > 0. && lo <= hi && hi <= 1.) {
                return Err(Error::config(format!(
                    "the random resized crop's area range must lie in (0, 1], got {lo}..{hi}"
                )));
            }
            let rrc = Transform::RandomResizedCrop {
                size,
                scale: (lo, hi),
                ratio: (3. / 4., 4. / 3.),
            };
            match t
                .iter()
                .position(|x| matches!(x, Transform::RandomCrop { .. }))
            {
                Some(i) => t[i] = rrc,
                None => {
                    let at = t
                        .iter()
                        .position(|x| matches!(x, Transform::Normalize { .. }))
                        .unwrap_or(t.len());
                    t.insert(at, rrc);
                }
            }
        }
        let policy = match (self.randaugment, self.trivial_augment) {
            (Some(_), true) => {
                return Err(Error::config(
                    "RandAugment and TrivialAugment are alternatives: choose one",
                ))
            }
            (Some((n, m)), false) => {
                if m > 30 {
                    return Err(Error::config(format!(
                        "the RandAugment magnitude must be 0..=30, got {m}"
                    )));
                }
                Some(Transform::RandAugment { n, m })
            }
            (None, true) => Some(Transform::TrivialAugmentWide),
            (None, false) => None,
        };
        if let Some(op) = policy {
            let at = t
                .iter()
                .position(|x| matches!(x, Transform::Normalize { .. }))
                .unwrap_or(t.len());
            t.insert(at, op);
        }
        if let Some(p) = self.random_erasing {
            if !(0. ..=1.).contains(&p) {
                return Err(Error::config(format!(
                    "the random-erasing probability must lie in [0, 1], got {p}"
                )));
            }
            t.push(Transform::RandomErasing {
                p,
                scale: (0.02, 1. / 3.),
                ratio: (0.3, 3.3),
                value: 0.,
            });
        }
        Ok(t)
    }
}

/// Per-channel mean and standard deviation of a dataset's pixels scaled to [0, 1] (the
/// normalisation `train` uses and records in the model file).
///
/// Images are read in parallel, one at a time per thread (a streamed folder is decoded once
/// and never held whole); each image's sums are taken in f64 and the images' sums are added
/// in index order, so the result does not depend on the thread count.
///
/// # Errors
/// A sample that cannot be read, naming it.
pub fn dataset_stats(ds: &dyn Dataset) -> Result<(Vec<f32>, Vec<f32>)> {
    let (c, h, w) = ds.shape();
    let per = h * w;
    let sums: Vec<Vec<(f64, f64)>> = (0..ds.len())
        .into_par_iter()
        .map(|i| {
            let (px, _) = ds.pixels(i)?;
            Ok(px
                .chunks_exact(per.max(1))
                .take(c)
                .map(|plane| {
                    plane.iter().fold((0f64, 0f64), |(s, q), &p| {
                        let v = f64::from(p) / 255.;
                        (s + v, q + v * v)
                    })
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    let mut sum = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for img in &sums {
        for (ch, (s, q)) in img.iter().enumerate() {
            sum[ch] += s;
            sq[ch] += q;
        }
    }
    let n = (ds.len() * per).max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(q, m)| ((q / n - m * m).max(1e-12)).sqrt() as f32)
        .collect();
    Ok((mean.into_iter().map(|m| m as f32).collect(), std))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageDataset;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() -> Result<()> {
        for n in OptimizerKind::NAMES {
            assert_eq!(n.parse::<OptimizerKind>()?.to_string(), *n);
        }
        for n in ScheduleKind::NAMES {
            assert_eq!(n.parse::<ScheduleKind>()?.to_string(), *n);
        }
        let e = "rmsprop".parse::<OptimizerKind>().expect_err("unknown");
        assert!(e.to_string().contains("sgd, adam, adamw"), "{e}");
        Ok(())
    }

    #[test]
    fn stats_are_the_pixels_mean_and_std() -> Result<()> {
        // Two 1x1x2 RGB images: channel 0 holds 0 and 255 twice, channel 1 all 51.
        let ds = ImageDataset {
            pixels: vec![0, 255, 51, 51, 0, 0, 0, 255, 51, 51, 0, 0],
            labels: vec![0, 0],
            channels: 3,
            height: 1,
            width: 2,
            num_classes: 1,
            class_names: vec![],
            sources: vec![],
        };
        let (mean, std) = dataset_stats(&ds)?;
        assert!((mean[0] - 0.5).abs() < 1e-7 && (std[0] - 0.5).abs() < 1e-7);
        assert!((mean[1] - 0.2).abs() < 1e-7 && std[1] < 1e-5);
        assert!(mean[2] == 0. && std[2] < 1e-5);
        Ok(())
    }

    #[test]
    fn schedule_spans_the_run_after_warmup() -> Result<()> {
        let s = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            lr: 0.1,
            warmup_epochs: 1.,
        }
        .build(10, 5)?;
        assert!(
            (s.lr_at(0) - 0.01).abs() < 1e-12,
            "warmup starts at a tenth"
        );
        assert!((s.lr_at(10) - 0.1).abs() < 1e-12, "peak after one epoch");
        assert!(s.lr_at(49) < 1e-3, "cosine ends near zero");
        Ok(())
    }

    #[test]
    fn extras_replace_the_shift_crop_and_erase_after_normalising() -> Result<()> {
        let norm = Transform::Normalize {
            mean: vec![0.5],
            std: vec![0.25],
        };
        let base = AugmentPolicy::Natural.train_transforms((8, 8), &[], &norm)?;
        let extras = AugmentExtras {
            rrc_scale: Some((0.25, 1.)),
            random_erasing: Some(0.5),
            randaugment: Some((2, 9)),
            trivial_augment: false,
        };
        let t = extras.apply(base, 8)?;
        assert!(matches!(
            t[0],
            Transform::RandomResizedCrop {
                size: 8,
                scale: (0.25, 1.),
                ..
            }
        ));
        assert!(matches!(t[1], Transform::RandomHorizontalFlip { .. }));
        assert_eq!(t[2], Transform::RandAugment { n: 2, m: 9 });
        assert_eq!(t[3], norm);
        assert!(matches!(t[4], Transform::RandomErasing { p: 0.5, .. }));
        // No policy: the crop goes just before Normalize.
        let none = AugmentPolicy::None.train_transforms((8, 8), &[], &norm)?;
        let t = extras.apply(none, 8)?;
        assert!(matches!(t[0], Transform::RandomResizedCrop { .. }));
        assert_eq!(t[1], Transform::RandAugment { n: 2, m: 9 });
        assert_eq!(t[2], norm);
        for bad in [
            AugmentExtras {
                rrc_scale: Some((0., 1.)),
                ..Default::default()
            },
            AugmentExtras {
                rrc_scale: Some((0.5, 1.5)),
                ..Default::default()
            },
            AugmentExtras {
                random_erasing: Some(1.5),
                ..Default::default()
            },
            AugmentExtras {
                randaugment: Some((2, 31)),
                ..Default::default()
            },
            AugmentExtras {
                randaugment: Some((2, 9)),
                trivial_augment: true,
                ..Default::default()
            },
        ] {
            assert!(bad.apply(vec![norm.clone()], 8).is_err(), "{bad:?}");
        }
        Ok(())
    }
}
