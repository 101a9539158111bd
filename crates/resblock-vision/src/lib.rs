//! The ResNet family on [`resblock_core`], with torchvision's parameter names.
//!
//! - [`basic_block()`] and [`bottleneck()`]: the two block types (post- or pre-activation,
//!   any shortcut, zero-init, drop-path, groups/width for ResNeXt and Wide ResNet, dilation).
//!   The basic block is also the article's CNN block (conv-BN-ReLU-conv-BN, identity or
//!   projection shortcut, ReLU after the sum).
//! - [`resnet()`] with [`ResNetConfig`]: one builder for torchvision's ResNets, ResNeXts and
//!   Wide ResNets, the CIFAR ResNets (options A/B/C), pre-activation ResNets, WRN-28-10,
//!   ResNet-D and the plain twins; [`ResNetConfig::preset`] by name.
//! - [`grow`]: a trained ResNet grown into a deeper one that computes the same function
//!   (new blocks start as exact identities).
//! - [`weights`]: strict loading of torchvision `.pth` / `.safetensors` weights and saving
//!   in torchvision's naming.
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::VarMap;
//! use resblock_core::{seeded_var_builder, ResidualScale, RngHandle};
//! use resblock_vision::{basic_block, BasicBlockConfig};
//!
//! let rng = RngHandle::seed_from_u64(0);
//! let varmap = VarMap::new();
//! let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
//! let cfg = BasicBlockConfig { scale: ResidualScale::ZeroInit, ..Default::default() };
//! let block = basic_block(8, 8, cfg, &rng, vb)?;
//! // Zero-init residual and a non-negative input: the block is exactly the identity.
//! let x = Tensor::rand(0f32, 1., (2, 8, 5, 5), &Device::Cpu)?;
//! let y = block.forward_t(&x, true)?;
//! assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
//! # Ok::<(), resblock_vision::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod basic_block;
mod block_run;
pub mod bottleneck;
pub mod error;
pub mod grow;
pub mod imagenet;
pub mod model_file;
pub mod pickle_globals;
pub mod preprocess;
#[cfg(feature = "download")]
pub mod pretrained;
pub mod pth_bounds;

pub mod resnet;
pub mod summary;
pub mod weights;

pub use basic_block::{
    basic_block, basic_block_with_shortcut, BasicBlock, BasicBlockConfig, BasicBranch,
};
pub use bottleneck::{
    bottleneck, Bottleneck, BottleneckBranch, BottleneckConfig, BOTTLENECK_EXPANSION,
};
pub use error::{Error, Result};
pub use model_file::{
    load_model, read_model_meta, save_model, save_model_varmap, LoadedModel, ModelMeta,
};
pub use preprocess::Preprocess;
pub use resnet::{resnet, Block, BlockType, ResNet, ResNetConfig, StemLayer, StemType};
pub use summary::{Summary, SummaryRow};
