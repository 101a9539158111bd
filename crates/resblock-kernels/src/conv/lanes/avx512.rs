//! The AVX-512 tiles of the 3x3 forward with the output channels in the lanes: `P`
//! consecutive output pixels of one row by `CO` = 16 `V` output channels (`V` vectors of
//! 16: [`Avx512`]`<2>` 32 channels by up to 14 pixels, 28 accumulators; `Avx512<1>` 16
//! channels by up to 16 pixels, for layers whose channels are not whole blocks of 32:
//! CIFAR ResNets' 16-channel stage), at stride `S` (1 or 2).
//!
//! Per tap and input channel the 32-channel tile loads its two weight vectors once and
//! broadcasts each pixel's input value into two FMAs: `P + 2` loads per `2 P` FMAs; the
//! 16-channel tile keeps the three taps' weights in registers and broadcasts each input
//! column once, into every FMA that reads it (`S` broadcasts per 3 FMAs). All loads are from the
//! plain input rows (pixel `i`'s tap `kx` reads column `S i + kx` from the tile's first
//! column), so there is no padded or phase-split copy of the input and no junk column.
//! The sums are transposed in registers (16 x 16) to the output's rows of pixels as they
//! are stored.

use std::arch::x86_64::*;

use super::tile::{opaque, tile_widths, Dst, Kernel, Part, Src};

/// f32 lanes of one register.
const LANES: usize = 16;

/// The AVX-512 tile of `V` vectors of output channels ([`tile`]).
pub(crate) struct Avx512<const V: usize>;

impl Kernel for Avx512<2> {
    const CO: usize = 2 * LANES;
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
        tile_widths!(tile_of_2, pw_s, edges, (src, c, wk, part, d);
            1 2 3 4 5 6 7 8 9 10 11 12 13 14; 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
    }
}

impl Kernel for Avx512<1> {
    const CO: usize = LANES;
    const ISA: crate::conv::direct::Isa = crate::conv::direct::Isa::Avx512;
    // 16 sums, a weight vector and a broadcast value; the store transposes 16 pixels.
    const MAX_P: usize = 16;
    const MAX_P_ROW: usize = 16;

    unsafe fn tile(
        pw_s: (usize, usize),
        edges: (bool, bool),
        src: Src,
        c: usize,
        wk: *const f32,
        part: Part,
        d: Dst,
    ) {
        tile_widths!(tile_of_1, pw_s, edges, (src, c, wk, part, d);
            1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }
}

/// With `CO = 16 V`: `out[j * plane + i] = from[i * CO + j] + sum_ci sum_(ky, kx) wk[t *
/// CO + j] * x[ci * plane + ky * w + S i + kx]`, with `t = ci * 9 + ky * 3 + kx`, for the
/// `rows` valid
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
unsafe fn tile<
    const V: usize,
    const P: usize,
    const S: usize,
    const LEFT: bool,
    const RIGHT: bool,
>(
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
        let co = V * LANES;
        let mut acc: [[__m512; V]; P] = if part.from.is_null() {
            [[_mm512_setzero_ps(); V]; P]
        } else {
            std::array::from_fn(|i| {
                std::array::from_fn(|v| _mm512_loadu_ps(part.from.add(i * co + v * LANES)))
            })
        };
        for ci in 0..c {
            let xc = s.x.wrapping_add(ci * s.plane);
            let wc = wk.add(ci * 9 * co);
            for r in 0..s.rows {
                let xr = xc.wrapping_add(r * s.w);
                let wr = wc.add(r * 3 * co);
                if V == 1 {
                    // One vector of channels: the three taps' weights stay in registers
                    // and each input column of the row is broadcast once, carried to the
                    // next pixel that reads it (pixel `i` reads columns `S i + kx`):
                    // `S` broadcasts per 3 FMAs instead of 3, where the broadcasts bound
                    // the tile. Each pixel's sums still take the taps in the order of
                    // `kx`, as below.
                    let w3: [__m512; 3] =
                        std::array::from_fn(|kx| _mm512_loadu_ps(wr.add(kx * co)));
                    let mut c0 = if LEFT {
                        _mm512_setzero_ps()
                    } else {
                        _mm512_set1_ps(*xr)
                    };
                    let mut c1 = if S == 1 {
                        _mm512_set1_ps(*xr.wrapping_add(1))
                    } else {
                        _mm512_setzero_ps()
                    };
                    for (i, a) in acc.iter_mut().enumerate() {
                        let a = &mut a[0];
                        let mid = if S == 1 {
                            c1
                        } else {
                            _mm512_set1_ps(*xr.wrapping_add(S * i + 1))
                        };
                        let last = RIGHT && i + 1 == P;
                        let c2 = if last {
                            _mm512_setzero_ps()
                        } else {
                            _mm512_set1_ps(*xr.wrapping_add(S * i + 2))
                        };
                        if !(LEFT && i == 0) {
                            *a = _mm512_fmadd_ps(c0, w3[0], *a);
                        }
                        *a = _mm512_fmadd_ps(mid, w3[1], *a);
                        if !last {
                            *a = _mm512_fmadd_ps(c2, w3[2], *a);
                        }
                        (c0, c1) = if S == 1 { (mid, c2) } else { (c2, c1) };
                    }
                    continue;
                }
                for kx in 0..3 {
                    let wv: [__m512; V] =
                        std::array::from_fn(|v| _mm512_loadu_ps(wr.add(kx * co + v * LANES)));
                    let xk = xr.wrapping_add(opaque(kx));
                    for (i, a) in acc.iter_mut().enumerate() {
                        if (LEFT && i == 0 && kx == 0) || (RIGHT && i + 1 == P && kx == 2) {
                            continue;
                        }
                        let b = _mm512_set1_ps(*xk.wrapping_add(S * i));
                        for (a, w) in a.iter_mut().zip(&wv) {
                            *a = _mm512_fmadd_ps(b, *w, *a);
                        }
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

/// [`tile`] of 32 channels.
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn tile_of_2<const P: usize, const S: usize, const LEFT: bool, const RIGHT: bool>(
    s: Src,
    c: usize,
    wk: *const f32,
    part: Part,
    d: Dst,
) {
    // SAFETY: the caller's contract.
    unsafe { tile::<2, P, S, LEFT, RIGHT>(s, c, wk, part, d) }
}

/// [`tile`] of 16 channels.
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn tile_of_1<const P: usize, const S: usize, const LEFT: bool, const RIGHT: bool>(
    s: Src,
    c: usize,
    wk: *const f32,
    part: Part,
    d: Dst,
) {
    // SAFETY: the caller's contract.
    unsafe { tile::<1, P, S, LEFT, RIGHT>(s, c, wk, part, d) }
}

/// The tile's sums (`acc[i][v]`: pixel `i`, channels `16 v..16 v + 16`) into the output
/// rows, finished as [`Dst`] says (`P <= 16`).
///
/// # Safety
/// As [`tile`].
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn store<const V: usize, const P: usize>(acc: [[__m512; V]; P], d: Dst) {
    let mask = ((1u32 << P) - 1) as __mmask16;
    // SAFETY: the caller's contract.
    unsafe {
        for v in 0..V {
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

/// The tile's sums into `to` as they are (`[P][16 V]`).
///
/// # Safety
/// AVX-512 F must be available and `to` writable for `P * CO` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn save<const V: usize, const P: usize>(acc: [[__m512; V]; P], to: *mut f32) {
    for (i, a) in acc.iter().enumerate() {
        for (v, a) in a.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { _mm512_storeu_ps(to.add(i * V * LANES + v * LANES), *a) };
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
