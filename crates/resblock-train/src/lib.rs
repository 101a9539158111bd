//! Training for resblock models: an engine that matches PyTorch step for step.
//!
//! - [`optim`]: SGD (momentum, dampening, Nesterov, coupled decay), Adam and AdamW with
//!   PyTorch's exact update rules, parameter groups ([`optim::param_groups`] excludes norms
//!   and biases from weight decay), state that checkpoints can save.
//! - [`schedule`]: constant, step, multistep, cosine and one-cycle schedules stepped per
//!   iteration, with composable linear warmup.
//! - [`loss`]: MSE, cross-entropy with label smoothing; [`metrics`]: loss, top-k accuracy
//!   and a [`metrics::Metric`] trait for your own.
//! - [`Trainer`]: train/eval modes, global-norm clipping, non-finite loss/gradient stop,
//!   atomic checkpoints with optimizer and RNG state (resuming is bit-identical on the
//!   CPU), `metrics.jsonl`, PNG curves, and [`record::Progress`] reported to a callback
//!   (the program renders it).
//! - [`data`]: MNIST, CIFAR and image folders (streamed: decoded by worker threads while the
//!   model trains) behind one [`Dataset`] trait, and a seeded [`DataLoader`].
//!
//! ```
//! use candle_core::{DType, Device, ModuleT};
//! use candle_nn::VarMap;
//! use resblock_core::{mlp_block, seeded_var_builder, MlpBlockConfig, RngHandle};
//! use resblock_train::{loss::mse, optim::{Adam, AdamConfig, Optimizer}};
//!
//! let rng = RngHandle::seed_from_u64(0);
//! let varmap = VarMap::new();
//! let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
//! let block = mlp_block(10, 10, MlpBlockConfig::article(), &rng, vb)?;
//! let x = rng.normal_tensor((100, 10), 0., 1., DType::F32, &Device::Cpu)?;
//! let y = rng.normal_tensor((100, 10), 0., 1., DType::F32, &Device::Cpu)?;
//! let mut opt = Adam::new(varmap.all_vars(), AdamConfig { lr: 0.01, ..Default::default() })?;
//! let first = mse(&block.forward_t(&x, true)?, &y)?.to_scalar::<f32>()?;
//! for _ in 0..50 {
//!     let loss = mse(&block.forward_t(&x, true)?, &y)?;
//!     opt.backward_step(&loss)?;
//! }
//! assert!(mse(&block.forward_t(&x, true)?, &y)?.to_scalar::<f32>()? < first);
//! # Ok::<(), resblock_train::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod best;
pub mod checkpoint;
pub mod clip;
pub mod confusion;
pub mod data;
pub mod distributed;
pub mod ema;
pub mod error;
pub mod freeze;
pub mod grad_flow;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod recipe;
pub mod record;
pub mod schedule;
pub mod trainer;

pub use data::{Batch, BatchSource, DataLoader, Dataset, FixedBatches, ImageDataset, Transform};
pub use distributed::{Communicator, SingleProcess};
pub use error::{Error, Result};
pub use record::{EpochRecord, Progress};
pub use trainer::{LossKind, Trainer, TrainerConfig};
