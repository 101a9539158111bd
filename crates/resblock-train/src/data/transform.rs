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
}
