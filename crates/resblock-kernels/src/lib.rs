//! The compute kernels of resblock: every `unsafe` line of the workspace lives in this crate.
//!
//! Tensor ops that ResNets need and Candle 0.11 lacks or gets wrong, each a Candle custom op
//! with its backward, and our CPU kernels for them (AVX-512 or AVX2/FMA where the CPU has
//! them, portable loops everywhere):
//!
//! - [`conv2d`] ([`conv`]): our CPU convolution ([`conv2d_native`]: forward and both
//!   gradients as GEMMs or direct kernels) or Candle's ([`conv2d_candle`], with a backward
//!   that is right for non-square inputs whose height and width leave different remainders
//!   under the stride); [`conv2d_fused`]: convolution + bias (+ ReLU) with the epilogue
//!   fused; [`conv2d_scale_shift`]: convolution + eval-mode BatchNorm (+ ReLU) the same way;
//!   [`conv2d_add_relu`]: the last convolution of an inference residual block with its
//!   shortcut's sum and ReLU in the epilogue too; [`conv2d_backward`]: both gradients for a
//!   given output gradient, without a graph.
//! - [`batch_norm_train`] ([`norm`]): training-mode batch normalisation (optionally fused
//!   with ReLU) as one multithreaded op with its own backward, statistics in f64.
//! - [`conv_batch_norm_train`] ([`fused`]): convolution + training-mode batch norm (+ ReLU)
//!   as one op for the 3x3 convolutions of ResNets (stride 1 and 2);
//!   [`conv_batch_norm_add_relu_train`] with a residual block's shortcut sum and ReLU as well;
//!   [`basic_block_train`] and [`zero_pad_block_train`] a whole basic block, and
//!   [`basic_block_chain_train`] a run of them (a CIFAR ResNet's body), as one op;
//!   [`conv_bn_relu_chain_train`] the stem and the body together.
//! - [`dense::linear`] ([`dense`]): `act(x . w^T + b)` (identity, ReLU or erf GELU) as one op,
//!   GEMMs forward and backward on our GEMM; [`layer_norm`]: layer normalisation as one op
//!   with its backward (Candle's fused one has none).
//! - [`max_pool2d`] ([`pool`]): padding, kernel != stride, dilation; trainable.
//! - [`subsample2d`]: strided slicing `x[:, :, ::s, ::s]`; [`zero_pad_shortcut`]: the
//!   option-A shortcut (subsample and zero channels) as one op ([`shortcut`]).
//! - [`add_relu`] ([`eltwise`]): `relu(a + b)`, the end of a post-activation block.
//!
//! [`dispatch`] is the one switch between ours and Candle's, direct and GEMM convolutions,
//! fused and separate conv + BN, AVX-512, AVX2 and portable loops; [`alloc`] tunes the
//! allocator for training; [`peak`] measures the CPU's peak FMA rate for the benchmarks.
//!
//! Layout: `conv/` (`mod.rs` the public entry points, `op.rs` the custom ops, `path.rs` which
//! kernels run, `gemm.rs` the GEMM path, `direct/` the direct kernels with `avx512.rs` and
//! `avx2.rs` micro-kernels), `norm/` (`mod.rs` the batch-norm op, `simd.rs` its loops,
//! `residual.rs` with the block's sum and ReLU, `layer.rs` layer norm), `dense/` (`op.rs`,
//! `gelu.rs`), `matmul.rs` (the one GEMM entry point: ours or the `gemm` crate),
//! `fused/conv_bn.rs`, `sgemm/` (our packed f32 GEMM, an AVX-512 and an AVX2 micro-kernel,
//! which `matmul.rs` uses where one runs), `pool.rs`, `shortcut/`, `eltwise.rs`, `buffer.rs` (what every op's
//! CPU side shares), `simd.rs` (one loop compiled per SIMD level), `dispatch.rs`,
//! `alloc.rs`, `peak.rs`, `error.rs`, `interleave.rs` (the transpose the packers share).
#![warn(missing_docs)]

mod aligned;
pub mod alloc;
mod buffer;
pub mod conv;
pub mod dense;
pub mod dispatch;
pub mod eltwise;
pub mod error;
pub mod fused;
mod interleave;
mod matmul;
pub mod norm;
pub mod peak;
pub mod pool;
mod sgemm;
pub mod shortcut;
mod simd;
#[cfg(test)]
mod test_support;
pub mod warm;

pub use conv::frozen::FrozenKernel;
pub use conv::{
    conv2d, conv2d_add_relu, conv2d_backward, conv2d_candle, conv2d_fused, conv2d_native,
    conv2d_scale_shift, ChannelAffine,
};
pub use dispatch::{kernels, set_kernels, simd_in_use, Dispatch, Kernels, Simd};
pub use eltwise::add_relu;
pub use error::{Error, Result};
pub use fused::{
    basic_block_chain_train, basic_block_train, conv_batch_norm_add_relu_train,
    conv_batch_norm_train, conv_bn_relu_chain_train, zero_pad_block_train, ChainBlock,
};
pub use norm::{
    batch_norm_add_relu_train, batch_norm_train, batch_norm_train_candle, layer_norm,
    layer_norm_candle, BatchStats,
};
pub use pool::{max_pool2d, max_pool2d_generic, Pool2dConfig};
pub use shortcut::{subsample2d, zero_pad_shortcut};
