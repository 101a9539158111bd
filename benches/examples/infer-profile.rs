//! Inference latency of torchvision ResNets (224x224 unless told), unfolded and with
//! BatchNorm folded, one line per (arch, batch, form): for a quick look while working on
//! kernels; the figures we report come from `cargo xtask bench --compare-torch`.
//!
//! `cargo run --release -p resblock-benches --example infer-profile -- [ARCH] [BATCH] [REPS]
//! [folded|unfolded] [SIZE]` (defaults: resnet50 8 5, both forms, 224; the form must be given
//! for a size).

use std::time::Instant;

use candle_core::{DType, Device, ModuleT};
use resblock_benches::inference_net;
use resblock_core::{configure_threads_here, RngHandle};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arch = args.first().map_or("resnet50", String::as_str);
    let batch: usize = args.get(1).map_or(Ok(8), |s| s.parse())?;
    let reps: usize = args.get(2).map_or(Ok(5), |s| s.parse::<usize>())?.max(1);
    let only = args.get(3).map(String::as_str);
    let size: usize = args.get(4).map_or(Ok(224), |s| s.parse())?;
    configure_threads_here(None);
    let (net, cfg) = inference_net(arch);
    let folded = net.folded()?;
    let x = RngHandle::seed_from_u64(1).normal_tensor(
        (batch, cfg.in_channels, size, size),
        0.,
        1.,
        DType::F32,
        &Device::Cpu,
    )?;
    for (form, model) in [("unfolded", &net), ("folded", &folded)] {
        if only.is_some_and(|o| o != form) {
            continue;
        }
        model.forward_t(&x, false)?;
        // Per-call times: the minimum is the least disturbed on a shared machine.
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                model
                    .forward_t(&x, false)
                    .map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        let (min, median) = (times[0], times[times.len() / 2]);
        println!(
            "{arch} bs{batch} {form}: min {:.1} ms, median {:.1} ms = {:.2} img/s at the minimum",
            1e3 * min,
            1e3 * median,
            batch as f64 / min
        );
    }
    Ok(())
}
