//! RandAugment (Cubuk et al. 2020) and TrivialAugment Wide (Müller and Hutter 2021), with
//! torchvision's operations and magnitude tables (31 bins), on (c, h, w) images with values
//! in [0, 1] (put them before `Normalize`).
//!
//! Which operations: one-channel images (digits) get the geometric ones and identity
//! (shears, translations, rotation): tone changes carry little for them. Colour images get
//! all fourteen (plus brightness, colour, contrast, sharpness, posterize, solarize,
//! autocontrast, equalize).
//!
//! RandAugment applies `n` operations drawn uniformly (with repeats), each at magnitude bin
//! `m` of 30; TrivialAugment one operation at a uniformly drawn bin of its wider table.
//! Signed magnitudes take either sign with probability 1/2.

pub mod color;
pub mod geometric;

use resblock_core::RngHandle;

/// One operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Nothing.
    Identity,
    /// Horizontal shear.
    ShearX,
    /// Vertical shear.
    ShearY,
    /// Horizontal shift.
    TranslateX,
    /// Vertical shift.
    TranslateY,
    /// Rotation.
    Rotate,
    /// Brightness.
    Brightness,
    /// Saturation.
    Color,
    /// Contrast.
    Contrast,
    /// Sharpness.
    Sharpness,
    /// Fewer bits per value.
    Posterize,
    /// Inversion above a threshold.
    Solarize,
    /// Stretch to the full range.
    AutoContrast,
    /// Histogram equalisation.
    Equalize,
}

/// Every operation; the first six (identity and the geometric ones) are what grayscale
/// images get.
const ALL: &[Op] = &[
    Op::Identity,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
];

/// Magnitude bins (torchvision's `num_magnitude_bins`).
pub const BINS: usize = 31;

/// The operations for images of `c` channels.
pub fn ops_for(c: usize) -> &'static [Op] {
    if c == 1 {
        &ALL[..6]
    } else {
        ALL
    }
}

/// Which table: RandAugment's or TrivialAugment Wide's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// RandAugment.
    RandAugment,
    /// TrivialAugment Wide.
    Wide,
}

/// `op`'s magnitude at `bin` (0..31) for an `h` x `w` image, and whether it is signed
/// (torchvision's `_augmentation_space`).
pub fn magnitude(op: Op, bin: usize, table: Table, (h, w): (usize, usize)) -> (f64, bool) {
    let t = bin.min(BINS - 1) as f64 / (BINS - 1) as f64; // linspace(0, max, 31)[bin]
    let wide = table == Table::Wide;
    match op {
        Op::Identity | Op::AutoContrast | Op::Equalize => (0., false),
        Op::ShearX | Op::ShearY => (t * if wide { 0.99 } else { 0.3 }, true),
        Op::TranslateX => (t * if wide { 32. } else { 150. / 331. * w as f64 }, true),
        Op::TranslateY => (t * if wide { 32. } else { 150. / 331. * h as f64 }, true),
        Op::Rotate => (t * if wide { 135. } else { 30. }, true),
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => {
            (t * if wide { 0.99 } else { 0.9 }, true)
        }
        Op::Posterize => {
            // 8 - round(arange(31) / ((31 - 1) / 4)) bits (wide: / 6).
            let per = (BINS - 1) as f64 / if wide { 6. } else { 4. };
            (8. - (bin as f64 / per).round(), false)
        }
        Op::Solarize => (1. - t, false), // linspace(255, 0) on [0, 1] values
    }
}

/// Applies `op` at magnitude `mag` (sign included) to `x` (c x h x w).
pub fn apply(op: Op, mag: f64, x: &mut Vec<f32>, c: usize, (h, w): (usize, usize)) {
    let per = h * w;
    match op {
        Op::Identity => {}
        Op::ShearX => *x = geometric::shear_x(x, c, (h, w), mag),
        Op::ShearY => *x = geometric::shear_y(x, c, (h, w), mag),
        Op::TranslateX => *x = geometric::translate(x, c, (h, w), mag, 0.),
        Op::TranslateY => *x = geometric::translate(x, c, (h, w), 0., mag),
        Op::Rotate => *x = geometric::rotate(x, c, (h, w), mag),
        Op::Brightness => color::brightness(x, (1. + mag) as f32),
        Op::Color => color::color(x, c, per, (1. + mag) as f32),
        Op::Contrast => color::contrast(x, c, per, (1. + mag) as f32),
        Op::Sharpness => color::sharpness(x, c, (h, w), (1. + mag) as f32),
        Op::Posterize => color::posterize(x, mag as u32),
        Op::Solarize => color::solarize(x, mag as f32),
        Op::AutoContrast => color::autocontrast(x, per),
        Op::Equalize => color::equalize(x, per),
    }
}

/// Draws an operation (and, for TrivialAugment, a bin; RandAugment uses `bin`), a sign,
/// and applies it.
pub fn random_op(
    x: &mut Vec<f32>,
    c: usize,
    hw: (usize, usize),
    table: Table,
    bin: Option<usize>,
    rng: &RngHandle,
) {
    let ops = ops_for(c);
    let op = ops[rng.below(ops.len())];
    let bin = bin.unwrap_or_else(|| rng.below(BINS));
    let (mag, signed) = magnitude(op, bin, table, hw);
    let mag = if signed && rng.uniform() < 0.5 {
        -mag
    } else {
        mag
    };
    apply(op, mag, x, c, hw);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_tables_match_torchvision() {
        let hw = (32, 32);
        // Bin 9 of 30 (RandAugment's default M): shear 0.09, rotate 9 deg, translate
        // 9/30 * 150/331 * 32.
        let (m, s) = magnitude(Op::ShearX, 9, Table::RandAugment, hw);
        assert!((m - 0.09).abs() < 1e-12 && s);
        assert!((magnitude(Op::Rotate, 9, Table::RandAugment, hw).0 - 9.).abs() < 1e-12);
        let tx = magnitude(Op::TranslateX, 9, Table::RandAugment, hw).0;
        assert!((tx - 0.3 * 150. / 331. * 32.).abs() < 1e-12);
        assert!((magnitude(Op::Rotate, 30, Table::Wide, hw).0 - 135.).abs() < 1e-12);
        assert!((magnitude(Op::TranslateY, 15, Table::Wide, hw).0 - 16.).abs() < 1e-12);
        // Posterize: 8 bits at bin 0, 4 at the top (RandAugment), 2 (wide).
        assert_eq!(magnitude(Op::Posterize, 0, Table::RandAugment, hw).0, 8.);
        assert_eq!(magnitude(Op::Posterize, 30, Table::RandAugment, hw).0, 4.);
        assert_eq!(magnitude(Op::Posterize, 30, Table::Wide, hw).0, 2.);
        assert_eq!(
            magnitude(Op::Solarize, 0, Table::RandAugment, hw),
            (1., false)
        );
        assert_eq!(ops_for(1).len(), 6);
        assert_eq!(ops_for(3).len(), 14);
    }

    #[test]
    fn digits_only_move_and_everything_stays_in_range() {
        let rng = RngHandle::seed_from_u64(4);
        let img: Vec<f32> = (0..64).map(|v| (v % 7) as f32 / 6.).collect();
        for _ in 0..200 {
            let mut x = img.clone();
            random_op(&mut x, 1, (8, 8), Table::Wide, None, &rng);
            // Geometric ops only move values (or fill 0): every value is one of the image's.
            assert!(x.iter().all(|v| *v == 0. || img.contains(v)));
            let mut y: Vec<f32> = (0..3 * 64).map(|v| (v % 11) as f32 / 10.).collect();
            random_op(&mut y, 3, (8, 8), Table::RandAugment, Some(9), &rng);
            assert!(y.iter().all(|v| (0. ..=1.).contains(v)));
        }
    }
}
