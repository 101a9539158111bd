//! The machine's peak f32 multiply-add rate, measured: the ceiling every kernel's GFLOP/s is
//! reported against (`cargo xtask bench`, row `cpu/peak/fma_f32`).
//!
//! Each thread runs chains of dependent FMAs, [`CHAINS`] vector registers at once (enough to
//! cover the FMA latency of two pipelines), on the widest SIMD [`crate::dispatch`] allows; no
//! memory is touched in the loop. The result is cores x FMA pipes x lanes x 2 x clock as
//! the CPU really runs it (turbo, and the halving of 512-bit FMAs on CPUs that execute them
//! as two 256-bit halves, such as AMD Zen 4).

use rayon::prelude::*;

use crate::dispatch::{simd_in_use, Simd};

/// Independent accumulators per thread.
pub const CHAINS: usize = 12;

/// Runs `iters` steps of [`CHAINS`] FMAs on every rayon thread and returns the floating-point
/// operations done (two per lane per FMA) and a value that depends on every result (so the
/// work cannot be optimised away).
pub fn fma_peak(iters: u64) -> (f64, f32) {
    let threads = rayon::current_num_threads();
    let simd = simd_in_use();
    let lanes = match simd {
        Simd::Avx512 => 16,
        Simd::Avx2 => 8,
        Simd::Portable => 1,
    };
    let check: f32 = (0..threads)
        .into_par_iter()
        .map(|t| chains(simd, iters, t as f32 * 1e-3))
        .sum();
    let flop = 2. * (threads * CHAINS * lanes) as f64 * iters as f64;
    (flop, check)
}

/// One thread's chains.
fn chains(simd: Simd, iters: u64, seed: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: `simd_in_use` reports a level only where the CPU has it.
        Simd::Avx512 => return unsafe { x86::chains512(iters, seed) },
        // SAFETY: as above.
        Simd::Avx2 => return unsafe { x86::chains256(iters, seed) },
        Simd::Portable => {}
    }
    let _ = simd;
    let mut acc = [seed; CHAINS];
    for _ in 0..iters {
        for a in &mut acc {
            *a = a.mul_add(0.999_9, 1e-4);
        }
    }
    acc.iter().sum()
}

/// Whether this CPU retires 512-bit FMAs at twice the rate of 256-bit ones (two 512-bit FMA
/// units, as Intel's server cores have), measured once per process on the calling thread
/// (about a millisecond): the fastest of three runs of [`CHAINS`] chains at each width.
/// `false` where AVX-512 is not in use, and on CPUs that split a 512-bit FMA into two
/// 256-bit halves (AMD Zen 4), where the two rates are equal.
///
/// Kernels that trade multiplies for memory traffic (Winograd) pay only where multiplies
/// are the scarcer resource: on a Zen 4 host ResNet-18 inference ran faster with them, on
/// an Intel Xeon host (two 512-bit units) 10% slower.
pub fn full_width_fma() -> bool {
    static FULL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FULL.get_or_init(|| simd_in_use() == Simd::Avx512 && fma_width_ratio() >= FULL_WIDTH_RATIO)
}

/// [`full_width_fma`] holds from this ratio of the 512-bit to the 256-bit FMA rate (2 on
/// two full-width units, 1 on split ones).
const FULL_WIDTH_RATIO: f64 = 1.5;

/// The 512-bit FMA rate over the 256-bit one, in f32 operations per second, on this thread.
fn fma_width_ratio() -> f64 {
    const ITERS: u64 = 50_000;
    let best = |simd: Simd| {
        (0..3)
            .map(|i| {
                let t = std::time::Instant::now();
                std::hint::black_box(chains(simd, ITERS, 0.5 + i as f32));
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let (wide, narrow) = (best(Simd::Avx512), best(Simd::Avx2));
    // Twice the lanes per FMA: the same time means twice the rate.
    2.0 * narrow / wide.max(f64::MIN_POSITIVE)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F and VL must be available.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn chains512(iters: u64, seed: f32) -> f32 {
        let (b, c) = (_mm512_set1_ps(0.999_9), _mm512_set1_ps(1e-4));
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        for _ in 0..iters {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, b, c);
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }

    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chains256(iters: u64, seed: f32) -> f32 {
        let (b, c) = (_mm256_set1_ps(0.999_9), _mm256_set1_ps(1e-4));
        let mut acc = [_mm256_set1_ps(seed); CHAINS];
        for _ in 0..iters {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, b, c);
            }
        }
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The measured ratio of 512-bit to 256-bit FMA rates is one of the two a CPU can have
    /// (1: split 512-bit FMAs, 2: full-width units), give or take a noisy host, and
    /// [`full_width_fma`] says which.
    #[test]
    fn fma_width_ratio_is_one_or_two() {
        if simd_in_use() != Simd::Avx512 {
            assert!(!full_width_fma());
            return;
        }
        let r = fma_width_ratio();
        eprintln!("512-bit / 256-bit FMA rate: {r:.2}");
        assert!((0.7..2.6).contains(&r), "ratio {r}");
        assert_eq!(full_width_fma(), full_width_fma());
    }

    /// Every path computes the same recurrence: x -> 0.9999 x + 1e-4 from the seed, summed
    /// over chains and lanes.
    #[test]
    fn every_path_computes_the_recurrence() {
        let want = |seed: f32, n: u64| {
            let mut x = f64::from(seed);
            for _ in 0..n {
                x = x * 0.9999 + 1e-4;
            }
            x
        };
        for (simd, lanes) in [(Simd::Portable, 1.), (Simd::Avx2, 8.), (Simd::Avx512, 16.)] {
            if !crate::dispatch::cpu().has(simd) {
                continue;
            }
            let got = f64::from(chains(simd, 100, 0.5));
            let expect = want(0.5, 100) * CHAINS as f64 * lanes;
            assert!(
                (got - expect).abs() < 1e-4 * expect,
                "{simd:?}: {got} vs {expect}"
            );
        }
    }
}
