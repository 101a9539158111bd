//! Checkpoints: resuming is bit-identical, seeded runs repeat, bad checkpoints are clear
//! errors, a diverging run keeps the last good checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_train::ema::Ema;
use resblock_train::optim::{param_groups, Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
use resblock_train::schedule::{LrSchedule, Schedule};
use resblock_train::{Batch, Error, FixedBatches, LossKind, Trainer, TrainerConfig};
use resblock_vision::{resnet, ResNet, ResNetConfig};

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("resume-tests", name)
}

fn data() -> Result<FixedBatches> {
    let rng = RngHandle::seed_from_u64(99);
    Ok(FixedBatches(
        (0..3)
            .map(|_| -> Result<Batch> {
                let inputs = rng.normal_tensor((8, 3, 12, 12), 0., 1., DType::F32, &Device::Cpu)?;
                let t: Vec<u32> = (0..8).map(|_| rng.below(10) as u32).collect();
                Ok(Batch {
                    inputs,
                    targets: Tensor::new(t.as_slice(), &Device::Cpu)?,
                })
            })
            .collect::<Result<Vec<_>>>()?,
    ))
}

/// A CIFAR resnet8 with drop-path (so the RNG state matters) and its VarMap and RNG.
fn model(seed: u64) -> Result<(ResNet, VarMap, RngHandle)> {
    let mut cfg = ResNetConfig::cifar(8)?;
    cfg.drop_path_rate = 0.2;
    let rng = RngHandle::seed_from_u64(seed);
    let varmap = VarMap::new();
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    Ok((net, varmap, rng))
}

fn sgd(varmap: &VarMap) -> Result<Box<dyn Optimizer>> {
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        dampening: 0.,
        nesterov: true,
    };
    Ok(Box::new(Sgd::new(param_groups(varmap, 5e-4, true), cfg)?))
}

fn schedule() -> Result<LrSchedule> {
    Ok(LrSchedule::new(
        0.05,
        Schedule::Cosine {
            total_steps: 6,
            min_lr: 0.,
        },
        None,
    )?)
}

fn weights(varmap: &VarMap) -> Result<Vec<(String, Vec<f64>)>> {
    let data = varmap.data().lock().expect("lock");
    let mut v: Vec<(String, Vec<f64>)> = data
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.as_tensor()
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?,
            ))
        })
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

fn run(
    epochs: usize,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    seed: u64,
) -> Result<Vec<(String, Vec<f64>)>> {
    Ok(run_ema(epochs, out, resume, seed, None)?.0)
}

type Weights = Vec<(String, Vec<f64>)>;

/// [`run`] with a moving average of decay `ema` (warmup on, or off for decay 0): the
/// weights, the average's values and the history.
fn run_ema(
    epochs: usize,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    seed: u64,
    ema: Option<f64>,
) -> Result<(Weights, Weights, Vec<resblock_train::EpochRecord>)> {
    let (net, varmap, rng) = model(seed)?;
    let cfg = TrainerConfig {
        epochs,
        loss: LossKind::CrossEntropy {
            label_smoothing: 0.1,
        },
        out_dir: out,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&net, &varmap, sgd(&varmap)?, schedule()?, cfg).with_rng(rng);
    if let Some(d) = ema {
        trainer = trainer.with_ema(Ema::new(&varmap, d, d > 0.)?);
    }
    if let Some(ck) = resume {
        trainer.resume(&ck)?;
    }
    let history = trainer.fit(&mut data()?, Some(&mut data()?))?.to_vec();
    let averaged = match trainer.ema() {
        Some(e) => {
            let mut v: Weights = e
                .tensors()
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)))
                .collect::<Result<_>>()?;
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        }
        None => Vec::new(),
    };
    Ok((weights(&varmap)?, averaged, history))
}

#[test]
fn the_moving_average_is_evaluated_saved_and_resumed_bit_identically() -> Result<()> {
    let (w, avg, history) = run_ema(2, None, None, 1, Some(0.9))?;
    assert_ne!(w, avg, "the average must differ from the weights");
    assert!(history
        .iter()
        .all(|r| r.ema_test_acc.is_finite() && r.ema_test_loss.is_finite()));
    let dir = scratch("ema-half");
    run_ema(1, Some(dir.clone()), None, 1, Some(0.9))?;
    let (w2, avg2, _) = run_ema(
        2,
        Some(dir.clone()),
        Some(dir.join("checkpoint.safetensors")),
        7,
        Some(0.9),
    )?;
    assert_eq!((w, avg), (w2, avg2));
    // A checkpoint without an average cannot resume a run that keeps one.
    let plain = scratch("ema-plain");
    run(1, Some(plain.clone()), None, 1)?;
    let err = run_ema(
        2,
        None,
        Some(plain.join("checkpoint.safetensors")),
        1,
        Some(0.9),
    )
    .expect_err("no average in the checkpoint");
    assert!(err.to_string().contains("no moving average"), "{err}");
    // Decay 0 without warmup: the average is the weights, so it scores the same.
    let (w, avg, history) = run_ema(2, None, None, 1, Some(0.))?;
    assert_eq!(w, avg);
    assert!(history
        .iter()
        .all(|r| r.ema_test_acc == r.test_acc && r.ema_test_loss == r.test_loss));
    Ok(())
}

#[test]
fn resuming_after_an_epoch_gives_bit_identical_weights() -> Result<()> {
    let straight = run(2, None, None, 1)?;
    let dir = scratch("half");
    run(1, Some(dir.clone()), None, 1)?;
    // A different seed for the fresh model: everything must come from the checkpoint.
    let resumed = run(
        2,
        Some(dir.clone()),
        Some(dir.join("checkpoint.safetensors")),
        7,
    )?;
    assert_eq!(straight, resumed);
    // metrics.jsonl has one line per epoch, rewritten consistently after the resume.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["epoch"], i + 1);
        for k in [
            "lr",
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "seconds",
        ] {
            assert!(l[k].is_number(), "{k} in {l}");
        }
    }
    for png in ["loss.png", "accuracy.png"] {
        let bytes = std::fs::read(dir.join(png))?;
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
    Ok(())
}

#[test]
fn the_same_seed_gives_the_same_run() -> Result<()> {
    assert_eq!(run(1, None, None, 3)?, run(1, None, None, 3)?);
    assert_ne!(run(1, None, None, 3)?, run(1, None, None, 4)?);
    Ok(())
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_clear_errors() -> Result<()> {
    let dir = scratch("bad");
    run(1, Some(dir.clone()), None, 1)?;
    let ck = dir.join("checkpoint.safetensors");
    let bytes = std::fs::read(&ck)?;

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(
        &garbage,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
    )?;
    let (net, varmap, rng) = model(1)?;
    let cfg = TrainerConfig {
        epochs: 2,
        ..Default::default()
    };
    let mut trainer =
        Trainer::new(&net, &varmap, sgd(&varmap)?, schedule()?, cfg.clone()).with_rng(rng);
    for bad in [&truncated, &garbage, &dir.join("absent.safetensors")] {
        let err = trainer.resume(bad).expect_err("bad checkpoint");
        let name = bad.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(err.to_string().contains(name), "{err}");
    }
    // A checkpoint of another architecture names the key.
    let (net20, vm20, _) = {
        let rng = RngHandle::seed_from_u64(0);
        let vm = VarMap::new();
        let n = resnet(
            &ResNetConfig::cifar(14)?,
            &rng,
            seeded_var_builder(&vm, &rng, DType::F32, &Device::Cpu),
        )?;
        (n, vm, rng)
    };
    let mut other = Trainer::new(&net20, &vm20, sgd(&vm20)?, schedule()?, cfg.clone());
    let err = other
        .resume(&ck)
        .expect_err("resnet8 checkpoint into resnet14");
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(
        err.to_string().contains("checkpoint.safetensors") && err.to_string().contains("layer"),
        "{err}"
    );
    // Another optimizer kind.
    let adam = Box::new(Adam::with_groups(
        param_groups(&varmap, 0., false),
        AdamConfig::default(),
    )?);
    let mut with_adam = Trainer::new(&net, &varmap, adam, schedule()?, cfg);
    let err = with_adam.resume(&ck).expect_err("sgd checkpoint into adam");
    assert!(err.to_string().contains("optimizer is sgd"), "{err}");
    // None of this touched the good checkpoint.
    assert_eq!(std::fs::read(&ck)?, bytes);
    Ok(())
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() -> Result<()> {
    let dir = scratch("nan");
    run(1, Some(dir.clone()), None, 1)?;
    let ck = dir.join("checkpoint.safetensors");
    let before = std::fs::read(&ck)?;
    let (net, varmap, rng) = model(1)?;
    let cfg = TrainerConfig {
        epochs: 3,
        out_dir: Some(dir.clone()),
        ..Default::default()
    };
    let huge = LrSchedule::new(1e30, Schedule::Constant, None)?;
    let opt = Box::new(Sgd::new(
        param_groups(&varmap, 0., false),
        SgdConfig {
            lr: 1e30,
            ..Default::default()
        },
    )?);
    let mut trainer = Trainer::new(&net, &varmap, opt, huge, cfg).with_rng(rng);
    trainer.resume(&ck)?;
    let err = trainer
        .fit(&mut data()?, None)
        .expect_err("lr 1e30 diverges");
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert_eq!(
        std::fs::read(&ck)?,
        before,
        "the last good checkpoint was overwritten"
    );
    Ok(())
}

#[test]
fn a_non_finite_batch_norm_statistic_stops_training_naming_it() -> Result<()> {
    let (net, varmap, rng) = model(3)?;
    {
        let data = varmap.data().lock().expect("varmap");
        let v = &data["layer2.0.bn1.running_var"];
        v.set(&(v.as_tensor() * f64::INFINITY)?)?;
    }
    let cfg = TrainerConfig {
        epochs: 1,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&net, &varmap, sgd(&varmap)?, schedule()?, cfg).with_rng(rng);
    let err = trainer.fit(&mut data()?, None).expect_err("stops");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                epoch: 1,
                step: 0,
                ..
            }
        ) && msg.contains("batch-norm statistic layer2.0.bn1.running_var")
            && msg.contains("epoch 1, step 0"),
        "{msg}"
    );
    Ok(())
}
