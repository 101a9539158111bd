//! The AVX2 + FMA micro-kernel of [`super::sgemm`]: an `MR x NR` = 6 x 16 tile of `dst`
//! (two 8-lane registers per row, 12 accumulators of the 16 registers) from a packed `A`
//! panel (`MR` values per `k`) and a packed `B` panel (`NR` values per `k`).
//!
//! Per `k` it loads two `B` vectors and broadcasts six `A` values into 12 FMAs: 12
//! independent sums cover the FMA latency of two 256-bit pipes, and the two `B` registers
//! and the broadcast leave one register free, so nothing is spilled. (The AVX-512 kernel's
//! 8 x 32 tile run as 4 x 16 passes on AVX2, 8 sums each, was 6-10% slower than the `gemm`
//! crate: its FMAs waited on the `B` loads.)

use std::arch::x86_64::*;

use super::{Avx2Kernel, Micro, TileDst, TileFinish};

const MR: usize = Avx2Kernel::MR;
const NR: usize = Avx2Kernel::NR;

const LANES: usize = 8;
/// How far ahead (floats) the in-place loop asks for its `B` panel: 32 steps of `k`, 2 KiB
/// (as the AVX-512 kernel's, whose `B` panels also stream from L2 there).
const PF: usize = 32 * NR;

/// `c[i * ldc + j] (=|+=) sum_p A[i, p] * b[p * NR + j]` for `i < mr`, `j < nr` (the
/// fields of `dst`), on `VR` vectors per row: 2 (`NR` columns), or 1 for a last panel of at most 8 columns
/// (the panel keeps its `NR` stride; only its first 8 values per `k` are read).
///
/// `A` is a packed panel, `A[i, p] = a[p * MR + i]`, when `LDA` is `None`; with `Some(lda)`
/// it is read in place from a row-major matrix, `A[i, p] = a[i * lda + p]` (rows past `mr`
/// read row 0 again; their sums are not stored): see `STRIDED_A_PANELS` in `mod.rs`.
///
/// With `dst.fin`, each stored value is finished first ([`finish`]).
///
/// # Safety
/// AVX2 and FMA must be available; `a` readable for `kc * MR` floats (packed) or at
/// `i * lda + p` for `i < mr`, `p < kc` (in place), `b` for `kc * NR`, and `dst` as
/// [`TileDst`] says, with `nr <= VR * 8`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn kernel<const VR: usize>(
    kc: usize,
    (a, lda): (*const f32, Option<usize>),
    b: *const f32,
    dst: TileDst,
) {
    // SAFETY: the caller's contract covers every pointer formed here. (No closures: they
    // would not inherit the target features.)
    unsafe {
        dst.prefetch();
        let mut acc = [[_mm256_setzero_ps(); VR]; MR];
        let mut bp = b;
        match lda {
            None => {
                let mut ap = a;
                for _ in 0..kc {
                    let mut bv = [_mm256_setzero_ps(); VR];
                    for (v, b) in bv.iter_mut().enumerate() {
                        *b = _mm256_loadu_ps(bp.add(v * LANES));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_ps(*ap.add(i));
                        for (r, b) in row.iter_mut().zip(&bv) {
                            *r = _mm256_fmadd_ps(av, *b, *r);
                        }
                    }
                    ap = ap.add(MR);
                    bp = bp.add(NR);
                }
            }
            Some(lda) => {
                let rows: [*const f32; MR] =
                    std::array::from_fn(|i| a.add(if i < dst.mr { i * lda } else { 0 }));
                for p in 0..kc {
                    let mut bv = [_mm256_setzero_ps(); VR];
                    for (v, b) in bv.iter_mut().enumerate() {
                        *b = _mm256_loadu_ps(bp.add(v * LANES));
                    }
                    // A hint: it reads nothing and cannot fault past the panel.
                    _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF).cast::<i8>());
                    for (row, ap) in acc.iter_mut().zip(&rows) {
                        let av = _mm256_set1_ps(*ap.add(p));
                        for (r, b) in row.iter_mut().zip(&bv) {
                            *r = _mm256_fmadd_ps(av, *b, *r);
                        }
                    }
                    bp = bp.add(NR);
                }
            }
        }
        store(&acc, dst);
    }
}

/// Stores (adds, finishes) the sums `acc` of [`kernel`]'s tile, as it says. Out of line:
/// with these loops inside it the compiler kept the sums in memory as well as in registers
/// and stored all 12 on every step of `k`.
///
/// # Safety
/// As [`kernel`]'s for `dst`.
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn store<const VR: usize>(acc: &[[__m256; VR]; MR], dst: TileDst) {
    let TileDst {
        c,
        ldc,
        mr,
        nr,
        add,
        fin,
    } = dst;
    // SAFETY: the caller's contract.
    unsafe {
        if nr == VR * LANES {
            for (i, row) in acc.iter().enumerate().take(mr) {
                let cp = c.add(i * ldc);
                for (v, r) in row.iter().enumerate() {
                    let p = cp.add(v * LANES);
                    let r = if add {
                        _mm256_add_ps(_mm256_loadu_ps(p), *r)
                    } else {
                        *r
                    };
                    let r = match fin {
                        Some(f) => finish(f, r, i, i * ldc + v * LANES, ALL),
                        None => r,
                    };
                    _mm256_storeu_ps(p, r);
                }
            }
        } else {
            // Masked loads and stores touch only the `nr` valid columns.
            for (i, row) in acc.iter().enumerate().take(mr) {
                let cp = c.add(i * ldc);
                for (v, r) in row.iter().enumerate() {
                    let valid = nr.saturating_sub(v * LANES).min(LANES);
                    if valid == 0 {
                        break;
                    }
                    let mask = first_lanes(valid);
                    let p = cp.add(v * LANES);
                    let r = if add {
                        _mm256_add_ps(_mm256_maskload_ps(p, mask), *r)
                    } else {
                        *r
                    };
                    let r = match fin {
                        Some(f) => finish(f, r, i, i * ldc + v * LANES, valid),
                        None => r,
                    };
                    _mm256_maskstore_ps(p, mask, r);
                }
            }
        }
    }
}

/// Every lane of a vector ([`finish`]'s `valid`).
const ALL: usize = LANES;

/// The mask of a vector's first `valid` lanes (`1 <= valid <= 8`) for `maskload` and
/// `maskstore`: all bits set in those lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn first_lanes(valid: usize) -> __m256i {
    const ONES: [i32; 2 * LANES] = {
        let mut v = [0i32; 2 * LANES];
        let mut i = 0;
        while i < LANES {
            v[i] = -1;
            i += 1;
        }
        v
    };
    debug_assert!((1..=LANES).contains(&valid));
    let from = &ONES[LANES - valid..2 * LANES - valid];
    // SAFETY: `from` holds 8 values (`valid` at most 8).
    unsafe { _mm256_loadu_si256(from.as_ptr().cast()) }
}

/// `r` finished by `f` as row `i`'s values at offset `at` from the tile's first element
/// (its first `valid` lanes: only those of the residual are read).
///
/// # Safety
/// AVX2 and FMA must be available, and `f`'s pointers readable as its fields say.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn finish(f: TileFinish, r: __m256, i: usize, at: usize, valid: usize) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        let mut r = r;
        if !f.scale.is_null() {
            r = _mm256_mul_ps(r, _mm256_set1_ps(*f.scale.add(i)));
        }
        // The bias, or zero (as the scalar pass adds, which turns -0 into +0).
        let b = if f.bias.is_null() { 0. } else { *f.bias.add(i) };
        r = _mm256_add_ps(r, _mm256_set1_ps(b));
        if !f.residual.is_null() {
            let res = f.residual.add(at);
            let res = if valid == LANES {
                _mm256_loadu_ps(res)
            } else {
                _mm256_maskload_ps(res, first_lanes(valid))
            };
            r = _mm256_add_ps(res, r);
        }
        if f.relu {
            // `max(0, r)` returns `r` when it is NaN (the second operand), as the scalar
            // `if r < 0 { 0 } else { r }` does, and keeps -0.
            r = _mm256_max_ps(_mm256_setzero_ps(), r);
        }
        r
    }
}
