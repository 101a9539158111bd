//! Tensor ops that ResNets need and Candle 0.11 lacks or gets wrong, each with a backward.
//!
//! - [`max_pool2d`]: padding, kernel != stride, dilation; trainable (Candle's is not).
//! - [`conv2d`]: Candle's conv with a backward that is right for non-square inputs whose
//!   height and width leave different remainders under the stride.
//! - [`conv2d_gemm`]: the same convolution with a GEMM backward (im2col / col2im), not yet
//!   the default.
//! - [`subsample2d`]: strided slicing `x[:, :, ::s, ::s]`.

mod conv;
mod conv_gemm;
mod max_pool;
mod subsample;

pub use conv::{conv2d, conv2d_gemm};
pub use max_pool::{max_pool2d, max_pool2d_generic, Pool2dConfig};
pub use subsample::subsample2d;

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
