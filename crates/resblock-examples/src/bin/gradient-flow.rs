//! Claim 3 of the article, gradient flow: shortcuts keep the gradient alive through depth.
//!
//! ```text
//! cargo run --release -p resblock-examples --bin gradient-flow                 # plain-56 vs resnet-56, 60 steps, about 2 min
//! cargo run --release -p resblock-examples --bin gradient-flow -- --depth 110 --steps 200
//! ```
//!
//! Writes `--out` (default `runs/gradient-flow`): `results.json` (`layers`, and per network
//! `init` and `trained`: the gradient norm of every convolution weight, input to output)
//! and `gradient_flow.png` (log scale). See [`resblock_examples::claims::gradient_flow`]
//! and `docs/residual-learning.md`.

use clap::Parser;
use resblock_examples::claims::gradient_flow::{run, Args};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    run(&Args::parse())?;
    Ok(())
}
