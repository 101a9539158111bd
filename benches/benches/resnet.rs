//! Whole ResNets on the CPU: torchvision ResNet-18/50 inference at batch 1 and 8 (224x224),
//! unfolded and with BatchNorm folded into the convolutions, and one SGD training step of
//! CIFAR ResNet-20/56 at batch 128 (32x32) and of ResNet-50 at batch 32 (224x224). PyTorch's
//! side: `benches/torch_bench.py`.

use candle_core::{DType, Device, ModuleT};
use criterion::{criterion_group, criterion_main, Criterion};
use resblock_benches::{inference_net, record, TrainWorkload};
use resblock_core::{configure_threads_here, RngHandle};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn inference(c: &mut Criterion) {
    configure_threads_here(None);
    for arch in ["resnet18", "resnet50"] {
        let (net, cfg) = inference_net(arch);
        let folded = net.folded().expect("fold");
        let macs = net.summary(224, 224).expect("summary").total_macs() as f64;
        for bs in [1usize, 8] {
            let x = RngHandle::seed_from_u64(1)
                .normal_tensor(
                    (bs, cfg.in_channels, 224, 224),
                    0.,
                    1.,
                    DType::F32,
                    &Device::Cpu,
                )
                .expect("x");
            for (suffix, model) in [("", &net), ("_folded", &folded)] {
                let id = format!("cpu/{arch}/infer/bs{bs}{suffix}");
                record(&id, Some(bs as f64), Some(2. * macs * bs as f64));
                c.bench_function(&id, |b| {
                    b.iter(|| model.forward_t(&x, false).expect("forward"))
                });
            }
        }
    }
}

/// One SGD step (forward, backward, update) of `arch` at `batch` images of `size`x`size`.
fn train_step(c: &mut Criterion, arch: &str, batch: usize, size: usize) {
    configure_threads_here(None);
    let work = TrainWorkload::new(arch, batch, size);
    let mut trainer = work.trainer();
    let id = format!("cpu/{arch}/train_step/bs{batch}");
    record(&id, Some(batch as f64), Some(work.flop));
    c.bench_function(&id, |b| {
        b.iter(|| trainer.train_step(&work.batch).expect("step"))
    });
}

fn training(c: &mut Criterion) {
    train_step(c, "resnet20", 128, 32);
    train_step(c, "resnet56", 128, 32);
    // The ImageNet-size step whose peak memory the bench also reports.
    train_step(c, "resnet50", 32, 224);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = inference, training
}
criterion_main!(benches);
