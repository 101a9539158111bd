//! `mpirun -np 2 train --distributed` (built with `--features mpi`; Open MPI's `mpirun` on
//! the PATH) against PyTorch DistributedDataParallel with gloo on 2 processes
//! (tests/fixtures/make_ddp_fixture.py): every tensor rank 0 saves, BN statistics and
//! momentum buffers included, within 1e-4 relative (measured 2.3e-6; the issue asks 1e-3).
//! Also: rank 0 alone prints and writes, a resume with another rank count is refused, and a
//! 2-rank run stopped and resumed ends bit-identical to an uninterrupted one.

#![cfg(feature = "mpi")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddp")
}

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("distributed-cli", name)
}

/// `mpirun -np ranks train --distributed` with the fixture's recipe and `extra` flags.
fn mpirun(ranks: usize, extra: &[&str]) -> Result<Output> {
    let folder = fixtures().join("folder");
    let init = fixtures().join("init.safetensors");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .arg(env!("CARGO_BIN_EXE_train"))
        .arg("--distributed")
        .arg("--data")
        .arg(format!("folder:{}", folder.display()))
        .arg("--init-weights")
        .arg(&init)
        .args([
            "--arch",
            "resnet8",
            "--batch-size",
            "3",
            "--lr",
            "0.05",
            "--schedule",
            "constant",
            "--label-smoothing",
            "0",
            "--no-augment",
            "--no-shuffle",
            "--workers",
            "1",
        ])
        .args(extra)
        // Containers often forbid the cross-process memory copy Open MPI tries first.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    cmd.output()
        .context("running mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

fn ok(out: &Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "mpirun failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).with_context(|| path.display().to_string())
}

#[test]
fn two_ranks_match_pytorch_ddp_and_resume() -> Result<()> {
    let dir = scratch("ddp");
    let out = ok(&mpirun(
        2,
        &["--epochs", "1", "--out", dir.to_str().context("path")?],
    )?)?;
    // Rank 0 alone prints.
    ensure!(out.matches("epoch 1/1").count() == 1, "{out}");
    ensure!(
        out.contains("on 2 ranks (6 images per step), 3 steps per epoch"),
        "{out}"
    );

    let expected = load(&fixtures().join("expected.safetensors"))?;
    let model = load(&dir.join("model.safetensors"))?;
    let checkpoint = load(&dir.join("checkpoint.safetensors"))?;
    let mut worst = 0f64;
    for (k, theirs) in &expected {
        let ours = if k.ends_with(".momentum_buffer") {
            checkpoint.get(&format!("optim/{k}"))
        } else {
            model.get(k)
        }
        .with_context(|| format!("{k} was not saved"))?;
        ensure!(
            ours.dims() == theirs.dims(),
            "{k}: shape {:?} vs {:?}",
            ours.dims(),
            theirs.dims()
        );
        let rel = resblock_testing::relative_l2(ours, theirs)?;
        ensure!(
            rel <= 1e-4,
            "{k}: relative difference {rel:e} from PyTorch DDP"
        );
        worst = worst.max(rel);
    }
    let state = expected
        .keys()
        .filter(|k| !k.ends_with(".momentum_buffer"))
        .count();
    ensure!(
        model.len() == state,
        "model.safetensors has {} tensors, PyTorch's state_dict {state}",
        model.len()
    );
    println!("worst relative difference from PyTorch DDP: {worst:e}");

    // Another rank count cannot resume the run.
    let wrong = mpirun(
        1,
        &["--epochs", "2", "--resume", dir.to_str().context("path")?],
    )?;
    let err = String::from_utf8_lossy(&wrong.stderr);
    ensure!(
        !wrong.status.success() && err.contains("2 process(es)") && err.contains("mpirun -np 2"),
        "{err}"
    );

    // Stopped after epoch 1 and resumed: bit-identical to 2 epochs at once.
    let (a, b) = (scratch("stopped"), scratch("whole"));
    let a_s = a.to_str().context("path")?;
    ok(&mpirun(
        2,
        &["--epochs", "2", "--stop-after", "1", "--out", a_s],
    )?)?;
    ok(&mpirun(2, &["--epochs", "2", "--resume", a_s])?)?;
    ok(&mpirun(
        2,
        &["--epochs", "2", "--out", b.to_str().context("path")?],
    )?)?;
    let (ta, tb) = (
        load(&a.join("model.safetensors"))?,
        load(&b.join("model.safetensors"))?,
    );
    ensure!(ta.len() == tb.len());
    for (k, x) in &ta {
        let y = &tb[k];
        let same = x
            .to_dtype(DType::F64)?
            .ne(&y.to_dtype(DType::F64)?)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?
            == 0.;
        ensure!(
            same,
            "{k} differs between the resumed and the uninterrupted run"
        );
    }
    Ok(())
}
