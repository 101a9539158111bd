//! Residual primitives on the CPU: the article's toy program, a residual MLP block forward +
//! backward, and the article's CNN block training step.

use candle_core::{DType, Device, ModuleT};
use candle_nn::VarMap;
use criterion::{criterion_group, criterion_main, Criterion};
use resblock_core::{
    configure_threads, mlp_block, seeded_var_builder, Activation, MlpBlockConfig, RngHandle,
};
use resblock_train::loss::mse;
use resblock_train::optim::{Adam, AdamConfig, Optimizer};
use resblock_vision::{basic_block, BasicBlockConfig};

fn toy_program(c: &mut Criterion) {
    configure_threads(None);
    c.bench_function("cpu/toy_residual/1000_epochs", |b| {
        b.iter(|| -> candle_core::Result<()> {
            let rng = RngHandle::seed_from_u64(42);
            let varmap = VarMap::new();
            let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
            let block = mlp_block(10, 10, MlpBlockConfig::article(), &rng, vb)?;
            let x = rng.normal_tensor((100, 10), 0., 1., DType::F32, &Device::Cpu)?;
            let y = rng.normal_tensor((100, 10), 0., 1., DType::F32, &Device::Cpu)?;
            let cfg = AdamConfig {
                lr: 0.01,
                ..Default::default()
            };
            let mut opt = Adam::new(varmap.all_vars(), cfg).map_err(candle_core::Error::wrap)?;
            for _ in 0..1000 {
                let loss =
                    mse(&block.forward_t(&x, true)?, &y).map_err(candle_core::Error::wrap)?;
                opt.backward_step(&loss).map_err(candle_core::Error::wrap)?;
            }
            Ok(())
        })
    });
}

fn mlp_fwd_bwd(c: &mut Criterion) {
    configure_threads(None);
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let cfg = MlpBlockConfig {
        hidden: Some(1024),
        activation: Activation::Gelu,
        layer_norm: true,
        ..Default::default()
    };
    let block = mlp_block(256, 256, cfg, &rng, vb).expect("block");
    let x = rng
        .normal_tensor((128, 256), 0., 1., DType::F32, &Device::Cpu)
        .expect("x");
    c.bench_function("cpu/residual_mlp_block/fwd_bwd/w256_h1024_bs128", |b| {
        b.iter(|| -> candle_core::Result<()> {
            let y = block.forward_t(&x, true)?;
            y.sqr()?.mean_all()?.backward()?;
            Ok(())
        })
    });
}

fn cnn_block_step(c: &mut Criterion) {
    configure_threads(None);
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let cfg = BasicBlockConfig {
        stride: 2,
        ..Default::default()
    };
    let block = basic_block(16, 32, cfg, &rng, vb).expect("block");
    let x = rng
        .uniform_tensor((32, 16, 32, 32), 0., 1., DType::F32, &Device::Cpu)
        .expect("x");
    c.bench_function("cpu/basic_block_16_32_s2/fwd_bwd/bs32_32x32", |b| {
        b.iter(|| -> candle_core::Result<()> {
            let y = block.forward_t(&x, true)?;
            y.sqr()?.mean_all()?.backward()?;
            Ok(())
        })
    });
}

/// One SGD step (forward, backward, update) of CIFAR ResNet-20 at batch 128, 32x32: the
/// figure the Performance issue compares with PyTorch.
fn resnet20_train_step(c: &mut Criterion) {
    use resblock_train::optim::{param_groups, Sgd, SgdConfig};
    use resblock_train::schedule::{LrSchedule, Schedule};
    use resblock_train::{Batch, LossKind, Trainer, TrainerConfig};
    use resblock_vision::{resnet, ResNetConfig};
    configure_threads(None);
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let cfg = ResNetConfig::preset("resnet20").expect("preset");
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )
    .expect("net");
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
        targets: candle_core::Tensor::new(
            (0..128u32).map(|i| i % 10).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .expect("y"),
    };
    c.bench_function("cpu/resnet20/train_step/bs128", |b| {
        b.iter(|| trainer.train_step(&batch).expect("step"))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = toy_program, mlp_fwd_bwd, cnn_block_step, resnet20_train_step
}
criterion_main!(benches);
