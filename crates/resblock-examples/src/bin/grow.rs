//! Claim 2 of the article, nested function classes: a trained network grown by blocks that
//! start as the identity computes exactly the same function, then trains on.
//!
//! ```text
//! cargo run --release -p resblock-examples --bin grow                 # resnet20 -> resnet32 on MNIST-10k, 4 + 4 epochs, about 7 min
//! cargo run --release -p resblock-examples --bin grow -- --from resnet20 --to resnet56 --epochs 10
//! ```
//!
//! Writes `--out` (default `runs/grow`): `results.json` (`before`, `grown` with
//! `max_rel_logit_diff`, `after`, `control`, `improved`, per-epoch `history`,
//! `residual_ratios`), `grow.png`, `grow_ratios.png` and each run's folder. See
//! [`resblock_examples::claims::grow`], [`resblock_vision::grow`] and
//! `docs/residual-learning.md`.

use clap::Parser;
use resblock_examples::claims::grow::{run, Args};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    run(&Args::parse())?;
    Ok(())
}
