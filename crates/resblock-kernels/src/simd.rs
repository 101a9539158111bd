//! One macro for the loops that are written once and compiled per SIMD level: the body is
//! a plain (`#[inline(always)]`) Rust function, which [`with_simd!`] runs compiled for
//! AVX-512, AVX2 + FMA or the build target, the widest of the level asked for that the CPU
//! has. The norm loops (`norm/simd.rs`, the layer norm backward's rows), the GELU
//! (`dense/gelu.rs`) and the dense layers' bias and bias sums (`dense/op.rs`) use it; the
//! explicit intrinsics kernels (`sgemm/`, `conv/direct/`) dispatch on their own. Its `fused`
//! form is for bodies whose `a * b + c` should be one FMA where the level has it
//! ([`mul_add`]).

/// `with_simd!(simd, body(a: A, b: B))`: `body(a, b)` compiled for the widest of `simd`
/// ([`crate::dispatch::Simd`]) that this CPU has (`crate::dispatch::usable`, so
/// a test may ask for any level on any machine); the macro's value is the body's.
/// `with_simd!(simd, fused body(a: A))`: `body::<FUSED>(a)` the same way, with `FUSED` true
/// on the AVX levels and [`NATIVE_FMA`] on the build target; `with_simd!(simd,
/// body::<f32>(a: A))`: a generic body at the given type arguments.
macro_rules! with_simd {
    // `fused body(..)`: a body generic over `const FUSED: bool` (see [`mul_add`]), run with
    // `FUSED` on the AVX levels (they have FMA) and [`NATIVE_FMA`] on the build target.
    ($simd:expr, fused $body:ident($($arg:ident: $ty:ty),*)) => {
        $crate::simd::with_simd!(@run $simd, $body, [::<true>],
            [::<{ $crate::simd::NATIVE_FMA }>], ($($arg: $ty),*) -> ())
    };
    // `body::<T>(..)`: a generic body at the given type arguments.
    ($simd:expr, $body:ident::<$($g:ty),+>($($arg:ident: $ty:ty),*)) => {
        $crate::simd::with_simd!(@run $simd, $body, [::<$($g),+>], [::<$($g),+>],
            ($($arg: $ty),*) -> ())
    };
    ($simd:expr, $body:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $crate::simd::with_simd!(@run $simd, $body, [], [], ($($arg: $ty),*) -> $ret)
    };
    ($simd:expr, $body:ident($($arg:ident: $ty:ty),*)) => {
        $crate::simd::with_simd!(@run $simd, $body, [], [], ($($arg: $ty),*) -> ())
    };
    // The body called as `$body $($avx)*(..)` on the AVX levels, `$body $($plain)*(..)` on
    // the build target.
    (@run $simd:expr, $body:ident, [$($avx:tt)*], [$($plain:tt)*],
        ($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        let out = {
            use $crate::dispatch::Simd;
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            fn avx512($($arg: $ty),*) -> $ret {
                $body $($avx)*($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret {
                $body $($avx)*($($arg),*)
            }
            match $crate::dispatch::usable($simd) {
                // SAFETY: the CPU has the features (`usable`).
                Simd::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                Simd::Avx2 => unsafe { avx2($($arg),*) },
                Simd::Portable => $body $($plain)*($($arg),*),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let out = {
            let _ = $simd;
            $body $($plain)*($($arg),*)
        };
        out
    }};
}

pub(crate) use with_simd;

/// Whether the build target itself has a fused multiply-add instruction (every ARM64 CPU;
/// x86-64 only when built for a CPU with FMA): where it has not, `f32::mul_add` is a call
/// to the C library's `fmaf`, many times slower than a multiply and an add.
pub(crate) const NATIVE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// `a * b + c`: one fused multiply-add (one rounding) where `FUSED`, else a multiply and an
/// add. Rust never contracts the two by itself, so a polynomial by Horner's rule written as
/// `r * t + c` is a chain of twice the instructions, and twice the latency, of FMAs.
#[inline(always)]
pub(crate) fn mul_add<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}
