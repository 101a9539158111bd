//! Times single layers at CIFAR ResNet shapes (batch 128): convolution forward and forward +
//! backward (from a given output gradient, `backward_from`), BatchNorm(+ReLU) training forward and forward + backward, with our kernels and
//! Candle's, and the fused conv + BatchNorm + ReLU training op.
//! `cargo run --release -p resblock-benches --example layer-profile -- [native|candle|both]
//! [conv|bn|convbn]`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use resblock_core::ops::{batch_norm_train, conv2d, conv_batch_norm_train, set_kernels, Kernels};
use resblock_core::{backward_from, configure_threads_here, RngHandle};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// The fastest of `reps` calls of `f`, in ms (the least disturbed on a shared machine).
fn time<R>(reps: usize, mut f: impl FnMut() -> anyhow::Result<R>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(1e3 * t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    configure_threads_here(None);
    let kernels = match std::env::args().nth(1).as_deref() {
        Some("native") => vec![Kernels::Native],
        Some("candle") => vec![Kernels::Candle],
        _ => vec![Kernels::Native, Kernels::Candle],
    };
    let only = std::env::args().nth(2).unwrap_or_default();
    let rng = RngHandle::seed_from_u64(0);
    let dev = Device::Cpu;
    let n = 128;
    // (cin, cout, size, stride)
    for (ci, co, hw, s) in [
        (16, 16, 32, 1),
        (16, 32, 32, 2),
        (32, 32, 16, 1),
        (64, 64, 8, 1),
    ] {
        if !only.is_empty() && only != "conv" {
            break;
        }
        let x = Var::from_tensor(&rng.normal_tensor((n, ci, hw, hw), 0., 1., DType::F32, &dev)?)?;
        let w = Var::from_tensor(&rng.normal_tensor((co, ci, 3, 3), 0., 0.1, DType::F32, &dev)?)?;
        let oh = (hw - 1) / s + 1;
        let r = rng.normal_tensor((n, co, oh, oh), 0., 1., DType::F32, &dev)?;
        let flop = 2. * (n * co * oh * oh * ci * 9) as f64;
        for k in kernels.iter().copied() {
            set_kernels(k);
            let f = time(5, || Ok(conv2d(&x, &w, 1, s, 1, 1)?))?;
            let fb = time(3, || Ok(backward_from(&conv2d(&x, &w, 1, s, 1, 1)?, &r)?))?;
            println!(
                "{k:?} conv {ci}->{co} {hw}x{hw} s{s}: fwd {f:.1} ms ({:.1} GFLOP/s), fwd+bwd {fb:.1} ms ({:.1} GFLOP/s)",
                flop / f / 1e6,
                3. * flop / fb / 1e6
            );
        }
    }
    for (c, hw) in [(16, 32), (64, 8)] {
        if !only.is_empty() && only != "bn" {
            break;
        }
        let x = Var::from_tensor(&rng.normal_tensor((n, c, hw, hw), 0., 1., DType::F32, &dev)?)?;
        let g = Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?)?;
        let r = rng.normal_tensor((n, c, hw, hw), 0., 1., DType::F32, &dev)?;
        for k in kernels.iter().copied() {
            set_kernels(k);
            let f = time(5, || Ok(batch_norm_train(&x, &g, &b, 1e-5, true)?))?;
            let fb = time(3, || {
                Ok(backward_from(
                    &batch_norm_train(&x, &g, &b, 1e-5, true)?.0,
                    &r,
                )?)
            })?;
            println!("{k:?} bn+relu {c}x{hw}x{hw}: fwd {f:.1} ms, fwd+bwd {fb:.1} ms");
        }
    }
    // `LAYER_PROFILE_SIZE=C` keeps only the fused layers with C channels,
    // `LAYER_PROFILE_REPS` sets the timed repetitions (for a profiler run) and
    // `LAYER_PROFILE_SIDE=S` the first stage's side (default 32; 28 for the MNIST `train`).
    let size: Option<usize> = std::env::var("LAYER_PROFILE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok());
    let reps: usize = std::env::var("LAYER_PROFILE_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let side: usize = std::env::var("LAYER_PROFILE_SIDE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    for (c, hw) in [(16, side), (32, side / 2), (64, side / 4)] {
        if !only.is_empty() && only != "convbn" {
            break;
        }
        if size.is_some_and(|s| s != c) {
            continue;
        }
        set_kernels(Kernels::Native);
        let x = Var::from_tensor(&rng.normal_tensor((n, c, hw, hw), 0., 1., DType::F32, &dev)?)?;
        let w = Var::from_tensor(&rng.normal_tensor((c, c, 3, 3), 0., 0.1, DType::F32, &dev)?)?;
        let g = Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?)?;
        let r = rng.normal_tensor((n, c, hw, hw), 0., 1., DType::F32, &dev)?;
        let run = || conv_batch_norm_train(&x, &w, (1, 1, 1, 1), &g, &b, 1e-5, true);
        let f = time(5, || Ok(run()?))?;
        let fb = time(reps, || Ok(backward_from(&run()?.0, &r)?))?;
        println!("Native conv+bn+relu {c}x{hw}x{hw}: fwd {f:.1} ms, fwd+bwd {fb:.1} ms");
    }
    if !only.is_empty() {
        return Ok(());
    }
    let x = rng.normal_tensor((n, 16, 32, 32), 0., 1., DType::F32, &dev)?;
    let y = rng.normal_tensor((n, 16, 32, 32), 0., 1., DType::F32, &dev)?;
    println!("candle add 16x32x32: {:.1} ms", time(5, || Ok((&x + &y)?))?);
    println!("candle relu 16x32x32: {:.1} ms", time(5, || Ok(x.relu()?))?);
    Ok(())
}
