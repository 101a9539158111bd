//! The AVX2 + FMA micro-kernels of the direct convolution: 4 output channels by 2 vectors
//! of 8 pixels (forward), 4 channels by 3 taps (weight gradient).

use std::arch::x86_64::*;

use super::{Isa, MAX_CB, TB};

/// Output channels per micro-tile.
const CB: usize = Isa::Avx2.cb();
/// f32 lanes of one register.
const LANES: usize = Isa::Avx2.lanes();

/// With `TQ = LANES * V` pixels (`V` vectors: 2 for the full tiles, 1 for a tail):
/// `out[j * qlen + 0..TQ] = sum_ci sum_tap w[ci, tap, j] * x[ci * ps + taps[tap] + 0..TQ]`.
///
/// # Safety
/// AVX2 and FMA must be available; `x` must be readable for
/// `(c - 1) * ps + max(taps) + TQ` floats, `w` for `c * taps.len() * CB`, and `out`
/// writable for `(CB - 1) * qlen + TQ`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn fwd_tile<const V: usize>(
    x: *const f32,
    ps: usize,
    taps: &[usize],
    c: usize,
    w: *const f32,
    out: *mut f32,
    qlen: usize,
) {
    // SAFETY: the caller's contract covers every pointer formed here. (No closures: they
    // would not inherit the target features.)
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); V]; CB];
        let mut xv = [_mm256_setzero_ps(); V];
        let mut wp = w;
        for ci in 0..c {
            let xc = x.add(ci * ps);
            for &off in taps {
                let p = xc.add(off);
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = _mm256_loadu_ps(p.add(v * LANES));
                }
                for (j, row) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*wp.add(j));
                    for (a, xv) in row.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(*xv, b, *a);
                    }
                }
                wp = wp.add(CB);
            }
        }
        for (j, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                _mm256_storeu_ps(out.add(j * qlen + v * LANES), *a);
            }
        }
    }
}

/// `sums[j][t]` (`j < CB`) `= sum_i sum_{q < qlen} dys[i][j * stride + q] * xs[i][offs[t] + q]`.
///
/// # Safety
/// AVX2 and FMA must be available, `qlen` a multiple of 8, every `xs[i]` readable for
/// `max(offs) + qlen` floats and every `dys[i]` for `(CB - 1) * stride + qlen`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn wgrad_tile(
    (xs, dys): (&[*const f32], &[*const f32]),
    offs: [usize; TB],
    stride: usize,
    qlen: usize,
    sums: &mut [[f32; TB]; MAX_CB],
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); TB]; CB];
        let mut xv = [_mm256_setzero_ps(); TB];
        for (&x, &dy) in xs.iter().zip(dys) {
            let mut q = 0;
            while q < qlen {
                for (v, off) in xv.iter_mut().zip(offs) {
                    *v = _mm256_loadu_ps(x.add(off + q));
                }
                for (j, row) in acc.iter_mut().enumerate() {
                    let d = _mm256_loadu_ps(dy.add(j * stride + q));
                    for (a, xv) in row.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(*xv, d, *a);
                    }
                }
                q += LANES;
            }
        }
        for (s, a) in sums.iter_mut().zip(&acc) {
            for (s, a) in s.iter_mut().zip(a) {
                let hi = _mm256_extractf128_ps(*a, 1);
                let v = _mm_add_ps(_mm256_castps256_ps128(*a), hi);
                let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
                let v = _mm_add_ss(v, _mm_movehdup_ps(v));
                *s = _mm_cvtss_f32(v);
            }
        }
    }
}
