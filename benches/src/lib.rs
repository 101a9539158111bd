//! Shared helpers of the criterion benches: what each benchmark's iteration does, recorded
//! for `cargo xtask bench` (images/s, GFLOP/s and the share of the measured GEMM peak).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_train::optim::{param_groups, Sgd, SgdConfig};
use resblock_train::schedule::{LrSchedule, Schedule};
use resblock_train::{Batch, LossKind, Trainer, TrainerConfig};
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
/// `flop` floating-point operations (multiply-adds count two); either may be unknown. Every
/// benchmark records itself (with `None`s where nothing is known): `cargo xtask bench`
/// lists only recorded ids, so that criterion's leftovers of removed ones stay out.
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

/// The residual MLP block of `cpu/residual_mlp_block/fwd_bwd/w256_h1024_bs128` (LayerNorm,
/// 256 -> 1024 with GELU -> 256, seeded) and its batch of 128 inputs: the bench's and
/// `mlp-profile`'s. The varmap holds the block's variables.
pub fn mlp_bench_block(varmap: &VarMap) -> (resblock_core::MlpBlock, Tensor) {
    let rng = RngHandle::seed_from_u64(0);
    let vb = seeded_var_builder(varmap, &rng, DType::F32, &Device::Cpu);
    let cfg = resblock_core::MlpBlockConfig {
        hidden: Some(1024),
        activation: resblock_core::Activation::Gelu,
        layer_norm: true,
        ..Default::default()
    };
    let block = resblock_core::mlp_block(256, 256, cfg, &rng, vb).expect("block");
    let x = rng
        .normal_tensor((128, 256), 0., 1., DType::F32, &Device::Cpu)
        .expect("x");
    (block, x)
}

/// A torchvision-style network `arch` on plain tensors (no variables, so no backprop graph is recorded), with
/// seeded weights and randomised BatchNorm statistics.
pub fn inference_net(arch: &str) -> (ResNet, ResNetConfig) {
    inference_net_on(arch, &Device::Cpu)
}

/// [`inference_net`] on `device`: the same weights on every device (they are drawn on the
/// CPU and copied).
pub fn inference_net_on(arch: &str, device: &Device) -> (ResNet, ResNetConfig) {
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
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )
    .expect("net");
    (net, cfg)
}

/// A network with its variables and one fixed batch: the training-step workload of the
/// benches (`cpu/<arch>/train_step/bs<batch>`) and of the memory probe, the same as
/// `train_step` in `benches/torch_bench.py` (SGD, momentum 0.9, Nesterov, weight decay 5e-4
/// on weights only, cross-entropy, random inputs, labels `i % 10`).
pub struct TrainWorkload {
    pub net: ResNet,
    pub varmap: VarMap,
    pub batch: Batch,
    /// Floating-point operations of one step (forward, input and weight gradients: three
    /// times the forward's multiply-adds, two operations each).
    pub flop: f64,
}

impl TrainWorkload {
    /// `arch` (a preset) on `batch` random `size`x`size` images.
    pub fn new(arch: &str, batch: usize, size: usize) -> TrainWorkload {
        TrainWorkload::new_on(arch, batch, size, &Device::Cpu)
    }

    /// [`TrainWorkload::new`] on `device`: the same weights and batch on every device (drawn
    /// on the CPU and copied).
    pub fn new_on(arch: &str, batch: usize, size: usize, device: &Device) -> TrainWorkload {
        let rng = RngHandle::seed_from_u64(0);
        let varmap = VarMap::new();
        let cfg = ResNetConfig::preset(arch).expect("preset");
        let net = resnet(
            &cfg,
            &rng,
            seeded_var_builder(&varmap, &rng, DType::F32, device),
        )
        .expect("net");
        let macs = net.summary(size, size).expect("summary").total_macs() as f64;
        let flop = 3. * 2. * macs * batch as f64;
        let classes = cfg.num_classes as u32;
        let batch = Batch {
            inputs: rng
                .normal_tensor(
                    (batch, cfg.in_channels, size, size),
                    0.,
                    1.,
                    DType::F32,
                    device,
                )
                .expect("x"),
            targets: Tensor::new(
                (0..batch as u32)
                    .map(|i| i % 10 % classes)
                    .collect::<Vec<_>>(),
                device,
            )
            .expect("y"),
        };
        TrainWorkload {
            net,
            varmap,
            batch,
            flop,
        }
    }

    /// The trainer that runs the steps.
    pub fn trainer(&self) -> Trainer<'_, ResNet> {
        let sgd = Sgd::new(
            param_groups(&self.varmap, 5e-4, true),
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.,
                nesterov: true,
            },
        )
        .expect("sgd");
        let schedule = LrSchedule::new(0.1, Schedule::Constant, None).expect("schedule");
        Trainer::new(
            &self.net,
            &self.varmap,
            Box::new(sgd),
            schedule,
            TrainerConfig {
                loss: LossKind::CrossEntropy {
                    label_smoothing: 0.,
                },
                ..Default::default()
            },
        )
    }
}

/// The process's peak resident set size in bytes (`VmHWM` of `/proc/self/status`), where
/// Linux reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// The process's resident set size now, in bytes (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
