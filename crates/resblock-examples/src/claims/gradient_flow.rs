//! Claim 3, gradient flow: shortcuts keep gradients alive in deep networks. Measures the
//! L2 norm of the loss gradient for every convolution weight, input to output, of plain-56
//! and resnet-56 on the same batch, at initialisation and after `--steps` training steps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use resblock_train::grad_flow::conv_grad_norms;
use resblock_train::plot::{write_line_charts, Line, LineChart, PALETTE};
use resblock_train::BatchSource;
use serde::{Deserialize, Serialize};

use super::{build, first_batch, save, Findings};
use crate::fit::{fit, Plan};
use crate::recipe_args::RecipeArgs;

/// Per-layer gradient norms of a plain network and its residual twin, at initialisation
/// and after training, on one fixed batch.
#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(name = "gradient-flow", version, about)]
pub struct Args {
    /// Training steps between the two measurements.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Epochs the learning-rate schedule spans (raised to what --steps needs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// Depth of the pair (6n + 2: plain-N against resnet-N).
    #[arg(long, default_value_t = 56)]
    pub depth: usize,
    /// Output directory: results.json, gradient_flow.png and one run folder per network.
    #[arg(long, default_value = "runs/gradient-flow")]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub recipe: RecipeArgs,
}

/// One network's gradient norms, one per convolution in forward order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Norms {
    /// At initialisation.
    pub init: Vec<f64>,
    /// After the training steps.
    pub trained: Vec<f64>,
}

impl Norms {
    /// first layer's norm / last layer's norm, at init and trained.
    pub fn first_over_last(&self) -> (f64, f64) {
        let r = |v: &[f64]| match (v.first(), v.last()) {
            (Some(a), Some(b)) if *b > 0. => a / b,
            _ => f64::NAN,
        };
        (r(&self.init), r(&self.trained))
    }
}

/// What the program found, as written to `results.json`: `"plain56"` and `"resnet56"`
/// (for the default depth) with `init` and `trained`, plus the context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// `--data`.
    pub data: String,
    /// `--seed`.
    pub seed: u64,
    /// Training steps between the measurements.
    pub steps: u64,
    /// Samples in the measured batch (the first of the training split, not augmented).
    pub batch_size: usize,
    /// The convolution weights measured, in forward order (the same for both networks).
    pub layers: Vec<String>,
    /// Norms by network name (`plain56`, `resnet56`).
    #[serde(flatten)]
    pub nets: BTreeMap<String, Norms>,
}

impl Results {
    /// The figure's panels (at initialisation, after training), log scale, from these
    /// numbers only: x is the layer's position (1 = input side).
    pub fn charts(&self) -> Vec<LineChart> {
        let panel = |title: String, trained: bool| LineChart {
            title,
            x_desc: "convolution (input -> output)".into(),
            y_desc: "||dL/dW||".into(),
            log_y: true,
            lines: self
                .nets
                .iter()
                .map(|(name, n)| {
                    let plain = name.starts_with("plain");
                    let v = if trained { &n.trained } else { &n.init };
                    Line {
                        label: name.clone(),
                        color: PALETTE[usize::from(plain)],
                        dashed: plain,
                        points: v
                            .iter()
                            .enumerate()
                            .map(|(i, &g)| ((i + 1) as f64, g))
                            .collect(),
                    }
                })
                .collect(),
        };
        vec![
            panel("at initialisation".into(), false),
            panel(format!("after {} steps", self.steps), true),
        ]
    }
}

impl Findings for Results {
    /// `gradient_flow.png`.
    fn draw(&self, dir: &Path) -> Result<()> {
        write_line_charts(&dir.join("gradient_flow.png"), &self.charts())?;
        Ok(())
    }
}

/// Runs the program.
///
/// # Errors
/// Bad flags or data, a diverging run, an unwritable output.
pub fn run(args: &Args) -> Result<Results> {
    let device = args.recipe.start()?;
    ensure!(
        args.depth >= 8 && (args.depth - 2).is_multiple_of(6),
        "--depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {}",
        args.depth
    );
    let data = args.recipe.open_data(None)?;
    let batch = first_batch(
        data.train.clone(),
        &data.test_transforms,
        args.recipe.batch_size as usize,
        &device,
    )?;
    let loss = args.recipe.loss();
    let mut nets = BTreeMap::new();
    let mut layers = Vec::new();
    for name in [
        format!("plain{}", args.depth),
        format!("resnet{}", args.depth),
    ] {
        let net = build(&name, &data, args.recipe.seed, &device)?;
        let init = conv_grad_norms(&net.model, &net.varmap, &batch, loss)?;
        let (train_loader, _) =
            args.recipe
                .loaders(&data, &device, resblock_train::data::Shard::whole())?;
        let per_epoch = train_loader.num_batches().max(1) as u64;
        let epochs = args.epochs.max(args.steps.div_ceil(per_epoch));
        let plan = Plan {
            epochs,
            max_steps: Some(args.steps),
            out: Some(args.out.join(&name)),
            label: name.clone(),
            ..Plan::default()
        };
        fit(
            &net.model,
            &net.varmap,
            &net.rng,
            &args.recipe,
            &data,
            &device,
            &plan,
            |_| {},
        )?;
        let trained = conv_grad_norms(&net.model, &net.varmap, &batch, loss)?;
        let names: Vec<String> = init.iter().map(|(n, _)| n.clone()).collect();
        if layers.is_empty() {
            layers = names;
        } else {
            ensure!(layers == names, "the two networks' convolutions differ");
        }
        nets.insert(
            name,
            Norms {
                init: init.into_iter().map(|(_, v)| v).collect(),
                trained: trained.into_iter().map(|(_, v)| v).collect(),
            },
        );
    }
    let results = Results {
        data: args.recipe.data.clone(),
        seed: args.recipe.seed,
        steps: args.steps,
        batch_size: batch.inputs.dim(0)?,
        layers,
        nets,
    };
    save(&args.out, &results)?;
    print_summary(&results, args);
    Ok(results)
}

fn print_summary(r: &Results, args: &Args) {
    println!(
        "\ngradient flow on {} (seed {}, batch of {}, {} convolutions):",
        r.data,
        r.seed,
        r.batch_size,
        r.layers.len()
    );
    println!(
        "  net        first-layer / last-layer gradient norm: at init   after {} steps",
        r.steps
    );
    for (name, n) in &r.nets {
        let (a, b) = n.first_over_last();
        println!("  {name:<9} {a:>46.3e} {b:>14.3e}");
    }
    println!(
        "results: {}, figure: gradient_flow.png",
        args.out.join("results.json").display()
    );
}
