//! Train a residual network on image data: the project's main job.
//!
//! With no arguments it trains a CIFAR-style ResNet-20 on the bundled MNIST-10k digits
//! (`data/mnist-10k`, verified against its checksums) and prints the test accuracy:
//!
//! ```text
//! cargo run --release -p resblock-examples --bin train
//! cargo run --release -p resblock-examples --bin train -- --epochs 30 --label-smoothing 0.1   # >= 99 % on MNIST-10k (99.25 % measured)
//! cargo run --release -p resblock-examples --bin train -- --data cifar10:DIR --arch resnet56 --epochs 180
//! cargo run --release -p resblock-examples --bin train -- --data folder:DIR --image-size 64 --arch resnet18
//! ```
//!
//! Outputs go to `--out` (default `runs/<arch>`): `checkpoint.safetensors` after every epoch
//! (resume with `--resume DIR`), `metrics.jsonl`, `loss.png`, `accuracy.png` and the final
//! model file `model.safetensors`: torchvision's tensor names plus the `resblock` metadata
//! (architecture, classes, preprocessing, flags, test accuracy) that `predict`, `evaluate`
//! and `export` read.
//!
//! Fine-tuning: `--init-weights W` or `--pretrained NAME` (torchvision's ImageNet weights,
//! downloaded and cached); a classifier for another class count is replaced by a fresh one,
//! grayscale data meets a 3-channel stem by replicating the channel, and
//! `--freeze-backbone` / `--freeze-until STAGE` train only what comes after.

use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_nn::VarMap;
use clap::{CommandFactory, Parser};
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_examples::fit::{fit, Plan};
use resblock_examples::{say, RecipeArgs};
use resblock_train::freeze::Freeze;
use resblock_train::Communicator;
use resblock_vision::model_file::{read_model_meta, save_model, save_model_varmap};
use resblock_vision::pretrained::{cache_dir, fetch_pretrained, Pretrained};
use resblock_vision::weights::{load_state_dict_into_varmap, read_state_dict};
use resblock_vision::{resnet, ModelMeta, ResNetConfig};
use serde::Serialize;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Train a ResNet (any resblock-vision preset) on MNIST, CIFAR or an image folder.
/// The parsed flags are recorded in the model file's metadata (`train_flags`).
#[derive(Debug, Parser, Serialize)]
#[command(version, about, args_override_self = true)]
struct Args {
    /// Flags from a TOML file (`lr = 0.1`, `rrc = true`, `label_smoothing = 0.1`, ...; see
    /// configs/*.toml); flags on the command line override it. The run directory gets the
    /// effective flags as `config.toml`.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print the effective flags (defaults, --config and the command line together) as a
    /// config file, and exit without training.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
    /// Architecture: any resblock-vision preset (resnet20, resnet56, plain20, resnet18,
    /// wrn28_10, ...); default resnet20, or the architecture of --pretrained.
    #[arg(long)]
    arch: Option<String>,
    /// Training epochs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: u64,
    #[command(flatten)]
    #[serde(flatten)]
    recipe: RecipeArgs,
    /// Start from these weights (.pth or .safetensors, torchvision naming, strict except
    /// for a classifier with another class count, which is replaced by a fresh one).
    #[arg(long, conflicts_with = "pretrained")]
    init_weights: Option<PathBuf>,
    /// Start from torchvision's ImageNet weights for an architecture (`resnet50`,
    /// `resnet50.IMAGENET1K_V2`, ...; sets --arch): downloaded once (SHA-256 checked) into
    /// the cache ($RESBLOCK_CACHE_DIR/weights, default ~/.cache/resblock/weights);
    /// RESBLOCK_WEIGHTS_MIRROR=URL replaces the official base URL.
    #[arg(long)]
    pretrained: Option<String>,
    /// Train only the classifier (`fc`); everything before it keeps its weights.
    #[arg(long, conflicts_with = "freeze_until")]
    freeze_backbone: bool,
    /// Keep the stem and the stages up to STAGE fixed (`stem`, `layer1`, `layer2`, ... or
    /// the number N of `layerN`; 0 is the stem) and train the rest.
    #[arg(long)]
    freeze_until: Option<String>,
    /// Output directory (default `runs/<arch>`). A directory that already holds a run is
    /// refused unless --overwrite (or --resume) is given.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write into an output directory that already holds a run, replacing its files.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Resume the run in DIR from its checkpoint (writes there unless --out is given). The
    /// flags must be the interrupted run's (checked): only --threads, --workers, --out,
    /// --stop-after and --max-steps may change, and --epochs may grow.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop after this many epochs are complete, as if interrupted (the schedule still spans
    /// --epochs); continue later with --resume.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stop_after: Option<u64>,
    /// Stop after this many optimizer steps in all (short runs: smoke tests, profiling,
    /// memory checks); the epoch in progress is evaluated and saved as usual.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_steps: Option<u64>,
    /// Data-parallel training on MPI, one process per rank: `mpirun -np W train
    /// --distributed ...` (PyTorch DDP's semantics: --batch-size is per rank, each rank
    /// takes every W-th sample of the epoch, gradients are averaged, rank 0 writes). Needs
    /// a build with `--features mpi`; see docs/distributed.md.
    #[arg(long)]
    distributed: bool,
}

fn main() -> Result<()> {
    let argv =
        resblock_examples::config_file::expand(std::env::args_os().collect(), &Args::command())?;
    let mut args = Args::parse_from(argv);
    // train's default recipe smooths labels (99 % on the bundled digits in 10 epochs); the
    // resolved value is what the run records.
    args.recipe.label_smoothing.get_or_insert(0.1);
    if args.print_config {
        print!(
            "{}",
            resblock_examples::config_file::effective_config(&serde_json::to_value(&args)?)?
        );
        return Ok(());
    }
    // Each rank's threads are this machine's cores shared among its ranks, set while the
    // process still has one thread (MPI starts its own).
    let mut runtime = args.recipe.clone();
    if args.distributed && runtime.threads.is_none() {
        runtime.threads = resblock_examples::distributed::default_rank_threads();
    }
    let device = runtime.start()?;
    let comm = resblock_examples::distributed::connect(args.distributed)?;
    resblock_examples::distributed::or_abort(comm.as_ref(), || run(&args, &device, &comm))
}

/// The run itself, on every rank alike (rank 0 alone prints and writes).
fn run(args: &Args, device: &candle_core::Device, comm: &Rc<dyn Communicator>) -> Result<()> {
    let leader = comm.rank() == 0;

    // Fine-tuning starts from a weight file: given, or torchvision's, downloaded once.
    let (arch, init) = match &args.pretrained {
        Some(name) => {
            let p = Pretrained::by_name(name)?;
            if let Some(a) = args.arch.as_deref().filter(|a| *a != p.arch) {
                bail!(
                    "--pretrained {name} is a {} but --arch {a} was given",
                    p.arch
                );
            }
            let mirror = std::env::var("RESBLOCK_WEIGHTS_MIRROR").ok();
            let file = fetch_pretrained(&p, &cache_dir(), mirror.as_deref())
                .with_context(|| format!("--pretrained {name}"))?;
            say!("pretrained {name}: {}", file.display());
            (p.arch.to_string(), Some(file))
        }
        None => (
            args.arch.clone().unwrap_or_else(|| "resnet20".into()),
            args.init_weights.clone(),
        ),
    };
    let init = match init {
        Some(path) => Some((read_state_dict(&path)?, path)),
        None => None,
    };
    // A model file from a run (or --pretrained) knows its network: without --arch, start
    // from its architecture and builder options.
    let init_meta = match &init {
        Some((_, path)) => read_model_meta(path)?,
        None => None,
    };
    let (arch, base_cfg) = match &init_meta {
        Some(m) if args.arch.is_none() || args.arch.as_deref() == Some(m.arch.as_str()) => {
            (m.arch.clone(), m.config.clone())
        }
        _ => {
            let cfg = ResNetConfig::preset(&arch)?;
            (arch, cfg)
        }
    };

    let out = args
        .out
        .clone()
        .or_else(|| args.resume.clone())
        .unwrap_or_else(|| PathBuf::from("runs").join(&arch));
    if args.resume.is_none() && !args.overwrite {
        if let Some(f) = [
            "checkpoint.safetensors",
            "model.safetensors",
            "metrics.jsonl",
        ]
        .iter()
        .map(|f| out.join(f))
        .find(|f| f.exists())
        {
            bail!(
                "{} already holds a run ({} exists): continue it with --resume {}, or replace it with --overwrite (or choose another --out)",
                out.display(),
                f.display(),
                out.display()
            );
        }
    }
    // Grayscale data meets a 3-channel stem (pretrained weights) by replicating its channel.
    let init_channels = init.as_ref().and_then(|(sd, _)| {
        ["conv1.weight", "conv1.0.weight"]
            .iter()
            .find_map(|k| sd.get(*k))
            .and_then(|t| t.dims().get(1).copied())
    });
    let data = args.recipe.open_data(init_channels)?;

    // No rank trains before every rank has checked the output directory.
    comm.barrier()?;
    let mut cfg = base_cfg;
    cfg.in_channels = data.shape.0;
    cfg.num_classes = data.num_classes();
    let rng = RngHandle::seed_from_u64(args.recipe.seed);
    let varmap = VarMap::new();
    let model = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, device),
    )?;
    if let Some((sd, path)) = &init {
        let file_classes = sd.get("fc.weight").and_then(|t| t.dims().first().copied());
        let new_head = file_classes.is_some_and(|n| n != cfg.num_classes);
        if let (true, Some(n)) = (new_head, file_classes) {
            say!(
                "replacing the head: {} has {n} classes, the data {} (fc freshly initialised)",
                path.display(),
                cfg.num_classes
            );
        }
        load_state_dict_into_varmap(&varmap, sd, path, |k| new_head && k.starts_with("fc."))
            .with_context(|| format!("{} as initial weights for --arch {arch}", path.display()))?;
        say!("initial weights from {}", path.display());
    }
    let freeze = match (&args.freeze_until, args.freeze_backbone) {
        (Some(stage), _) => Freeze::until(stage, cfg.layers.len())?,
        (None, true) => Freeze::Backbone,
        (None, false) => Freeze::Nothing,
    };

    let plan = Plan {
        epochs: args.epochs,
        out: Some(out.clone()),
        resume: args.resume.clone(),
        stop_after: args.stop_after,
        max_steps: args.max_steps,
        freeze,
        label: arch.clone(),
        flags: Some(serde_json::to_value(args)?),
        comm: Some(comm.clone()),
    };
    // A fresh run records its flags as a config file; a resumed one keeps its original.
    if args.resume.is_none() && leader {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        resblock_io::write_atomic(
            &out.join("config.toml"),
            resblock_examples::config_file::effective_config(&serde_json::to_value(args)?)?
                .as_bytes(),
        )
        .with_context(|| format!("writing {}", out.join("config.toml").display()))?;
    }
    let run = fit(
        &model,
        &varmap,
        &rng,
        &args.recipe,
        &data,
        device,
        &plan,
        |_| {},
    )?;
    let last = run.last()?;
    let mut meta = ModelMeta::new(&arch, &cfg, data.train.class_names(), &data.preprocess);
    meta.dataset = Some(args.recipe.data.clone());
    meta.train_flags = Some(serde_json::to_value(args)?);
    meta.test_accuracy = Some(100. * last.test_acc);
    let mut reported = (last.test_acc, last.test_loss);
    if let Some(avg) = &run.ema {
        // The better of the average and the trained weights (ties keep the trained ones).
        let use_ema = last.ema_test_acc > last.test_acc;
        if use_ema {
            let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in data.iter() {
                if let Some(t) = avg.get(k) {
                    v.set(t)?;
                }
            }
            meta.test_accuracy = Some(100. * last.ema_test_acc);
            reported = (last.ema_test_acc, last.ema_test_loss);
        }
        say!(
            "moving average: {:.2}%, trained weights: {:.2}%; model.safetensors holds the {}",
            100. * last.ema_test_acc,
            100. * last.test_acc,
            if use_ema {
                "average"
            } else {
                "trained weights"
            }
        );
        meta.weights = Some(if use_ema { "ema" } else { "raw" }.into());
    }
    if leader {
        save_model_varmap(&varmap, &meta, &out.join("model.safetensors"))?;
    }
    if let (true, true, Some((epoch, val_acc))) = (leader, args.recipe.keep_best, run.best) {
        // The trainer wrote the best epoch's tensors; make them a model file like the last.
        let best = out.join("best.safetensors");
        let tensors: std::collections::HashMap<String, candle_core::Tensor> =
            candle_core::safetensors::load(&best, &candle_core::Device::Cpu)
                .with_context(|| format!("reading {}", best.display()))?;
        let mut best_meta = meta.clone();
        best_meta.test_accuracy = None;
        best_meta.weights = Some("best".into());
        save_model(&tensors, &best_meta, &best)?;
        say!(
            "best epoch {epoch}: validation accuracy {:.2}%; its weights in {} (`evaluate --model` it for the test accuracy)",
            100. * val_acc,
            best.display()
        );
    }
    if let Some(e) = run.stopped_early {
        say!("stopped early after epoch {e} (--early-stop)");
    } else if args.max_steps.is_some_and(|m| run.steps >= m) {
        say!("stopped after {} steps (--max-steps)", run.steps);
    } else if last.epoch < args.epochs as usize {
        say!(
            "stopped after epoch {} of {}: continue with --resume {}",
            last.epoch,
            args.epochs,
            out.display()
        );
    }
    say!(
        "test accuracy: {:.2}% (test loss {:.4}) after {} epochs; {:.1} s of training in this run; weights in {}",
        100. * reported.0,
        reported.1,
        last.epoch,
        run.seconds,
        out.join("model.safetensors").display()
    );
    Ok(())
}
