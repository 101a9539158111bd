//! Export a model to ONNX.
//!
//! ```text
//! export --model runs/resnet20/model.safetensors --onnx resnet20.onnx
//! export --arch resnet50 --weights resnet50-0676ba61.pth --num-classes 1000 --onnx resnet50.onnx
//! export --pretrained resnet18 --onnx resnet18.onnx --fold-bn
//! ```
//!
//! The graph (opset 13) takes `input` (N, C, H, W; N dynamic, H x W the model file's
//! `image_size` unless --image-size is given), normalised as the model file's metadata says
//! (`mean`/`std` of pixels in 0..1), and gives `logits` (N, classes). The model file's
//! metadata is copied into the ONNX `metadata_props` under the key `resblock`.
//!
//! Check it in onnxruntime (Python):
//!
//! ```text
//! import numpy as np, onnxruntime as ort
//! s = ort.InferenceSession("resnet20.onnx")
//! logits = s.run(["logits"], {"input": np.zeros((2, 1, 28, 28), np.float32)})[0]
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use resblock_examples::ModelArgs;
use resblock_onnx::ExportOptions;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Export a model file (or torchvision weights) to ONNX.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Where to write the ONNX file.
    #[arg(long)]
    onnx: PathBuf,
    /// Fold each convolution + batch norm pair into the convolution.
    #[arg(long)]
    fold_bn: bool,
    /// Input height and width (`H` or `H,W`; default: the model file's image size).
    #[arg(long)]
    image_size: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    resblock_examples::start_threads(None);
    let loaded = args.model.load(&candle_core::Device::Cpu)?;
    let image_size = match &args.image_size {
        None => loaded.meta.image_size,
        Some(s) => {
            let v: Vec<usize> = s
                .split(',')
                .map(|p| p.trim().parse::<usize>().ok().filter(|v| *v > 0))
                .collect::<Option<_>>()
                .with_context(|| format!("--image-size {s:?}: expected H or H,W (positive)"))?;
            match v.as_slice() {
                [h] => [*h, *h],
                [h, w] => [*h, *w],
                _ => anyhow::bail!("--image-size {s:?}: expected H or H,W"),
            }
        }
    };
    let opts = ExportOptions {
        image_size,
        fold_batch_norm: args.fold_bn,
        metadata: vec![("resblock".into(), loaded.meta.to_json()?)],
    };
    resblock_onnx::write(&loaded.net, &opts, &args.onnx)?;
    println!(
        "wrote {} ({}, input (N, {}, {}, {}), output logits (N, {}), opset {})",
        args.onnx.display(),
        loaded.meta.arch,
        loaded.meta.in_channels,
        image_size[0],
        image_size[1],
        loaded.meta.num_classes,
        resblock_onnx::OPSET
    );
    Ok(())
}
