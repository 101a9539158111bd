//! The benchmark rows of the GPU check, timed on the device (see `main.rs`).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use resblock_benches::{inference_net_on, TrainWorkload};
use resblock_core::ops::{batch_norm_train, conv2d, conv2d_backward};
use resblock_core::{
    backward_from, mlp_block, seeded_var_builder, Activation, MlpBlockConfig, RngHandle,
};
use resblock_vision::{basic_block, BasicBlockConfig};

/// The benchmark rows on the GPU.
pub(crate) struct Rows {
    gpu: Device,
    /// The rows' id prefix: `cuda`, `metal` or `cpu`.
    prefix: &'static str,
    min_time: f64,
    pub(crate) times: BTreeMap<String, f64>,
}

impl Rows {
    pub(crate) fn new(gpu: Device, min_time: f64) -> Rows {
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

    pub(crate) fn run_all(&mut self) -> Result<()> {
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
    pub(crate) fn print(&self, torch: Option<&str>) -> Result<()> {
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
