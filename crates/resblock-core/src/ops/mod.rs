//! Tensor ops that ResNets need and Candle 0.11 lacks or gets wrong, each with a backward.
//!
//! - [`max_pool2d`]: padding, kernel != stride, dilation; trainable (Candle's is not).
//! - [`conv2d`]: our CPU convolution ([`conv2d_native`]: forward and both gradients as
//!   GEMMs) or Candle's ([`conv2d_candle`], with a backward that is right for non-square
//!   inputs whose height and width leave different remainders under the stride).
//! - [`batch_norm_train`]: training-mode batch normalisation (optionally fused with ReLU)
//!   as one multithreaded op with its own backward, statistics in f64.
//! - [`conv_batch_norm_train`]: convolution + training-mode batch norm (+ ReLU) as one op
//!   for the 3x3 "same" convolutions of ResNets; [`conv_batch_norm_add_relu_train`] with a
//!   residual block's shortcut sum and ReLU as well.
//! - [`add_relu`]: `relu(a + b)`, the end of a post-activation residual block, as one op.
//! - [`conv2d_fused`]: convolution + bias (+ ReLU) with the epilogue fused (inference on
//!   folded networks, biased convolutions); [`conv2d_scale_shift`]: convolution + eval-mode
//!   BatchNorm (+ ReLU) the same way (inference on unfolded networks).
//!
//! [`set_kernels`] switches every op with two implementations between ours (the default) and
//! Candle's plain path, for comparison and for benchmarks; so does the environment variable
//! `RESBLOCK_KERNELS=candle`.
//! - [`subsample2d`]: strided slicing `x[:, :, ::s, ::s]`; [`zero_pad_shortcut`]: the
//!   option-A shortcut (subsample and zero channels) as one op with its backward.

mod add_relu;
mod batch_norm;
mod bn_kernels;
mod conv;
mod conv_cpu;
mod max_pool;
mod subsample;
mod zero_pad;

pub use add_relu::add_relu;
pub use batch_norm::{
    batch_norm_train, batch_norm_train_candle, conv_batch_norm_add_relu_train,
    conv_batch_norm_train, BatchStats,
};
pub use conv::{conv2d, conv2d_candle, conv2d_fused, conv2d_native, conv2d_scale_shift};
pub use max_pool::{max_pool2d, max_pool2d_generic, Pool2dConfig};
pub use subsample::subsample2d;
pub use zero_pad::zero_pad_shortcut;

use std::sync::atomic::{AtomicU8, Ordering};

/// Which implementation the ops with two use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Ours on the CPU (f32/f64), Candle's elsewhere. The default.
    Native,
    /// Candle's everywhere.
    Candle,
}

static KERNELS: AtomicU8 = AtomicU8::new(0);

/// Chooses the implementation for the whole process (takes effect for ops built afterwards).
pub fn set_kernels(k: Kernels) {
    KERNELS.store(
        match k {
            Kernels::Native => 1,
            Kernels::Candle => 2,
        },
        Ordering::Relaxed,
    );
}

/// The implementation in use: [`set_kernels`]'s choice, else `RESBLOCK_KERNELS=candle` from
/// the environment, else [`Kernels::Native`].
pub fn kernels() -> Kernels {
    match KERNELS.load(Ordering::Relaxed) {
        1 => Kernels::Native,
        2 => Kernels::Candle,
        _ => {
            let k = match std::env::var("RESBLOCK_KERNELS") {
                Ok(v) if v.eq_ignore_ascii_case("candle") => Kernels::Candle,
                _ => Kernels::Native,
            };
            set_kernels(k);
            k
        }
    }
}

/// Whether this CPU has AVX2 and FMA, which our x86-64 SIMD kernels need (checked once).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An output element a kernel writes: an initialised `f32`, or a `MaybeUninit<f32>` of a
/// buffer filled for the first time (see [`vec_written_by`]).
pub(crate) trait Slot: Send {
    fn put(&mut self, v: f32);
}

impl Slot for f32 {
    #[inline(always)]
    fn put(&mut self, v: f32) {
        *self = v;
    }
}

impl Slot for std::mem::MaybeUninit<f32> {
    #[inline(always)]
    fn put(&mut self, v: f32) {
        self.write(v);
    }
}

/// A NaN with a payload that arithmetic never produces: what debug builds put in a
/// [`vec_written_by`] buffer first, to check that `fill` overwrote every element.
const UNWRITTEN: u32 = 0x7fa5_5a5a;

/// A vector of `len` values filled by `fill` without zero-filling it first: for the large
/// outputs of our kernels, `vec![0.0; len]` is one more pass over the buffer (glibc's
/// `calloc` clears reused heap memory), measured at about 5% of a training step. Debug
/// builds (the tests) pre-fill a marker and assert that `fill` overwrote all of it.
///
/// # Safety
/// `fill` must write every element of the slice it gets (`MaybeUninit::write`, or
/// [`Slot::put`]); the vector's elements are read as initialised afterwards.
pub(crate) unsafe fn vec_written_by(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    if cfg!(debug_assertions) {
        for s in spare.iter_mut() {
            s.write(f32::from_bits(UNWRITTEN));
        }
    }
    fill(spare);
    // SAFETY: the capacity is at least `len`, and the caller guarantees `fill` initialised
    // all `len` elements.
    unsafe { v.set_len(len) };
    debug_assert!(
        v.iter().all(|x| x.to_bits() != UNWRITTEN),
        "vec_written_by: an element was not written"
    );
    v
}

/// The contiguous slice of a CPU buffer that a layout covers (custom ops' inputs are made
/// contiguous before the op).
pub(crate) fn contiguous_slice<'a, T>(
    s: &'a [T],
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// Runs `f` on the contiguous CPU data of `t` (copied first only if `t` is not contiguous),
/// without copying it out: custom ops' backward passes read their saved inputs this way.
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &candle_core::Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<T>()?;
            Ok(f(contiguous_slice(all, layout, op)?))
        }
        _ => candle_core::bail!("{op}: the native kernel runs on the CPU only"),
    }
}

/// `dy` where a ReLU's output `y` is positive, zero elsewhere: the gradient through a fused
/// ReLU (CPU, f32/f64).
pub(crate) fn relu_mask<T: candle_core::WithDType>(
    y: &candle_core::Tensor,
    dy: &candle_core::Tensor,
    op: &str,
) -> candle_core::Result<candle_core::Tensor> {
    use rayon::prelude::*;
    let zero = T::zero();
    let g = with_cpu_slice(y, op, |y: &[T]| {
        with_cpu_slice(dy, op, |dy: &[T]| {
            y.par_iter()
                .zip(dy.par_iter())
                .map(|(y, g)| if *y > zero { *g } else { zero })
                .collect::<Vec<T>>()
        })
    })??;
    candle_core::Tensor::from_vec(g, y.shape(), y.device())
}
