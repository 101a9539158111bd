//! Claim 1, degradation: with one recipe, a deeper *plain* network trains worse than a
//! shallower one, while a residual network of the same depth does not (He et al. 2016,
//! Figure 6). Trains plain-20, resnet-20, plain-56 and resnet-56 (CIFAR-style, option-A
//! shortcuts; the plain nets are the same networks without shortcuts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use resblock_train::plot::{write_heatmaps, write_line_charts, Heatmap, Line, LineChart, PALETTE};
use serde::{Deserialize, Serialize};

use super::{build, depth, error_pct, first_batch, save, Findings, RatioLog};
use crate::fit::{fit, Plan};
use crate::recipe_args::RecipeArgs;

/// The networks, in training order.
pub const NETS: [&str; 4] = ["plain20", "resnet20", "plain56", "resnet56"];

/// Train plain-20/56 and resnet-20/56 with one recipe and compare their training and test
/// error per epoch (He et al. 2016, Figure 6).
#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(name = "degradation", version, about)]
pub struct Args {
    /// Training epochs of each network.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Output directory: results.json, degradation.png, residual_ratios.png and one run
    /// folder per network.
    #[arg(long, default_value = "runs/degradation")]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub recipe: RecipeArgs,
}

/// One network's curves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curves {
    /// Weighted layers.
    pub depth: usize,
    /// Training error per epoch, % (running, on the augmented training batches in training
    /// mode, as the trainer reports it).
    pub train_err: Vec<f64>,
    /// Test error per epoch, %.
    pub test_err: Vec<f64>,
    /// Wall time of its training, s.
    pub seconds: f64,
}

/// What the program found, as written to `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// `--data`.
    pub data: String,
    /// `--seed`.
    pub seed: u64,
    /// `--epochs`.
    pub epochs: u64,
    /// Curves by network name (`plain20`, `plain56`, `resnet20`, `resnet56`).
    pub nets: BTreeMap<String, Curves>,
    /// Per residual network, each block's `||g(x)|| / ||x||` on the first test batch at
    /// initialisation and after each epoch.
    pub residual_ratios: BTreeMap<String, RatioLog>,
    /// Final training error of plain-56 minus plain-20, percentage points (> 0: the deeper
    /// plain net trains worse: degradation).
    pub plain_gap: f64,
    /// The same for resnet-56 minus resnet-20.
    pub residual_gap: f64,
}

impl Results {
    /// The figure's panels (training error, test error), drawn from these numbers only:
    /// plain dashed, residual solid, one colour per depth.
    pub fn error_charts(&self) -> Vec<LineChart> {
        let mut depths: Vec<usize> = self.nets.values().map(|c| c.depth).collect();
        depths.sort_unstable();
        depths.dedup();
        let colour =
            |d: usize| PALETTE[depths.iter().position(|&x| x == d).unwrap_or(0) % PALETTE.len()];
        let panel = |title: &str, f: &dyn Fn(&Curves) -> &Vec<f64>| LineChart {
            title: title.into(),
            x_desc: "epoch".into(),
            y_desc: "error (%)".into(),
            log_y: false,
            lines: NETS
                .iter()
                .filter_map(|name| self.nets.get(*name).map(|c| (name, c)))
                .map(|(name, c)| Line {
                    label: (*name).into(),
                    color: colour(c.depth),
                    dashed: name.starts_with("plain"),
                    points: f(c)
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| ((i + 1) as f64, v))
                        .collect(),
                })
                .collect(),
        };
        vec![
            panel("training error", &|c| &c.train_err),
            panel("test error", &|c| &c.test_err),
        ]
    }

    /// The heat maps of the residual networks' block ratios.
    pub fn ratio_maps(&self) -> Vec<Heatmap> {
        self.residual_ratios
            .iter()
            .map(|(name, log)| log.heatmap(&format!("{name}: ||g(x)|| / ||x||"), &[]))
            .collect()
    }
}

impl Findings for Results {
    /// `degradation.png` and `residual_ratios.png`.
    fn draw(&self, dir: &Path) -> Result<()> {
        write_line_charts(&dir.join("degradation.png"), &self.error_charts())?;
        let maps = self.ratio_maps();
        if !maps.is_empty() {
            write_heatmaps(&dir.join("residual_ratios.png"), &maps, "||g(x)||/||x||")?;
        }
        Ok(())
    }
}

/// Runs the program.
///
/// # Errors
/// Bad flags or data, a diverging run, an unwritable output.
pub fn run(args: &Args) -> Result<Results> {
    let device = args.recipe.start()?;
    let data = args.recipe.open_data(None)?;
    let probe_n = (args.recipe.batch_size as usize).min(256);
    let probe = first_batch(data.test.clone(), &data.test_transforms, probe_n, &device)?;
    let mut nets = BTreeMap::new();
    let mut residual_ratios = BTreeMap::new();
    for name in NETS {
        let net = build(name, &data, args.recipe.seed, &device)?;
        let residual = name.starts_with("resnet");
        let mut log = RatioLog::default();
        if residual {
            log.record(&net.model, &probe.inputs)?;
        }
        let mut failed = None;
        let plan = Plan {
            epochs: args.epochs,
            out: Some(args.out.join(name)),
            label: name.into(),
            ..Plan::default()
        };
        let fitted = fit(
            &net.model,
            &net.varmap,
            &net.rng,
            &args.recipe,
            &data,
            &device,
            &plan,
            |_| {
                if residual && failed.is_none() {
                    failed = log.record(&net.model, &probe.inputs).err();
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e);
        }
        nets.insert(
            name.to_string(),
            Curves {
                depth: depth(&net.cfg),
                train_err: fitted
                    .history
                    .iter()
                    .map(|r| error_pct(r.train_acc))
                    .collect(),
                test_err: fitted
                    .history
                    .iter()
                    .map(|r| error_pct(r.test_acc))
                    .collect(),
                seconds: fitted.seconds,
            },
        );
        if residual {
            residual_ratios.insert(name.to_string(), log);
        }
    }
    let last_train = |n: &str| {
        nets.get(n)
            .and_then(|c: &Curves| c.train_err.last().copied())
            .unwrap_or(f64::NAN)
    };
    let results = Results {
        data: args.recipe.data.clone(),
        seed: args.recipe.seed,
        epochs: args.epochs,
        plain_gap: last_train("plain56") - last_train("plain20"),
        residual_gap: last_train("resnet56") - last_train("resnet20"),
        nets,
        residual_ratios,
    };
    save(&args.out, &results)?;
    print_summary(&results, args);
    Ok(results)
}

fn print_summary(r: &Results, args: &Args) {
    println!(
        "\ndegradation on {} (seed {}, {} epochs): final errors",
        r.data, r.seed, r.epochs
    );
    println!("  net        train err   test err   time");
    for name in NETS {
        if let Some(c) = r.nets.get(name) {
            println!(
                "  {name:<9} {:>8.2}%  {:>8.2}%  {:>6.0} s",
                c.train_err.last().copied().unwrap_or(f64::NAN),
                c.test_err.last().copied().unwrap_or(f64::NAN),
                c.seconds
            );
        }
    }
    let verdict = |gap: f64| {
        if gap > 0. {
            "the deeper net trains worse"
        } else {
            "the deeper net trains at least as well"
        }
    };
    println!(
        "  plain-56 vs plain-20: {:+.2} points of training error ({})",
        r.plain_gap,
        verdict(r.plain_gap)
    );
    println!(
        "  resnet-56 vs resnet-20: {:+.2} points of training error ({})",
        r.residual_gap,
        verdict(r.residual_gap)
    );
    println!(
        "results: {}, figures: degradation.png, residual_ratios.png",
        args.out.join("results.json").display()
    );
}
