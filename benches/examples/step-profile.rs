//! Where a CIFAR ResNet training step spends its time: forward, backward and optimizer
//! update, with our kernels and with Candle's, one line each; and an eval-mode forward of
//! the same batch.
//!
//! `cargo run --release -p resblock-benches --example step-profile -- [ARCH] [BATCH] [STEPS]
//! [native|candle|both] [SIZE] [IN_CHANNELS]` (defaults: resnet20 128 5 both 32, the preset's
//! input channels; `resnet20 128 20 native 28 1` is the default `train` run's step). For a quick look while working on kernels; the figures we
//! report come from `cargo xtask bench --compare-torch`.

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use resblock_core::ops::{set_kernels, Kernels};
use resblock_core::{configure_threads_here, seeded_var_builder, RngHandle};
use resblock_train::loss::cross_entropy;
use resblock_train::optim::{param_groups, Optimizer, Sgd, SgdConfig};
use resblock_vision::{resnet, ResNetConfig};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arch = args.first().map_or("resnet20", String::as_str);
    let batch: usize = args.get(1).map_or(Ok(128), |s| s.parse())?;
    let steps: usize = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let which: Vec<Kernels> = match args.get(3).map(String::as_str) {
        Some("native") => vec![Kernels::Native],
        Some("candle") => vec![Kernels::Candle],
        _ => vec![Kernels::Native, Kernels::Candle],
    };
    let size: usize = args.get(4).map_or(Ok(32), |s| s.parse())?;
    let in_channels: Option<usize> = args.get(5).map(|s| s.parse()).transpose()?;
    configure_threads_here(None);
    for kernels in which {
        set_kernels(kernels);
        let rng = RngHandle::seed_from_u64(0);
        let varmap = VarMap::new();
        let mut cfg = ResNetConfig::preset(arch)?;
        if let Some(c) = in_channels {
            cfg.in_channels = c;
        }
        let net = resnet(
            &cfg,
            &rng,
            seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
        )?;
        let mut sgd = Sgd::new(
            param_groups(&varmap, 5e-4, true),
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.,
                nesterov: true,
            },
        )?;
        let x = rng.normal_tensor(
            (batch, cfg.in_channels, size, size),
            0.,
            1.,
            DType::F32,
            &Device::Cpu,
        )?;
        let y = Tensor::new(
            (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
            &Device::Cpu,
        )?;
        let (mut tf, mut tb, mut to) = (0f64, 0f64, 0f64);
        let mut fastest = f64::INFINITY;
        for step in 0..=steps {
            let t0 = Instant::now();
            let logits = net.forward_t(&x, true)?;
            let loss = cross_entropy(&logits, &y, 0.)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            sgd.step(&grads)?;
            let t3 = Instant::now();
            if step > 0 {
                tf += (t1 - t0).as_secs_f64();
                tb += (t2 - t1).as_secs_f64();
                to += (t3 - t2).as_secs_f64();
                fastest = fastest.min((t3 - t0).as_secs_f64());
            }
        }
        // Eval mode on the same network and batch (what `train` runs on its test set after
        // every epoch): the fastest of `steps` forwards.
        let mut eval = f64::INFINITY;
        for _ in 0..=steps {
            let t0 = Instant::now();
            net.forward_t(&x, false)?;
            eval = eval.min(t0.elapsed().as_secs_f64());
        }
        let n = steps as f64;
        println!(
            "{kernels:?}: {arch} bs{batch}: eval-mode forward {:.1} ms (fastest)",
            1e3 * eval
        );
        println!(
            "{kernels:?}: {arch} bs{batch}: forward {:.0} ms, backward {:.0} ms, update {:.0} ms, step {:.0} ms = {:.1} img/s (fastest step {:.0} ms)",
            1e3 * tf / n,
            1e3 * tb / n,
            1e3 * to / n,
            1e3 * (tf + tb + to) / n,
            batch as f64 * n / (tf + tb + to),
            1e3 * fastest
        );
    }
    Ok(())
}
