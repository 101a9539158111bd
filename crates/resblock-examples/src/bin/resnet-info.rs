//! Print a ResNet's layer-by-layer summary (output shapes, parameters, multiply-adds), and
//! optionally write freshly initialised weights in torchvision's naming.
//!
//! ```text
//! resnet-info --arch resnet50 [--size 224] [--num-classes 1000] [--save-init resnet50.safetensors]
//! ```

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use clap::Parser;
use resblock_core::params::shape_only_var_builder;
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_vision::weights::save_varmap;
use resblock_vision::{resnet, ResNetConfig};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Summarise a ResNet preset, optionally saving freshly initialised weights.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Architecture (a resblock-vision preset name).
    #[arg(long)]
    arch: String,
    /// Input height and width (default: 224 for ImageNet nets, 32 for CIFAR nets).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=8192))]
    size: Option<u64>,
    /// Classes of the classifier (default: the preset's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    num_classes: Option<u64>,
    /// Input channels (default 3).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    in_channels: Option<u64>,
    /// Write torchvision-initialised weights (state_dict names) to this .safetensors file.
    #[arg(long)]
    save_init: Option<PathBuf>,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    resblock_examples::start_threads(None);
    let mut cfg = ResNetConfig::preset(&args.arch)?;
    if let Some(n) = args.num_classes {
        cfg.num_classes = n as usize;
    }
    if let Some(c) = args.in_channels {
        cfg.in_channels = c as usize;
    }
    let size = args.size.map_or(
        if cfg.stem == resblock_vision::StemType::Cifar {
            32
        } else {
            224
        },
        |s| s as usize,
    );
    let rng = RngHandle::seed_from_u64(args.seed);
    let (vb, _) = shape_only_var_builder(DType::F32, &Device::Cpu);
    let net = resnet(&cfg, &rng, vb)?;
    println!("{}", net.summary(size, size)?);
    if let Some(path) = &args.save_init {
        let varmap = VarMap::new();
        resnet(
            &cfg,
            &rng,
            seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
        )?;
        save_varmap(&varmap, path)?;
        println!("wrote initial weights to {}", path.display());
    }
    Ok(())
}
