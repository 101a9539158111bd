//! Gradient accumulation: K batches per optimizer step give the step of one batch of all
//! their samples (no batch norm here, so nothing else differs), and the step count is
//! ceil(batches / K).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use resblock_core::{mlp_block, seeded_var_builder, MlpBlockConfig, RngHandle};
use resblock_train::optim::{param_groups, Sgd, SgdConfig};
use resblock_train::schedule::{LrSchedule, Schedule};
use resblock_train::{Batch, FixedBatches, LossKind, Trainer, TrainerConfig};

/// `n` batches of `bs` samples of 10 features with 10 classes, from a fixed seed.
fn batches(n: usize, bs: usize) -> Result<Vec<Batch>> {
    let rng = RngHandle::seed_from_u64(5);
    (0..n)
        .map(|_| {
            let inputs = rng.normal_tensor((bs, 10), 0., 1., DType::F32, &Device::Cpu)?;
            let t: Vec<u32> = (0..bs).map(|_| rng.below(10) as u32).collect();
            Ok(Batch {
                inputs,
                targets: Tensor::new(t.as_slice(), &Device::Cpu)?,
            })
        })
        .collect()
}

fn concat(pairs: &[Batch]) -> Result<Batch> {
    let inputs: Vec<&Tensor> = pairs.iter().map(|b| &b.inputs).collect();
    let targets: Vec<&Tensor> = pairs.iter().map(|b| &b.targets).collect();
    Ok(Batch {
        inputs: Tensor::cat(&inputs, 0)?,
        targets: Tensor::cat(&targets, 0)?,
    })
}

/// Trains the article's residual MLP block for one epoch; returns its weights and steps.
fn train(data: Vec<Batch>, accumulate: usize) -> Result<(Vec<Vec<f32>>, u64)> {
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
    let sgd = Sgd::new(
        param_groups(&varmap, 1e-3, true),
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.,
            nesterov: false,
        },
    )?;
    let cfg = TrainerConfig {
        loss: LossKind::CrossEntropy {
            label_smoothing: 0.1,
        },
        accumulate,
        ..Default::default()
    };
    let schedule = LrSchedule::new(0.1, Schedule::Constant, None)?;
    let mut trainer = Trainer::new(&block, &varmap, Box::new(sgd), schedule, cfg);
    trainer.train_epoch(&mut FixedBatches(data))?;
    let data = varmap.data().lock().expect("lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let w = names
        .iter()
        .map(|k| data[*k].as_tensor().flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    Ok((w, trainer.step()))
}

#[test]
fn accumulating_k_batches_is_one_step_on_all_their_samples() -> Result<()> {
    // Six batches of 4 and one of 2: K = 2 makes steps of 8, 8, 8 and 2 samples; K = 4 of
    // 16 and 10 (4 + 4 + 2: each batch's loss weighted by its share of the samples).
    let mut small = batches(6, 4)?;
    small.extend(batches(1, 2)?);
    for k in [2, 4] {
        let big: Vec<Batch> = small.chunks(k).map(concat).collect::<Result<_>>()?;
        let (a, steps_a) = train(small.clone(), k)?;
        let (b, steps_b) = train(big, 1)?;
        assert_eq!(steps_a, 7u64.div_ceil(k as u64));
        assert_eq!(steps_a, steps_b);
        let worst = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "K = {k}: weights differ by {worst}");
    }
    // K = 1 is the step per batch it always was.
    let (a, steps) = train(small.clone(), 1)?;
    assert_eq!(steps, 7);
    let (b, _) = train(small, 2)?;
    assert_ne!(a, b);
    Ok(())
}
