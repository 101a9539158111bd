//! Classify images (or a tensor) with a ResNet and torchvision weights.
//!
//! ```text
//! # top-5 ImageNet classes of each image (torchvision's resize 256 / crop 224 / normalise)
//! classify --arch resnet50 --weights resnet50.pth --image cat.jpg dog.png
//! # tensor mode: tensor `input` (N, C, H, W) in, tensor `logits` (N, classes) out
//! classify --arch resnet20 --weights w.safetensors --num-classes 10 --input x.safetensors --output y.safetensors
//! ```
//!
//! Weights are loaded strictly (a file for another architecture is an error that lists the
//! mismatched keys); the network runs with its batch norms folded into the convolutions.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, ModuleT, Tensor, D};
use clap::Parser;
use resblock_core::parse_device;
use resblock_vision::imagenet::{class_names, load_image, preprocess};
use resblock_vision::weights::{load_resnet, read_state_dict, save_tensors};
use resblock_vision::ResNetConfig;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

/// Classify images or a tensor with a ResNet from torchvision weights.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Architecture: one of resblock-vision's presets (resnet18 ... wide_resnet101_2, resnet20 ...).
    #[arg(long)]
    arch: String,
    /// Weight file (.pth or .safetensors) with torchvision's state_dict names.
    #[arg(long)]
    weights: PathBuf,
    /// Images to classify (PNG or JPEG).
    #[arg(long, num_args = 1.., conflicts_with_all = ["input", "output"], required_unless_present = "input")]
    image: Vec<PathBuf>,
    /// Tensor mode: a .safetensors file with tensor `input` (N, C, H, W).
    #[arg(long, requires = "output")]
    input: Option<PathBuf>,
    /// Tensor mode: where to write tensor `logits` (N, classes).
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
    /// Classes of the classifier (default: the preset's, 1000 for ImageNet nets).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    num_classes: Option<u64>,
    /// Resize the shorter image side to this before cropping.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    resize: u64,
    /// Center-crop size.
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u64).range(1..=4096))]
    crop: u64,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    top: u64,
    /// Device: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` or `auto`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    resblock_examples::start_threads(args.threads);
    let device = parse_device(&args.device)?;
    let mut cfg = ResNetConfig::preset(&args.arch)?;
    if let Some(n) = args.num_classes {
        cfg.num_classes = n as usize;
    }
    let net = load_resnet(&cfg, &args.weights, &device)?.folded()?;

    if let (Some(input), Some(output)) = (&args.input, &args.output) {
        let tensors = read_state_dict(input)?;
        let x = tensors
            .get("input")
            .with_context(|| format!("{}: no tensor named `input`", input.display()))?;
        match x.dims() {
            [_, c, h, w] if *c == cfg.in_channels && *h > 0 && *w > 0 => {}
            d => bail!(
                "{}: tensor `input` has shape {d:?}, expected (N, {}, H, W)",
                input.display(),
                cfg.in_channels
            ),
        }
        let logits = net.forward_t(&x.to_dtype(DType::F32)?.to_device(&device)?, false)?;
        let out = HashMap::from([(
            "logits".to_string(),
            logits.to_device(&candle_core::Device::Cpu)?,
        )]);
        save_tensors(&out, output)?;
        println!("wrote logits {:?} to {}", logits.dims(), output.display());
        return Ok(());
    }

    if cfg.in_channels != 3 {
        bail!(
            "image mode needs a 3-channel network, {} has {}",
            args.arch,
            cfg.in_channels
        );
    }
    let names = class_names();
    let (resize, crop) = (args.resize as usize, args.crop as usize);
    let batch = args
        .image
        .iter()
        .map(|p| preprocess(&load_image(p)?, resize, crop, &device))
        .collect::<resblock_vision::Result<Vec<_>>>()?;
    let probs = candle_nn::ops::softmax(
        &net.forward_t(&Tensor::stack(&batch, 0)?, false)?,
        D::Minus1,
    )?
    .to_dtype(DType::F32)?
    .to_vec2::<f32>()?;
    for (path, p) in args.image.iter().zip(probs) {
        println!("{}:", path.display());
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        for &i in order.iter().take(args.top as usize) {
            let name = if cfg.num_classes == 1000 {
                names[i].to_string()
            } else {
                format!("class {i}")
            };
            println!("  {:6.2}%  {name}", 100. * p[i]);
        }
    }
    Ok(())
}
