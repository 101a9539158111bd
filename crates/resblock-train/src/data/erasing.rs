//! torchvision's `RandomErasing` (Zhong et al. 2017): with probability `p`, a box of random
//! area (a `scale` fraction of the image) and aspect ratio (log-uniform in `ratio`) is set
//! to `value` in every channel. It runs after normalisation, so 0 is the dataset mean.
//!
//! The box is drawn as torchvision draws it: up to ten tries of (area, log-ratio); the first
//! box strictly smaller than the image wins, at a uniform position; after ten misses
//! nothing is erased.

use super::rrc::CropBox;

fn int_below(u: f64, n: usize) -> usize {
    ((u * n as f64) as usize).min(n.saturating_sub(1))
}

/// The box to erase in an `h` x `w` image, or `None`; `draw` returns uniforms in [0, 1).
pub fn erase_box(
    (h, w): (usize, usize),
    (s0, s1): (f64, f64),
    (r0, r1): (f64, f64),
    mut draw: impl FnMut() -> f64,
) -> Option<CropBox> {
    let area = (h * w) as f64;
    let (l0, l1) = (r0.ln(), r1.ln());
    for _ in 0..10 {
        let target = area * (s0 + (s1 - s0) * draw());
        let aspect = (l0 + (l1 - l0) * draw()).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if eh < h && ew < w {
            let top = int_below(draw(), h - eh + 1);
            let left = int_below(draw(), w - ew + 1);
            return Some((top, left, eh, ew));
        }
    }
    None
}

/// Sets box `b` of a (c, h, w) image to `value`.
pub fn erase(x: &mut [f32], (h, w): (usize, usize), (top, left, eh, ew): CropBox, value: f32) {
    for plane in x.chunks_exact_mut(h * w) {
        for row in plane.chunks_exact_mut(w).skip(top).take(eh) {
            row[left..left + ew].fill(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_and_fill_follow_torchvision() {
        // 8x8, scale (0.02, 0.33), ratio (0.3, 3.3); area draw 1 -> 21.12 px, log-ratio
        // draw 0.5 -> aspect sqrt(0.99) -> 5x5 (4.58 and 4.61 round to 5); top 0.5 of 4 -> 2, left 0 -> 0.
        let mut d = vec![1., 0.5, 0.5, 0.].into_iter();
        let b = erase_box((8, 8), (0.02, 0.33), (0.3, 3.3), || d.next().expect("draw"));
        assert_eq!(b, Some((2, 0, 5, 5)));
        // A box as large as the image never fits: ten misses, nothing erased.
        let b = erase_box((4, 4), (1., 1.), (1., 1.), || 0.5);
        assert_eq!(b, None);
        let mut x = vec![1f32; 2 * 3 * 3];
        erase(&mut x, (3, 3), (1, 1, 2, 1), 0.);
        assert_eq!(
            x,
            [1., 1., 1., 1., 0., 1., 1., 0., 1., 1., 1., 1., 1., 0., 1., 1., 0., 1.]
        );
    }
}
