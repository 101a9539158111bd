//! The ResNet family on [`resblock_core`], with torchvision's parameter names.
//!
//! This crate holds the convolutional blocks and (as they land) the network builders and
//! weight I/O. Today: [`basic_block()`], the two-3x3-convolution block of ResNet-18/34 and the
//! CIFAR ResNets, which is also the article's CNN block (conv-BN-ReLU-conv-BN, identity or
//! projection shortcut, ReLU after the sum), in post- and pre-activation order.
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

pub mod basic_block;
pub mod error;

pub use basic_block::{basic_block, BasicBlock, BasicBlockConfig, BasicBranch};
pub use error::{Error, Result};
