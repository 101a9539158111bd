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
//! | [`Dispatch::simd`] | `RESBLOCK_SIMD=avx2` or `=0` | at most AVX2 (8 lanes), or the portable loops |
//! | [`Dispatch::own_gemm`] | `RESBLOCK_SGEMM=0` | the `gemm` crate for every f32 GEMM (linear layers, the convolutions' GEMM path) |
//! | [`Dispatch::winograd`] | `RESBLOCK_WINOGRAD=0` | wide 3x3 convolutions on the direct or GEMM path (where 512-bit FMAs run at full width, see [`crate::peak::full_width_fma`], only forwards with outputs 14 wide and more, and backwards and fused training ops from 128 channels; `=1` takes Winograd there for every shape) |
//! | [`Dispatch::masked_taps`] | `RESBLOCK_MASKED_TAPS=0` | AVX-512 direct convolutions on the shared-padding layout |
//! | [`Dispatch::transposed_wgrad`] | `RESBLOCK_TRANSPOSED_WGRAD=0` | the 3x3 weight gradients of the masked and stride-2 layouts on the per-tap tile |
//! | [`Dispatch::channel_lanes`] | `RESBLOCK_CHANNEL_LANES=0` | 3x3 forwards (stride 2, and stride 1 where Winograd does not run) and stride-1 input gradients (the convolution's direct backward and the fused training op's) on the direct or GEMM path |
//!
//! CPU features are detected once ([`cpu`]); a SIMD path runs only when the CPU has it
//! and [`Dispatch::simd`] allows it, so tests can force every path on any machine, and
//! [`simd_in_use`] says which one runs.

use std::sync::atomic::{AtomicU16, Ordering};
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
    /// The widest SIMD kernels allowed (each runs only where the CPU has it).
    pub simd: Simd,
    /// Our packed f32 GEMM (`sgemm/`: its AVX-512 kernel, or its AVX2 one where that is the
    /// widest level that runs) for the linear layers and the convolutions' GEMM path; the
    /// `gemm` crate otherwise (and always for f64).
    pub own_gemm: bool,
    /// Winograd F(2x2, 3x3) and F(4x4, 3x3) for wide f32 3x3 stride-1 convolutions
    /// (`conv/winograd/`).
    pub winograd: bool,
    /// The masked layout for the AVX-512 direct kernels of stride-1 "same" convolutions:
    /// rows without padding columns, the taps that would wrap masked off (no junk columns
    /// computed; see `conv/direct`).
    pub masked_taps: bool,
    /// The transposed weight gradient of 3x3 "same" convolutions on the masked layout and
    /// of 3x3 stride-2 ones, with whole blocks of 16 output channels: the output channels
    /// in the vector lanes, the input values broadcast (`conv/direct/transposed.rs`).
    pub transposed_wgrad: bool,
    /// The AVX-512 and AVX2 3x3 kernels with the output channels in the vector lanes,
    /// reading the plain input (`conv/lanes/`: no padded or polyphase copy of it): forwards
    /// at stride 2, and at stride 1 where Winograd does not run, and the stride-1 input
    /// gradients of the direct backward and of the fused conv + BN training op.
    pub channel_lanes: bool,
}

/// SIMD instruction sets of our kernels, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Simd {
    /// Portable Rust loops (whatever the compiler makes of them for the build target): every
    /// CPU, and the reference the others are tested against.
    Portable,
    /// x86-64 AVX2 + FMA, 8 f32 lanes, 16 vector registers.
    Avx2,
    /// x86-64 AVX-512 F + VL (with AVX2 + FMA), 16 f32 lanes, 32 vector registers.
    Avx512,
}

impl Simd {
    /// The `RESBLOCK_SIMD` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// From `RESBLOCK_SIMD`'s spellings: `0`, `off` or `portable`; `avx2`; `avx512`.
    pub fn parse(s: &str) -> Option<Simd> {
        match s.to_ascii_lowercase().as_str() {
            "0" | "off" | "portable" => Some(Simd::Portable),
            "avx2" => Some(Simd::Avx2),
            "avx512" | "1" | "on" => Some(Simd::Avx512),
            _ => None,
        }
    }
}

impl Default for Dispatch {
    /// Everything on: our kernels, direct convolutions, fusion, SIMD.
    fn default() -> Self {
        Self {
            kernels: Kernels::Native,
            direct_conv: true,
            fused_conv_bn: true,
            simd: Simd::Avx512,
            own_gemm: true,
            winograd: true,
            masked_taps: true,
            transposed_wgrad: true,
            channel_lanes: true,
        }
    }
}

impl Dispatch {
    /// The defaults with the environment's overrides (see the module docs). An unknown
    /// `RESBLOCK_SIMD` value is reported once on stderr and leaves the default.
    pub fn from_env() -> Self {
        let off = |name: &str| std::env::var(name).is_ok_and(|v| v == "0");
        Self {
            kernels: match std::env::var("RESBLOCK_KERNELS") {
                Ok(v) if v.eq_ignore_ascii_case("candle") => Kernels::Candle,
                _ => Kernels::Native,
            },
            direct_conv: !off("RESBLOCK_DIRECT_CONV"),
            fused_conv_bn: !off("RESBLOCK_FUSED_CONV_BN"),
            simd: match std::env::var("RESBLOCK_SIMD") {
                Ok(v) => Simd::parse(&v).unwrap_or_else(|| {
                    eprintln!(
                        "warning: RESBLOCK_SIMD={v:?} is not one of 0, portable, avx2, avx512; \
                         using the widest the CPU has"
                    );
                    Simd::Avx512
                }),
                Err(_) => Simd::Avx512,
            },
            own_gemm: !off("RESBLOCK_SGEMM"),
            winograd: !off("RESBLOCK_WINOGRAD"),
            masked_taps: !off("RESBLOCK_MASKED_TAPS"),
            transposed_wgrad: !off("RESBLOCK_TRANSPOSED_WGRAD"),
            channel_lanes: !off("RESBLOCK_CHANNEL_LANES"),
        }
    }

    fn pack(self) -> u16 {
        0x8000
            | u16::from(self.kernels == Kernels::Candle)
            | u16::from(self.direct_conv) << 1
            | u16::from(self.fused_conv_bn) << 2
            | (self.simd as u16) << 3
            | u16::from(self.own_gemm) << 5
            | u16::from(self.winograd) << 6
            | u16::from(self.masked_taps) << 7
            | u16::from(self.transposed_wgrad) << 8
            | u16::from(self.channel_lanes) << 9
    }

    fn unpack(b: u16) -> Self {
        Self {
            kernels: if b & 1 != 0 {
                Kernels::Candle
            } else {
                Kernels::Native
            },
            direct_conv: b & 2 != 0,
            fused_conv_bn: b & 4 != 0,
            simd: match (b >> 3) & 3 {
                0 => Simd::Portable,
                1 => Simd::Avx2,
                _ => Simd::Avx512,
            },
            own_gemm: b & 0x20 != 0,
            winograd: b & 0x40 != 0,
            masked_taps: b & 0x80 != 0,
            transposed_wgrad: b & 0x100 != 0,
            channel_lanes: b & 0x200 != 0,
        }
    }
}

/// 0: not chosen yet; else [`Dispatch::pack`].
static STATE: AtomicU16 = AtomicU16::new(0);

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
    /// x86-64 AVX-512 F and VL (16 lanes, 32 registers usable at every width; every
    /// AVX-512 CPU since Skylake-SP and Zen 4 has both).
    pub avx512: bool,
}

impl CpuFeatures {
    /// Whether this CPU can run the kernels of `simd` (whatever the dispatch allows).
    pub fn has(self, simd: Simd) -> bool {
        match simd {
            Simd::Portable => true,
            Simd::Avx2 => self.avx2_fma,
            Simd::Avx512 => self.avx2_fma && self.avx512,
        }
    }
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
                avx512: std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures {
                avx2_fma: false,
                avx512: false,
            }
        }
    })
}

/// The SIMD kernels that run: the widest [`Dispatch::simd`] allows and the CPU has.
pub fn simd_in_use() -> Simd {
    usable(current().simd)
}

/// Whether the AVX2 + FMA kernels may run (also true where AVX-512 runs: the AVX-512
/// kernels leave the AVX2 ones the loops they do not cover).
pub(crate) fn avx2_fma() -> bool {
    simd_in_use() >= Simd::Avx2
}

/// The widest level up to `simd` that this CPU has (the one a kernel asked for `simd`
/// runs).
pub(crate) fn usable(simd: Simd) -> Simd {
    let f = cpu();
    [Simd::Avx512, Simd::Avx2]
        .into_iter()
        .find(|&s| s <= simd && f.has(s))
        .unwrap_or(Simd::Portable)
}

/// Whether the AVX-512 kernels may run.
pub(crate) fn avx512() -> bool {
    simd_in_use() == Simd::Avx512
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_packs_and_unpacks() {
        for b in 0..512u16 {
            if (b >> 3) & 3 == 3 {
                continue;
            }
            let d = Dispatch::unpack(0x8000 | b);
            assert_eq!(Dispatch::unpack(d.pack()), d);
        }
    }

    #[test]
    fn simd_names_parse_back() {
        for s in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
            assert_eq!(Simd::parse(s.name()), Some(s));
        }
        assert_eq!(Simd::parse("0"), Some(Simd::Portable));
        assert_eq!(Simd::parse("sse9"), None);
    }
}
