//! The AVX2 tile of the 3x3 forward with the output channels in the lanes: `P` consecutive
//! output pixels of one row by [`CO`] = 16 output channels (two vectors of 8), `2 P`
//! accumulators (12 for the widest tile, 6 pixels: with the two weight vectors and the
//! broadcast input value, 15 of the 16 registers), at stride `S` (1 or 2).
//!
//! Per tap and input channel it loads the two weight vectors once and broadcasts each
//! pixel's input value into two FMAs: `P + 2` loads per `2 P` FMAs (8 per 12 at 6 pixels,
//! the ratio of the GEMM's 6 x 16 tile), all from the plain input rows, as the AVX-512
//! tile does. The sums are transposed in registers (8 x 8) to the output's rows of pixels
//! as they are stored.

use std::arch::x86_64::*;

use super::tile::{opaque, tile_widths, Dst, Kernel, Part, Src};

/// Output channels of one block (the packed weights' innermost dimension).
const CO: usize = 16;
/// f32 lanes of one register.
const LANES: usize = 8;

/// The AVX2 tile ([`tile`]).
pub(crate) struct Avx2;

impl Kernel for Avx2 {
    const CO: usize = CO;
    const ISA: crate::conv::direct::Isa = crate::conv::direct::Isa::Avx2;
    const MAX_P: usize = 6;
    /// Compiled for a 6-pixel row at stride 1 (the first pixel's left and the last one's
    /// right taps skipped), the tile kept one sum on the stack, stored on every step
    /// (`cargo xtask asm`): such rows are cut in two.
    const MAX_P_ROW: usize = 5;

    unsafe fn tile(
        pw_s: (usize, usize),
        edges: (bool, bool),
        src: Src,
        c: usize,
        wk: *const f32,
        part: Part,
        d: Dst,
    ) {
        tile_widths!(tile, pw_s, edges, (src, c, wk, part, d); 1 2 3 4 5 6; 1 2 3 4 5)
    }
}

/// [`Kernel::tile`] for `P` pixels at stride `S`, `LEFT` and `RIGHT` as there.
///
/// # Safety
/// AVX2 and FMA must be available; the rest as [`Kernel::tile`].
#[target_feature(enable = "avx2,fma")]
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
        // Built and handed on by value, as the AVX-512 tile's (sums read or written in place
        // through references stay in memory as well).
        let mut acc: [[__m256; 2]; P] = if part.from.is_null() {
            [[_mm256_setzero_ps(); 2]; P]
        } else {
            std::array::from_fn(|i| {
                std::array::from_fn(|v| _mm256_loadu_ps(part.from.add(i * CO + v * LANES)))
            })
        };
        for ci in 0..c {
            let xc = s.x.wrapping_add(ci * s.plane);
            let wc = wk.add(ci * 9 * CO);
            for r in 0..s.rows {
                let xr = xc.wrapping_add(r * s.w);
                let wr = wc.add(r * 3 * CO);
                for kx in 0..3 {
                    let w0 = _mm256_loadu_ps(wr.add(kx * CO));
                    let w1 = _mm256_loadu_ps(wr.add(kx * CO + LANES));
                    let xk = xr.wrapping_add(opaque(kx));
                    for (i, a) in acc.iter_mut().enumerate() {
                        if (LEFT && i == 0 && kx == 0) || (RIGHT && i + 1 == P && kx == 2) {
                            continue;
                        }
                        let b = _mm256_broadcast_ss(&*xk.wrapping_add(S * i));
                        a[0] = _mm256_fmadd_ps(b, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(b, w1, a[1]);
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

/// The tile's sums (`acc[i][v]`: pixel `i`, channels `8 v..8 v + 8`) into the output rows,
/// finished as [`Dst`] says.
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store<const P: usize>(acc: [[__m256; 2]; P], d: Dst) {
    // Lanes `i < P`: the tile's pixels.
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(P as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    // SAFETY: the caller's contract.
    unsafe {
        for v in 0..2 {
            let co0 = v * LANES;
            let mut rows = [_mm256_setzero_ps(); LANES];
            for (r, a) in rows.iter_mut().zip(&acc) {
                *r = a[v];
            }
            if d.finish {
                // Per channel, and the channels are the lanes here: before the transpose.
                let s = (!d.scale.is_null()).then(|| _mm256_loadu_ps(d.scale.add(co0)));
                let b = if d.bias.is_null() {
                    _mm256_setzero_ps()
                } else {
                    _mm256_loadu_ps(d.bias.add(co0))
                };
                for r in rows.iter_mut().take(P) {
                    if let Some(s) = s {
                        *r = _mm256_mul_ps(*r, s);
                    }
                    *r = _mm256_add_ps(*r, b);
                }
            }
            let t = transpose8(rows);
            for (j, t) in t.iter().enumerate() {
                let at = (co0 + j) * d.plane;
                let mut r = *t;
                if d.finish {
                    if !d.residual.is_null() {
                        r = _mm256_add_ps(_mm256_maskload_ps(d.residual.add(at), mask), r);
                    }
                    if d.relu {
                        // `max(0, r)` keeps a NaN (the second operand) and -0, as the
                        // scalar `if r < 0 { 0 } else { r }` does.
                        r = _mm256_max_ps(_mm256_setzero_ps(), r);
                    }
                }
                store_first::<P>(d.out.add(at), r);
            }
        }
    }
}

/// The first `P` lanes of `v` at `to`, nothing after (no masked store: AMD's Zen cores
/// run `vmaskmovps` to memory as a slow microcoded sequence).
///
/// # Safety
/// AVX2 must be available, `P <= 8` and `to` writable for `P` floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_first<const P: usize>(to: *mut f32, v: __m256) {
    // SAFETY: each store writes lanes below `P` (the caller's contract).
    unsafe {
        if P == LANES {
            _mm256_storeu_ps(to, v);
            return;
        }
        let (mut half, mut at) = (_mm256_castps256_ps128(v), 0);
        if P >= 4 {
            _mm_storeu_ps(to, half);
            half = _mm256_extractf128_ps::<1>(v);
            at = 4;
        }
        let rest = P - at;
        if rest >= 2 {
            _mm_store_sd(to.add(at).cast(), _mm_castps_pd(half));
            half = _mm_movehl_ps(half, half);
            at += 2;
        }
        if rest % 2 == 1 {
            _mm_store_ss(to.add(at), half);
        }
    }
}

/// The tile's sums into `to` as they are (`[P][CO]`).
///
/// # Safety
/// AVX2 must be available and `to` writable for `P * CO` floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn save<const P: usize>(acc: [[__m256; 2]; P], to: *mut f32) {
    for (i, a) in acc.iter().enumerate() {
        for (v, a) in a.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { _mm256_storeu_ps(to.add(i * CO + v * LANES), *a) };
        }
    }
}

/// The transpose of 8 rows of 8: `out[j]` lane `i` is `v[i]` lane `j`. Pairs of rows
/// interleaved, then pairs of pairs (each 128-bit half then holds one column of four
/// rows), then the halves gathered.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
    let mut q = [_mm256_setzero_ps(); 8];
    for h in 0..2 {
        let (a, b, c, e) = (v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
        let lo_ab = _mm256_unpacklo_ps(a, b);
        let hi_ab = _mm256_unpackhi_ps(a, b);
        let lo_ce = _mm256_unpacklo_ps(c, e);
        let hi_ce = _mm256_unpackhi_ps(c, e);
        // Half `l` of `q[4 h + k]`: element `4 l + k` of rows `4 h..4 h + 4`.
        q[4 * h] = _mm256_shuffle_ps::<0x44>(lo_ab, lo_ce);
        q[4 * h + 1] = _mm256_shuffle_ps::<0xee>(lo_ab, lo_ce);
        q[4 * h + 2] = _mm256_shuffle_ps::<0x44>(hi_ab, hi_ce);
        q[4 * h + 3] = _mm256_shuffle_ps::<0xee>(hi_ab, hi_ce);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for k in 0..4 {
        out[k] = _mm256_permute2f128_ps::<0x20>(q[k], q[4 + k]);
        out[4 + k] = _mm256_permute2f128_ps::<0x31>(q[k], q[4 + k]);
    }
    out
}
