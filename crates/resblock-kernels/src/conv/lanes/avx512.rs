//! The AVX-512 tile of the 3x3 forward with the output channels in the lanes: `P`
//! consecutive output pixels of one row by [`CO`] = 32 output channels (two vectors of 16),
//! `2 P` accumulators (28 for the widest tile, 14 pixels), at stride `S` (1 or
//! 2).
//!
//! Per tap and input channel it loads the two weight vectors once and broadcasts each
//! pixel's input value into two FMAs: `P + 2` loads per `2 P` FMAs, all of them from the
//! plain input rows (pixel `i`'s tap `kx` reads column `S i + kx` from the tile's first
//! column), so there is no padded or phase-split copy of the input and no junk column.
//! The sums are transposed in registers (16 x 16) to the output's rows of pixels as they
//! are stored.

use std::arch::x86_64::*;

use super::tile::{opaque, tile_widths, Dst, Kernel, Part, Src};

/// Output channels of one block (the packed weights' innermost dimension).
const CO: usize = 32;
/// f32 lanes of one register.
const LANES: usize = 16;

/// The AVX-512 tile ([`tile`]).
pub(crate) struct Avx512;

impl Kernel for Avx512 {
    const CO: usize = CO;
    const ISA: crate::conv::direct::Isa = crate::conv::direct::Isa::Avx512;
    const MAX_P: usize = 14;
    const MAX_P_ROW: usize = 14;

    unsafe fn tile(
        pw_s: (usize, usize),
        edges: (bool, bool),
        src: Src,
        c: usize,
        wk: *const f32,
        part: Part,
        d: Dst,
    ) {
        tile_widths!(tile, pw_s, edges, (src, c, wk, part, d);
            1 2 3 4 5 6 7 8 9 10 11 12 13 14; 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
    }
}

/// `out[j * plane + i] = from[i * CO + j] + sum_ci sum_(ky, kx) wk[t * CO + j] * x[ci *
/// plane + ky * w + S i + kx]`, with `t = ci * 9 + ky * 3 + kx`, for the `rows` valid
/// kernel rows, pixels `i < P` and channels `j < CO` (then finished, see [`Dst`]), or the
/// same sums into `to[i * CO + j]` ([`Part`]: the sums over one part of the input
/// channels). With `LEFT` the tile starts a row: its first pixel's column-0 taps read the
/// left padding (zero) and are skipped; with `RIGHT` (stride 1) it ends the row, and its
/// last pixel's column-2 taps, reading the right padding, are skipped.
///
/// # Safety
/// AVX-512 F and VL must be available; `x` readable at every offset above but the skipped
/// ones, `wk` for `(c - 1) * 9 * CO + rows * 3 * CO` floats, `part`'s pointers (where not
/// null) for `P * CO` floats; without `part.to`, `out` writable (and `residual` readable)
/// at `j * plane + i`, and `scale` and `bias` readable for `CO` floats where not null.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn tile<const P: usize, const S: usize, const LEFT: bool, const RIGHT: bool>(
    s: Src,
    c: usize,
    wk: *const f32,
    part: Part,
    d: Dst,
) {
    // SAFETY: the caller's contract covers every pointer read here. (No closures: they
    // would not inherit the target features.)
    unsafe {
        // Built and handed on by value: with the sums read or written in place through
        // references, LLVM kept them in memory as well and stored every one after each FMA.
        let mut acc: [[__m512; 2]; P] = if part.from.is_null() {
            [[_mm512_setzero_ps(); 2]; P]
        } else {
            std::array::from_fn(|i| {
                std::array::from_fn(|v| _mm512_loadu_ps(part.from.add(i * CO + v * LANES)))
            })
        };
        for ci in 0..c {
            let xc = s.x.wrapping_add(ci * s.plane);
            let wc = wk.add(ci * 9 * CO);
            for r in 0..s.rows {
                let xr = xc.wrapping_add(r * s.w);
                let wr = wc.add(r * 3 * CO);
                for kx in 0..3 {
                    let w0 = _mm512_loadu_ps(wr.add(kx * CO));
                    let w1 = _mm512_loadu_ps(wr.add(kx * CO + LANES));
                    let xk = xr.wrapping_add(opaque(kx));
                    for (i, a) in acc.iter_mut().enumerate() {
                        if (LEFT && i == 0 && kx == 0) || (RIGHT && i + 1 == P && kx == 2) {
                            continue;
                        }
                        let b = _mm512_set1_ps(*xk.wrapping_add(S * i));
                        a[0] = _mm512_fmadd_ps(b, w0, a[0]);
                        a[1] = _mm512_fmadd_ps(b, w1, a[1]);
                    }
                }
            }
        }
        if part.to.is_null() {
            store(acc, d);
        } else {
            save(acc, part.to);
        }
    }
}

/// The tile's sums (`acc[i][v]`: pixel `i`, channels `16 v..16 v + 16`) into the output
/// rows, finished as [`Dst`] says.
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn store<const P: usize>(acc: [[__m512; 2]; P], d: Dst) {
    let mask = ((1u32 << P) - 1) as __mmask16;
    // SAFETY: the caller's contract.
    unsafe {
        for v in 0..2 {
            let co0 = v * LANES;
            let mut rows = [_mm512_setzero_ps(); LANES];
            for (r, a) in rows.iter_mut().zip(&acc) {
                *r = a[v];
            }
            if d.finish {
                // Per channel, and the channels are the lanes here: before the transpose.
                let s = (!d.scale.is_null()).then(|| _mm512_loadu_ps(d.scale.add(co0)));
                let b = if d.bias.is_null() {
                    _mm512_setzero_ps()
                } else {
                    _mm512_loadu_ps(d.bias.add(co0))
                };
                for r in rows.iter_mut().take(P) {
                    if let Some(s) = s {
                        *r = _mm512_mul_ps(*r, s);
                    }
                    *r = _mm512_add_ps(*r, b);
                }
            }
            let t = transpose16(rows);
            for (j, t) in t.iter().enumerate() {
                let at = (co0 + j) * d.plane;
                let mut r = *t;
                if d.finish {
                    if !d.residual.is_null() {
                        r = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d.residual.add(at)), r);
                    }
                    if d.relu {
                        // `max(0, r)` keeps a NaN (the second operand) and -0, as the
                        // scalar `if r < 0 { 0 } else { r }` does.
                        r = _mm512_max_ps(_mm512_setzero_ps(), r);
                    }
                }
                _mm512_mask_storeu_ps(d.out.add(at), mask, r);
            }
        }
    }
}

/// The tile's sums into `to` as they are (`[P][CO]`).
///
/// # Safety
/// AVX-512 F must be available and `to` writable for `P * CO` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn save<const P: usize>(acc: [[__m512; 2]; P], to: *mut f32) {
    for (i, a) in acc.iter().enumerate() {
        for (v, a) in a.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { _mm512_storeu_ps(to.add(i * CO + v * LANES), *a) };
        }
    }
}

/// The transpose of 16 rows of 16: `out[j]` lane `i` is `v[i]` lane `j`. Pairs of rows
/// interleaved, then pairs of pairs (each 128-bit lane then holds one column of four rows),
/// then the 128-bit lanes gathered in two steps.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) fn transpose16(v: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let (a, b, c, e) = (v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
        let lo_ab = _mm512_unpacklo_ps(a, b);
        let hi_ab = _mm512_unpackhi_ps(a, b);
        let lo_ce = _mm512_unpacklo_ps(c, e);
        let hi_ce = _mm512_unpackhi_ps(c, e);
        // Lane `l` of `t[4 q + k]`: element `4 l + k` of rows `4 q..4 q + 4`.
        t[4 * q] = _mm512_shuffle_ps::<0x44>(lo_ab, lo_ce);
        t[4 * q + 1] = _mm512_shuffle_ps::<0xee>(lo_ab, lo_ce);
        t[4 * q + 2] = _mm512_shuffle_ps::<0x44>(hi_ab, hi_ce);
        t[4 * q + 3] = _mm512_shuffle_ps::<0xee>(hi_ab, hi_ce);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        // Lanes 0 and 2 (`e`) or 1 and 3 (`o`) of rows 0-3 and 4-7, and of 8-11 and 12-15.
        let e0 = _mm512_shuffle_f32x4::<0x88>(t[k], t[4 + k]);
        let o0 = _mm512_shuffle_f32x4::<0xdd>(t[k], t[4 + k]);
        let e1 = _mm512_shuffle_f32x4::<0x88>(t[8 + k], t[12 + k]);
        let o1 = _mm512_shuffle_f32x4::<0xdd>(t[8 + k], t[12 + k]);
        out[k] = _mm512_shuffle_f32x4::<0x88>(e0, e1);
        out[8 + k] = _mm512_shuffle_f32x4::<0xdd>(e0, e1);
        out[4 + k] = _mm512_shuffle_f32x4::<0x88>(o0, o1);
        out[12 + k] = _mm512_shuffle_f32x4::<0xdd>(o0, o1);
    }
    out
}
