//! Per-sample transforms on CHW `f32` images, deterministic for a given random stream.

use resblock_core::RngHandle;

use crate::error::{Error, Result};

/// One step of an augmentation / preprocessing pipeline (applied in order).
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// `(x - mean[c]) / std[c]` per channel (one value broadcasts to every channel).
    Normalize {
        /// Per-channel means.
        mean: Vec<f32>,
        /// Per-channel standard deviations.
        std: Vec<f32>,
    },
    /// torchvision's `RandomCrop(size, padding)`: zero-pad every side by `padding`, then crop
    /// `size` x `size` at a uniformly random offset (random shifts of up to `padding` pixels
    /// when `size` is the image size).
    RandomCrop {
        /// Output height and width.
        size: usize,
        /// Zero padding on each side.
        padding: usize,
    },
    /// Flip left-right with probability `p`.
    RandomHorizontalFlip {
        /// Probability.
        p: f64,
    },
    /// torchvision's `RandomResizedCrop(size, scale, ratio)` (see [`super::rrc`]): a box of
    /// a random `scale` fraction of the area and log-uniform aspect `ratio`, resized
    /// (bilinear) to `size` x `size`.
    RandomResizedCrop {
        /// Output height and width.
        size: usize,
        /// Range of the box's area as a fraction of the image's (torchvision: 0.08..1).
        scale: (f64, f64),
        /// Range of the box's width / height (torchvision: 3/4..4/3).
        ratio: (f64, f64),
    },
    /// torchvision's `RandomErasing(p, scale, ratio, value)` (see [`super::erasing`]); put
    /// it after `Normalize`, so that `value` 0 is the mean.
    RandomErasing {
        /// Probability of erasing a box.
        p: f64,
        /// Range of the box's area as a fraction of the image's (torchvision: 0.02..1/3).
        scale: (f64, f64),
        /// Range of the box's aspect ratio (torchvision: 0.3..3.3).
        ratio: (f64, f64),
        /// The value written.
        value: f32,
    },
    /// RandAugment: `n` operations at magnitude bin `m` (0..=30), see
    /// [`super::autoaugment`]; on values in [0, 1], so before `Normalize`.
    RandAugment {
        /// Operations per image.
        n: usize,
        /// Magnitude bin, 0..=30.
        m: usize,
    },
    /// TrivialAugment Wide: one operation at a random magnitude, see
    /// [`super::autoaugment`]; before `Normalize`.
    TrivialAugmentWide,
    /// Bilinear resize to `height` x `width`: PyTorch's
    /// `F.interpolate(x, (height, width), mode="bilinear", align_corners=False)` (no
    /// antialiasing, so prefer it for modest scale changes).
    Resize {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// Source index and weight of the upper neighbour for output index `i` when resizing
/// `inp` samples to `out` (half-pixel centres, clamped at the low edge, as PyTorch).
fn source(i: usize, inp: usize, out: usize) -> (usize, usize, f32) {
    let scale = inp as f32 / out as f32;
    let src = (scale * (i as f32 + 0.5) - 0.5).max(0.);
    let i0 = (src as usize).min(inp - 1);
    let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
    (i0, i1, src - i0 as f32)
}

/// Whether `(lo, hi)` is a finite range of positive numbers with `lo <= hi`.
fn valid_range((lo, hi): (f64, f64)) -> bool {
    lo.is_finite() && hi.is_finite() && lo > 0. && lo <= hi
}

fn resize(x: &[f32], c: usize, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
    let rows: Vec<_> = (0..oh).map(|y| source(y, h, oh)).collect();
    let cols: Vec<_> = (0..ow).map(|x| source(x, w, ow)).collect();
    let mut out = Vec::with_capacity(c * oh * ow);
    for plane in x.chunks_exact(h * w).take(c) {
        for &(y0, y1, ly) in &rows {
            for &(x0, x1, lx) in &cols {
                let top = plane[y0 * w + x0] * (1. - lx) + plane[y0 * w + x1] * lx;
                let bottom = plane[y1 * w + x0] * (1. - lx) + plane[y1 * w + x1] * lx;
                out.push(top * (1. - ly) + bottom * ly);
            }
        }
    }
    out
}

impl Transform {
    /// Applies the transform to a (c, h, w) image; returns the new (h, w).
    ///
    /// # Errors
    /// A crop larger than the padded image, a normalisation with the wrong channel count, or
    /// a resize to or from an empty image.
    pub fn apply(
        &self,
        x: &mut Vec<f32>,
        c: usize,
        h: usize,
        w: usize,
        rng: &RngHandle,
    ) -> Result<(usize, usize)> {
        match self {
            Self::Normalize { mean, std } => {
                let pick = |v: &[f32], ch: usize| -> Result<f32> {
                    match v.len() {
                        1 => Ok(v[0]),
                        n if n == c => Ok(v[ch]),
                        n => Err(Error::config(format!(
                            "normalize has {n} values for {c} channels"
                        ))),
                    }
                };
                for ch in 0..c {
                    let (m, s) = (pick(mean, ch)?, pick(std, ch)?);
                    for v in &mut x[ch * h * w..(ch + 1) * h * w] {
                        *v = (*v - m) / s;
                    }
                }
                Ok((h, w))
            }
            Self::RandomCrop { size, padding } => {
                let (ph, pw) = (h + 2 * padding, w + 2 * padding);
                if *size > ph || *size > pw {
                    return Err(Error::config(format!(
                        "random crop {size} exceeds the padded image {ph}x{pw}"
                    )));
                }
                let top = rng.below(ph - size + 1);
                let left = rng.below(pw - size + 1);
                let mut out = vec![0f32; c * size * size];
                for ch in 0..c {
                    for y in 0..*size {
                        let sy = (top + y) as isize - *padding as isize;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        for xx in 0..*size {
                            let sx = (left + xx) as isize - *padding as isize;
                            if sx >= 0 && sx < w as isize {
                                out[ch * size * size + y * size + xx] =
                                    x[ch * h * w + sy as usize * w + sx as usize];
                            }
                        }
                    }
                }
                *x = out;
                Ok((*size, *size))
            }
            Self::Resize { height, width } => {
                if *height == 0 || *width == 0 || h == 0 || w == 0 {
                    return Err(Error::config(format!(
                        "cannot resize a {h}x{w} image to {height}x{width}"
                    )));
                }
                if (*height, *width) != (h, w) {
                    *x = resize(x, c, (h, w), (*height, *width));
                }
                Ok((*height, *width))
            }
            Self::RandomResizedCrop { size, scale, ratio } => {
                if *size == 0 || h == 0 || w == 0 || !valid_range(*scale) || !valid_range(*ratio) {
                    return Err(Error::config(format!(
                        "random resized crop: size {size} of a {h}x{w} image with scale {scale:?} and ratio {ratio:?} (size, sides and ranges must be positive)"
                    )));
                }
                let b = super::rrc::rrc_box((h, w), *scale, *ratio, || rng.uniform());
                let cropped = super::rrc::crop(x, c, (h, w), b);
                *x = resize(&cropped, c, (b.2, b.3), (*size, *size));
                Ok((*size, *size))
            }
            Self::RandomErasing {
                p,
                scale,
                ratio,
                value,
            } => {
                if !valid_range(*scale) || !valid_range(*ratio) {
                    return Err(Error::config(format!(
                        "random erasing: scale {scale:?} and ratio {ratio:?} must be positive ranges"
                    )));
                }
                if rng.uniform() < *p {
                    if let Some(b) =
                        super::erasing::erase_box((h, w), *scale, *ratio, || rng.uniform())
                    {
                        super::erasing::erase(x, (h, w), b, *value);
                    }
                }
                Ok((h, w))
            }
            Self::RandAugment { n, m } => {
                if *m >= super::autoaugment::BINS {
                    return Err(Error::config(format!(
                        "RandAugment magnitude {m} is above {}",
                        super::autoaugment::BINS - 1
                    )));
                }
                for _ in 0..*n {
                    super::autoaugment::random_op(
                        x,
                        c,
                        (h, w),
                        super::autoaugment::Table::RandAugment,
                        Some(*m),
                        rng,
                    );
                }
                Ok((h, w))
            }
            Self::TrivialAugmentWide => {
                super::autoaugment::random_op(
                    x,
                    c,
                    (h, w),
                    super::autoaugment::Table::Wide,
                    None,
                    rng,
                );
                Ok((h, w))
            }
            Self::RandomHorizontalFlip { p } => {
                if rng.uniform() < *p {
                    for row in x.chunks_exact_mut(w) {
                        row.reverse();
                    }
                }
                Ok((h, w))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_shifts_with_zero_fill_and_flip_reverses_rows() -> Result<()> {
        let img: Vec<f32> = (0..9).map(|v| v as f32).collect(); // 1x3x3
        let rng = RngHandle::seed_from_u64(0);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut x = img.clone();
            let hw = Transform::RandomCrop {
                size: 3,
                padding: 1,
            }
            .apply(&mut x, 1, 3, 3, &rng)?;
            assert_eq!(hw, (3, 3));
            // Every crop is the image shifted by at most one pixel, zeros shifted in.
            assert!(x.iter().all(|v| *v == 0. || img.contains(v)));
            seen.insert(x.iter().map(|v| *v as i32).collect::<Vec<_>>());
        }
        assert_eq!(seen.len(), 9, "all 9 shifts occur");
        let mut x = img.clone();
        Transform::RandomHorizontalFlip { p: 1. }.apply(&mut x, 1, 3, 3, &rng)?;
        assert_eq!(x, [2., 1., 0., 5., 4., 3., 8., 7., 6.]);
        let mut x = img.clone();
        Transform::Normalize {
            mean: vec![4.],
            std: vec![2.],
        }
        .apply(&mut x, 1, 3, 3, &rng)?;
        assert_eq!(x[0], -2.);
        Ok(())
    }

    #[test]
    fn resized_crop_of_the_whole_image_is_the_image_and_erasing_zeroes_a_box() -> Result<()> {
        let rng = RngHandle::seed_from_u64(1);
        let img: Vec<f32> = (0..2 * 4 * 4).map(|v| v as f32).collect(); // 2x4x4
                                                                        // scale (1, 1) and ratio (1, 1): the box is the whole image, resized to itself.
        let mut x = img.clone();
        let rrc = Transform::RandomResizedCrop {
            size: 4,
            scale: (1., 1.),
            ratio: (1., 1.),
        };
        assert_eq!(rrc.apply(&mut x, 2, 4, 4, &rng)?, (4, 4));
        assert_eq!(x, img);
        // Any box, resized to 8x8: values stay within the image's range, each channel
        // within its own.
        let mut x = img.clone();
        let rrc = Transform::RandomResizedCrop {
            size: 8,
            scale: (0.08, 1.),
            ratio: (0.75, 4. / 3.),
        };
        assert_eq!(rrc.apply(&mut x, 2, 4, 4, &rng)?, (8, 8));
        assert!(x[..64].iter().all(|v| (0. ..=15.).contains(v)));
        assert!(x[64..].iter().all(|v| (16. ..=31.).contains(v)));
        // Erasing with p = 1 zeroes some box of both channels in the same place, p = 0 none.
        let erasing = |p| Transform::RandomErasing {
            p,
            scale: (0.1, 0.3),
            ratio: (0.5, 2.),
            value: -1.,
        };
        let mut x = vec![1f32; 2 * 8 * 8];
        erasing(1.).apply(&mut x, 2, 8, 8, &rng)?;
        let erased: Vec<usize> = (0..64).filter(|&i| x[i] == -1.).collect();
        assert!(!erased.is_empty());
        assert!(erased.iter().all(|&i| x[64 + i] == -1.));
        let mut y = vec![1f32; 2 * 8 * 8];
        erasing(0.).apply(&mut y, 2, 8, 8, &rng)?;
        assert!(y.iter().all(|v| *v == 1.));
        assert!(Transform::RandomResizedCrop {
            size: 4,
            scale: (0., 1.),
            ratio: (1., 1.)
        }
        .apply(&mut vec![0.; 16], 1, 4, 4, &rng)
        .is_err());
        Ok(())
    }
}
