//! torchvision's `RandomResizedCrop`: a random box of random area (a `scale` fraction of
//! the image) and aspect ratio (log-uniform in `ratio`), resized to `size` x `size`.
//!
//! The box is drawn as torchvision draws it: up to ten tries of (area, log-ratio), the
//! first box that fits wins, at a uniform position; after ten misses, the whole image
//! clamped to the ratio range, centred. The draws come from a closure so that the tests can
//! feed hand-picked numbers.

/// A crop box: (top, left, height, width).
pub type CropBox = (usize, usize, usize, usize);

/// An integer in `0..n` from a uniform draw `u` in [0, 1).
fn int_below(u: f64, n: usize) -> usize {
    ((u * n as f64) as usize).min(n.saturating_sub(1))
}

/// The box for an `h` x `w` image; `draw` returns uniforms in [0, 1), four per try (area,
/// log-ratio, top, left; the last two only for a box that fits).
pub fn rrc_box(
    (h, w): (usize, usize),
    (s0, s1): (f64, f64),
    (r0, r1): (f64, f64),
    mut draw: impl FnMut() -> f64,
) -> CropBox {
    let area = (h * w) as f64;
    let (l0, l1) = (r0.ln(), r1.ln());
    for _ in 0..10 {
        let target = area * (s0 + (s1 - s0) * draw());
        let aspect = (l0 + (l1 - l0) * draw()).exp();
        let bw = (target * aspect).sqrt().round() as usize;
        let bh = (target / aspect).sqrt().round() as usize;
        if 0 < bw && bw <= w && 0 < bh && bh <= h {
            let top = int_below(draw(), h - bh + 1);
            let left = int_below(draw(), w - bw + 1);
            return (top, left, bh, bw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (bh, bw) = if in_ratio < r0 {
        (((w as f64) / r0).round() as usize, w)
    } else if in_ratio > r1 {
        (h, ((h as f64) * r1).round() as usize)
    } else {
        (h, w)
    };
    let (bh, bw) = (bh.clamp(1, h), bw.clamp(1, w));
    ((h - bh) / 2, (w - bw) / 2, bh, bw)
}

/// Copies box `b` out of a (c, h, w) image.
pub fn crop(x: &[f32], c: usize, (h, w): (usize, usize), (top, left, bh, bw): CropBox) -> Vec<f32> {
    let mut out = Vec::with_capacity(c * bh * bw);
    for plane in x.chunks_exact(h * w).take(c) {
        for row in plane.chunks_exact(w).skip(top).take(bh) {
            out.extend_from_slice(&row[left..left + bw]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(v: Vec<f64>) -> impl FnMut() -> f64 {
        let mut it = v.into_iter();
        move || it.next().expect("enough draws")
    }

    #[test]
    fn boxes_follow_torchvision_draw_by_draw() {
        // 10x10, scale (0.08, 1), ratio (3/4, 4/3). Area draw 0.5 -> 54 px; log-ratio
        // draw 0.5 -> aspect 1 -> 7x7 (sqrt 54 = 7.35); top draw 0.25 of 4 places -> 1,
        // left draw 0.99 -> 3.
        let b = rrc_box(
            (10, 10),
            (0.08, 1.),
            (0.75, 4. / 3.),
            feed(vec![0.5, 0.5, 0.25, 0.99]),
        );
        assert_eq!(b, (1, 3, 7, 7));
        // Area 100 at aspect 4/3: 11.5 x 8.7 -> width 12 does not fit; the next try
        // (area 0.08 + 0.92 * 0 = 8 px, aspect 3/4) gives w round(2.449) = 2, h round(3.266) = 3.
        let b = rrc_box(
            (10, 10),
            (0.08, 1.),
            (0.75, 4. / 3.),
            feed(vec![1., 1., 0., 0., 0., 0.]),
        );
        assert_eq!(b, (0, 0, 3, 2));
        // Ten misses on a 4x20 strip (ratio 5 > 4/3): the centred 4 x round(4 * 4/3) = 5 box.
        let b = rrc_box((4, 20), (1., 1.), (0.75, 4. / 3.), feed(vec![0.; 20]));
        assert_eq!(b, (0, 7, 4, 5));
    }

    #[test]
    fn crop_takes_the_box_of_every_channel() {
        let x: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32).collect(); // 2x3x4
        assert_eq!(
            crop(&x, 2, (3, 4), (1, 2, 2, 2)),
            [6., 7., 10., 11., 18., 19., 22., 23.]
        );
    }
}
