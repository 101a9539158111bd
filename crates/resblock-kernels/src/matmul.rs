//! The one way into our CPU GEMMs: `dst = [dst +] a . b` over strided operands, on our
//! AVX-512 [`crate::sgemm`] for f32 where it runs ([`crate::dispatch::Dispatch::own_gemm`]),
//! else the `gemm` crate (the kernel Candle's own matmul uses: AVX2/FMA, NEON or portable),
//! which also takes every f64 product. The convolutions' GEMM path (`conv/gemm.rs`) and the
//! dense layers (`dense/`) call it: [`gemm_into`] into initialised memory (accumulating or
//! not), [`gemm_uninit`] and [`gemm_new`] into fresh memory, which neither GEMM reads when
//! it does not accumulate, so no output is zero-filled first.

use std::mem::MaybeUninit;

use candle_core::WithDType;
use gemm::Parallelism;

/// `dst (m x n, row-major) = [dst +] a (m x k) . b (k x n)`, `a` and `b` given by row and
/// column strides into their slices.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: WithDType>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    par: Parallelism,
) {
    let len = dst.len();
    // SAFETY: `dst` is `len` initialised values, borrowed mutably for the call.
    unsafe {
        gemm_raw(
            dims,
            (dst.as_mut_ptr(), len, true),
            accumulate,
            (a, a_strides),
            (b, b_strides),
            None,
            par,
        );
    }
}

/// `dst (m x n, row-major) = a (m x k) . b (k x n)` into uninitialised memory, which it
/// returns initialised: each of the `m * n` values is written without being read, so a
/// fresh output needs no zero-filling first (a pass over it that cost 3-5% of a ResNet-50
/// batch-1 inference). Where our `sgemm` runs it the values are also finished as they are
/// stored ([`crate::sgemm::Finish`]); the second value says whether `finish` was applied
/// (elsewhere, and for a product with no depth, the caller applies it after).
///
/// # Panics
/// If `dst` is shorter than `m * n` or an operand's strides reach past its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_uninit<'d, T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &'d mut [MaybeUninit<T>],
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    finish: Option<crate::sgemm::Finish<'_>>,
    par: Parallelism,
) -> (&'d mut [T], bool) {
    let dst = &mut dst[..m * n];
    // SAFETY: `dst` is `m * n` values, borrowed mutably for the call; not accumulating,
    // `gemm_raw` writes them all without reading them, so they are initialised after it.
    unsafe {
        let finished = gemm_raw(
            (m, n, k),
            (dst.as_mut_ptr().cast(), m * n, false),
            false,
            (a, a_strides),
            (b, b_strides),
            finish,
            par,
        );
        let out = std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), m * n);
        (out, finished)
    }
}

/// A fresh `m x n` product `a . b` ([`gemm_uninit`] into a new vector).
pub(crate) fn gemm_new<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    par: Parallelism,
) -> Vec<T> {
    let mut dst = Vec::with_capacity(m * n);
    gemm_uninit(
        (m, n, k),
        &mut dst.spare_capacity_mut()[..m * n],
        a,
        a_strides,
        b,
        b_strides,
        None,
        par,
    );
    // SAFETY: `gemm_uninit` initialised the first `m * n` values.
    unsafe { dst.set_len(m * n) };
    dst
}

/// The GEMM behind [`gemm_into`] and [`gemm_uninit`], into `len` values at `dst`
/// (initialised where `init`), finished where our `sgemm` runs a product with depth into
/// uninitialised memory; returns whether `finish` was applied.
///
/// # Safety
/// `dst` must be valid for writes of `len` values, not aliased for the call, and, where
/// `accumulate`, initialised (`init`).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, len, init): (*mut T, usize, bool),
    accumulate: bool,
    (a, (a_rs, a_cs)): (&[T], (usize, usize)),
    (b, (b_rs, b_cs)): (&[T], (usize, usize)),
    finish: Option<crate::sgemm::Finish<'_>>,
    par: Parallelism,
) -> bool {
    assert!(
        init || !accumulate,
        "gemm: accumulating into uninitialised memory"
    );
    assert!(
        finish.is_none() || !init,
        "gemm: a finish is for a fresh product"
    );
    if m == 0 || n == 0 {
        return finish.is_some();
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(len >= m * n, "gemm: destination too small");
    if k == 0 {
        if !accumulate {
            // SAFETY: `dst` is valid for `len >= m * n` writes (the caller's contract).
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
        }
        return false;
    }
    assert!(a.len() > last(m, k, a_rs, a_cs), "gemm: lhs out of bounds");
    assert!(b.len() > last(k, n, b_rs, b_cs), "gemm: rhs out of bounds");
    if let (Some(a), Some(b)) = (as_f32(a), as_f32(b)) {
        // One row (a classifier at batch 1) stays on the `gemm` crate, whose matrix-vector
        // loop reads `b` once where our GEMM packs all of it for the row: 1 x 512 . 512 x
        // 1000 took 0.037 against 0.149 ms, 1 x 2048 . 2048 x 1000 0.158 against 0.836 ms
        // (Zen 3, AVX2 kernel, interleaved minima: `gemm-ab`); from two rows ours is ahead
        // (0.145 against 0.205 ms).
        if m > 1 && crate::sgemm::available() {
            let threads = threads_of(par);
            let a = crate::sgemm::Operand {
                data: a,
                rs: a_rs,
                cs: a_cs,
            };
            let b = crate::sgemm::Operand {
                data: b,
                rs: b_rs,
                cs: b_cs,
            };
            // SAFETY: T is f32 (`as_f32` above); `dst` is valid for `len` writes and, where
            // `init`, initialised (the caller's contract).
            if init {
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast::<f32>(), len) };
                crate::sgemm::sgemm((m, n, k), dst, accumulate, a, b, threads);
            } else {
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(dst.cast::<MaybeUninit<f32>>(), len) };
                crate::sgemm::sgemm_uninit((m, n, k), dst, a, b, finish, threads);
            }
            return finish.is_some();
        }
    }
    // SAFETY: every index the GEMM touches is in bounds (checked above), `dst` does not alias
    // `a` or `b` (the caller's contract and two `&`), T is f32 or f64 (the callers' dtype
    // match), and with `read_dst` false the `gemm` crate writes `dst` without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
    false
}

/// `s` as f32 when `T` is f32.
pub(crate) fn as_f32<T: WithDType>(s: &[T]) -> Option<&[f32]> {
    (T::DTYPE == candle_core::DType::F32)
        // SAFETY: T is f32 (same size, alignment and bit validity).
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
}

/// `s` as f32 when `T` is f32.
pub(crate) fn as_f32_mut<T: WithDType>(s: &mut [T]) -> Option<&mut [f32]> {
    (T::DTYPE == candle_core::DType::F32)
        // SAFETY: T is f32 (same size, alignment and bit validity).
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
}

/// `s` as f32 when `T` is f32.
pub(crate) fn as_f32_uninit<T: WithDType>(
    s: &mut [MaybeUninit<T>],
) -> Option<&mut [MaybeUninit<f32>]> {
    (T::DTYPE == candle_core::DType::F32).then(|| {
        // SAFETY: T is f32 (same size and alignment).
        unsafe {
            std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<MaybeUninit<f32>>(), s.len())
        }
    })
}

/// The thread count of a [`Parallelism`].
pub(crate) fn threads_of(par: Parallelism) -> usize {
    match par {
        Parallelism::None => 1,
        Parallelism::Rayon(t) => t.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-row product runs on the `gemm` crate (its finish left to the caller), two rows
    /// on our GEMM where it runs (finished as stored); both give the plain sums (exact here:
    /// quarters times small integers).
    #[test]
    fn one_row_products_stay_on_the_gemm_crate() {
        let (n, k) = (40, 9);
        let a: Vec<f32> = (0..2 * k).map(|i| i as f32 * 0.25 - 1.).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.).collect();
        let bias = [0.5f32, -0.5];
        let finish = crate::sgemm::Finish {
            scale: None,
            bias: Some(&bias),
            residual: None,
            relu: false,
        };
        for m in [1, 2] {
            let mut dst = vec![MaybeUninit::new(f32::NAN); m * n];
            let (out, finished) = gemm_uninit(
                (m, n, k),
                &mut dst,
                &a,
                (k, 1),
                &b,
                (n, 1),
                Some(finish),
                Parallelism::None,
            );
            assert_eq!(finished, m > 1 && crate::sgemm::available(), "{m} rows");
            for i in 0..m {
                for j in 0..n {
                    let sum: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                    let want = if finished { sum + bias[i] } else { sum };
                    assert_eq!(out[i * n + j], want, "{m} rows: ({i}, {j})");
                }
            }
        }
    }
}
