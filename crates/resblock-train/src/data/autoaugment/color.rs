//! The colour and tone operations of RandAugment and TrivialAugment, as torchvision's
//! tensor versions compute them on images with values in [0, 1]: blends with a degenerate
//! image (`brightness`, `contrast`, `color`, `sharpness`), `posterize`, `solarize`,
//! `autocontrast` and `equalize` (on the 8-bit values).

/// `(1 - f) d + f x`, clamped to [0, 1] (torchvision's `_blend`).
fn blend(x: &mut [f32], degenerate: &[f32], f: f32) {
    for (v, d) in x.iter_mut().zip(degenerate) {
        *v = ((1. - f) * d + f * *v).clamp(0., 1.);
    }
}

/// ITU-R 601 luma of an RGB image (one plane), torchvision's `rgb_to_grayscale`; a
/// one-channel image is its own.
fn gray(x: &[f32], c: usize, per: usize) -> Vec<f32> {
    if c < 3 {
        return x[..per].to_vec();
    }
    (0..per)
        .map(|i| 0.299 * x[i] + 0.587 * x[per + i] + 0.114 * x[2 * per + i])
        .collect()
}

/// Scales every value by `f` (against black).
pub fn brightness(x: &mut [f32], f: f32) {
    let black = vec![0f32; x.len()];
    blend(x, &black, f);
}

/// Blends with the mean of the grayscale image.
pub fn contrast(x: &mut [f32], c: usize, per: usize, f: f32) {
    let g = gray(x, c, per);
    let mean = g.iter().sum::<f32>() / per as f32;
    let d = vec![mean; x.len()];
    blend(x, &d, f);
}

/// Blends with the grayscale image (saturation); a no-op for one channel.
pub fn color(x: &mut [f32], c: usize, per: usize, f: f32) {
    if c < 3 {
        return;
    }
    let g = gray(x, c, per);
    let d: Vec<f32> = (0..c).flat_map(|_| g.iter().copied()).collect();
    blend(x, &d, f);
}

/// Blends with a smoothed image (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13 inside, the
/// border pixels kept), per channel.
pub fn sharpness(x: &mut [f32], c: usize, (h, w): (usize, usize), f: f32) {
    let mut d = x.to_vec();
    if h >= 3 && w >= 3 {
        for ch in 0..c {
            let p = &x[ch * h * w..(ch + 1) * h * w];
            for y in 1..h - 1 {
                for xx in 1..w - 1 {
                    let mut s = 4. * p[y * w + xx];
                    for dy in 0..3 {
                        for dx in 0..3 {
                            s += p[(y + dy - 1) * w + xx + dx - 1];
                        }
                    }
                    d[ch * h * w + y * w + xx] = s / 13.;
                }
            }
        }
    }
    blend(x, &d, f);
}

/// The 8-bit value of `v` in [0, 1] (rounded).
fn to_u8(v: f32) -> u8 {
    (v * 255.).round().clamp(0., 255.) as u8
}

/// Keeps the top `bits` bits of each 8-bit value.
pub fn posterize(x: &mut [f32], bits: u32) {
    let mask = (0xFFu32 << (8 - bits.min(8))) as u8;
    for v in x.iter_mut() {
        *v = f32::from(to_u8(*v) & mask) / 255.;
    }
}

/// Inverts the values at or above `threshold`.
pub fn solarize(x: &mut [f32], threshold: f32) {
    for v in x.iter_mut() {
        if *v >= threshold {
            *v = 1. - *v;
        }
    }
}

/// Stretches each channel to [0, 1] (a constant channel is left alone).
pub fn autocontrast(x: &mut [f32], per: usize) {
    for p in x.chunks_exact_mut(per) {
        let lo = p.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if hi > lo {
            for v in p.iter_mut() {
                *v = ((*v - lo) / (hi - lo)).clamp(0., 1.);
            }
        }
    }
}

/// Histogram equalisation of each channel's 8-bit values (PIL's and torchvision's
/// lookup table: `step` = (pixels - count of the last used value) / 255, value i maps to
/// (pixels below i + step / 2) / step).
pub fn equalize(x: &mut [f32], per: usize) {
    for p in x.chunks_exact_mut(per) {
        let mut hist = [0usize; 256];
        for v in p.iter() {
            hist[to_u8(*v) as usize] += 1;
        }
        let last = hist.iter().rposition(|&n| n > 0).map_or(0, |i| hist[i]);
        let step = (per - last) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut n = step / 2;
        for (i, l) in lut.iter_mut().enumerate() {
            *l = (n / step).min(255) as u8;
            n += hist[i];
        }
        for v in p.iter_mut() {
            *v = f32::from(lut[to_u8(*v) as usize]) / 255.;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tone_operations_by_hand() {
        let mut x = vec![0.2, 0.6];
        brightness(&mut x, 1.5);
        assert!((x[0] - 0.3).abs() < 1e-6 && (x[1] - 0.9).abs() < 1e-6);
        // Contrast 0 is the mean everywhere; 2 doubles the distance to it (clamped).
        let mut x = vec![0.2, 0.6];
        contrast(&mut x, 1, 2, 0.);
        assert_eq!(x, [0.4, 0.4]);
        let mut x = vec![0.2, 0.6];
        contrast(&mut x, 1, 2, 2.);
        assert!((x[0] - 0.0).abs() < 1e-6 && (x[1] - 0.8).abs() < 1e-6);
        // Colour 0 turns RGB into its luma.
        let mut x = vec![1., 0., 0.]; // one red pixel
        color(&mut x, 3, 1, 0.);
        assert!(x.iter().all(|v| (v - 0.299).abs() < 1e-6), "{x:?}");
        // Sharpness 0 is the smoothed image: the centre of a 3x3 with one bright centre.
        let mut x = vec![0., 0., 0., 0., 1., 0., 0., 0., 0.];
        sharpness(&mut x, 1, (3, 3), 0.);
        assert!((x[4] - 5. / 13.).abs() < 1e-6 && x[0] == 0.);
        // Posterize 1 keeps the top bit: 200 -> 128, 100 -> 0.
        let mut x = vec![200. / 255., 100. / 255.];
        posterize(&mut x, 1);
        assert_eq!(x, [128. / 255., 0.]);
        let mut x = vec![0.2, 0.7];
        solarize(&mut x, 0.5);
        assert!((x[1] - 0.3).abs() < 1e-6 && x[0] == 0.2);
        let mut x = vec![0.25, 0.5, 0.75];
        autocontrast(&mut x, 3);
        assert_eq!(x, [0., 0.5, 1.]);
    }

    #[test]
    fn equalize_spreads_a_narrow_histogram() {
        // 8-bit values 10, 10, 20, 30 (four pixels): last used value 30 appears once, step
        // (4 - 1) / 255 = 0 -> unchanged (PIL does the same for so few pixels).
        let mut x: Vec<f32> = [10., 10., 20., 30.].iter().map(|v| v / 255.).collect();
        let before = x.clone();
        equalize(&mut x, 4);
        assert_eq!(x, before);
        // 512 pixels: 256 of value 10, 255 of 20, 1 of 30: step (512 - 1) / 255 = 2;
        // 10 -> (0 + 1) / 2 = 0, 20 -> (256 + 1) / 2 = 128, 30 -> (511 + 1) / 2 = 256 -> 255.
        let mut x: Vec<f32> = std::iter::repeat_n(10., 256)
            .chain(std::iter::repeat_n(20., 255))
            .chain([30.])
            .map(|v| v / 255.)
            .collect();
        equalize(&mut x, 512);
        assert_eq!((x[0], x[300], x[511]), (0., 128. / 255., 1.));
    }
}
