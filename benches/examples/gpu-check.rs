//! The GPU check: CPU-vs-CUDA parity of a ResNet-20 training step and of ResNet-18/50
//! inference, then the benchmark rows timed on the GPU (build with `--features cuda`).
//!
//! `cargo run --release --features cuda -p resblock-benches --example gpu-check --
//! [--out FILE] [--torch FILE] [--min-time SECONDS] [--device NAME] [--parity-only]`
//!
//! `--device` (default `cuda`, any name `train --device` takes) and `--parity-only` (no rows)
//! let the check itself run without a GPU: `--device cpu --parity-only` compares the CPU
//! with itself.
//!
//! - **Parity.** The same seeded weights and batch on the CPU (our kernels, the reference)
//!   and on CUDA (Candle's CUDA ops): the ResNet-20 bs128 step's logits, loss and every
//!   gradient, the losses of three SGD steps (Nesterov momentum, weight decay, as the benches'
//!   step) and the weights and BatchNorm statistics after them; ResNet-18/50 logits at batch
//!   2, unfolded and folded. Each tensor is compared as `max |cuda - cpu| / max |cpu|`; a
//!   comparison over 1e-3 fails the run (non-zero exit) after everything else has run. The
//!   weights after three steps may also differ by up to twice what Candle's own CPU kernels
//!   give for the same steps (see [`train_parity`]).
//! - **Rows.** The `cpu/...` rows of `cargo xtask bench` as `cuda/...`, each the mean over at
//!   least five calls and `--min-time` seconds (default 1) after two warm-ups, with the device
//!   synchronised after every call, as `benches/torch_bench.py --device cuda` times PyTorch.
//!   `--torch FILE` (that script's JSON) adds PyTorch's time and the ratio to each row.
//! - `--out FILE` writes `{"parity": {...}, "rows": {id: seconds}}` as JSON.
//!
//! What it measured on an H200 is in docs/benchmarks.md ("GPU").

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use resblock_benches::{inference_net_on, TrainWorkload};
use resblock_core::ops::{batch_norm_train, conv2d, conv2d_backward, set_kernels, Kernels};
use resblock_core::{
    backward_from, configure_threads, mlp_block, seeded_var_builder, Activation, MlpBlockConfig,
    RngHandle,
};
use resblock_train::loss::cross_entropy;
use resblock_vision::{basic_block, BasicBlockConfig};

/// The largest relative difference a parity comparison may show.
const TOLERANCE: f64 = 1e-3;

fn main() -> Result<()> {
    let mut out = None;
    let mut torch = None;
    let mut min_time = 1.0f64;
    let mut device = "cuda".to_string();
    let mut rows_too = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(value()?),
            "--torch" => torch = Some(value()?),
            "--device" => device = value()?,
            "--parity-only" => rows_too = false,
            "--min-time" => {
                let v = value()?;
                min_time = v
                    .parse()
                    .with_context(|| format!("--min-time: {v:?} is not a number"))?
            }
            _ => bail!(
                "unknown flag {a:?} (--out FILE, --torch FILE, --min-time SECONDS, \
                 --device NAME, --parity-only)"
            ),
        }
    }
    configure_threads(None);
    let gpu = resblock_core::parse_device(&device)
        .with_context(|| format!("--device {device} (CUDA needs a build with --features cuda)"))?;

    let mut parity = Parity::default();
    for (section, run) in [
        (
            "resnet20 train step",
            train_parity as fn(&Device, &mut Parity) -> Result<()>,
        ),
        ("resnet18/50 inference", infer_parity),
    ] {
        if let Err(e) = run(&gpu, &mut parity) {
            parity.failed.push(format!("{section}: {e:#}"));
        }
    }

    let mut rows = Rows::new(gpu.clone(), min_time);
    if rows_too {
        if let Err(e) = rows.run_all() {
            println!("rows stopped: {e:#}");
            parity.failed.push(format!("rows: {e:#}"));
        }
        rows.print(torch.as_deref())?;
    }

    if let Some(path) = out {
        let json = serde_json::json!({
            "parity": parity.worst,
            "failed": parity.failed,
            "rows": rows.times,
        });
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {tmp}"))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {path}"))?;
    }
    if parity.failed.is_empty() {
        println!("parity: every comparison within its tolerance");
        Ok(())
    } else {
        bail!("parity failed:\n  {}", parity.failed.join("\n  "))
    }
}

/// The parity comparisons: the worst relative difference per group, and what failed.
#[derive(Default)]
struct Parity {
    worst: BTreeMap<String, f64>,
    failed: Vec<String>,
}

impl Parity {
    /// Compares `gpu` with `cpu` (the reference) under `group`/`name`: within [`TOLERANCE`].
    fn compare(&mut self, group: &str, name: &str, cpu: &Tensor, gpu: &Tensor) -> Result<()> {
        self.compare_within(group, name, cpu, gpu, 0.)
    }

    /// [`Parity::compare`] within the larger of [`TOLERANCE`] and `allowed`.
    fn compare_within(
        &mut self,
        group: &str,
        name: &str,
        cpu: &Tensor,
        gpu: &Tensor,
        allowed: f64,
    ) -> Result<()> {
        let rel = relative_difference(cpu, gpu).with_context(|| format!("{group}/{name}"))?;
        self.note(group, rel);
        let limit = TOLERANCE.max(allowed);
        // A NaN difference fails too.
        if rel.is_nan() || rel > limit {
            self.failed.push(format!(
                "{group}/{name}: relative difference {rel:.3e} (allowed {limit:.1e})"
            ));
        }
        Ok(())
    }

    /// Records `rel` in `group`'s worst.
    fn note(&mut self, group: &str, rel: f64) {
        let worst = self.worst.entry(group.to_string()).or_insert(0.);
        *worst = worst.max(rel);
    }

    fn report(&self, group: &str) {
        if let Some(w) = self.worst.get(group) {
            println!("parity {group}: worst relative difference {w:.2e}");
        }
    }
}

/// `max |b - a| / max |a|` (`a` is the reference), in f64 on the CPU.
fn relative_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let b = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    if a.dims() != b.dims() {
        bail!("shapes {:?} and {:?}", a.dims(), b.dims());
    }
    let scale = a.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-30);
    let diff = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale)
}

/// ResNet-20 at batch 128 on three runs from the same weights and batch: ours on the CPU
/// (the reference), Candle's own CPU kernels (the yardstick) and CUDA. One forward + backward
/// is compared tensor by tensor, then three SGD steps of the benches' trainer. Training at
/// lr 0.1 amplifies rounding: after three steps the BatchNorm biases (which start at zero)
/// of our and Candle's CPU kernels differ by a few percent of their size, so the weights
/// after the steps pass when CUDA is within the tolerance or within twice the yardstick's
/// difference for that tensor.
fn train_parity(gpu: &Device, p: &mut Parity) -> Result<()> {
    let cpu = TrainRun::new(&Device::Cpu, Kernels::Native)?;
    let yardstick = TrainRun::new(&Device::Cpu, Kernels::Candle)?;
    let cuda = TrainRun::new(gpu, Kernels::Native)?;
    for (name, v) in &cpu.initial {
        p.compare("resnet20 initial weights", name, v, &cuda.initial[name])?;
    }
    p.compare("resnet20 step logits", "logits", &cpu.logits, &cuda.logits)?;
    p.compare("resnet20 step loss", "loss", &cpu.loss, &cuda.loss)?;
    for (name, g) in &cpu.grads {
        p.compare("resnet20 step gradients", name, g, &cuda.grads[name])?;
    }
    for (step, (lc, lg)) in cpu.losses.iter().zip(&cuda.losses).enumerate() {
        let (lc, lg) = (
            Tensor::new(*lc, &Device::Cpu)?,
            Tensor::new(*lg, &Device::Cpu)?,
        );
        p.compare("resnet20 SGD losses", &format!("step {step}"), &lc, &lg)?;
    }
    for (name, w) in &cpu.after {
        let allowed = 2. * relative_difference(w, &yardstick.after[name])?;
        let group = "resnet20 weights after 3 SGD steps";
        p.compare_within(group, name, w, &cuda.after[name], allowed)?;
        let rel = relative_difference(w, &yardstick.after[name])?;
        p.note(
            "resnet20 weights after 3 SGD steps, Candle's CPU kernels",
            rel,
        );
    }
    for g in [
        "resnet20 initial weights",
        "resnet20 step logits",
        "resnet20 step loss",
        "resnet20 step gradients",
        "resnet20 SGD losses",
        "resnet20 weights after 3 SGD steps",
        "resnet20 weights after 3 SGD steps, Candle's CPU kernels",
    ] {
        p.report(g);
    }
    Ok(())
}

/// What [`train_parity`] compares of one run (tensors on the CPU, by variable name).
struct TrainRun {
    initial: BTreeMap<String, Tensor>,
    logits: Tensor,
    loss: Tensor,
    grads: BTreeMap<String, Tensor>,
    losses: Vec<f64>,
    after: BTreeMap<String, Tensor>,
}

impl TrainRun {
    /// The ResNet-20 bs128 workload on `device` with `kernels` (restored afterwards).
    fn new(device: &Device, kernels: Kernels) -> Result<TrainRun> {
        let before = resblock_core::ops::kernels();
        set_kernels(kernels);
        let run = TrainRun::run(device);
        set_kernels(before);
        run
    }

    fn run(device: &Device) -> Result<TrainRun> {
        let work = TrainWorkload::new_on("resnet20", 128, 32, device);
        let vars = sorted_vars(&work.varmap);
        // A copy: on the CPU `to_device` shares the variable's storage, which the steps change.
        let on_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.copy();
        let initial = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), on_cpu(v.as_tensor())?)))
            .collect::<Result<_>>()?;
        let logits = work.net.forward_t(&work.batch.inputs, true)?;
        let loss = cross_entropy(&logits, &work.batch.targets, 0.)?;
        let store = loss.backward()?;
        // BatchNorm running statistics have no gradient.
        let grads = vars
            .iter()
            .filter_map(|(n, v)| {
                store
                    .get(v.as_tensor())
                    .map(|g| Ok((n.clone(), on_cpu(g)?)))
            })
            .collect::<Result<_>>()?;
        let mut trainer = work.trainer();
        let losses = (0..3)
            .map(|_| Ok(trainer.train_step(&work.batch)?.0))
            .collect::<Result<_>>()?;
        let after = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), on_cpu(v.as_tensor())?)))
            .collect::<Result<_>>()?;
        Ok(TrainRun {
            initial,
            logits: on_cpu(&logits)?,
            loss: on_cpu(&loss)?,
            grads,
            losses,
            after,
        })
    }
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// ResNet-18 and ResNet-50 logits at batch 2 (224x224), unfolded and with BatchNorm folded.
fn infer_parity(gpu: &Device, p: &mut Parity) -> Result<()> {
    for arch in ["resnet18", "resnet50"] {
        let (cpu_net, cfg) = inference_net_on(arch, &Device::Cpu);
        let (gpu_net, _) = inference_net_on(arch, gpu);
        let x = RngHandle::seed_from_u64(1).normal_tensor(
            (2, cfg.in_channels, 224, 224),
            0.,
            1.,
            DType::F32,
            &Device::Cpu,
        )?;
        let xg = x.to_device(gpu)?;
        let group = format!("{arch} inference logits");
        p.compare(
            &group,
            "unfolded",
            &cpu_net.forward_t(&x, false)?,
            &gpu_net.forward_t(&xg, false)?,
        )?;
        p.compare(
            &group,
            "folded",
            &cpu_net.folded()?.forward_t(&x, false)?,
            &gpu_net.folded()?.forward_t(&xg, false)?,
        )?;
        p.report(&group);
    }
    Ok(())
}

/// The benchmark rows on the GPU.
struct Rows {
    gpu: Device,
    /// The rows' id prefix: `cuda`, `metal` or `cpu`.
    prefix: &'static str,
    min_time: f64,
    times: BTreeMap<String, f64>,
}

impl Rows {
    fn new(gpu: Device, min_time: f64) -> Rows {
        let prefix = match &gpu {
            Device::Cuda(_) => "cuda",
            Device::Metal(_) => "metal",
            Device::Cpu => "cpu",
        };
        Rows {
            gpu,
            prefix,
            min_time,
            times: BTreeMap::new(),
        }
    }

    /// Mean seconds per call of `f` (synchronised), as `measure` in torch_bench.py.
    fn time(&mut self, id: &str, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        let id = format!("{}/{id}", self.prefix);
        for _ in 0..2 {
            f()?;
            self.gpu.synchronize()?;
        }
        let start = Instant::now();
        let mut n = 0u32;
        while n < 5 || start.elapsed().as_secs_f64() < self.min_time {
            f()?;
            self.gpu.synchronize()?;
            n += 1;
        }
        let t = start.elapsed().as_secs_f64() / f64::from(n);
        println!("ours {id}: {:.3} ms", t * 1e3);
        self.times.insert(id, t);
        Ok(())
    }

    fn randn(&self, shape: &[usize], std: f64) -> Result<Tensor> {
        Ok(
            RngHandle::seed_from_u64(shape.iter().product::<usize>() as u64).normal_tensor(
                shape,
                0.,
                std,
                DType::F32,
                &self.gpu,
            )?,
        )
    }

    fn run_all(&mut self) -> Result<()> {
        self.kernels()?;
        self.blocks()?;
        self.networks()
    }

    /// GEMM, the 3x3 convolutions and BatchNorm + ReLU (as benches/benches/kernels.rs).
    fn kernels(&mut self) -> Result<()> {
        for n in [1024usize, 4096] {
            let a = self.randn(&[n, n], 1.)?;
            self.time(&format!("gemm/f32_{n}"), || {
                a.matmul(&a)?;
                Ok(())
            })?;
        }
        for (name, n, ci, co, hw, s) in [
            ("c16_32x32_bs128", 128, 16, 16, 32, 1),
            ("c64_56x56_bs8", 8, 64, 64, 56, 1),
            ("c128_56x56_s2_bs8", 8, 64, 128, 56, 2),
            ("c256_14x14_bs8", 8, 256, 256, 14, 1),
        ] {
            let x = Var::from_tensor(&self.randn(&[n, ci, hw, hw], 1.)?)?;
            let w = Var::from_tensor(&self.randn(&[co, ci, 3, 3], 0.1)?)?;
            let (xp, wp) = (x.as_tensor().detach(), w.as_tensor().detach());
            self.time(&format!("conv3x3/{name}/fwd"), || {
                conv2d(&xp, &wp, 1, s, 1, 1)?;
                Ok(())
            })?;
            let out = (hw - 1) / s + 1;
            let r = self.randn(&[n, co, out, out], 1.)?;
            self.time(&format!("conv3x3/{name}/bwd_data_and_weight"), || {
                conv2d_backward(x.as_tensor(), w.as_tensor(), &r, 1, s, 1, 1)?;
                Ok(())
            })?;
        }
        for (name, n, ch, hw) in [
            ("c16_32x32_bs128", 128, 16, 32),
            ("c64_56x56_bs8", 8, 64, 56),
        ] {
            let x = Var::from_tensor(&self.randn(&[n, ch, hw, hw], 1.)?)?;
            let g = Var::from_tensor(&Tensor::ones(ch, DType::F32, &self.gpu)?)?;
            let b = Var::from_tensor(&Tensor::zeros(ch, DType::F32, &self.gpu)?)?;
            let r = self.randn(&[n, ch, hw, hw], 1.)?;
            self.time(&format!("batch_norm_relu/{name}/train_fwd_bwd"), || {
                let (y, _) =
                    batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, true)?;
                backward_from(&y, &r)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The residual MLP block and the article's CNN block (as benches/benches/residual.rs).
    fn blocks(&mut self) -> Result<()> {
        let gpu = self.gpu.clone();
        let rng = RngHandle::seed_from_u64(0);
        let varmap = VarMap::new();
        let cfg = MlpBlockConfig {
            hidden: Some(1024),
            activation: Activation::Gelu,
            layer_norm: true,
            ..Default::default()
        };
        let block = mlp_block(
            256,
            256,
            cfg,
            &rng,
            seeded_var_builder(&varmap, &rng, DType::F32, &gpu),
        )?;
        let x = rng.normal_tensor((128, 256), 0., 1., DType::F32, &gpu)?;
        self.time("residual_mlp_block/fwd_bwd/w256_h1024_bs128", || {
            block.forward_t(&x, true)?.sqr()?.mean_all()?.backward()?;
            Ok(())
        })?;
        let varmap = VarMap::new();
        let cfg = BasicBlockConfig {
            stride: 2,
            ..Default::default()
        };
        let block = basic_block(
            16,
            32,
            cfg,
            &rng,
            seeded_var_builder(&varmap, &rng, DType::F32, &gpu),
        )?;
        let x = rng.uniform_tensor((32, 16, 32, 32), 0., 1., DType::F32, &gpu)?;
        self.time("basic_block_16_32_s2/fwd_bwd/bs32_32x32", || {
            block.forward_t(&x, true)?.sqr()?.mean_all()?.backward()?;
            Ok(())
        })
    }

    /// ResNet-18/50 inference and the training steps (as benches/benches/resnet.rs).
    fn networks(&mut self) -> Result<()> {
        let gpu = self.gpu.clone();
        for arch in ["resnet18", "resnet50"] {
            let (net, cfg) = inference_net_on(arch, &gpu);
            let folded = net.folded()?;
            for bs in [1usize, 8] {
                let x = RngHandle::seed_from_u64(1).normal_tensor(
                    (bs, cfg.in_channels, 224, 224),
                    0.,
                    1.,
                    DType::F32,
                    &gpu,
                )?;
                for (suffix, model) in [("", &net), ("_folded", &folded)] {
                    self.time(&format!("{arch}/infer/bs{bs}{suffix}"), || {
                        model.forward_t(&x, false)?;
                        Ok(())
                    })?;
                }
            }
        }
        for (arch, batch, size) in [
            ("resnet20", 128, 32),
            ("resnet56", 128, 32),
            ("resnet50", 32, 224),
        ] {
            let work = TrainWorkload::new_on(arch, batch, size, &gpu);
            let mut trainer = work.trainer();
            self.time(&format!("{arch}/train_step/bs{batch}"), || {
                trainer.train_step(&work.batch)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The rows as a table, with PyTorch's times from `torch` (torch_bench.py's JSON) where
    /// given: ratio = PyTorch's time / ours (above 1: we are faster).
    fn print(&self, torch: Option<&str>) -> Result<()> {
        let torch: BTreeMap<String, serde_json::Value> = match torch {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
                serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))?
            }
            None => BTreeMap::new(),
        };
        println!("| row | ours (ms) | PyTorch (ms) | ratio |");
        println!("|---|---|---|---|");
        for (id, &t) in &self.times {
            match torch.get(id).and_then(serde_json::Value::as_f64) {
                Some(pt) => println!(
                    "| {id} | {:.3} | {:.3} | {:.2}x |",
                    t * 1e3,
                    pt * 1e3,
                    pt / t
                ),
                None => println!("| {id} | {:.3} | - | - |", t * 1e3),
            }
        }
        Ok(())
    }
}
