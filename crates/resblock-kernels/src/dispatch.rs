//! The one place that decides which kernel runs: Candle's or ours, and on which CPU path.
//!
//! Every op with two implementations asks [`current`] when it is built. The choice starts
//! from the environment (read once) and can be changed for the whole process with [`set`]:
//!
//! | field | environment | effect when off |
//! |---|---|---|
//! | [`Dispatch::kernels`] | `RESBLOCK_KERNELS=candle` | Candle's ops everywhere |
//! | [`Dispatch::direct_conv`] | `RESBLOCK_DIRECT_CONV=0` | convolutions always on the GEMM path |
//! | [`Dispatch::fused_conv_bn`] | `RESBLOCK_FUSED_CONV_BN=0` | conv and training BatchNorm as two ops |
//! | [`Dispatch::simd`] | `RESBLOCK_SIMD=0` | the portable loops instead of the SIMD kernels |
//!
//! CPU features are detected once ([`cpu`]); a SIMD path runs only when the CPU has it
//! and [`Dispatch::simd`] allows it, so tests can force every path on any machine.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Which implementation the ops with two use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Ours on the CPU (f32/f64), Candle's elsewhere. The default.
    Native,
    /// Candle's everywhere.
    Candle,
}

/// The kernel choice of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// Ours or Candle's.
    pub kernels: Kernels,
    /// Direct (im2col-free) convolutions where they apply.
    pub direct_conv: bool,
    /// Convolution + training BatchNorm (+ ReLU, + a block's sum) as one op where it applies.
    pub fused_conv_bn: bool,
    /// SIMD kernels where the CPU has them (else the portable loops).
    pub simd: bool,
}

impl Default for Dispatch {
    /// Everything on: our kernels, direct convolutions, fusion, SIMD.
    fn default() -> Self {
        Self {
            kernels: Kernels::Native,
            direct_conv: true,
            fused_conv_bn: true,
            simd: true,
        }
    }
}

impl Dispatch {
    /// The defaults with the environment's overrides (see the module docs).
    pub fn from_env() -> Self {
        let off = |name: &str| std::env::var(name).is_ok_and(|v| v == "0");
        Self {
            kernels: match std::env::var("RESBLOCK_KERNELS") {
                Ok(v) if v.eq_ignore_ascii_case("candle") => Kernels::Candle,
                _ => Kernels::Native,
            },
            direct_conv: !off("RESBLOCK_DIRECT_CONV"),
            fused_conv_bn: !off("RESBLOCK_FUSED_CONV_BN"),
            simd: !off("RESBLOCK_SIMD"),
        }
    }

    fn pack(self) -> u8 {
        0x80 | u8::from(self.kernels == Kernels::Candle)
            | u8::from(self.direct_conv) << 1
            | u8::from(self.fused_conv_bn) << 2
            | u8::from(self.simd) << 3
    }

    fn unpack(b: u8) -> Self {
        Self {
            kernels: if b & 1 != 0 {
                Kernels::Candle
            } else {
                Kernels::Native
            },
            direct_conv: b & 2 != 0,
            fused_conv_bn: b & 4 != 0,
            simd: b & 8 != 0,
        }
    }
}

/// 0: not chosen yet; else [`Dispatch::pack`].
static STATE: AtomicU8 = AtomicU8::new(0);

/// Sets the choice for the whole process (ops built afterwards follow it).
pub fn set(d: Dispatch) {
    STATE.store(d.pack(), Ordering::Relaxed);
}

/// The choice in use: [`set`]'s, else [`Dispatch::from_env`].
pub fn current() -> Dispatch {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let d = Dispatch::from_env();
            // Another thread may have called `set` meanwhile: keep its choice.
            let _ = STATE.compare_exchange(0, d.pack(), Ordering::Relaxed, Ordering::Relaxed);
            Dispatch::unpack(STATE.load(Ordering::Relaxed))
        }
        b => Dispatch::unpack(b),
    }
}

/// Chooses ours or Candle's for the whole process, leaving the rest of the choice.
pub fn set_kernels(k: Kernels) {
    set(Dispatch {
        kernels: k,
        ..current()
    });
}

/// Ours or Candle's ([`current`]`().kernels`).
pub fn kernels() -> Kernels {
    current().kernels
}

/// What this CPU offers our kernels, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// x86-64 AVX2 and FMA (the 8-lane kernels).
    pub avx2_fma: bool,
    /// x86-64 AVX-512F (16 lanes).
    pub avx512f: bool,
}

/// The CPU's features.
pub fn cpu() -> CpuFeatures {
    static CPU: OnceLock<CpuFeatures> = OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx2_fma: std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures {
                avx2_fma: false,
                avx512f: false,
            }
        }
    })
}

/// Whether the AVX2 + FMA kernels may run: the CPU has them and [`Dispatch::simd`] is on.
pub(crate) fn avx2_fma() -> bool {
    cpu().avx2_fma && current().simd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_packs_and_unpacks() {
        for b in 0..16u8 {
            let d = Dispatch::unpack(0x80 | b);
            assert_eq!(Dispatch::unpack(d.pack()), d);
        }
    }
}
