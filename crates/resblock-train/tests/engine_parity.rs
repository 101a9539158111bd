//! The training engine against PyTorch step for step (fixtures from
//! tests/fixtures/make_fixtures.py): every step's loss within 1e-4 relative, and the final
//! weights within 1e-4 relative (||ours - theirs|| / ||theirs|| per tensor). In float64 the
//! same resnet20 run agrees to 1e-9 (measured ~1e-15), which pins the update rules
//! themselves; in float32 that run is chaotic (a rounding-level difference can flip a ReLU
//! and grows 500x in three steps), so it is held tightly at the first step and loosely after (see
//! that test for the measurements).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use resblock_core::{residual_mlp, Activation, MlpBlockConfig, ResidualMlpConfig, RngHandle};
use resblock_testing::hash_var_builder;
use resblock_train::optim::{param_groups, Adam, AdamConfig, Sgd, SgdConfig};
use resblock_train::schedule::{LrSchedule, Schedule, Warmup};
use resblock_train::{Batch, FixedBatches, LossKind, Trainer, TrainerConfig};
use resblock_vision::{resnet, ResNetConfig};

fn fixture(name: &str) -> Result<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)?)
}

fn batches(f: &HashMap<String, Tensor>) -> Result<FixedBatches> {
    Ok(FixedBatches(
        (0..4)
            .map(|i| -> Result<Batch> {
                Ok(Batch {
                    inputs: f.get(&format!("input{i}")).context("input")?.clone(),
                    targets: f.get(&format!("target{i}")).context("target")?.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?,
    ))
}

fn check(f: &HashMap<String, Tensor>, losses: &[f64], varmap: &VarMap, tol: f64) -> Result<()> {
    let want = f["losses"].to_vec1::<f64>()?;
    assert_eq!(losses.len(), want.len());
    for (i, (a, b)) in losses.iter().zip(&want).enumerate() {
        anyhow::ensure!(
            (a - b).abs() <= tol * b.abs(),
            "step {}: loss {a} vs PyTorch {b}",
            i + 1
        );
    }
    check_weights(f, varmap, tol)
}

/// Every final weight within `tol` relative (||ours - theirs|| / ||theirs||).
fn check_weights(f: &HashMap<String, Tensor>, varmap: &VarMap, tol: f64) -> Result<()> {
    let data = varmap.data().lock().expect("lock");
    for (k, theirs) in f
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("final.").map(|n| (n, v)))
    {
        if k.ends_with("num_batches_tracked") {
            continue;
        }
        let ours = data.get(k).with_context(|| format!("variable {k}"))?;
        let rel = resblock_testing::relative_l2(ours.as_tensor(), theirs)?;
        anyhow::ensure!(rel <= tol, "{k}: relative error {rel:e}");
    }
    Ok(())
}

/// The fixture's resnet20 run in `dtype`: hash weights, SGD Nesterov (lr 0.02, momentum 0.9,
/// weight decay 5e-4 except on 1-D parameters), MultiStep [8, 14], label smoothing 0.1, 5
/// epochs of the 4 fixed batches. Returns the step losses and the VarMap.
fn run_resnet20(f: &HashMap<String, Tensor>, dtype: DType) -> Result<(Vec<f64>, VarMap)> {
    let varmap = VarMap::new();
    let vb = resblock_testing::hash_var_builder_with_dtype(&varmap, dtype);
    let model = resnet(
        &ResNetConfig::preset("resnet20")?,
        &RngHandle::seed_from_u64(0),
        vb,
    )?;
    let sgd = Sgd::new(
        param_groups(&varmap, 5e-4, true),
        SgdConfig {
            lr: 0.02,
            momentum: 0.9,
            dampening: 0.,
            nesterov: true,
        },
    )?;
    let schedule = LrSchedule::new(
        0.02,
        Schedule::MultiStep {
            milestones: vec![8, 14],
            gamma: 0.1,
        },
        None,
    )?;
    let cfg = TrainerConfig {
        epochs: 5,
        loss: LossKind::CrossEntropy {
            label_smoothing: 0.1,
        },
        ..Default::default()
    };
    let mut trainer = Trainer::new(&model, &varmap, Box::new(sgd), schedule, cfg);
    let mut data = batches(f)?;
    for b in &mut data.0 {
        b.inputs = b.inputs.to_dtype(dtype)?;
    }
    trainer.fit(&mut data, None)?;
    let losses = trainer.step_losses().to_vec();
    Ok((losses, varmap))
}

/// The f32 run against PyTorch's float64 run of the same problem (the exact trajectory).
///
/// This trajectory is chaotic in f32: about five ReLU inputs a step land within 2e-6 of zero
/// (16 images of 16x16), so a rounding-level change in a step can flip a ReLU, and SGD with
/// Nesterov momentum at lr 0.02 grows that difference 50x in the next step and 500x in
/// three.
/// Measured (2026-12): perturbing the `gemm` crate's output of only the stride-2 layers'
/// forward GEMMs by one ulp at random positions moved the loss by 7e-5 at step 3 and 1.4e-3
/// at step 5 for one seed in six; our AVX-512 GEMM (`resblock-kernels/src/sgemm/`), whose
/// results are bit-identical to the `gemm` crate's except on a layer with K = 288 (two
/// depth blocks, RMS error 2.3e-7 against 2.5e-7), leaves f64 by 6e-4 at step 5 and at most
/// 7.2e-3 over the 20 steps, its final weights by at most 6.5e-3; PyTorch's own f32 run
/// leaves its f64 run by 2.8e-4 from step 9. So a tight bound past the first step tests
/// which way the rounding fell, not the code. What is held:
///
/// - step 1 (the forward, which has no such amplification) within 1e-5 relative;
/// - every step within 2e-2 relative, and every final weight within 2e-2 (relative L2):
///   far outside the chaos for any wrong gradient or update, which moves the run by O(1).
///
/// The update rules themselves are pinned by the f64 run (1e-9), and every f32 kernel by its
/// unit tests against an f64 reference.
#[test]
fn resnet20_sgd_nesterov_multistep_matches_pytorch() -> Result<()> {
    let f64_ref = fixture("engine_resnet20_f64.safetensors")?;
    let f32_ref = fixture("engine_resnet20.safetensors")?;
    let (losses, varmap) = run_resnet20(&f32_ref, DType::F32)?;
    let torch64 = f64_ref["losses"].to_vec1::<f64>()?;
    assert_eq!(losses.len(), torch64.len());
    for (i, (a, e)) in losses.iter().zip(&torch64).enumerate() {
        let tol = if i == 0 { 1e-5 } else { 2e-2 };
        anyhow::ensure!(
            (a - e).abs() <= tol * e.abs(),
            "step {}: loss {a} vs PyTorch-f64 {e} (bound {tol:e} relative)",
            i + 1
        );
    }
    check_weights(&f64_ref, &varmap, 2e-2)
}

#[test]
fn residual_mlp_adamw_cosine_warmup_matches_pytorch() -> Result<()> {
    let f = fixture("engine_mlp.safetensors")?;
    let varmap = VarMap::new();
    let rng = RngHandle::seed_from_u64(0);
    let cfg = ResidualMlpConfig {
        in_dim: 20,
        width: 32,
        depth: 3,
        out_dim: Some(5),
        drop_path: 0.,
        block: MlpBlockConfig {
            hidden: Some(64),
            activation: Activation::Gelu,
            layer_norm: true,
            ..Default::default()
        },
    };
    let model = residual_mlp(cfg, &rng, hash_var_builder(&varmap))?;
    let adamw = Adam::with_groups(
        param_groups(&varmap, 0.05, false),
        AdamConfig {
            lr: 1e-2,
            weight_decay: 0.05,
            decoupled: true,
            ..Default::default()
        },
    )?;
    let schedule = LrSchedule::new(
        1e-2,
        Schedule::Cosine {
            total_steps: 15,
            min_lr: 0.,
        },
        Some(Warmup {
            steps: 5,
            start_factor: 0.1,
        }),
    )?;
    let tcfg = TrainerConfig {
        epochs: 5,
        loss: LossKind::Mse,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&model, &varmap, Box::new(adamw), schedule, tcfg);
    trainer.fit(&mut batches(&f)?, None)?;
    let losses = trainer.step_losses().to_vec();
    check(&f, &losses, &varmap, 1e-4)
}

/// The resnet20 run in float64 against PyTorch in float64.
#[test]
fn resnet20_sgd_f64_matches_pytorch_closely() -> Result<()> {
    let f = fixture("engine_resnet20.safetensors")?;
    let (losses, varmap) = run_resnet20(&f, DType::F64)?;
    check(
        &fixture("engine_resnet20_f64.safetensors")?,
        &losses,
        &varmap,
        1e-9,
    )
}
