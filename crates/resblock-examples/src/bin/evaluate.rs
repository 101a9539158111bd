//! Evaluate a model on a dataset's test split: accuracy, per-class precision and recall, the
//! confusion matrix and the most confident mistakes.
//!
//! ```text
//! evaluate --model runs/resnet20/model.safetensors                       # the bundled MNIST-10k test split
//! evaluate --model runs/resnet18/model.safetensors --data folder:DIR --out runs/eval
//! ```
//!
//! Prints the report and writes `--out` (default `runs/evaluate`): `results.json` with
//! `accuracy` (percent), `per_class` (class name -> precision, recall, support),
//! `confusion` (rows: true class, columns: predicted, in `class_names` order) and
//! `mistakes`; `confusion.png`. Folder images get exactly `predict`'s preprocessing (from
//! the model file); MNIST/CIFAR tensors are resized (bilinear) to the model's input size
//! when it differs, a 1-channel dataset is replicated for a 3-channel model, and the
//! model's normalisation applies.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor, D};
use clap::Parser;
use resblock_core::RngHandle;
use resblock_examples::{ModelArgs, RuntimeArgs};
use resblock_train::confusion::{ClassStats, ConfusionMatrix};
use resblock_train::data::{
    decode_image, list_image_folder, DataKind, DataSpec, FolderListing, Split,
};
use resblock_train::{Dataset, Transform};
use resblock_vision::{ModelMeta, Preprocess};
use serde::Serialize;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Evaluate a model file on a dataset's test split.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Data, as `train --data`: `mnist-10k`, `mnist:DIR`, `cifar10:DIR`, `cifar100:DIR` or
    /// `folder:DIR` (its `test/` or `val/` split is evaluated).
    #[arg(long, default_value = "mnist-10k")]
    data: String,
    /// Output directory for results.json and confusion.png.
    #[arg(long, default_value = "runs/evaluate")]
    out: PathBuf,
    /// How many of the most confident mistakes to list.
    #[arg(long, default_value_t = 10)]
    mistakes: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Serialize)]
struct Mistake {
    path: String,
    truth: String,
    predicted: String,
    prob: f32,
}

#[derive(Serialize)]
struct Results<'a> {
    model: String,
    data: &'a str,
    samples: u64,
    accuracy: f64,
    class_names: &'a [String],
    per_class: serde_json::Map<String, serde_json::Value>,
    confusion: &'a [Vec<u64>],
    mistakes: Vec<Mistake>,
}

/// The test split as (source, label) items and a way to turn each into a normalised input.
enum Source {
    Files(Vec<(PathBuf, u32)>),
    Tensors(std::sync::Arc<dyn Dataset>),
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Self::Files(f) => f.len(),
            Self::Tensors(d) => d.len(),
        }
    }

    /// Item `i`: (its source, label, normalised CHW input).
    fn item(&self, i: usize, pre: &Preprocess, rng: &RngHandle) -> Result<(String, u32, Vec<f32>)> {
        match self {
            Self::Files(files) => {
                let (path, label) = &files[i];
                let img = decode_image(path)?;
                Ok((
                    path.display().to_string(),
                    *label,
                    pre.normalize(&pre.pixels(&img)),
                ))
            }
            Self::Tensors(ds) => {
                let (mut x, label) = ds.get(i)?;
                let (c, h, w) = ds.shape();
                let [mh, mw] = pre.image_size;
                if (h, w) != (mh, mw) {
                    Transform::Resize {
                        height: mh,
                        width: mw,
                    }
                    .apply(&mut x, c, h, w, rng)?;
                }
                if c == 1 && pre.channels == 3 {
                    x = [x.clone(), x.clone(), x].concat();
                }
                let norm = Transform::Normalize {
                    mean: pre.mean.clone(),
                    std: pre.std.clone(),
                };
                norm.apply(&mut x, pre.channels, mh, mw, rng)?;
                Ok((ds.source(i), label, x))
            }
        }
    }
}

fn open_data(spec: &DataSpec, meta: &ModelMeta) -> Result<Source> {
    if spec.kind == DataKind::Folder {
        let dir = spec.folder_test_dir()?;
        let FolderListing {
            class_names: names,
            files,
        } = list_image_folder(&dir)?;
        if names != meta.class_names {
            bail!(
                "{}: classes {names:?} are not the model's {:?}",
                dir.display(),
                meta.class_names
            );
        }
        return Ok(Source::Files(files));
    }
    let ds = spec.load_split(Split::Test, None)?;
    let (c, _, _) = ds.shape();
    if ds.num_classes() != meta.num_classes {
        bail!(
            "{}: {} classes but the model has {}",
            spec.text,
            ds.num_classes(),
            meta.num_classes
        );
    }
    if c != meta.in_channels && !(c == 1 && meta.in_channels == 3) {
        bail!(
            "{}: {c}-channel images but the model takes {}",
            spec.text,
            meta.in_channels
        );
    }
    Ok(Source::Tensors(ds))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.runtime.start()?;
    let model_path = args.model.path()?;
    let loaded = args.model.load(&device)?;
    let net = loaded.net.folded()?;
    let meta = &loaded.meta;
    let pre = meta.preprocess();
    let spec = DataSpec::parse(&args.data)?;
    let data = open_data(&spec, meta)?;
    if data.len() == 0 {
        bail!("{}: no test images", spec.text);
    }
    let rng = RngHandle::seed_from_u64(0);
    let [h, w] = pre.image_size;
    let mut confusion = ConfusionMatrix::new(meta.num_classes);
    // (confidence, source, truth, predicted) of every mistake.
    let mut wrong: Vec<(f32, String, usize, usize)> = Vec::new();
    let bs = args.batch_size as usize;
    for start in (0..data.len()).step_by(bs) {
        let items = (start..(start + bs).min(data.len()))
            .map(|i| data.item(i, &pre, &rng))
            .collect::<Result<Vec<_>>>()?;
        let flat: Vec<f32> = items
            .iter()
            .flat_map(|(_, _, x)| x.iter().copied())
            .collect();
        let x = Tensor::from_vec(flat, (items.len(), pre.channels, h, w), &Device::Cpu)?
            .to_device(&device)?;
        let probs =
            candle_nn::ops::softmax(&net.forward_t(&x, false)?.to_dtype(DType::F32)?, D::Minus1)?
                .to_vec2::<f32>()?;
        for ((src, label, _), p) in items.into_iter().zip(probs) {
            let (pred, conf) =
                p.iter().enumerate().fold(
                    (0, f32::MIN),
                    |best, (i, &v)| if v > best.1 { (i, v) } else { best },
                );
            let truth = label as usize;
            confusion.add(truth, pred)?;
            if pred != truth {
                wrong.push((conf, src, truth, pred));
            }
        }
    }
    wrong.sort_by(|a, b| b.0.total_cmp(&a.0));
    let names = &meta.class_names;
    let stats = confusion.per_class();
    let accuracy = 100. * confusion.accuracy();

    println!(
        "{} on {}: accuracy {accuracy:.2}% ({} of {})",
        model_path.display(),
        spec.text,
        confusion.total() - wrong.len() as u64,
        confusion.total()
    );
    println!(
        "\n{:>14}  {:>9}  {:>7}  {:>7}",
        "class", "precision", "recall", "support"
    );
    for (n, s) in names.iter().zip(&stats) {
        let n: String = n.chars().take(14).collect();
        println!(
            "{n:>14}  {:>8.2}%  {:>6.2}%  {:>7}",
            100. * s.precision,
            100. * s.recall,
            s.support
        );
    }
    println!(
        "\nconfusion matrix (rows: true class, columns: predicted):\n{}",
        confusion.table(names)
    );
    let mistakes: Vec<Mistake> = wrong
        .iter()
        .take(args.mistakes)
        .map(|(conf, src, t, p)| Mistake {
            path: src.clone(),
            truth: names[*t].clone(),
            predicted: names[*p].clone(),
            prob: *conf,
        })
        .collect();
    if !mistakes.is_empty() {
        println!("most confident mistakes:");
        for m in &mistakes {
            println!(
                "  {:6.2}%  {} (true {}, predicted {})",
                100. * m.prob,
                m.path,
                m.truth,
                m.predicted
            );
        }
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let per_class = names
        .iter()
        .zip(&stats)
        .map(|(n, s): (&String, &ClassStats)| Ok((n.clone(), serde_json::to_value(s)?)))
        .collect::<Result<serde_json::Map<_, _>>>()?;
    let results = Results {
        model: model_path.display().to_string(),
        data: &spec.text,
        samples: confusion.total(),
        accuracy,
        class_names: names,
        per_class,
        confusion: &confusion.counts,
        mistakes,
    };
    let json = args.out.join("results.json");
    resblock_io::write_atomic(&json, serde_json::to_string_pretty(&results)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    confusion.save_png(names, &args.out.join("confusion.png"))?;
    println!("wrote {} and confusion.png", json.display());
    Ok(())
}
