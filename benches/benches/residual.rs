//! Residual primitives on the CPU: the article's toy program, a residual MLP block forward +
//! backward, and the article's CNN block forward + backward. (Whole ResNets: `resnet.rs`;
//! single kernels: `kernels.rs`.)

use candle_core::{DType, Device, ModuleT};
use candle_nn::VarMap;
use criterion::{criterion_group, criterion_main, Criterion};
use resblock_core::{
    configure_threads_here, mlp_block, seeded_var_builder, MlpBlockConfig, RngHandle,
};
use resblock_train::loss::mse;
use resblock_train::optim::{Adam, AdamConfig, Optimizer};
use resblock_vision::{basic_block, BasicBlockConfig};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn toy_program(c: &mut Criterion) {
    configure_threads_here(None);
    resblock_benches::record("cpu/toy_residual/1000_epochs", None, None);
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
    configure_threads_here(None);
    let varmap = VarMap::new();
    let (block, x) = resblock_benches::mlp_bench_block(&varmap);
    // LayerNorm, 256 -> 1024 -> 256: forward 2 * 128 * 2 * 256 * 1024, backward twice that.
    resblock_benches::record(
        "cpu/residual_mlp_block/fwd_bwd/w256_h1024_bs128",
        Some(128.),
        Some(3. * 2. * 128. * 2. * 256. * 1024.),
    );
    c.bench_function("cpu/residual_mlp_block/fwd_bwd/w256_h1024_bs128", |b| {
        b.iter(|| -> candle_core::Result<()> {
            let y = block.forward_t(&x, true)?;
            y.sqr()?.mean_all()?.backward()?;
            Ok(())
        })
    });
}

fn cnn_block_step(c: &mut Criterion) {
    configure_threads_here(None);
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
    // Two 3x3 convolutions and a 1x1 projection at 16x16 output, forward + backward.
    let flop = resblock_benches::conv3x3_flop(32, 16, 32, 32, 2)
        + resblock_benches::conv3x3_flop(32, 32, 32, 16, 1)
        + 2. * (32 * 32 * 16 * 16 * 16) as f64;
    resblock_benches::record(
        "cpu/basic_block_16_32_s2/fwd_bwd/bs32_32x32",
        Some(32.),
        Some(3. * flop),
    );
    c.bench_function("cpu/basic_block_16_32_s2/fwd_bwd/bs32_32x32", |b| {
        b.iter(|| -> candle_core::Result<()> {
            let y = block.forward_t(&x, true)?;
            y.sqr()?.mean_all()?.backward()?;
            Ok(())
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = toy_program, mlp_fwd_bwd, cnn_block_step
}
criterion_main!(benches);
