//! The elementwise loops of the f32 BatchNorm kernels (the standalone norm and the fused
//! conv + norm op): per-plane moments, normalisation (optionally with a residual sum), the
//! backward's channel sums and input gradient, a ReLU's gradient.
//!
//! Plain loops that LLVM vectorises, compiled for AVX-512, AVX2 + FMA or the build target
//! ([`crate::simd::with_simd`], the widest [`crate::dispatch::simd_in_use`] allows), plus
//! explicit AVX-512 and AVX2 kernels for the f32 -> f64 sums. No FMA is formed in the f32
//! arithmetic (Rust never contracts `a * b + c`), so a backward that recomputes the ReLU's
//! mask from the norm's input matches the forward's output bit for bit.

use std::mem::MaybeUninit;

use crate::buffer::Slot;
#[cfg(target_arch = "x86_64")]
use crate::dispatch::usable;
use crate::dispatch::{simd_in_use, Simd};
use crate::simd::with_simd;

/// Floats per step of the explicit sum kernels (one f64 vector of AVX-512, two of AVX2).
const LANES: usize = 8;

macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident;) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            with_simd!(simd_in_use(), $body($($arg: $ty),*) -> $ret)
        }
    };
}

/// One plane's mean and sum of squared deviations from it, in f64.
pub(crate) fn moments(p: &[f32]) -> (f64, f64) {
    moments_with(simd_in_use(), p)
}

/// [`moments`] with the sum kernels of `simd` (narrower where the CPU lacks it).
fn moments_with(simd: Simd, p: &[f32]) -> (f64, f64) {
    let mu = shifted_sums(simd, p, 0.).0 / p.len() as f64;
    (mu, shifted_sums(simd, p, mu).1)
}

/// `sum(v - mu)` and `sum((v - mu)^2)` in f64.
fn shifted_sums(simd: Simd, p: &[f32], mu: f64) -> (f64, f64) {
    let n = p.len() / LANES * LANES;
    #[cfg(target_arch = "x86_64")]
    let (n, (mut s, mut q)) = match usable(simd) {
        // SAFETY: the CPU has AVX-512 (`usable`); `n <= p.len()`, a multiple of 8.
        Simd::Avx512 => (n, unsafe { x86::shifted_sums512(p.as_ptr(), n, mu) }),
        // SAFETY: the CPU has AVX2 and FMA (`usable`); as above.
        Simd::Avx2 => (n, unsafe { x86::shifted_sums(p.as_ptr(), n, mu) }),
        Simd::Portable => (0, (0., 0.)),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (n, (mut s, mut q)) = {
        let _ = (n, simd);
        (0, (0f64, 0f64))
    };
    for v in &p[n..] {
        let d = f64::from(*v) - mu;
        s += d;
        q += d * d;
    }
    (s, q)
}

dispatch! {
    /// `out = relu?((v - mu) * scale + shift)`, as `batch_norm::normalize`.
    fn normalize(out: &mut [MaybeUninit<f32>], v: &[f32], coef: (f32, f32, f32), relu: bool) -> () = normalize_body;
}

#[inline(always)]
fn normalize_body(
    out: &mut [MaybeUninit<f32>],
    v: &[f32],
    (mu, scale, shift): (f32, f32, f32),
    relu: bool,
) {
    if relu {
        for (o, v) in out.iter_mut().zip(v) {
            let r = (*v - mu) * scale + shift;
            o.write(if r < 0.0 { 0.0 } else { r });
        }
    } else {
        for (o, v) in out.iter_mut().zip(v) {
            o.write((*v - mu) * scale + shift);
        }
    }
}

dispatch! {
    /// `out = relu?((v - mu) * scale + shift + res)`: the norm, then the residual added
    /// (rounded as two ops: the norm's output, then the sum, as PyTorch's
    /// `relu(bn(x) + res)`).
    fn normalize_add(out: &mut [MaybeUninit<f32>], vr: (&[f32], &[f32]), coef: (f32, f32, f32), relu: bool) -> () = normalize_add_body;
}

#[inline(always)]
fn normalize_add_body(
    out: &mut [MaybeUninit<f32>],
    (v, res): (&[f32], &[f32]),
    (mu, scale, shift): (f32, f32, f32),
    relu: bool,
) {
    for ((o, v), r) in out.iter_mut().zip(v).zip(res) {
        let y = (*v - mu) * scale + shift;
        let z = y + *r;
        o.write(if relu && z < 0.0 { 0.0 } else { z });
    }
}

/// `dy` where the ReLU's output `y` is positive, zero elsewhere.
pub(crate) fn relu_grad(y: &[f32], dy: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    assert_eq!(y.len(), dy.len(), "relu_grad: sizes");
    let fill = |g: &mut [MaybeUninit<f32>]| {
        g.par_chunks_mut(1 << 14)
            .zip(y.par_chunks(1 << 14).zip(dy.par_chunks(1 << 14)))
            .for_each(|(g, (y, dy))| relu_grad_into(g, (y, dy)))
    };
    // SAFETY: the chunks of `g`, `y` and `dy` line up (equal lengths), and `relu_grad_into`
    // writes every element of its chunk.
    unsafe { crate::buffer::vec_written_by(y.len(), fill) }
}

dispatch! {
    /// `g = dy` where `y > 0`, else 0.
    fn relu_grad_into(g: &mut [MaybeUninit<f32>], ydy: (&[f32], &[f32])) -> () = relu_grad_body;
}

#[inline(always)]
fn relu_grad_body(g: &mut [MaybeUninit<f32>], (y, dy): (&[f32], &[f32])) {
    for ((g, y), d) in g.iter_mut().zip(y).zip(dy) {
        g.write(if *y > 0.0 { *d } else { 0.0 });
    }
}

/// The output gradient through the fused ReLU: zero where the forward's output was not
/// positive (recomputed from the convolution output `v`).
#[inline(always)]
fn masked(v: f32, g: f32, (mu, scale, shift): (f32, f32, f32), relu: bool) -> f32 {
    if relu && (v - mu) * scale + shift <= 0.0 {
        0.0
    } else {
        g
    }
}

/// `sum(g)` and `sum(g * (v - mu))` over one plane of the convolution output `v`, `g`
/// the output gradient `dy` through the ReLU (see [`masked`]), in f64.
pub(crate) fn grad_sums(
    v: &[f32],
    dy: &[f32],
    coef: (f32, f32, f32),
    mu: f64,
    relu: bool,
) -> (f64, f64) {
    grad_sums_with(simd_in_use(), (v, dy), coef, mu, relu)
}

/// [`grad_sums`] with the sum kernels of `simd` (narrower where the CPU lacks it).
fn grad_sums_with(
    simd: Simd,
    (v, dy): (&[f32], &[f32]),
    coef: (f32, f32, f32),
    mu: f64,
    relu: bool,
) -> (f64, f64) {
    assert_eq!(v.len(), dy.len(), "conv_bn: gradient size");
    let n = v.len() / LANES * LANES;
    #[cfg(target_arch = "x86_64")]
    let (n, (mut a, mut b)) = {
        let ptrs = (v.as_ptr(), dy.as_ptr());
        match usable(simd) {
            // SAFETY: the CPU has AVX-512 (`usable`); `n <= v.len() = dy.len()`, a multiple
            // of 8.
            Simd::Avx512 => (n, unsafe { x86::grad_sums512(ptrs, n, coef, mu, relu) }),
            // SAFETY: the CPU has AVX2 and FMA (`usable`); as above.
            Simd::Avx2 => (n, unsafe { x86::grad_sums(ptrs, n, coef, mu, relu) }),
            Simd::Portable => (0, (0., 0.)),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (n, (mut a, mut b)) = {
        let _ = (n, simd);
        (0, (0f64, 0f64))
    };
    for (v, g) in v[n..].iter().zip(&dy[n..]) {
        let g = f64::from(masked(*v, *g, coef, relu));
        a += g;
        b += g * (f64::from(*v) - mu);
    }
    (a, b)
}

dispatch! {
    /// One row of the norm's input gradient
    /// `out = a * (g - mean(g) - (v - mean) * k)` (see `batch_norm::grad_coef`).
    fn input_grad(out: &mut [f32], vg: (&[f32], &[f32]), fcoef: (f32, f32, f32), gcoef: (f32, f32, f32, f32), relu: bool) -> () = input_grad_body;
}

dispatch! {
    /// [`input_grad`] into memory not yet written (a `vec_written_by` buffer).
    fn input_grad_uninit(out: &mut [MaybeUninit<f32>], vg: (&[f32], &[f32]), fcoef: (f32, f32, f32), gcoef: (f32, f32, f32, f32), relu: bool) -> () = input_grad_body;
}

#[inline(always)]
fn input_grad_body<S: Slot>(
    out: &mut [S],
    (v, g): (&[f32], &[f32]),
    fcoef: (f32, f32, f32),
    (mu, a, mdy, k): (f32, f32, f32, f32),
    relu: bool,
) {
    for ((o, v), g) in out.iter_mut().zip(v).zip(g) {
        o.put(a * (masked(*v, *g, fcoef, relu) - mdy - (*v - mu) * k));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Both halves of 8 f32 lanes as f64 vectors.
    #[target_feature(enable = "avx2,fma")]
    fn widen(v: __m256) -> (__m256d, __m256d) {
        (
            _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256d) -> f64 {
        let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
    }

    /// `sum(v - mu)` and `sum((v - mu)^2)` over `p[..n]`, `n` a multiple of 8.
    ///
    /// # Safety
    /// AVX2 and FMA must be available and `p` readable for `n` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn shifted_sums(p: *const f32, n: usize, mu: f64) -> (f64, f64) {
        let m = _mm256_set1_pd(mu);
        let (mut s0, mut s1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let (mut q0, mut q1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut i = 0;
        while i < n {
            // SAFETY: `i + 8 <= n` floats are readable (the caller's contract).
            let (lo, hi) = widen(unsafe { _mm256_loadu_ps(p.add(i)) });
            let (d0, d1) = (_mm256_sub_pd(lo, m), _mm256_sub_pd(hi, m));
            s0 = _mm256_add_pd(s0, d0);
            s1 = _mm256_add_pd(s1, d1);
            q0 = _mm256_fmadd_pd(d0, d0, q0);
            q1 = _mm256_fmadd_pd(d1, d1, q1);
            i += 8;
        }
        (hsum(_mm256_add_pd(s0, s1)), hsum(_mm256_add_pd(q0, q1)))
    }

    /// `grad_sums` over the first `n` values (a multiple of 8).
    ///
    /// # Safety
    /// AVX2 and FMA must be available and both pointers readable for `n` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn grad_sums(
        (v, dy): (*const f32, *const f32),
        n: usize,
        (mu32, scale, shift): (f32, f32, f32),
        mu: f64,
        relu: bool,
    ) -> (f64, f64) {
        let (mu32, scale, shift) = (
            _mm256_set1_ps(mu32),
            _mm256_set1_ps(scale),
            _mm256_set1_ps(shift),
        );
        let m = _mm256_set1_pd(mu);
        let (mut a0, mut a1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let (mut b0, mut b1) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut i = 0;
        while i < n {
            // SAFETY: `i + 8 <= n` floats of both are readable (the caller's contract).
            let (x, mut g) = unsafe { (_mm256_loadu_ps(v.add(i)), _mm256_loadu_ps(dy.add(i))) };
            if relu {
                // As `masked`: keep `g` unless (x - mu) * scale + shift <= 0 (no FMA).
                let r = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, mu32), scale), shift);
                g = _mm256_and_ps(g, _mm256_cmp_ps::<_CMP_NLE_UQ>(r, _mm256_setzero_ps()));
            }
            let ((g0, g1), (x0, x1)) = (widen(g), widen(x));
            a0 = _mm256_add_pd(a0, g0);
            a1 = _mm256_add_pd(a1, g1);
            b0 = _mm256_fmadd_pd(g0, _mm256_sub_pd(x0, m), b0);
            b1 = _mm256_fmadd_pd(g1, _mm256_sub_pd(x1, m), b1);
            i += 8;
        }
        (hsum(_mm256_add_pd(a0, a1)), hsum(_mm256_add_pd(b0, b1)))
    }

    /// Steps of 8 floats per loop turn of the AVX-512 sums (independent accumulators, so
    /// the f64 additions' latency does not bound the loop).
    const UNROLL: usize = 4;

    /// [`shifted_sums`] with 8 f64 lanes and 4 accumulators per sum.
    ///
    /// # Safety
    /// AVX-512 F must be available and `p` readable for `n` floats, `n` a multiple of 8.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(crate) unsafe fn shifted_sums512(p: *const f32, n: usize, mu: f64) -> (f64, f64) {
        let m = _mm512_set1_pd(mu);
        let mut s = [_mm512_setzero_pd(); UNROLL];
        let mut q = [_mm512_setzero_pd(); UNROLL];
        let mut step = |j: usize, k: usize| {
            // SAFETY: `j + 8 <= n` floats are readable (the caller's contract).
            let x = unsafe { _mm256_loadu_ps(p.add(j)) };
            let d = _mm512_sub_pd(_mm512_cvtps_pd(x), m);
            s[k] = _mm512_add_pd(s[k], d);
            q[k] = _mm512_fmadd_pd(d, d, q[k]);
        };
        let mut i = 0;
        while i + 8 * UNROLL <= n {
            for k in 0..UNROLL {
                step(i + 8 * k, k);
            }
            i += 8 * UNROLL;
        }
        while i < n {
            step(i, 0);
            i += 8;
        }
        (sum4(s), sum4(q))
    }

    /// [`grad_sums`] with 8 f64 lanes and 4 accumulators per sum.
    ///
    /// # Safety
    /// AVX-512 F must be available and both pointers readable for `n` floats, `n` a
    /// multiple of 8.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(crate) unsafe fn grad_sums512(
        (v, dy): (*const f32, *const f32),
        n: usize,
        (mu32, scale, shift): (f32, f32, f32),
        mu: f64,
        relu: bool,
    ) -> (f64, f64) {
        let (mu32, scale, shift) = (
            _mm256_set1_ps(mu32),
            _mm256_set1_ps(scale),
            _mm256_set1_ps(shift),
        );
        let m = _mm512_set1_pd(mu);
        let mut a = [_mm512_setzero_pd(); UNROLL];
        let mut b = [_mm512_setzero_pd(); UNROLL];
        let mut step = |j: usize, k: usize| {
            // SAFETY: `j + 8 <= n` floats of both are readable (the caller's contract).
            let (x, mut g) = unsafe { (_mm256_loadu_ps(v.add(j)), _mm256_loadu_ps(dy.add(j))) };
            if relu {
                // As `masked`: keep `g` unless (x - mu) * scale + shift <= 0 (no FMA).
                let r = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, mu32), scale), shift);
                g = _mm256_and_ps(g, _mm256_cmp_ps::<_CMP_NLE_UQ>(r, _mm256_setzero_ps()));
            }
            let g = _mm512_cvtps_pd(g);
            a[k] = _mm512_add_pd(a[k], g);
            b[k] = _mm512_fmadd_pd(g, _mm512_sub_pd(_mm512_cvtps_pd(x), m), b[k]);
        };
        let mut i = 0;
        while i + 8 * UNROLL <= n {
            for k in 0..UNROLL {
                step(i + 8 * k, k);
            }
            i += 8 * UNROLL;
        }
        while i < n {
            step(i, 0);
            i += 8;
        }
        (sum4(a), sum4(b))
    }

    /// The sum of every lane of four accumulators.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn sum4(v: [__m512d; UNROLL]) -> f64 {
        _mm512_reduce_add_pd(_mm512_add_pd(
            _mm512_add_pd(v[0], v[1]),
            _mm512_add_pd(v[2], v[3]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.) / 17.)
            .collect()
    }

    const LEVELS: [Simd; 3] = [Simd::Portable, Simd::Avx2, Simd::Avx512];

    /// The sums against plain f64 loops on every SIMD level, at lengths that are all
    /// scalar tail (7), all vector body (32, 64: whole AVX-512 turns), and both (37, 49: a
    /// turn, single steps and a tail).
    #[test]
    fn sums_match_plain_loops() {
        for simd in LEVELS {
            for n in [7, 32, 37, 49, 64] {
                let (v, dy) = (values(n), values(n + 3)[3..].to_vec());
                let mu = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64;
                let q: f64 = v.iter().map(|x| (f64::from(*x) - mu).powi(2)).sum();
                let (m, m2) = moments_with(simd, &v);
                assert!(
                    (m - mu).abs() < 1e-12 && (m2 - q).abs() < 1e-9 * q,
                    "{simd:?} moments at {n}"
                );
                let coef = (0.25f32, 1.5f32, -0.125f32);
                for relu in [false, true] {
                    let (mut a, mut b) = (0f64, 0f64);
                    for (x, g) in v.iter().zip(&dy) {
                        let g = f64::from(masked(*x, *g, coef, relu));
                        a += g;
                        b += g * (f64::from(*x) - 0.25);
                    }
                    let (sa, sb) = grad_sums_with(simd, (&v, &dy), coef, 0.25, relu);
                    assert!(
                        (sa - a).abs() < 1e-9 && (sb - b).abs() < 1e-9,
                        "{simd:?} grad_sums at {n}, relu {relu}: ({sa}, {sb}) vs ({a}, {b})"
                    );
                }
            }
        }
    }

    /// The elementwise loops compiled for each SIMD level give the portable loops' values
    /// bit for bit (no FMA is formed on any level).
    #[test]
    fn elementwise_loops_agree_on_every_level() {
        let n = 45;
        let (v, g, r) = (
            values(n),
            values(n + 5)[5..].to_vec(),
            values(n + 9)[9..].to_vec(),
        );
        let (fcoef, gcoef) = ((0.25f32, 1.5f32, -0.125f32), (0.3f32, 0.7, -0.2, 0.9));
        let run = |simd: Simd| {
            let mut out = Vec::new();
            let (v, vr, vg) = (
                v.as_slice(),
                (v.as_slice(), r.as_slice()),
                (v.as_slice(), g.as_slice()),
            );
            for relu in [false, true] {
                let mut ys = vec![MaybeUninit::new(0f32); n];
                let y = ys.as_mut_slice();
                with_simd!(simd, normalize_body(y: &mut [MaybeUninit<f32>], v: &[f32], fcoef: (f32, f32, f32), relu: bool));
                let mut zs = vec![MaybeUninit::new(0f32); n];
                let z = zs.as_mut_slice();
                with_simd!(simd, normalize_add_body(z: &mut [MaybeUninit<f32>], vr: (&[f32], &[f32]), fcoef: (f32, f32, f32), relu: bool));
                let mut ds = vec![0f32; n];
                let d = ds.as_mut_slice();
                with_simd!(simd, input_grad_body(d: &mut [f32], vg: (&[f32], &[f32]), fcoef: (f32, f32, f32), gcoef: (f32, f32, f32, f32), relu: bool));
                // The same body into memory not yet written (`input_grad_uninit`).
                let mut us = vec![MaybeUninit::new(f32::NAN); n];
                let u = us.as_mut_slice();
                with_simd!(simd, input_grad_body(u: &mut [MaybeUninit<f32>], vg: (&[f32], &[f32]), fcoef: (f32, f32, f32), gcoef: (f32, f32, f32, f32), relu: bool));
                // SAFETY: every element was initialised above.
                let us: Vec<f32> = us.iter().map(|x| unsafe { x.assume_init() }).collect();
                assert_eq!(us, ds, "{simd:?}: input_grad into uninitialised memory");
                // SAFETY: every element was initialised above.
                out.extend(ys.iter().chain(&zs).map(|x| unsafe { x.assume_init() }));
                out.extend(ds);
            }
            let mut ms = vec![MaybeUninit::new(0f32); n];
            let (m, ydy) = (ms.as_mut_slice(), (r.as_slice(), g.as_slice()));
            with_simd!(simd, relu_grad_body(m: &mut [MaybeUninit<f32>], ydy: (&[f32], &[f32])));
            // SAFETY: as above.
            out.extend(ms.iter().map(|x| unsafe { x.assume_init() }));
            out.into_iter().map(f32::to_bits).collect::<Vec<_>>()
        };
        let want = run(Simd::Portable);
        for simd in LEVELS {
            assert_eq!(run(simd), want, "{simd:?}");
        }
    }
}
