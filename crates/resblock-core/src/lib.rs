//! Residual primitives on [Candle](https://github.com/huggingface/candle).
//!
//! A residual block learns the residual `g(x) = f(x) - x` and outputs `g(x) + shortcut(x)`;
//! when `g` is driven to zero the block is the identity, so depth stops hurting. This crate
//! holds the pieces every residual network is built from:
//!
//! - [`Residual`]: the combinator `post(shortcut(x) + scale * g(x))` around any `ModuleT`,
//!   with pre-activation ordering, [`ResidualScale`] (zero-init, ReZero, fixed), drop-path
//!   and a [`probe`] that measures `||g(x)|| / ||x||`.
//! - [`Shortcut`]: identity, projection (1x1 conv + BN), zero-padding "option A", linear,
//!   or removed (plain networks).
//! - [`mlp_block`] / [`residual_mlp`]: the article's Linear residual block and stacks of it.
//! - Layers with PyTorch's init and names ([`linear`], [`conv2d`], [`batch_norm`]) on the
//!   [`ops`] Candle lacks (re-exported from `resblock-kernels`: trainable padded max-pool, a
//!   conv with a correct backward for non-square inputs, fused conv + BN, strided slicing).
//! - [`RngHandle`] and [`seeded_var_builder`]: seeded, checkpointable randomness (Candle's
//!   CPU generator cannot be seeded).
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::VarMap;
//! use resblock_core::{mlp_block, seeded_var_builder, MlpBlockConfig, RngHandle};
//!
//! let rng = RngHandle::seed_from_u64(42);
//! let varmap = VarMap::new();
//! let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
//! let block = mlp_block(10, 10, MlpBlockConfig::article(), &rng, vb)?; // Linear(10,10) + x
//! let x = Tensor::randn(0f32, 1., (100, 10), &Device::Cpu)?;
//! assert_eq!(block.forward_t(&x, true)?.dims(), [100, 10]);
//! # Ok::<(), resblock_core::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod backward_from;
pub mod conv_bn;
pub mod device;
pub mod drop_path;
pub mod error;
pub mod init;
pub mod layers;
pub mod mlp;
pub mod params;
pub mod probe;
pub mod residual;
pub mod rng;
pub mod shortcut;
pub mod threads;

/// The tensor ops and CPU kernels under the layers (the `resblock-kernels` crate).
pub use resblock_kernels as ops;

pub use backward_from::backward_from;
pub use conv_bn::ConvBn;
pub use device::{best_device, parse_device};
pub use drop_path::DropPath;
pub use error::{Error, Result};
pub use init::{init_tensor, seeded_var_builder};
pub use layers::{
    batch_norm, conv2d, layer_norm, linear, linear_act, linear_zeros, sum_sq, Activation,
    BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, ConvInit, LayerNorm,
};
pub use mlp::{
    mlp_block, residual_mlp, MlpBlock, MlpBlockConfig, MlpBranch, ResidualMlp, ResidualMlpConfig,
};
pub use probe::{ProbeReading, Probed, ResidualProbe};
pub use residual::{Branch, Norm, PreActivation, Residual, ResidualScale};
pub use rng::{RngHandle, RngState};
pub use shortcut::{ProjectionConfig, Shortcut, ShortcutPolicy};
pub use threads::{configure_threads, configure_threads_here, pin_candle_threads, thread_count};
