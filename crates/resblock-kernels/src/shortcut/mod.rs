//! The ops of residual shortcuts: strided slicing and the zero-padding "option A".

mod subsample;
pub(crate) mod zero_pad;

pub use subsample::subsample2d;
pub use zero_pad::zero_pad_shortcut;
