//! Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a whole batch, as timm's
//! `Mixup` does in its default batch mode: one weight `lam ~ Beta(alpha, alpha)` per
//! batch, each sample paired with the batch's mirror image (sample `i` with `n - 1 - i`);
//! with both enabled, CutMix is chosen with probability `switch_prob`. The targets become
//! class probabilities: `lam` of the sample's own (smoothed) one-hot label and `1 - lam`
//! of its partner's.
//!
//! Mixup blends whole images; CutMix pastes the partner's box of area `1 - lam` (centre
//! uniform, clipped at the borders) and recomputes `lam` from the box actually pasted.

use resblock_core::RngHandle;

use crate::error::{Error, Result};

/// Mixup/CutMix settings (`train --mixup ALPHA`, `--cutmix ALPHA`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixConfig {
    /// Mixup's Beta parameter; 0 disables mixup.
    pub mixup_alpha: f64,
    /// CutMix's Beta parameter; 0 disables CutMix.
    pub cutmix_alpha: f64,
    /// With both enabled, the probability of CutMix for a batch (timm: 0.5).
    pub switch_prob: f64,
    /// Label smoothing of the targets (the loss then takes them as they are).
    pub label_smoothing: f64,
    /// Number of classes.
    pub num_classes: usize,
}

impl MixConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// Negative or non-finite alphas, neither enabled, a probability outside [0, 1], or
    /// no classes.
    pub fn validate(&self) -> Result<()> {
        let ok = |a: f64| a.is_finite() && a >= 0.;
        if !ok(self.mixup_alpha) || !ok(self.cutmix_alpha) {
            return Err(Error::config(format!(
                "mixup and cutmix alphas must be finite and >= 0, got {} and {}",
                self.mixup_alpha, self.cutmix_alpha
            )));
        }
        if self.mixup_alpha == 0. && self.cutmix_alpha == 0. {
            return Err(Error::config(
                "mixing needs a mixup or cutmix alpha above 0",
            ));
        }
        if !(0. ..=1.).contains(&self.switch_prob) || !(0. ..1.).contains(&self.label_smoothing) {
            return Err(Error::config(format!(
                "switch probability must be in [0, 1] and label smoothing in [0, 1), got {} and {}",
                self.switch_prob, self.label_smoothing
            )));
        }
        if self.num_classes == 0 {
            return Err(Error::config("mixing needs at least one class"));
        }
        Ok(())
    }
}

/// Blends every sample with its mirror partner: `x[i] = lam x[i] + (1 - lam) x[n-1-i]`.
/// `x` holds `n` samples of `per` values each.
pub fn mixup(x: &mut [f32], per: usize, lam: f32) {
    let original = x.to_vec();
    let n = x.len() / per.max(1);
    for (i, s) in x.chunks_exact_mut(per).enumerate() {
        let partner = &original[(n - 1 - i) * per..(n - i) * per];
        for (v, p) in s.iter_mut().zip(partner) {
            *v = lam * *v + (1. - lam) * p;
        }
    }
}

/// CutMix's box for an `h` x `w` image: side `sqrt(1 - lam)` of each dimension (floored),
/// centred at (`cy`, `cx`), clipped to the image; (top, bottom, left, right), exclusive
/// ends.
pub fn cutmix_box(
    (h, w): (usize, usize),
    lam: f64,
    (cy, cx): (usize, usize),
) -> (usize, usize, usize, usize) {
    let r = (1. - lam).max(0.).sqrt();
    let (ch, cw) = ((h as f64 * r) as usize, (w as f64 * r) as usize);
    let top = cy.saturating_sub(ch / 2);
    let bottom = (cy + ch / 2).min(h);
    let left = cx.saturating_sub(cw / 2);
    let right = (cx + cw / 2).min(w);
    (top, bottom, left, right)
}

/// Pastes the mirror partner's box into every sample of `x` (`n` samples of
/// `c` x `h` x `w`); returns the area share kept from the sample itself (the corrected
/// `lam`).
pub fn cutmix(
    x: &mut [f32],
    (c, h, w): (usize, usize, usize),
    (top, bottom, left, right): (usize, usize, usize, usize),
) -> f64 {
    let per = c * h * w;
    let original = x.to_vec();
    let n = x.len() / per.max(1);
    for (i, s) in x.chunks_exact_mut(per).enumerate() {
        let partner = &original[(n - 1 - i) * per..(n - i) * per];
        for ch in 0..c {
            for y in top..bottom {
                let row = ch * h * w + y * w;
                s[row + left..row + right].copy_from_slice(&partner[row + left..row + right]);
            }
        }
    }
    1. - ((bottom - top) * (right - left)) as f64 / (h * w) as f64
}

/// The mixed targets, (n, classes) row-major: `lam` of each sample's smoothed one-hot
/// label and `1 - lam` of its mirror partner's.
pub fn mixed_targets(labels: &[u32], lam: f64, smoothing: f64, classes: usize) -> Vec<f32> {
    let off = smoothing / classes as f64;
    let on = 1. - smoothing + off;
    let n = labels.len();
    let mut t = vec![0f32; n * classes];
    for (i, row) in t.chunks_exact_mut(classes).enumerate() {
        for v in row.iter_mut() {
            *v = off as f32;
        }
        let (a, b) = (labels[i] as usize, labels[n - 1 - i] as usize);
        row[a] += (lam * (on - off)) as f32;
        row[b] += ((1. - lam) * (on - off)) as f32;
    }
    t
}

/// Mixes a batch in place (`x`: `labels.len()` samples of `c` x `h` x `w`) with draws from
/// `rng`; returns the targets, (n, classes) row-major.
///
/// # Errors
/// Invalid settings or a label out of range.
pub fn mix_batch(
    x: &mut [f32],
    labels: &[u32],
    (c, h, w): (usize, usize, usize),
    cfg: &MixConfig,
    rng: &RngHandle,
) -> Result<Vec<f32>> {
    cfg.validate()?;
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= cfg.num_classes) {
        return Err(Error::config(format!(
            "label {bad} is out of range for {} classes",
            cfg.num_classes
        )));
    }
    let use_cutmix = match (cfg.mixup_alpha > 0., cfg.cutmix_alpha > 0.) {
        (true, true) => rng.uniform() < cfg.switch_prob,
        (false, true) => true,
        _ => false,
    };
    let alpha = if use_cutmix {
        cfg.cutmix_alpha
    } else {
        cfg.mixup_alpha
    };
    let lam = rng.beta(alpha, alpha).unwrap_or(1.);
    let lam = if use_cutmix {
        let centre = (rng.below(h), rng.below(w));
        cutmix(x, (c, h, w), cutmix_box((h, w), lam, centre))
    } else {
        mixup(x, c * h * w, lam as f32);
        lam
    };
    Ok(mixed_targets(
        labels,
        lam,
        cfg.label_smoothing,
        cfg.num_classes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixup_blends_mirror_partners() {
        // Three samples of two values: 0 pairs with 2, 1 with itself.
        let mut x = vec![0., 10., 1., 1., 4., 2.];
        mixup(&mut x, 2, 0.75);
        assert_eq!(x, [1., 8., 1., 1., 3., 4.]);
    }

    #[test]
    fn cutmix_pastes_the_partners_box_and_corrects_lam() {
        // lam 0.75: sides sqrt(0.25) = 0.5 of 4 -> 2, centred at (1, 3): rows 0..2,
        // columns 2..4 (3 + 1 = 4 is the border).
        let b = cutmix_box((4, 4), 0.75, (1, 3));
        assert_eq!(b, (0, 2, 2, 4));
        // Clipped: centred at a corner, only a quarter of the box is inside.
        assert_eq!(cutmix_box((4, 4), 0.75, (0, 0)), (0, 1, 0, 1));
        let mut x: Vec<f32> = (0..2 * 16).map(|v| v as f32).collect(); // 2 samples, 1x4x4
        let lam = cutmix(&mut x, (1, 4, 4), b);
        assert_eq!(lam, 0.75);
        assert_eq!(&x[..8], [0., 1., 18., 19., 4., 5., 22., 23.]);
        assert_eq!(&x[16..24], [16., 17., 2., 3., 20., 21., 6., 7.]);
    }

    #[test]
    fn targets_mix_smoothed_one_hots() {
        // Two samples (labels 0 and 2), 4 classes, smoothing 0.2: off 0.05, on 0.85.
        let t = mixed_targets(&[0, 2], 0.75, 0.2, 4);
        let want = [0.65, 0.05, 0.25, 0.05, 0.25, 0.05, 0.65, 0.05];
        for (a, b) in t.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{t:?}");
        }
    }

    #[test]
    fn mixed_batches_are_seeded_and_targets_are_distributions() -> Result<()> {
        let cfg = MixConfig {
            mixup_alpha: 0.2,
            cutmix_alpha: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
            num_classes: 3,
        };
        let base: Vec<f32> = (0..4 * 2 * 3 * 3).map(|v| v as f32).collect();
        let run = |seed| -> Result<(Vec<f32>, Vec<f32>)> {
            let mut x = base.clone();
            let t = mix_batch(
                &mut x,
                &[0, 1, 2, 1],
                (2, 3, 3),
                &cfg,
                &RngHandle::seed_from_u64(seed),
            )?;
            Ok((x, t))
        };
        let (x1, t1) = run(3)?;
        assert_eq!((x1.clone(), t1.clone()), run(3)?);
        for row in t1.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.).abs() < 1e-5);
        }
        assert!(mix_batch(
            &mut base.clone(),
            &[0, 1, 5, 1],
            (2, 3, 3),
            &cfg,
            &RngHandle::seed_from_u64(0)
        )
        .is_err());
        let off = MixConfig {
            mixup_alpha: 0.,
            cutmix_alpha: 0.,
            ..cfg
        };
        assert!(off.validate().is_err());
        Ok(())
    }
}
