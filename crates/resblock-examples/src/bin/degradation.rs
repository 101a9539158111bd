//! Claim 1 of the article, degradation: a deeper plain network trains worse than a shallower
//! one, a residual network of the same depth does not.
//!
//! ```text
//! cargo run --release -p resblock-examples --bin degradation                 # bundled MNIST-10k, 5 epochs, about 11 min on 2 cores
//! cargo run --release -p resblock-examples --bin degradation -- --seed 1 --out runs/degradation-seed1
//! cargo run --release -p resblock-examples --bin degradation -- --data cifar10:DIR --epochs 30
//! ```
//!
//! Trains plain-20, resnet-20, plain-56 and resnet-56 with `train`'s recipe (every recipe
//! flag of `train` applies) and writes `--out` (default `runs/degradation`): `results.json`
//! (`nets.<name>.train_err` / `test_err`, % per epoch; `residual_ratios`),
//! `degradation.png` (He et al. 2016 Figure 6 style), `residual_ratios.png` and each run's
//! folder. See [`resblock_examples::claims::degradation`] and `docs/residual-learning.md`.

use clap::Parser;
use resblock_examples::claims::degradation::{run, Args};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    run(&Args::parse())?;
    Ok(())
}
