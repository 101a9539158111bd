//! Data-parallel training with ranks as threads ([`LocalGroup`]), against one process:
//!
//! - without batch norm, 2 ranks on half batches take exactly the steps of one process on
//!   the concatenated batches (gradient averaging, evaluation split and reduced, rank 0
//!   alone writing);
//! - with batch norm, they follow DDP's per-rank semantics: each rank normalises with its
//!   own half's statistics, the averaged gradient is the mean of the two halves', and rank
//!   0's running statistics are those its own halves moved (computed here by hand);
//! - a non-finite loss on one rank stops every rank; a checkpoint of 2 ranks refuses to
//!   resume with 1.

use std::path::Path;
use std::rc::Rc;

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use resblock_core::{mlp_block, seeded_var_builder, MlpBlockConfig, RngHandle};
use resblock_train::distributed::LocalGroup;
use resblock_train::loss::cross_entropy;
use resblock_train::optim::{param_groups, Optimizer, Sgd, SgdConfig};
use resblock_train::schedule::{LrSchedule, Schedule};
use resblock_train::{Batch, Communicator, Error, FixedBatches, LossKind, Trainer, TrainerConfig};
use resblock_vision::{resnet, ResNetConfig};

/// `steps` batches of `bs` samples of shape `shape` with 10 classes, from `seed`.
fn batches(seed: u64, steps: usize, bs: usize, shape: &[usize]) -> Result<Vec<Batch>> {
    let rng = RngHandle::seed_from_u64(seed);
    (0..steps)
        .map(|_| {
            let dims: Vec<usize> = [&[bs][..], shape].concat();
            let inputs = rng.normal_tensor(dims, 0., 1., DType::F32, &Device::Cpu)?;
            let t: Vec<u32> = (0..bs).map(|_| rng.below(10) as u32).collect();
            Ok(Batch {
                inputs,
                targets: Tensor::new(t.as_slice(), &Device::Cpu)?,
            })
        })
        .collect()
}

/// Samples `[rank * n/W, (rank + 1) * n/W)` of every batch: rank `rank`'s part.
fn part(all: &[Batch], rank: usize, world: usize) -> Result<Vec<Batch>> {
    all.iter()
        .map(|b| {
            let n = b.inputs.dim(0)? / world;
            Ok(Batch {
                inputs: b.inputs.narrow(0, rank * n, n)?,
                targets: b.targets.narrow(0, rank * n, n)?,
            })
        })
        .collect()
}

/// Runs `f` on each rank of a `world`-thread group; the results by rank.
fn on_ranks<T: Send>(world: usize, f: impl Fn(LocalGroup) -> Result<T> + Sync) -> Result<Vec<T>> {
    let groups = LocalGroup::new(world)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let f = &f;
                s.spawn(move || f(g))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
            .collect()
    })
}

fn sgd(varmap: &VarMap) -> Result<Sgd> {
    Ok(Sgd::new(
        param_groups(varmap, 5e-4, true),
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.,
            nesterov: true,
        },
    )?)
}

fn constant() -> Result<LrSchedule> {
    Ok(LrSchedule::new(0.05, Schedule::Constant, None)?)
}

/// A trainer of `model` with [`sgd`] at a [`constant`] rate.
fn trainer<'m, M: ModuleT>(
    model: &'m M,
    varmap: &VarMap,
    cfg: TrainerConfig,
) -> Result<Trainer<'m, M>> {
    Ok(Trainer::new(
        model,
        varmap,
        Box::new(sgd(varmap)?),
        constant()?,
        cfg,
    ))
}

/// Every variable by name, as f64 values.
fn weights(varmap: &VarMap) -> Result<Vec<(String, Vec<f64>)>> {
    let data = varmap.data().lock().expect("lock");
    let mut out: Vec<(String, Vec<f64>)> = data
        .iter()
        .map(|(k, v)| {
            Ok((
                k.clone(),
                v.as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?,
            ))
        })
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Each tensor within `tol` relative (||a - b|| / ||b||).
fn assert_close(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)], tol: f64) -> Result<()> {
    ensure!(a.len() == b.len(), "{} vs {} variables", a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        ensure!(ka == kb, "{ka} vs {kb}");
        let d: f64 = va.iter().zip(vb).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        let m: f64 = vb.iter().map(|y| y * y).sum::<f64>();
        ensure!(
            d.sqrt() <= tol * m.sqrt().max(1e-12),
            "{ka}: relative difference {:e}",
            d.sqrt() / m.sqrt()
        );
    }
    Ok(())
}

fn mlp(varmap: &VarMap) -> Result<impl ModuleT> {
    let rng = RngHandle::seed_from_u64(0);
    Ok(mlp_block(
        10,
        10,
        MlpBlockConfig {
            hidden: Some(16),
            ..Default::default()
        },
        &rng,
        seeded_var_builder(varmap, &rng, DType::F32, &Device::Cpu),
    )?)
}

const STEPS: usize = 6;
const GLOBAL_BATCH: usize = 16;

/// The MLP trained for 2 epochs on `train`, tested on `test`, writing to `out`; returns
/// the weights, the history's (train loss, test loss, test accuracy) and the step losses.
#[allow(clippy::type_complexity)]
fn fit_mlp(
    comm: Rc<dyn Communicator>,
    train: Vec<Batch>,
    test: Vec<Batch>,
    out: &Path,
) -> Result<(Vec<(String, Vec<f64>)>, Vec<(f64, f64, f64)>, Vec<f64>)> {
    let varmap = VarMap::new();
    let model = mlp(&varmap)?;
    if comm.rank() == 1 {
        // A different start on rank 1: the broadcast gives it rank 0's.
        for v in varmap.all_vars() {
            v.set(&(v.as_tensor() * 3.)?)?;
        }
    }
    let cfg = TrainerConfig {
        epochs: 2,
        loss: LossKind::CrossEntropy {
            label_smoothing: 0.1,
        },
        out_dir: Some(out.to_path_buf()),
        ..Default::default()
    };
    let mut trainer = trainer(&model, &varmap, cfg)?.with_communicator(comm)?;
    let history = trainer
        .fit(&mut FixedBatches(train), Some(&mut FixedBatches(test)))?
        .iter()
        .map(|r| (r.train_loss, r.test_loss, r.test_acc))
        .collect();
    Ok((weights(&varmap)?, history, trainer.step_losses().to_vec()))
}

#[test]
fn two_ranks_take_the_steps_of_one_process_on_the_concatenated_batches() -> Result<()> {
    let train = batches(1, STEPS, GLOBAL_BATCH, &[10])?;
    let test = batches(2, 3, 8, &[10])?;
    let dir = resblock_testing::scratch_dir!("distributed-tests", "concatenated");
    let single = fit_mlp(
        Rc::new(resblock_train::SingleProcess),
        train.clone(),
        test.clone(),
        &dir.join("single"),
    )?;
    let ranks = on_ranks(2, |g| {
        let rank = g.rank();
        fit_mlp(
            Rc::new(g),
            part(&train, rank, 2)?,
            part(&test, rank, 2)?,
            &dir.join(format!("rank{rank}")),
        )
    })?;
    // Both ranks hold the same weights, bit for bit, and those of the single process.
    assert_eq!(ranks[0].0, ranks[1].0);
    assert_close(&ranks[0].0, &single.0, 1e-5)?;
    for (a, b) in ranks[0].2.iter().zip(&single.2) {
        ensure!((a - b).abs() <= 1e-5 * b.abs(), "step loss {a} vs {b}");
    }
    // Training and test metrics are the whole data's on every rank.
    for r in &ranks {
        for (a, b) in r.1.iter().zip(&single.1) {
            ensure!(
                (a.0 - b.0).abs() <= 1e-5 * b.0.abs(),
                "train loss {a:?} vs {b:?}"
            );
            ensure!(
                (a.1 - b.1).abs() <= 1e-5 * b.1.abs(),
                "test loss {a:?} vs {b:?}"
            );
            ensure!(a.2 == b.2, "test accuracy {a:?} vs {b:?}");
        }
    }
    // Rank 0 alone writes.
    for f in ["checkpoint.safetensors", "metrics.jsonl"] {
        ensure!(dir.join("rank0").join(f).exists(), "rank 0 wrote no {f}");
    }
    ensure!(
        !dir.join("rank1").exists(),
        "rank 1 wrote into its output directory"
    );

    // The checkpoint records 2 ranks; one process refuses to resume it.
    let varmap = VarMap::new();
    let model = mlp(&varmap)?;
    let mut alone = trainer(&model, &varmap, TrainerConfig::default())?;
    let err = alone
        .resume(&dir.join("rank0/checkpoint.safetensors"))
        .expect_err("a 2-rank checkpoint resumed by 1 process");
    ensure!(
        err.to_string().contains("2 process(es)") && err.to_string().contains("mpirun -np 2"),
        "{err}"
    );
    Ok(())
}

/// A small CIFAR-style ResNet with batch norm (8 channels, one block per stage).
fn small_resnet(varmap: &VarMap) -> Result<resblock_vision::ResNet> {
    let mut cfg = ResNetConfig::preset("resnet8")?;
    cfg.in_channels = 1;
    cfg.num_classes = 10;
    cfg.planes = vec![4, 8, 8];
    cfg.stem_width = 4;
    let rng = RngHandle::seed_from_u64(3);
    Ok(resnet(
        &cfg,
        &rng,
        seeded_var_builder(varmap, &rng, DType::F32, &Device::Cpu),
    )?)
}

fn is_stat(name: &str) -> bool {
    name.contains("running_") || name.ends_with("num_batches_tracked")
}

fn snapshot_stats(varmap: &VarMap) -> Result<Vec<(candle_core::Var, Tensor)>> {
    let data = varmap.data().lock().expect("lock");
    data.iter()
        .filter(|(k, _)| is_stat(k))
        .map(|(_, v)| Ok((v.clone(), v.as_tensor().copy()?)))
        .collect()
}

#[test]
fn batch_norm_follows_ddp_per_rank_semantics() -> Result<()> {
    let train = batches(4, 4, 8, &[1, 8, 8])?;
    // By hand: one model; each step runs rank 0's half (its statistics kept) and rank 1's
    // half (its statistics thrown away), and steps on the mean of the two gradients.
    let varmap = VarMap::new();
    let model = small_resnet(&varmap)?;
    let mut opt = sgd(&varmap)?;
    for b in &train {
        let halves = part(std::slice::from_ref(b), 0, 2)?
            .into_iter()
            .chain(part(std::slice::from_ref(b), 1, 2)?)
            .collect::<Vec<_>>();
        let g0 = cross_entropy(
            &model.forward_t(&halves[0].inputs, true)?,
            &halves[0].targets,
            0.,
        )?
        .backward()?;
        let kept = snapshot_stats(&varmap)?;
        let g1 = cross_entropy(
            &model.forward_t(&halves[1].inputs, true)?,
            &halves[1].targets,
            0.,
        )?
        .backward()?;
        for (v, t) in kept {
            v.set(&t)?;
        }
        let mut mean: GradStore = g0;
        for p in opt.params() {
            let a = mean.get(p.as_tensor()).context("rank 0 gradient")?;
            let b = g1.get(p.as_tensor()).context("rank 1 gradient")?;
            let avg = ((a + b)? * 0.5)?;
            mean.insert(p.as_tensor(), avg);
        }
        opt.step(&mean)?;
    }
    let by_hand = weights(&varmap)?;

    let ranks = on_ranks(2, |g| {
        let rank = g.rank();
        let varmap = VarMap::new();
        let model = small_resnet(&varmap)?;
        let cfg = TrainerConfig {
            loss: LossKind::CrossEntropy {
                label_smoothing: 0.,
            },
            ..Default::default()
        };
        let mut trainer = trainer(&model, &varmap, cfg)?.with_communicator(Rc::new(g))?;
        trainer.fit(&mut FixedBatches(part(&train, rank, 2)?), None)?;
        weights(&varmap)
    })?;
    // After the epoch every rank holds rank 0's statistics.
    assert_eq!(ranks[0], ranks[1]);
    assert_close(&ranks[0], &by_hand, 1e-4)?;

    // The semantics matter: one process on the whole batches moves the statistics elsewhere.
    let varmap = VarMap::new();
    let model = small_resnet(&varmap)?;
    let mut trainer = trainer(&model, &varmap, TrainerConfig::default())?;
    trainer.fit(&mut FixedBatches(train.clone()), None)?;
    let whole = weights(&varmap)?;
    let stats = |w: &[(String, Vec<f64>)]| -> Vec<(String, Vec<f64>)> {
        w.iter()
            .filter(|(k, _)| k.contains("running_mean"))
            .cloned()
            .collect()
    };
    ensure!(
        assert_close(&stats(&whole), &stats(&by_hand), 1e-2).is_err(),
        "whole-batch statistics equal rank 0's: the test does not tell the semantics apart"
    );
    Ok(())
}

#[test]
fn a_non_finite_loss_on_one_rank_stops_every_rank() -> Result<()> {
    let train = batches(6, 3, 8, &[10])?;
    let results = on_ranks(2, |g| {
        let rank = g.rank();
        let mut mine = part(&train, rank, 2)?;
        if rank == 1 {
            mine[1].inputs = (&mine[1].inputs * f64::NAN)?;
        }
        let varmap = VarMap::new();
        let model = mlp(&varmap)?;
        let mut trainer =
            trainer(&model, &varmap, TrainerConfig::default())?.with_communicator(Rc::new(g))?;
        let err = match trainer.train_epoch(&mut FixedBatches(mine)) {
            Ok(_) => anyhow::bail!("rank {rank} trained through a NaN loss"),
            Err(e) => e,
        };
        Ok((err, trainer.step()))
    })?;
    for (err, steps) in results {
        ensure!(
            matches!(err, Error::NonFinite { .. }) && steps == 1,
            "{err} after {steps} steps"
        );
    }
    Ok(())
}
