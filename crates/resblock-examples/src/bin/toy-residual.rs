//! The article's first program: a residual block `g(x) + x` with `g = Linear(10, 10)`,
//! fitted to 100 random inputs/targets with MSE and Adam (lr 0.01) for 1000 epochs, printing
//! the loss every 10 epochs, then run on one random test input.
//!
//! ```text
//! cargo run --release -p resblock-examples --bin toy-residual [-- --seed 42 --epochs 1000 --lr 0.01]
//! ```

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, ModuleT};
use candle_nn::VarMap;
use clap::Parser;
use resblock_core::{mlp_block, seeded_var_builder, MlpBlockConfig, RngHandle};
use resblock_examples::{format_matrix, positive_f64};
use resblock_train::optim::{Adam, AdamConfig};
use resblock_train::schedule::{LrSchedule, Schedule};
use resblock_train::{Batch, Error as TrainError, LossKind, Trainer, TrainerConfig};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Fit the article's Linear(10,10) residual block to random data with MSE + Adam.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Seed of the weights, the data and the test input.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Training epochs (full-batch steps).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: u64,
    /// Adam learning rate.
    #[arg(long, default_value_t = 0.01, value_parser = positive_f64)]
    lr: f64,
    /// Number of random training samples.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    samples: u64,
    /// Width of the block (input = output features).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    features: u64,
    /// Print the loss every this many epochs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    log_every: u64,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    resblock_examples::start_threads(args.threads);
    let dev = Device::Cpu;
    let (n, d) = (args.samples as usize, args.features as usize);

    // As the article: model first, then the data, all from one seeded stream.
    let rng = RngHandle::seed_from_u64(args.seed);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &dev);
    let model = mlp_block(d, d, MlpBlockConfig::article(), &rng, vb)?;
    let inputs = rng.normal_tensor((n, d), 0., 1., DType::F32, &dev)?;
    let targets = rng.normal_tensor((n, d), 0., 1., DType::F32, &dev)?;

    // The training engine: Adam with a constant rate, full-batch MSE, one step per epoch.
    let cfg = AdamConfig {
        lr: args.lr,
        ..Default::default()
    };
    let opt = Adam::new(varmap.all_vars(), cfg)?;
    let schedule = LrSchedule::new(args.lr, Schedule::Constant, None)?;
    let tcfg = TrainerConfig {
        epochs: args.epochs as usize,
        loss: LossKind::Mse,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&model, &varmap, Box::new(opt), schedule, tcfg);
    let batch = Batch {
        inputs: inputs.clone(),
        targets,
    };
    for epoch in 1..=args.epochs {
        // The article prints the loss of the forward pass that the step then uses.
        let loss = match trainer.train_step(&batch) {
            Ok((loss, _)) => loss,
            Err(TrainError::NonFinite { value, .. }) => {
                bail!(
                    "the loss became {value} at epoch {epoch}: try a smaller --lr (now {})",
                    args.lr
                )
            }
            Err(e) => return Err(e.into()),
        };
        if epoch % args.log_every == 0 {
            println!("Epoch [{epoch}/{}], Loss: {:.4}", args.epochs, loss as f32);
        }
    }

    let test_input = rng.normal_tensor((1, d), 0., 1., DType::F32, &dev)?;
    let output = model.forward_t(&test_input, false)?;
    println!(
        "Test input: {}",
        format_matrix(&test_input).context("printing the test input")?
    );
    println!(
        "Output: {}",
        format_matrix(&output).context("printing the output")?
    );
    Ok(())
}
