//! Shared helpers of the criterion benches: what each benchmark's iteration does, recorded
//! for `cargo xtask bench` (images/s, GFLOP/s and the share of the measured GEMM peak).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_vision::{resnet, ResNet, ResNetConfig};

/// Where benches record their metadata: `<target>/bench-meta.jsonl`, one JSON object per line
/// (`id`, `images`, `flop`), the last line for an id winning.
pub fn meta_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("bench-meta.jsonl")
}

/// Records that one iteration of benchmark `id` processes `images` images (or samples) and
/// `flop` floating-point operations (multiply-adds count two); either may be unknown.
pub fn record(id: &str, images: Option<f64>, flop: Option<f64>) {
    let line = serde_json::json!({ "id": id, "images": images, "flop": flop });
    let path = meta_path();
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("warning: cannot record {id} in {}: {e}", path.display());
    }
}

/// Floating-point operations of a 3x3 convolution forward pass (padding 1).
pub fn conv3x3_flop(n: usize, c_in: usize, c_out: usize, size: usize, stride: usize) -> f64 {
    let out = (size - 1) / stride + 1;
    2. * (n * c_out * out * out * c_in * 9) as f64
}

/// A torchvision-style network `arch` on plain tensors (no variables, so no backprop graph is recorded), with
/// seeded weights and randomised BatchNorm statistics.
pub fn inference_net(arch: &str) -> (ResNet, ResNetConfig) {
    let cfg = ResNetConfig::preset(arch).expect("preset");
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )
    .expect("net");
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap")
        .iter()
        .map(|(k, v)| {
            let t = v.as_tensor().detach();
            let t = if k.ends_with("running_var") {
                t.affine(0.5, 0.75).expect("var")
            } else {
                t
            };
            (k.clone(), t)
        })
        .collect();
    let net = resnet(
        &cfg,
        &rng,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .expect("net");
    (net, cfg)
}
