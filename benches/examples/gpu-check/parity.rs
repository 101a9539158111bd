//! The CPU-vs-device parity comparisons of the GPU check (see `main.rs`).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use resblock_benches::{inference_net_on, TrainWorkload};
use resblock_core::ops::{set_kernels, Kernels};
use resblock_core::RngHandle;
use resblock_train::loss::cross_entropy;

/// The largest relative difference a parity comparison may show.
const TOLERANCE: f64 = 1e-3;

/// The parity comparisons: the worst relative difference per group, and what failed.
#[derive(Default)]
pub(crate) struct Parity {
    pub(crate) worst: BTreeMap<String, f64>,
    pub(crate) failed: Vec<String>,
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
pub(crate) fn train_parity(gpu: &Device, p: &mut Parity) -> Result<()> {
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
pub(crate) fn infer_parity(gpu: &Device, p: &mut Parity) -> Result<()> {
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
