//! The one entry point of our CPU GEMMs: `dst = [dst +] a . b` over strided operands, on
//! our AVX-512 [`crate::sgemm`] for f32 where it runs ([`crate::dispatch::Dispatch::own_gemm`]),
//! else the `gemm` crate (the kernel Candle's own matmul uses: AVX2/FMA, NEON or portable),
//! which also takes every f64 product. The convolutions' GEMM path (`conv/gemm.rs`) and the
//! dense layers (`dense/`) call it.

use candle_core::WithDType;
use gemm::Parallelism;

/// `dst (m x n, row-major) = [dst +] a (m x k) . b (k x n)`, `a` and `b` given by row and
/// column strides into their slices.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() >= m * n, "gemm: destination too small");
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    assert!(a.len() > last(m, k, a_rs, a_cs), "gemm: lhs out of bounds");
    assert!(b.len() > last(k, n, b_rs, b_cs), "gemm: rhs out of bounds");
    if let (Some(dst), Some(a), Some(b)) = (as_f32_mut(dst), as_f32(a), as_f32(b)) {
        if crate::sgemm::available() {
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
            crate::sgemm::sgemm((m, n, k), dst, accumulate, a, b, threads);
            return;
        }
    }
    // SAFETY: every index the GEMM touches is in bounds (checked above), `dst` does not alias
    // `a` or `b` (a `&mut` and two `&`), and T is f32 or f64 (the callers' dtype match).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
        )
    }
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

/// The thread count of a [`Parallelism`].
pub(crate) fn threads_of(par: Parallelism) -> usize {
    match par {
        Parallelism::None => 1,
        Parallelism::Rayon(t) => t.max(1),
    }
}
