//! Claim 2, nested function classes: a trained network grown by blocks that start as the
//! identity computes exactly what it did, so the deeper network can only start where the
//! smaller one ended. Trains `--from` (resnet20), grows it into `--to` (resnet32; see
//! [`resblock_vision::grow`]), checks the logits on the whole test set, trains the grown
//! network on, and trains `--to` from scratch for the same total budget as a control.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor, D};
use resblock_core::RngHandle;
use resblock_train::plot::{write_heatmaps, write_line_charts, Line, LineChart, PALETTE};
use resblock_train::{BatchSource, EpochRecord};
use resblock_vision::grow::grow;
use resblock_vision::{ResNet, ResNetConfig};
use serde::{Deserialize, Serialize};

use super::{build, depth, first_batch, save, Findings, RatioLog};
use crate::fit::{fit, Plan};
use crate::recipe_args::{PreparedData, RecipeArgs};

/// Train a small ResNet, grow it by identity blocks into a deeper one (same function,
/// checked on the test set), train that on, and compare with the deep net from scratch.
#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(name = "grow", version, about)]
pub struct Args {
    /// The network trained first (a CIFAR-style preset with option A or B shortcuts).
    #[arg(long, default_value = "resnet20")]
    pub from: String,
    /// The deeper network it grows into (more blocks per stage, otherwise the same).
    #[arg(long, default_value = "resnet32")]
    pub to: String,
    /// Training epochs of the small network.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Training epochs of the grown network (default: --epochs, the small net's budget).
    /// The control trains --epochs + --grow-epochs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub grow_epochs: Option<u64>,
    /// Learning rate (the one-cycle maximum) of the grown network's training (default:
    /// --lr). The small net and the control use --lr.
    #[arg(long, value_parser = crate::positive_f64)]
    pub grow_lr: Option<f64>,
    /// Output directory: results.json, grow.png, grow_ratios.png and one run folder per
    /// training.
    #[arg(long, default_value = "runs/grow")]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub recipe: RecipeArgs,
}

/// The small network after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Before {
    /// Its preset.
    pub arch: String,
    /// Weighted layers.
    pub depth: usize,
    /// Test accuracy, %.
    pub test_acc: f64,
    /// Epochs trained.
    pub epochs: u64,
}

/// The grown network before any further training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grown {
    /// Its preset.
    pub arch: String,
    /// Weighted layers.
    pub depth: usize,
    /// Test accuracy, %, from its own logits.
    pub test_acc: f64,
    /// max |logit difference| / max |logit| over the whole test set.
    pub max_rel_logit_diff: f64,
    /// The blocks it added (they start as the identity).
    pub new_blocks: Vec<String>,
}

/// A network after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trained {
    /// Test accuracy, %.
    pub test_acc: f64,
    /// Epochs of this training.
    pub epochs: u64,
    /// Its learning rate (the schedule's maximum for one-cycle).
    pub lr: f64,
}

/// Per-epoch numbers of one training.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Test accuracy per epoch, %.
    pub test_acc: Vec<f64>,
    /// Mean training loss per epoch.
    pub train_loss: Vec<f64>,
}

impl History {
    fn of(h: &[EpochRecord]) -> Self {
        Self {
            test_acc: h.iter().map(|r| 100. * r.test_acc).collect(),
            train_loss: h.iter().map(|r| r.train_loss).collect(),
        }
    }
}

/// Per-epoch numbers of the three trainings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histories {
    /// The small network, epochs 1..=E.
    pub small: History,
    /// The grown network, epochs E+1..=E+G.
    pub grown: History,
    /// The deep network from scratch, epochs 1..=E+G.
    pub control: History,
}

/// What the program found, as written to `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// `--data`.
    pub data: String,
    /// `--seed`.
    pub seed: u64,
    /// The small network after its training.
    pub before: Before,
    /// The grown network, untrained.
    pub grown: Grown,
    /// The grown network after `--grow-epochs`.
    pub after: Trained,
    /// The deep network trained from scratch for the same total budget.
    pub control: Trained,
    /// Whether training the grown network improved on the small one's test accuracy.
    pub improved: bool,
    /// Per-epoch numbers.
    pub history: Histories,
    /// The grown network's per-block `||g(x)|| / ||x||` on the first test batch, at growth
    /// (epoch 0) and after each of its epochs.
    pub residual_ratios: RatioLog,
}

impl Results {
    /// The figure's panels (test accuracy, training loss) over the whole budget: the small
    /// net, the grown net continuing from it (starting at its measured accuracy), the
    /// control. Drawn from these numbers only.
    pub fn charts(&self) -> Vec<LineChart> {
        let e = self.before.epochs as f64;
        let h = &self.history;
        let series = |f: &dyn Fn(&History) -> &Vec<f64>, start: Option<f64>| {
            let grown_start = start.map(|v| (e, v));
            vec![
                Line {
                    label: format!("{} (small)", self.before.arch),
                    color: PALETTE[0],
                    dashed: false,
                    points: f(&h.small)
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| ((i + 1) as f64, v))
                        .collect(),
                },
                Line {
                    label: format!("{} grown from it", self.grown.arch),
                    color: PALETTE[1],
                    dashed: false,
                    points: grown_start
                        .into_iter()
                        .chain(
                            f(&h.grown)
                                .iter()
                                .enumerate()
                                .map(|(i, &v)| (e + (i + 1) as f64, v)),
                        )
                        .collect(),
                },
                Line {
                    label: format!("{} from scratch", self.grown.arch),
                    color: PALETTE[2],
                    dashed: true,
                    points: f(&h.control)
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| ((i + 1) as f64, v))
                        .collect(),
                },
            ]
        };
        vec![
            LineChart {
                title: "test accuracy".into(),
                x_desc: "epoch".into(),
                y_desc: "accuracy (%)".into(),
                log_y: false,
                lines: series(&|x| &x.test_acc, Some(self.grown.test_acc)),
            },
            LineChart {
                title: "training loss".into(),
                x_desc: "epoch".into(),
                y_desc: "loss".into(),
                log_y: true,
                lines: series(&|x| &x.train_loss, None),
            },
        ]
    }
}

impl Findings for Results {
    /// `grow.png` and `grow_ratios.png`.
    fn draw(&self, dir: &Path) -> Result<()> {
        write_line_charts(&dir.join("grow.png"), &self.charts())?;
        let title = format!("{} grown: ||g(x)|| / ||x|| (* new)", self.grown.arch);
        let map = self.residual_ratios.heatmap(&title, &self.grown.new_blocks);
        write_heatmaps(&dir.join("grow_ratios.png"), &[map], "||g(x)||/||x||")?;
        Ok(())
    }
}

/// The model's logits on the whole test split, in order, and the labels.
fn test_logits(
    model: &ResNet,
    recipe: &RecipeArgs,
    data: &PreparedData,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (_, mut test) = recipe.loaders(data, device, resblock_train::data::Shard::whole())?;
    let mut logits = Vec::new();
    let mut labels = Vec::new();
    for b in test.epoch(0)? {
        let b = b?;
        logits.push(model.forward_t(&b.inputs, false)?.detach());
        labels.push(b.targets);
    }
    ensure!(!logits.is_empty(), "the test split is empty");
    Ok((Tensor::cat(&logits, 0)?, Tensor::cat(&labels, 0)?))
}

fn accuracy_pct(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let pred = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    let hits = pred
        .eq(&labels.to_dtype(DType::U32)?)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(100. * hits / labels.dim(0)? as f64)
}

/// max |a - b| / max |a|, in f64.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(if scale > 0. { diff / scale } else { diff })
}

fn preset_for(name: &str, data: &PreparedData) -> Result<ResNetConfig> {
    let mut cfg = ResNetConfig::preset(name).with_context(|| format!("architecture {name:?}"))?;
    cfg.in_channels = data.shape.0;
    cfg.num_classes = data.num_classes();
    Ok(cfg)
}

/// Runs the program.
///
/// # Errors
/// Bad flags or data, networks that cannot grow into each other, a diverging run, an
/// unwritable output.
pub fn run(args: &Args) -> Result<Results> {
    let device = args.recipe.start()?;
    let grow_epochs = args.grow_epochs.unwrap_or(args.epochs);
    // Refuse a growth that cannot work before training anything.
    let to_cfg = ResNetConfig::preset(&args.to).with_context(|| format!("--to {}", args.to))?;
    let from_cfg =
        ResNetConfig::preset(&args.from).with_context(|| format!("--from {}", args.from))?;
    resblock_vision::grow::check(&from_cfg, &to_cfg)
        .with_context(|| format!("--from {} --to {}", args.from, args.to))?;
    let data = args.recipe.open_data(None)?;
    let seed = args.recipe.seed;
    let probe_n = (args.recipe.batch_size as usize).min(256);
    let probe = first_batch(data.test.clone(), &data.test_transforms, probe_n, &device)?;

    // 1. The small network.
    let small = build(&args.from, &data, seed, &device)?;
    let plan = |epochs, dir: String, label: String| Plan {
        epochs,
        out: Some(args.out.join(dir)),
        label,
        ..Plan::default()
    };
    let small_fit = fit(
        &small.model,
        &small.varmap,
        &small.rng,
        &args.recipe,
        &data,
        &device,
        &plan(args.epochs, args.from.clone(), args.from.clone()),
        |_| {},
    )?;
    let (small_logits, labels) = test_logits(&small.model, &args.recipe, &data, &device)?;
    let before_acc = accuracy_pct(&small_logits, &labels)?;

    // 2. Grown by identity blocks: the same function.
    let rng = RngHandle::seed_from_u64(seed.wrapping_add(1));
    let g = grow(
        &small.cfg,
        &small.varmap,
        &preset_for(&args.to, &data)?,
        &rng,
        &device,
    )?;
    let (grown_logits, _) = test_logits(&g.model, &args.recipe, &data, &device)?;
    let grown_acc = accuracy_pct(&grown_logits, &labels)?;
    let diff = max_rel_diff(&small_logits, &grown_logits)?;
    println!(
        "grew {} ({:.2}%) into {} by {} identity blocks: test accuracy {:.2}%, max relative logit difference {diff:.3e}",
        args.from,
        before_acc,
        args.to,
        g.new_blocks.len(),
        grown_acc
    );

    // 3. The grown network trained on.
    let mut log = RatioLog::default();
    log.record(&g.model, &probe.inputs)?;
    let mut failed = None;
    let grow_recipe = RecipeArgs {
        lr: args.grow_lr.unwrap_or(args.recipe.lr),
        ..args.recipe.clone()
    };
    let grown_fit = fit(
        &g.model,
        &g.varmap,
        &rng,
        &grow_recipe,
        &data,
        &device,
        &plan(
            grow_epochs,
            format!("{}-grown", args.to),
            format!("{} grown", args.to),
        ),
        |_| {
            if failed.is_none() {
                failed = log.record(&g.model, &probe.inputs).err();
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    let after_acc = 100. * grown_fit.last()?.test_acc;

    // 4. The control: the deep network from scratch, the same total budget.
    let control = build(&args.to, &data, seed, &device)?;
    let control_fit = fit(
        &control.model,
        &control.varmap,
        &control.rng,
        &args.recipe,
        &data,
        &device,
        &plan(
            args.epochs + grow_epochs,
            format!("{}-scratch", args.to),
            format!("{} scratch", args.to),
        ),
        |_| {},
    )?;

    let results = Results {
        data: args.recipe.data.clone(),
        seed,
        before: Before {
            arch: args.from.clone(),
            depth: depth(&small.cfg),
            test_acc: before_acc,
            epochs: args.epochs,
        },
        grown: Grown {
            arch: args.to.clone(),
            depth: depth(g.model.config()),
            test_acc: grown_acc,
            max_rel_logit_diff: diff,
            new_blocks: g.new_blocks.clone(),
        },
        after: Trained {
            test_acc: after_acc,
            epochs: grow_epochs,
            lr: grow_recipe.lr,
        },
        control: Trained {
            test_acc: 100. * control_fit.last()?.test_acc,
            epochs: args.epochs + grow_epochs,
            lr: args.recipe.lr,
        },
        improved: after_acc > before_acc,
        history: Histories {
            small: History::of(&small_fit.history),
            grown: History::of(&grown_fit.history),
            control: History::of(&control_fit.history),
        },
        residual_ratios: log,
    };
    save(&args.out, &results)?;
    print_summary(&results, args);
    Ok(results)
}

fn print_summary(r: &Results, args: &Args) {
    println!("\ngrow on {} (seed {}):", r.data, r.seed);
    println!(
        "  {} after {} epochs:            {:.2}%",
        r.before.arch, r.before.epochs, r.before.test_acc
    );
    println!(
        "  grown into {} (untrained):     {:.2}%  (max relative logit difference {:.3e})",
        r.grown.arch, r.grown.test_acc, r.grown.max_rel_logit_diff
    );
    println!(
        "  grown {} after {} more epochs (lr {}): {:.2}%  ({})",
        r.grown.arch,
        r.after.epochs,
        r.after.lr,
        r.after.test_acc,
        if r.improved {
            "improved on the small net"
        } else {
            "did not improve on the small net"
        }
    );
    println!(
        "  {} from scratch, {} epochs:   {:.2}%",
        r.grown.arch, r.control.epochs, r.control.test_acc
    );
    println!(
        "results: {}, figures: grow.png, grow_ratios.png",
        args.out.join("results.json").display()
    );
}
