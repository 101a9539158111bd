//! Classify image files with a trained model (or torchvision weights).
//!
//! ```text
//! predict --model runs/resnet20/model.safetensors digit.png more-digits/
//! predict --model runs/resnet18/model.safetensors --top-k 3 --json photos/
//! predict --arch resnet50 --weights resnet50-0676ba61.pth cat.jpg     # ImageNet names built in
//! predict --pretrained resnet50 cat.jpg                                  # downloaded once
//! ```
//!
//! Each image gets the preprocessing recorded in the model file (grayscale or RGB, resize,
//! normalisation: [`resblock_vision::Preprocess`]), the same as in training; images run in
//! batches. `--json` prints one object per image and line:
//! `{"path": "...", "top": [{"class": "<name>", "prob": 0.97}, ...]}`.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, ModuleT, Tensor, D};
use clap::Parser;
use resblock_examples::{collect_images, ModelArgs, RuntimeArgs};
use resblock_train::data::decode_image;
use serde::Serialize;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Classify images with a model file from `train` or torchvision weights.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Image files or folders (searched recursively for .png/.jpg/.jpeg).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Classes to report per image.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: u64,
    /// One JSON object per image and line instead of text.
    #[arg(long)]
    json: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Serialize)]
struct Guess<'a> {
    class: &'a str,
    prob: f32,
}

#[derive(Serialize)]
struct Line<'a> {
    path: String,
    top: Vec<Guess<'a>>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.runtime.start()?;
    let loaded = args.model.load(&device)?;
    let net = loaded.net.folded()?;
    let meta = &loaded.meta;
    let pre = meta.preprocess();
    let files = collect_images(&args.paths)?;
    if files.is_empty() {
        anyhow::bail!("no .png/.jpg images in {:?}", args.paths);
    }
    let k = (args.top_k as usize).min(meta.num_classes);
    for chunk in files.chunks(args.batch_size as usize) {
        let batch = chunk
            .iter()
            .map(|p| Ok(pre.tensor(&decode_image(p)?, &device)?))
            .collect::<Result<Vec<Tensor>>>()?;
        let logits = net.forward_t(&Tensor::stack(&batch, 0)?, false)?;
        let probs =
            candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?.to_vec2::<f32>()?;
        for (path, p) in chunk.iter().zip(probs) {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let top: Vec<Guess<'_>> = order[..k]
                .iter()
                .map(|&i| Guess {
                    class: &meta.class_names[i],
                    prob: p[i],
                })
                .collect();
            if args.json {
                let line = Line {
                    path: path.display().to_string(),
                    top,
                };
                println!("{}", serde_json::to_string(&line)?);
            } else {
                let text: Vec<String> = top
                    .iter()
                    .map(|g| format!("{} ({:.2}%)", g.class, 100. * g.prob))
                    .collect();
                println!("{}: {}", path.display(), text.join(", "));
            }
        }
    }
    Ok(())
}
