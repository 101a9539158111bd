//! Keep-best and early stopping in the trainer: the best epoch's weights are written with
//! its epoch, training stops when the patience runs out, the state survives a resume, and
//! without a validation set nothing is selected (the test set never is).

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use resblock_core::{mlp_block, seeded_var_builder, MlpBlock, MlpBlockConfig, RngHandle};
use resblock_train::best::KeepBest;
use resblock_train::optim::{param_groups, Sgd, SgdConfig};
use resblock_train::schedule::{LrSchedule, Schedule};
use resblock_train::{Batch, FixedBatches, LossKind, Trainer, TrainerConfig};

fn batches(seed: u64, n: usize) -> Result<Vec<Batch>> {
    let rng = RngHandle::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let inputs = rng.normal_tensor((8, 10), 0., 1., DType::F32, &Device::Cpu)?;
            // Learnable: the class is the index of the largest of the first 3 features.
            let v = inputs.narrow(1, 0, 3)?.argmax(1)?;
            Ok(Batch { inputs, targets: v })
        })
        .collect()
}

fn model() -> Result<(MlpBlock, VarMap)> {
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let block = mlp_block(
        10,
        10,
        MlpBlockConfig {
            hidden: Some(16),
            ..Default::default()
        },
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    Ok((block, varmap))
}

fn trainer<'m>(
    block: &'m MlpBlock,
    varmap: &VarMap,
    epochs: usize,
    out: Option<std::path::PathBuf>,
    stop_after: Option<usize>,
) -> Result<Trainer<'m, MlpBlock>> {
    let sgd = Sgd::new(
        param_groups(varmap, 0., true),
        SgdConfig {
            lr: 0.5,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let cfg = TrainerConfig {
        epochs,
        loss: LossKind::CrossEntropy {
            label_smoothing: 0.,
        },
        out_dir: out,
        stop_after,
        ..Default::default()
    };
    let schedule = LrSchedule::new(0.5, Schedule::Constant, None)?;
    Ok(Trainer::new(block, varmap, Box::new(sgd), schedule, cfg)
        .with_keep_best(KeepBest::new(true, Some(2))?))
}

#[test]
fn the_best_epoch_is_kept_and_survives_a_resume() -> Result<()> {
    let dir = resblock_testing::scratch_dir!("keep-best", "straight");
    let (block, varmap) = model()?;
    let mut t = trainer(&block, &varmap, 8, Some(dir.clone()), None)?;
    let history = t
        .fit_validated(
            &mut FixedBatches(batches(1, 6)?),
            Some(&mut FixedBatches(batches(2, 2)?)),
            Some(&mut FixedBatches(batches(3, 2)?)),
        )?
        .to_vec();
    let val: Vec<f64> = history.iter().map(|r| r.val_acc).collect();
    let (best_epoch, best) = t.best().expect("a best epoch");
    // The best is the first epoch reaching the highest validation accuracy.
    let top = val.iter().copied().fold(f64::MIN, f64::max);
    assert_eq!(best, top);
    assert_eq!(
        best_epoch,
        1 + val.iter().position(|&v| v == top).expect("top")
    );
    // Stopped early exactly when two epochs in a row did not improve, or ran to the end.
    match t.stopped_early() {
        Some(e) => assert_eq!(e, best_epoch + 2, "{val:?}"),
        None => assert_eq!(history.len(), 8),
    }
    let meta =
        safetensors::SafeTensors::read_metadata(&std::fs::read(dir.join("best.safetensors"))?)?
            .1
            .metadata()
            .clone()
            .expect("metadata");
    assert_eq!(meta["epoch"], best_epoch.to_string());

    // Interrupted after 2 epochs and resumed (fresh trainer): the same best and stop.
    let cut = resblock_testing::scratch_dir!("keep-best", "cut");
    let (b1, v1) = model()?;
    trainer(&b1, &v1, 8, Some(cut.clone()), Some(2))?.fit_validated(
        &mut FixedBatches(batches(1, 6)?),
        Some(&mut FixedBatches(batches(2, 2)?)),
        None,
    )?;
    let (b2, v2) = model()?;
    let mut resumed = trainer(&b2, &v2, 8, Some(cut.clone()), None)?;
    resumed.resume(&cut.join("checkpoint.safetensors"))?;
    resumed.fit_validated(
        &mut FixedBatches(batches(1, 6)?),
        Some(&mut FixedBatches(batches(2, 2)?)),
        None,
    )?;
    assert_eq!(resumed.best(), t.best());
    assert_eq!(resumed.stopped_early(), t.stopped_early());

    // No validation set: refused, naming the flag.
    let (b3, v3) = model()?;
    let err = trainer(&b3, &v3, 2, None, None)?
        .fit(
            &mut FixedBatches(batches(1, 2)?),
            Some(&mut FixedBatches(batches(3, 1)?)),
        )
        .expect_err("keep-best without validation");
    assert!(err.to_string().contains("--val-split"), "{err}");
    Ok(())
}
