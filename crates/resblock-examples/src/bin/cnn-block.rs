//! The article's CNN residual block: conv-BN-ReLU-conv-BN plus an identity or a 1x1-conv+BN
//! projection shortcut, ReLU after the sum.
//!
//! Builds `ResidualBlock(in, in, 1)` (identity shortcut) and `ResidualBlock(in, out, stride)`
//! (projection shortcut), runs them on a batch of images, prints shapes and parameter
//! counts, shows that a zero-initialised block is exactly the identity map, and trains the
//! projection block a few steps on a regression target to show the loss falls.
//!
//! ```text
//! cargo run --release -p resblock-examples --bin cnn-block [-- --in-channels 16 --out-channels 32 --stride 2]
//! ```

use anyhow::{bail, Result};
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use clap::Parser;
use resblock_core::params::count_parameters;
use resblock_core::{seeded_var_builder, ResidualScale, RngHandle};
use resblock_examples::positive_f64;
use resblock_train::loss::mse;
use resblock_train::optim::{Adam, AdamConfig, Optimizer};
use resblock_vision::{basic_block, BasicBlockConfig};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Build, inspect and train the article's CNN residual block.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Input channels of both blocks.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    in_channels: u64,
    /// Output channels of the projection block.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    out_channels: u64,
    /// Stride of the projection block.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=8))]
    stride: u64,
    /// Images in the batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=1024))]
    batch: u64,
    /// Height and width of the images.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    size: u64,
    /// Training steps of the demo.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Adam learning rate of the demo.
    #[arg(long, default_value_t = 0.01, value_parser = positive_f64)]
    lr: f64,
    /// Seed of the weights and data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    resblock_examples::start_threads(args.threads);
    let dev = Device::Cpu;
    let (cin, cout, stride) = (
        args.in_channels as usize,
        args.out_channels as usize,
        args.stride as usize,
    );
    let (n, size) = (args.batch as usize, args.size as usize);
    let rng = RngHandle::seed_from_u64(args.seed);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &dev);

    let identity = basic_block(
        cin,
        cin,
        BasicBlockConfig::default(),
        &rng,
        vb.pp("identity_block"),
    )?;
    let proj_cfg = BasicBlockConfig {
        stride,
        ..Default::default()
    };
    let projection = basic_block(cin, cout, proj_cfg, &rng, vb.pp("projection_block"))?;

    // A batch of feature maps as a block deep in a network sees them: non-negative (they
    // come out of a ReLU).
    let x = rng.uniform_tensor((n, cin, size, size), 0., 1., DType::F32, &dev)?;
    println!("input batch: {:?}", x.dims());
    for (name, block) in [
        ("identity_block", &identity),
        ("projection_block", &projection),
    ] {
        let y = block.forward_t(&x, false)?;
        println!(
            "{name}: shortcut {}, output {:?}, {} parameters",
            block.shortcut().describe(),
            y.dims(),
            count_parameters(&varmap, name)
        );
    }

    // Zero-init residual: bn2's gamma starts at 0, so g(x) = 0 and the block is the identity.
    let zero_vm = VarMap::new();
    let zvb = seeded_var_builder(&zero_vm, &rng, DType::F32, &dev);
    let zcfg = BasicBlockConfig {
        scale: ResidualScale::ZeroInit,
        ..Default::default()
    };
    let zero_block = basic_block(cin, cin, zcfg, &rng, zvb)?;
    let diff = max_abs_diff(&zero_block.forward_t(&x, true)?, &x)?;
    println!("zero-initialised block: max |block(x) - x| = {diff} (identity map)");
    if diff != 0. {
        bail!("the zero-initialised block is not the identity (max diff {diff})");
    }

    // Train the projection block to map x to a fixed random target.
    let target = rng.normal_tensor(
        projection.forward_t(&x, false)?.shape(),
        0.5,
        1.,
        DType::F32,
        &dev,
    )?;
    let vars = {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter()
            .filter(|(k, _)| k.starts_with("projection_block."))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let mut opt = Adam::new(
        vars,
        AdamConfig {
            lr: args.lr,
            ..Default::default()
        },
    )?;
    let mut first = None;
    let mut last = f32::NAN;
    for step in 1..=args.steps {
        let loss = mse(&projection.forward_t(&x, true)?, &target)?;
        last = loss.to_scalar::<f32>()?;
        if !last.is_finite() {
            bail!(
                "the loss became {last} at step {step}: try a smaller --lr (now {})",
                args.lr
            );
        }
        first.get_or_insert(last);
        println!("step {step}/{}: loss {last:.4}", args.steps);
        opt.backward_step(&loss)?;
    }
    if let Some(first) = first {
        println!("loss {first:.4} -> {last:.4}");
    }
    Ok(())
}
