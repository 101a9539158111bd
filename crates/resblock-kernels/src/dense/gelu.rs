//! GELU in its exact (erf) form, PyTorch's default, and its derivative, as loops the
//! compiler vectorises: `gelu(z) = z * Phi(z)`, `gelu'(z) = Phi(z) + z * phi(z)` with
//! `Phi(z) = (1 + erf(z / sqrt 2)) / 2` and `phi(z) = exp(-z^2 / 2) / sqrt(2 pi)`.
//!
//! Candle's `gelu_erf` calls a scalar `erff` per element (and its backward composes about
//! ten tensor ops around another), which cost a residual MLP block more than its matmuls.
//! Here f32 uses a rational `erf` and a polynomial `exp` made of adds, multiplies, a
//! division and bit operations only, compiled for AVX-512, AVX2 or the build target
//! ([`crate::dispatch::simd_in_use`]); f64 keeps Candle's scalar `erf` (not a hot path).
//!
//! Accuracy (f32): `erf` within 3.3e-7 absolute of the exact value over the whole line
//! (`scripts/fit_erf.py` fits it; the tests measure it), `exp` within 2 ulp; so `gelu` is within
//! about 2e-7 * |z| of the exact value, as close as PyTorch's vectorised CPU kernel, which
//! also forms `1 + erf` (the tests check both against f64).

use std::mem::MaybeUninit;

use crate::dispatch::Simd;
use crate::simd::{mul_add, with_simd};

/// `erf` rounds to +-1 in f32 beyond this.
const ERF_CLAMP: f32 = 3.92;

/// Numerator of `erf(x) / x` in `t = x^2` (`scripts/fit_erf.py`), lowest degree first.
/// (The script's digits, as printed; the compiler rounds them to f32.)
#[allow(clippy::excessive_precision)]
const ERF_P: [f32; 6] = [
    1.128_379_022,
    1.927_650_038e-1,
    5.306_060_752e-2,
    3.868_368_750e-3,
    2.874_804_795e-4,
    2.034_729_574e-6,
];

/// Its denominator, `Q(0) = 1`.
#[allow(clippy::excessive_precision)]
const ERF_Q: [f32; 6] = [
    1.0,
    5.041_652_028e-1,
    1.150_850_116e-1,
    1.517_237_797e-2,
    1.188_125_503e-3,
    3.807_064_261e-5,
];

/// `sum c[i] t^i` by Horner's rule (FMAs where `FUSED`).
#[inline(always)]
fn horner<const FUSED: bool>(c: &[f32; 6], t: f32) -> f32 {
    let mut r = c[5];
    for k in (0..5).rev() {
        r = mul_add::<FUSED>(r, t, c[k]);
    }
    r
}

/// `erf(x)` in f32 (branch-free; NaN in gives +-1, which the callers multiply by NaN).
#[inline(always)]
fn erf<const FUSED: bool>(x: f32) -> f32 {
    let a = x.abs().min(ERF_CLAMP);
    let t = a * a;
    (a * horner::<FUSED>(&ERF_P, t) / horner::<FUSED>(&ERF_Q, t))
        .min(1.0)
        .copysign(x)
}

/// `exp(-t)` for `t >= 0` in f32 (0 past `t = 87`, below f32's normal range): `-t =
/// -n ln 2 - r` with `|r| <= ln 2 / 2`, `exp(-r)` by its Taylor series to `r^7` (truncation
/// under 1e-9 relative), scaled by `2^-n` through the exponent bits.
#[inline(always)]
fn exp_neg<const FUSED: bool>(t: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let t = t.min(87.0);
    let n = (t * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n * LN2_HI - t + n * LN2_LO;
    // exp(r) for |r| <= 0.35.
    let mut e: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        e = mul_add::<FUSED>(e, r, c);
    }
    // 2^-n for 0 <= n <= 126 (n is a small non-negative integer here), its exponent read
    // from the bits of n + 2^23, whose low mantissa bits hold n exactly: `n as i32` is a
    // saturating conversion, which the compiler did lane by lane (a NaN test per value):
    // with it, this GELU backward was 5.5 % of a residual MLP block's forward + backward,
    // without it 3.2 %.
    let n = (n + 8_388_608.0).to_bits() - 0x4B00_0000;
    let scale = f32::from_bits((127 - n) << 23);
    e * scale
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_one<const FUSED: bool>(z: f32) -> f32 {
    0.5 * z * (1.0 + erf::<FUSED>(z * FRAC_1_SQRT_2))
}

/// `(gelu(z), gelu'(z))`, sharing `Phi(z)`.
#[inline(always)]
fn gelu_and_grad_one<const FUSED: bool>(z: f32) -> (f32, f32) {
    let cdf = 0.5 * (1.0 + erf::<FUSED>(z * FRAC_1_SQRT_2));
    (
        z * cdf,
        cdf + z * FRAC_1_SQRT_2PI * exp_neg::<FUSED>(0.5 * z * z),
    )
}

/// `gelu(z + b)` into `y`, `b` added along each row of `z` (none where `b` is empty).
#[inline(always)]
fn forward_body<const FUSED: bool>(z: &[f32], y: &mut [MaybeUninit<f32>], b: &[f32]) {
    if b.is_empty() {
        for (y, z) in y.iter_mut().zip(z) {
            y.write(gelu_one::<FUSED>(*z));
        }
        return;
    }
    for (y, z) in y.chunks_exact_mut(b.len()).zip(z.chunks_exact(b.len())) {
        for ((y, z), b) in y.iter_mut().zip(z).zip(b) {
            y.write(gelu_one::<FUSED>(*z + *b));
        }
    }
}

/// As [`forward_body`], with `z` replaced by `gelu'(z + b)`.
#[inline(always)]
fn forward_keeping_grad_body<const FUSED: bool>(
    z: &mut [f32],
    y: &mut [MaybeUninit<f32>],
    b: &[f32],
) {
    if b.is_empty() {
        for (y, z) in y.iter_mut().zip(z) {
            let (v, g) = gelu_and_grad_one::<FUSED>(*z);
            y.write(v);
            *z = g;
        }
        return;
    }
    for (y, z) in y.chunks_exact_mut(b.len()).zip(z.chunks_exact_mut(b.len())) {
        for ((y, z), b) in y.iter_mut().zip(z).zip(b) {
            let (v, g) = gelu_and_grad_one::<FUSED>(*z + *b);
            y.write(v);
            *z = g;
        }
    }
}

/// `y = gelu(z + b)` on the given SIMD level (narrower where the CPU lacks it), `b` a bias
/// added along each row of `z` (`b.len()` values a row; empty: none), writing every value
/// of `y` (which need not be initialised: the callers' outputs are fresh buffers, not
/// zero-filled first).
pub(crate) fn forward_with(simd: Simd, z: &[f32], y: &mut [MaybeUninit<f32>], b: &[f32]) {
    check(z.len(), y.len(), b.len());
    with_simd!(simd, fused forward_body(z: &[f32], y: &mut [MaybeUninit<f32>], b: &[f32]))
}

/// The lengths of `z`, `y` and `b` that write every value of `y`.
fn check(z: usize, y: usize, b: usize) {
    assert_eq!(z, y, "gelu: sizes");
    assert!(
        b == 0 || z.is_multiple_of(b),
        "gelu: {z} values in rows of {b}"
    );
}

/// `y = gelu(z + b)`, and `z` replaced by `gelu'(z + b)`, on the given SIMD level (`b` as
/// in [`forward_with`]): the forward of a layer that will be trained keeps the derivative
/// for its backward (which is then one multiply, `dz = dy * gelu'(z)`), computed here from
/// the same `Phi(z)`: the backward no longer evaluates `erf` again, and its division.
pub(crate) fn forward_keeping_grad_with(
    simd: Simd,
    z: &mut [f32],
    y: &mut [MaybeUninit<f32>],
    b: &[f32],
) {
    check(z.len(), y.len(), b.len());
    with_simd!(simd, fused forward_keeping_grad_body(z: &mut [f32], y: &mut [MaybeUninit<f32>], b: &[f32]))
}

/// `gelu(z)` in f64 (Candle's scalar `erf`).
pub(crate) fn forward_f64(z: f64) -> f64 {
    0.5 * z * (1.0 + candle_core::cpu::erf::erf_f64(z * std::f64::consts::FRAC_1_SQRT_2))
}

/// `gelu'(z)` in f64.
pub(crate) fn grad_f64(z: f64) -> f64 {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(z * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    cdf + z * pdf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every SIMD level against f64 over the whole useful range and past the clamps, with
    /// lengths that leave vector tails.
    #[test]
    fn every_path_matches_f64() {
        let z: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.) / 200.).collect();
        for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
            // SAFETY: each call writes every value of its output.
            let y: Vec<f32> = unsafe {
                crate::buffer::vec_written_by(z.len(), |y| forward_with(simd, &z, y, &[]))
            };
            let mut grad = z.clone();
            let y_kept: Vec<f32> = unsafe {
                crate::buffer::vec_written_by(z.len(), |y| {
                    forward_keeping_grad_with(simd, &mut grad, y, &[])
                })
            };
            assert_eq!(y, y_kept, "{simd:?}: the same gelu keeping its derivative");
            // With a bias along rows of 127 (4001 = 31 * 127 + 64: the first 31 rows), the
            // same values as with the bias added first, bit for bit. (Each call below writes
            // every value of its output, as above.)
            let (n, rows) = (127, 31);
            let b: Vec<f32> = (0..n).map(|j| (j as f32 - 60.) / 50.).collect();
            let zb = &z[..n * rows];
            let added: Vec<f32> = zb.iter().enumerate().map(|(i, v)| v + b[i % n]).collect();
            let (mut g_b, mut g_added) = (zb.to_vec(), added.clone());
            let with = |z: &[f32], b: &[f32]| -> Vec<f32> {
                unsafe { crate::buffer::vec_written_by(z.len(), |y| forward_with(simd, z, y, b)) }
            };
            assert_eq!(
                with(zb, &b),
                with(&added, &[]),
                "{simd:?}: gelu with a bias"
            );
            let kept_b: Vec<f32> = unsafe {
                crate::buffer::vec_written_by(zb.len(), |y| {
                    forward_keeping_grad_with(simd, &mut g_b, y, &b)
                })
            };
            let kept_added: Vec<f32> = unsafe {
                crate::buffer::vec_written_by(zb.len(), |y| {
                    forward_keeping_grad_with(simd, &mut g_added, y, &[])
                })
            };
            assert_eq!(
                (kept_b, g_b),
                (kept_added, g_added),
                "{simd:?}: kept, with a bias"
            );
            for (i, &v) in z.iter().enumerate() {
                let v64 = f64::from(v);
                let (want, gwant) = (forward_f64(v64), grad_f64(v64));
                let e = (f64::from(y[i]) - want).abs();
                assert!(
                    e <= 3e-7 * v64.abs().max(1.0),
                    "{simd:?} gelu({v}) = {} vs {want}",
                    y[i]
                );
                let e = (f64::from(grad[i]) - gwant).abs();
                assert!(
                    e <= 1e-6 * gwant.abs().max(1.0),
                    "{simd:?} gelu'({v}) = {} vs {gwant}",
                    grad[i]
                );
            }
        }
    }

    /// Both forms of the polynomials (fused multiply-adds, as the AVX levels and ARM64 run
    /// them, and separate multiplies and adds, as x86-64's build target does) within the
    /// bounds.
    #[test]
    fn exp_and_erf_hold_their_bounds() {
        check_bounds::<true>();
        check_bounds::<false>();
    }

    fn check_bounds<const FUSED: bool>() {
        for i in 0..=87_000 {
            let t = i as f32 / 1000.;
            let want = (-f64::from(t)).exp();
            let got = f64::from(exp_neg::<FUSED>(t));
            assert!(
                (got - want).abs() <= 2.5e-7 * want,
                "fused {FUSED}: exp(-{t}) = {got} vs {want}"
            );
        }
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.;
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            worst = worst.max((f64::from(erf::<FUSED>(x)) - want).abs());
        }
        // 3.26e-7 measured unfused (the fit script's float32 model of this code: 3.19e-7).
        assert!(worst <= 3.5e-7, "fused {FUSED}: erf: max error {worst:e}");
        let (v, g) = gelu_and_grad_one::<FUSED>(f32::NAN);
        assert!(gelu_one::<FUSED>(f32::NAN).is_nan() && v.is_nan() && g.is_nan());
    }
}
