//! One macro for the loops that are written once and compiled per SIMD level: the body is
//! a plain (`#[inline(always)]`) Rust function, which [`with_simd!`] runs compiled for
//! AVX-512, AVX2 + FMA or the build target, the widest of the level asked for that the CPU
//! has. The norm loops (`norm/simd.rs`) and the GELU (`dense/gelu.rs`) use it; the explicit
//! intrinsics kernels (`sgemm/`, `conv/direct/`) dispatch on their own.

/// `with_simd!(simd, body(a: A, b: B))`: `body(a, b)` compiled for the widest of `simd`
/// ([`crate::dispatch::Simd`]) that this CPU has (`crate::dispatch::usable`, so
/// a test may ask for any level on any machine); the macro's value is the body's.
macro_rules! with_simd {
    ($simd:expr, $body:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        let out = {
            use $crate::dispatch::Simd;
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            fn avx512($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            match $crate::dispatch::usable($simd) {
                // SAFETY: the CPU has the features (`usable`).
                Simd::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                Simd::Avx2 => unsafe { avx2($($arg),*) },
                Simd::Portable => $body($($arg),*),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let out = {
            let _ = $simd;
            $body($($arg),*)
        };
        out
    }};
    ($simd:expr, $body:ident($($arg:ident: $ty:ty),*)) => {
        with_simd!($simd, $body($($arg: $ty),*) -> ())
    };
}

pub(crate) use with_simd;
