//! The flags that choose a model, shared by `predict`, `evaluate` and `export`:
//! `--model M` (a model file from `train`, or any weight file with `--arch`),
//! `--arch A --weights W` (torchvision weights; ImageNet class names and statistics for
//! 1000-class nets) or `--pretrained NAME` (torchvision's, downloaded and cached).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use resblock_vision::pretrained::{cache_dir, fetch_pretrained, Pretrained};
use resblock_vision::{load_model, LoadedModel};

/// Which model to use.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model file (`model.safetensors` from `train`; metadata gives the architecture,
    /// classes and preprocessing). Weight files without metadata need --arch.
    #[arg(long, conflicts_with_all = ["weights", "pretrained"])]
    pub model: Option<PathBuf>,
    /// Weight file (.pth or .safetensors, torchvision names); needs --arch when it has no
    /// metadata.
    #[arg(long, conflicts_with = "pretrained")]
    pub weights: Option<PathBuf>,
    /// Architecture of a weight file without metadata (resnet50, resnet20, ...).
    #[arg(long)]
    pub arch: Option<String>,
    /// torchvision's ImageNet weights by name (resnet50, resnet50.IMAGENET1K_V2, ...),
    /// downloaded once into the cache ($RESBLOCK_CACHE_DIR/weights).
    #[arg(long)]
    pub pretrained: Option<String>,
    /// Classes of a weight file without metadata (checked against its `fc.weight`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub num_classes: Option<u64>,
}

impl ModelArgs {
    /// The model file these flags name (downloading `--pretrained` weights if needed).
    ///
    /// # Errors
    /// No model flag, or a failed download.
    pub fn path(&self) -> Result<PathBuf> {
        if let Some(name) = &self.pretrained {
            let p = Pretrained::by_name(name)?;
            let mirror = std::env::var("RESBLOCK_WEIGHTS_MIRROR").ok();
            return fetch_pretrained(&p, &cache_dir(), mirror.as_deref())
                .with_context(|| format!("--pretrained {name}"));
        }
        match (&self.model, &self.weights) {
            (Some(p), _) | (None, Some(p)) => Ok(p.clone()),
            (None, None) => {
                bail!("name a model: --model FILE, --arch A --weights FILE, or --pretrained NAME")
            }
        }
    }

    /// Loads the model for inference; says on stderr when its metadata had to be assumed.
    ///
    /// # Errors
    /// As [`ModelArgs::path`] and [`load_model`].
    pub fn load(&self, device: &Device) -> Result<LoadedModel> {
        let path = self.path()?;
        let m = load_model(&path, self.arch.as_deref(), device)?;
        if let Some(n) = self.num_classes {
            if n as usize != m.meta.num_classes {
                bail!(
                    "{}: --num-classes {n} but the weights have {} classes",
                    path.display(),
                    m.meta.num_classes
                );
            }
        }
        if m.assumed && m.meta.dataset.as_deref() == Some("imagenet") {
            eprintln!(
                "{}: no resblock metadata; assuming torchvision's ImageNet classes and preprocessing (resize 256, crop 224)",
                path.display()
            );
        } else if m.assumed {
            eprintln!(
                "{}: no resblock metadata; assuming {} classes named by index, {}x{} inputs, mean {:?}, std {:?}",
                path.display(),
                m.meta.num_classes,
                m.meta.image_size[0],
                m.meta.image_size[1],
                m.meta.mean,
                m.meta.std
            );
        }
        Ok(m)
    }
}

/// Where inference runs: `--device` and `--threads` (call [`RuntimeArgs::start`] first).
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Device: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` or `auto`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: Option<u64>,
}

impl RuntimeArgs {
    /// Configures the CPU threads and returns the device.
    ///
    /// # Errors
    /// An unknown or unavailable device.
    pub fn start(&self) -> Result<Device> {
        crate::start_threads(self.threads);
        Ok(resblock_core::parse_device(&self.device)?)
    }
}
