//! The AVX-512 micro-kernels of the direct convolution: 8 output channels by 2 vectors of 16
//! pixels (forward: 16 accumulators of the 32 registers), 8 channels by 3 taps (weight
//! gradient, as two passes of 4 channels: 12 accumulators).
//!
//! Against the AVX2 tile (4 x 2 vectors of 8) each broadcast weight feeds twice the pixels and
//! each loaded input vector twice the channels, so a step issues half the loads per FMA and
//! twice as many independent accumulators hide the FMA latency. (On CPUs that execute a
//! 512-bit FMA as two 256-bit halves, such as AMD Zen 4, that is where the gain comes from:
//! the peak FMA rate is the same as AVX2's.)

use std::arch::x86_64::*;

use super::{Isa, MAX_CB, QV, TB};

/// Output channels per micro-tile.
const CB: usize = Isa::Avx512.cb();
/// f32 lanes of one register.
const LANES: usize = Isa::Avx512.lanes();

/// With `TQ = LANES * QV` pixels:
/// `out[j * qlen + 0..TQ] = sum_ci sum_tap w[ci, tap, j] * x[ci * ps + taps[tap] + 0..TQ]`.
///
/// # Safety
/// AVX-512F must be available; `x` must be readable for `(c - 1) * ps + max(taps) + TQ`
/// floats, `w` for `c * taps.len() * CB`, and `out` writable for `(CB - 1) * qlen + TQ`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn fwd_tile(
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
        let mut acc = [[_mm512_setzero_ps(); QV]; CB];
        let mut xv = [_mm512_setzero_ps(); QV];
        let mut wp = w;
        for ci in 0..c {
            let xc = x.add(ci * ps);
            for &off in taps {
                let p = xc.add(off);
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = _mm512_loadu_ps(p.add(v * LANES));
                }
                for (j, row) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*wp.add(j));
                    for (a, xv) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(*xv, b, *a);
                    }
                }
                wp = wp.add(CB);
            }
        }
        for (j, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                _mm512_storeu_ps(out.add(j * qlen + v * LANES), *a);
            }
        }
    }
}

/// `sums[j][t] += sum_i sum_{q < qlen} dys[i][j * stride + q] * xs[i][offs[t] + q]` for every
/// `j < CB`, starting from zero.
///
/// # Safety
/// AVX-512F must be available, `qlen` a multiple of 16, every `xs[i]` readable for
/// `max(offs) + qlen` floats and every `dys[i]` for `(CB - 1) * stride + qlen`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn wgrad_tile(
    (xs, dys): (&[*const f32], &[*const f32]),
    offs: [usize; TB],
    stride: usize,
    qlen: usize,
    sums: &mut [[f32; TB]; MAX_CB],
) {
    *sums = [[0.0; TB]; MAX_CB];
    for (&x, &dy) in xs.iter().zip(dys) {
        // SAFETY: the caller's contract, for one image.
        unsafe { wgrad_image(x, dy, offs, stride, qlen, sums) };
    }
}

/// Output channels per weight-gradient pass: a tile's `CB` channels run as two passes of 4
/// (12 accumulators). One pass of all 8 (24 accumulators) made LLVM spill them to the stack
/// and run slower than the AVX2 kernel.
const WG_ROWS: usize = 4;

/// One image's share of [`wgrad_tile`], added to `sums`.
///
/// # Safety
/// As [`wgrad_tile`] for one `(x, dy)`.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn wgrad_image(
    x: *const f32,
    dy: *const f32,
    offs: [usize; TB],
    stride: usize,
    qlen: usize,
    sums: &mut [[f32; TB]; MAX_CB],
) {
    for (half, sums) in sums[..CB].chunks_exact_mut(WG_ROWS).enumerate() {
        // SAFETY: the caller's contract covers every pointer formed here; the pass reads `dY`
        // rows `half * WG_ROWS..(half + 1) * WG_ROWS < CB`.
        unsafe {
            let dy = dy.add(half * WG_ROWS * stride);
            let mut acc = [[_mm512_setzero_ps(); TB]; WG_ROWS];
            let mut q = 0;
            while q < qlen {
                let mut xv = [_mm512_setzero_ps(); TB];
                for (v, off) in xv.iter_mut().zip(offs) {
                    *v = _mm512_loadu_ps(x.add(off + q));
                }
                for (j, row) in acc.iter_mut().enumerate() {
                    let d = _mm512_loadu_ps(dy.add(j * stride + q));
                    for (a, xv) in row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(*xv, d, *a);
                    }
                }
                q += LANES;
            }
            for (s, a) in sums.iter_mut().zip(&acc) {
                for (s, a) in s.iter_mut().zip(a) {
                    *s += _mm512_reduce_add_ps(*a);
                }
            }
        }
    }
}
