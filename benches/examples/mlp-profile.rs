//! The residual MLP block's training step (`cpu/residual_mlp_block/fwd_bwd/w256_h1024_bs128`
//! in the bench): forward + backward, timed a step at a time, with the fastest and the
//! median step printed, so that two builds can be alternated process by process.
//!
//! `cargo run --release -p resblock-benches --example mlp-profile -- [STEPS] [THREADS]`
//! (defaults: 2000 steps, the bench's thread count). For a quick look while working on
//! kernels; the figures we report come from `cargo xtask bench --compare-torch`.

use std::time::Instant;

use candle_core::ModuleT;
use candle_nn::VarMap;
use resblock_core::configure_threads_here;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: usize = args.first().map_or(Ok(2000), |s| s.parse())?;
    let threads: Option<usize> = args.get(1).map(|s| s.parse()).transpose()?;
    let pool = configure_threads_here(threads);
    let varmap = VarMap::new();
    // The bench's block: LayerNorm, 256 -> 1024 (GELU) -> 256, batch 128.
    let (block, x) = resblock_benches::mlp_bench_block(&varmap);
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        let y = block.forward_t(&x, true)?;
        y.sqr()?.mean_all()?.backward()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let warm = &mut times[steps / 10..];
    warm.sort_by(f64::total_cmp);
    let mean = warm.iter().sum::<f64>() / warm.len() as f64;
    println!(
        "mlp step: fastest {:.3} ms, median {:.3} ms, mean {:.3} ms ({} threads, {} steps)",
        warm[0],
        warm[warm.len() / 2],
        mean,
        pool,
        steps
    );
    Ok(())
}
