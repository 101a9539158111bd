//! The max pooling of a ResNet's stem (3x3, stride 2, padding 1) forward and backward on a
//! random batch, each timed alone: prints the fastest and the median of REPS calls. For a
//! quick look while working on `resblock_kernels::pool`; the backward includes Candle's
//! bookkeeping around the op (the sum's gradient, the input's gradient accumulated).
//!
//! `cargo run --release -p resblock-benches --example pool-profile -- N C HW REPS`
//! (ResNet-50's at batch 32: `32 64 112 10`).
use std::time::Instant;

use candle_core::{DType, Device, Var};
use resblock_core::ops::{max_pool2d, Pool2dConfig};
use resblock_core::{configure_threads_here, RngHandle};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let [n, c, hw, reps] = args[..] else {
        anyhow::bail!("usage: pool-profile N C HW REPS");
    };
    anyhow::ensure!(reps > 0, "REPS must be at least 1");
    configure_threads_here(None);
    let rng = RngHandle::seed_from_u64(0);
    let x =
        Var::from_tensor(&rng.normal_tensor((n, c, hw, hw), 0., 1., DType::F32, &Device::Cpu)?)?;
    let mut f = vec![];
    let mut b = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        let y = max_pool2d(x.as_tensor(), Pool2dConfig::new(3, 2, 1))?;
        f.push(t.elapsed().as_secs_f64() * 1e3);
        let l = y.sum_all()?;
        let t = Instant::now();
        let g = l.backward()?;
        b.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(g.get(x.as_tensor()));
    }
    f.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    println!(
        "fwd min {:.2} med {:.2} ms; bwd min {:.2} med {:.2} ms",
        f[0],
        f[reps / 2],
        b[0],
        b[reps / 2]
    );
    Ok(())
}
