//! One f32 product `a (m x k) . b (k x n)` through our dense op (the GEMM the linear layers
//! and the convolutions' GEMM path run, as the `cpu/gemm/f32_1024` bench row) with our own
//! GEMM allowed and not (`Dispatch::own_gemm`, the `gemm` crate otherwise), interleaved
//! call by call: prints the minimum and median of each and their rate. On a shared host
//! this is fairer than two bench runs minutes apart. The figures we report come from
//! `cargo xtask bench`.
//!
//! `cargo run --release -p resblock-benches --example gemm-ab -- M N K REPS`

use std::time::Instant;

use candle_core::{DType, Device};
use resblock_core::ops::dense::{linear, DenseActivation};
use resblock_core::ops::dispatch;
use resblock_core::{configure_threads_here, RngHandle};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let [m, n, k, reps] = args[..] else {
        anyhow::bail!("usage: gemm-ab M N K REPS");
    };
    configure_threads_here(None);
    let rng = RngHandle::seed_from_u64(1);
    let a = rng.normal_tensor((m, k), 0., 1., DType::F32, &Device::Cpu)?;
    // A linear layer's weight: `(n, k)`, the product reads it transposed.
    let w = rng.normal_tensor((n, k), 0., 1., DType::F32, &Device::Cpu)?;
    let base = dispatch::current();
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..2 * reps.max(1) {
        let on = i % 2 == 1;
        dispatch::set(dispatch::Dispatch {
            own_gemm: on,
            ..base
        });
        let t = Instant::now();
        linear(&a, &w, None, DenseActivation::Identity)?;
        times[usize::from(on)].push(t.elapsed().as_secs_f64());
    }
    dispatch::set(base);
    let flop = 2. * (m * n * k) as f64;
    for (name, t) in ["the gemm crate", "ours"].iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        println!(
            "{m}x{k} . {k}x{n}, {name}: min {:.3} ms ({:.1} GFLOP/s), median {:.3} ms",
            1e3 * t[0],
            flop / t[0] / 1e9,
            1e3 * t[t.len() / 2]
        );
    }
    Ok(())
}
