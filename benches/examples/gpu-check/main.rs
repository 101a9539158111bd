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
//! - `--out FILE` writes `{"parity": {group: worst}, "failed": [...], "rows": {id: seconds}}`
//!   as JSON.
//!
//! What it measured on an H200 is in docs/benchmarks.md ("GPU"). `parity.rs` holds the
//! comparisons, `rows.rs` the timed rows.

mod parity;
mod rows;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use resblock_core::configure_threads_here;

use parity::{infer_parity, train_parity, Parity};
use rows::Rows;

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
    configure_threads_here(None);
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
