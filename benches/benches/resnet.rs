//! Whole ResNets on the CPU: torchvision ResNet-18/50 inference at batch 1 and 8 (224x224),
//! unfolded and with BatchNorm folded into the convolutions, and one SGD training step of
//! CIFAR ResNet-20/56 at batch 128 (32x32). PyTorch's side: `benches/torch_bench.py`.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use criterion::{criterion_group, criterion_main, Criterion};
use resblock_benches::{inference_net, record};
use resblock_core::{configure_threads, seeded_var_builder, RngHandle};
use resblock_vision::{resnet, ResNetConfig};

fn inference(c: &mut Criterion) {
    configure_threads(None);
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

/// One SGD step (forward, backward, update) of a CIFAR ResNet at batch 128, 32x32.
fn train_step(c: &mut Criterion, arch: &str) {
    use resblock_train::optim::{param_groups, Sgd, SgdConfig};
    use resblock_train::schedule::{LrSchedule, Schedule};
    use resblock_train::{Batch, LossKind, Trainer, TrainerConfig};
    configure_threads(None);
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let cfg = ResNetConfig::preset(arch).expect("preset");
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )
    .expect("net");
    let macs = net.summary(32, 32).expect("summary").total_macs() as f64;
    let sgd = Sgd::new(
        param_groups(&varmap, 5e-4, true),
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.,
            nesterov: true,
        },
    )
    .expect("sgd");
    let schedule = LrSchedule::new(0.1, Schedule::Constant, None).expect("schedule");
    let mut trainer = Trainer::new(
        &net,
        &varmap,
        Box::new(sgd),
        schedule,
        TrainerConfig {
            loss: LossKind::CrossEntropy {
                label_smoothing: 0.,
            },
            ..Default::default()
        },
    );
    let batch = Batch {
        inputs: rng
            .normal_tensor((128, 3, 32, 32), 0., 1., DType::F32, &Device::Cpu)
            .expect("x"),
        targets: Tensor::new(
            (0..128u32).map(|i| i % 10).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .expect("y"),
    };
    let id = format!("cpu/{arch}/train_step/bs128");
    // Forward, input gradient and weight gradient: three times the forward's work.
    record(&id, Some(128.), Some(3. * 2. * macs * 128.));
    c.bench_function(&id, |b| {
        b.iter(|| trainer.train_step(&batch).expect("step"))
    });
}

fn training(c: &mut Criterion) {
    train_step(c, "resnet20");
    train_step(c, "resnet56");
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = inference, training
}
criterion_main!(benches);
