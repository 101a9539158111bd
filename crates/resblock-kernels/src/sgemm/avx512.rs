//! The AVX-512 micro-kernel of [`super::sgemm`]: an `MR x NR` = 8 x 32 tile of `dst` (two
//! 16-lane registers per row, 16 accumulators of the 32 registers) from a packed `A` panel
//! (`MR` values per `k`) and a packed `B` panel (`NR` values per `k`).
//!
//! Per `k` it loads two `B` vectors and broadcasts eight `A` values into 16 FMAs, so the FMA
//! units, not the loads, set the pace; 16 independent accumulators cover the FMA latency of
//! two full-width pipes.

use std::arch::x86_64::*;

use super::{Avx512Kernel, Micro, TileDst, TileFinish};

const MR: usize = Avx512Kernel::MR;
const NR: usize = Avx512Kernel::NR;

const LANES: usize = 16;
/// How far ahead (floats) the in-place loop asks for its `B` panel: 32 steps of `k`, 4 KiB.
/// A column part of `columns_pay` walks along a row of panels, each new `B` panel coming
/// from L2 (64 KiB at `KC_IN_PLACE`), and the FMAs waited on its loads: 1024^3 on two
/// threads 4.81-4.85 ms against 4.95-5.20 without (16 steps ahead 4.87-5.11, 64 the same
/// as 32). The prefetch stays out of the packed loop, whose `B` panel stays in L1. (That
/// timing was taken while the loop also stored its sums to the stack on every step, see
/// [`store`]; `cargo xtask asm` now checks it does not.)
const PF: usize = 32 * NR;

/// `c[i * ldc + j] (=|+=) sum_p A[i, p] * b[p * NR + j]` for `i < mr`, `j < nr` (the
/// fields of `dst`), on `VR` vectors per row: 2 (`NR` columns), or 1 for a last panel of at most 16 columns
/// (the panel keeps its `NR` stride; only its first 16 values per `k` are read).
///
/// `A` is a packed panel, `A[i, p] = a[p * MR + i]`, when `LDA` is `None`; with `Some(lda)`
/// it is read in place from a row-major matrix, `A[i, p] = a[i * lda + p]` (rows past `mr`
/// read row 0 again; their sums are not stored): see `STRIDED_A_PANELS` in `mod.rs`.
///
/// With `dst.fin`, each stored value is finished first ([`finish`]).
///
/// # Safety
/// AVX-512 F must be available; `a` readable for `kc * MR` floats (packed) or at
/// `i * lda + p` for `i < mr`, `p < kc` (in place), `b` for `kc * NR`, and `dst` as
/// [`TileDst`] says, with `nr <= VR * 16`.
#[target_feature(enable = "avx512f,avx2,fma")]
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
        let mut acc = [[_mm512_setzero_ps(); VR]; MR];
        let mut bp = b;
        match lda {
            None => {
                let mut ap = a;
                for _ in 0..kc {
                    let mut bv = [_mm512_setzero_ps(); VR];
                    for (v, b) in bv.iter_mut().enumerate() {
                        *b = _mm512_loadu_ps(bp.add(v * LANES));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*ap.add(i));
                        for (r, b) in row.iter_mut().zip(&bv) {
                            *r = _mm512_fmadd_ps(av, *b, *r);
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
                    let mut bv = [_mm512_setzero_ps(); VR];
                    for (v, b) in bv.iter_mut().enumerate() {
                        // A hint: it reads nothing and cannot fault past the panel.
                        _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PF + v * LANES).cast::<i8>());
                        *b = _mm512_loadu_ps(bp.add(v * LANES));
                    }
                    for (row, ap) in acc.iter_mut().zip(&rows) {
                        let av = _mm512_set1_ps(*ap.add(p));
                        for (r, b) in row.iter_mut().zip(&bv) {
                            *r = _mm512_fmadd_ps(av, *b, *r);
                        }
                    }
                    bp = bp.add(NR);
                }
            }
        }
        let sums = acc;
        store(&sums, dst);
    }
}

/// Stores (adds, finishes) the sums `acc` of [`kernel`]'s tile, as it says. Out of line, as
/// AVX2's `store`: with these loops inside the kernel the compiler kept the sums in memory
/// as well as in registers and stored all 16 on every step of `k` (found in the assembly;
/// on the Xeon of the thirty-seventh session the loop with the stores ran as fast: 1024^3
/// on two threads 7.07-7.47 against 6.96-7.49 ms).
///
/// # Safety
/// As [`kernel`]'s for `dst`.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline(never)]
unsafe fn store<const VR: usize>(acc: &[[__m512; VR]; MR], dst: TileDst) {
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
                        _mm512_add_ps(_mm512_loadu_ps(p), *r)
                    } else {
                        *r
                    };
                    let r = match fin {
                        Some(f) => finish(f, r, i, i * ldc + v * LANES, 0xffff),
                        None => r,
                    };
                    _mm512_storeu_ps(p, r);
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
                    let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
                    let p = cp.add(v * LANES);
                    let r = if add {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), *r)
                    } else {
                        *r
                    };
                    let r = match fin {
                        Some(f) => finish(f, r, i, i * ldc + v * LANES, mask),
                        None => r,
                    };
                    _mm512_mask_storeu_ps(p, mask, r);
                }
            }
        }
    }
}

/// `r` finished by `f` as row `i`'s values at offset `at` from the tile's first element
/// (the lanes of `mask`: only those of the residual are read).
///
/// # Safety
/// AVX-512 F must be available, and `f`'s pointers readable as its fields say.
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn finish(f: TileFinish, r: __m512, i: usize, at: usize, mask: __mmask16) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe {
        let mut r = r;
        if !f.scale.is_null() {
            r = _mm512_mul_ps(r, _mm512_set1_ps(*f.scale.add(i)));
        }
        // The bias, or zero (as the scalar pass adds, which turns -0 into +0).
        let b = if f.bias.is_null() { 0. } else { *f.bias.add(i) };
        r = _mm512_add_ps(r, _mm512_set1_ps(b));
        if !f.residual.is_null() {
            r = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, f.residual.add(at)), r);
        }
        if f.relu {
            // `max(0, r)` returns `r` when it is NaN (the second operand), as the scalar
            // `if r < 0 { 0 } else { r }` does, and keeps -0.
            r = _mm512_max_ps(_mm512_setzero_ps(), r);
        }
        r
    }
}
