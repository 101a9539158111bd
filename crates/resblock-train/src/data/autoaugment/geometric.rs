//! The geometric operations of RandAugment and TrivialAugment on a (c, h, w) image with
//! values in [0, 1]: every output pixel samples the input at the inverse-mapped position of
//! its centre, nearest neighbour, and pixels mapped from outside the image are 0
//! (torchvision's `fill=None`).

/// Resamples `x` (c planes of h x w): output pixel (row y, column x) takes the input pixel
/// at `map(x + 0.5, y + 0.5)` (continuous coordinates, column first), floored; 0 outside.
fn resample(
    x: &[f32],
    c: usize,
    (h, w): (usize, usize),
    map: impl Fn(f64, f64) -> (f64, f64),
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for y in 0..h {
        for xx in 0..w {
            let (sx, sy) = map(xx as f64 + 0.5, y as f64 + 0.5);
            let (sx, sy) = (sx.floor(), sy.floor());
            if sx < 0. || sy < 0. || sx >= w as f64 || sy >= h as f64 {
                continue;
            }
            let (sx, sy) = (sx as usize, sy as usize);
            for ch in 0..c {
                out[ch * h * w + y * w + xx] = x[ch * h * w + sy * w + sx];
            }
        }
    }
    out
}

/// Horizontal shear as PIL's and torchvision's `ShearX`: output (x, y) takes input
/// (x + m y, y), about the top-left corner.
pub fn shear_x(x: &[f32], c: usize, hw: (usize, usize), m: f64) -> Vec<f32> {
    resample(x, c, hw, |px, py| (px + m * py, py))
}

/// Vertical shear: output (x, y) takes input (x, y + m x).
pub fn shear_y(x: &[f32], c: usize, hw: (usize, usize), m: f64) -> Vec<f32> {
    resample(x, c, hw, |px, py| (px, py + m * px))
}

/// Shift by `dx` pixels right and `dy` down (the content moves; rounded to whole pixels,
/// as torchvision's `int(magnitude)`).
pub fn translate(x: &[f32], c: usize, hw: (usize, usize), dx: f64, dy: f64) -> Vec<f32> {
    let (dx, dy) = (dx.trunc(), dy.trunc());
    resample(x, c, hw, |px, py| (px - dx, py - dy))
}

/// Rotation by `degrees` counter-clockwise about the image centre.
pub fn rotate(x: &[f32], c: usize, (h, w): (usize, usize), degrees: f64) -> Vec<f32> {
    let (s, co) = degrees.to_radians().sin_cos();
    let (cx, cy) = (w as f64 / 2., h as f64 / 2.);
    // Counter-clockwise on screen (y down) maps output back to input by the opposite turn.
    resample(x, c, (h, w), |px, py| {
        let (dx, dy) = (px - cx, py - cy);
        (cx + co * dx - s * dy, cy + s * dx + co * dy)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1x3x3: 1..9 row by row.
    fn img() -> Vec<f32> {
        (1..=9).map(|v| v as f32).collect()
    }

    #[test]
    fn shears_shifts_and_quarter_turns_by_hand() {
        // ShearX 1: row y moves left by y + 0.5 (floored at centres): row 0 takes columns
        // 0.5+0.5 -> 1, 2, 3 (outside); row 1: 2, 3, out; row 2: 3 (2.5 + 2.5 = 5 -> out)...
        assert_eq!(
            shear_x(&img(), 1, (3, 3), 1.),
            [2., 3., 0., 6., 0., 0., 0., 0., 0.]
        );
        // ShearY 1 is its transpose.
        assert_eq!(
            shear_y(&img(), 1, (3, 3), 1.),
            [4., 8., 0., 7., 0., 0., 0., 0., 0.]
        );
        // Translate right 1 and up 1.
        assert_eq!(
            translate(&img(), 1, (3, 3), 1., -1.),
            [0., 4., 5., 0., 7., 8., 0., 0., 0.]
        );
        // Fractions are truncated like torchvision's int().
        assert_eq!(
            translate(&img(), 1, (3, 3), 1.9, 0.),
            translate(&img(), 1, (3, 3), 1., 0.)
        );
        // A quarter turn counter-clockwise: the right column becomes the top row.
        assert_eq!(
            rotate(&img(), 1, (3, 3), 90.),
            [3., 6., 9., 2., 5., 8., 1., 4., 7.]
        );
        assert_eq!(rotate(&img(), 1, (3, 3), 0.), img());
    }
}
